// Activation names of the fused CPU kernels; codes match the Python names: "none", "relu", "gelu" (exact erf form), "silu", "tanh", "sigmoid".
// Header-only and torch-free: the stable-ABI CPU kernels and the CUDA launchers both include it.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace mmfuse {

enum class Activation { kNone, kRelu, kGelu, kSilu, kTanh, kSigmoid };

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu") return Activation::kSilu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "sigmoid") return Activation::kSigmoid;
  // std::runtime_error: Python's RuntimeError with exactly this message, as TORCH_CHECK gave
  throw std::runtime_error("activation must be one of none, relu, gelu, silu, tanh, sigmoid; got " + std::string(name));
}

}  // namespace mmfuse
