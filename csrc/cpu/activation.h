// Activation names of the fused CPU kernels; codes match the Python names: "none", "relu", "gelu" (exact erf form), "silu", "tanh", "sigmoid".
#pragma once

#include <c10/util/Exception.h>

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
  TORCH_CHECK(false, "activation must be one of none, relu, gelu, silu, tanh, sigmoid; got ", name);
}

}  // namespace mmfuse
