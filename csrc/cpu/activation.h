// Activations shared by the fused CPU kernels, in the accumulation type (float or double).
// Codes match the Python names: "none", "relu", "gelu" (exact erf form), "silu", "tanh", "sigmoid".
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
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

template <typename T>
inline T activate(Activation a, T x) {
  switch (a) {
    case Activation::kNone: return x;
    case Activation::kRelu: return x > T(0) ? x : T(0);
    case Activation::kGelu: return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
    case Activation::kSilu: return x / (T(1) + std::exp(-x));
    case Activation::kTanh: return std::tanh(x);
    case Activation::kSigmoid: return T(1) / (T(1) + std::exp(-x));
  }
  return x;
}

// d activate(x) / dx at the pre-activation x.
template <typename T>
inline T activate_grad(Activation a, T x) {
  switch (a) {
    case Activation::kNone: return T(1);
    case Activation::kRelu: return x > T(0) ? T(1) : T(0);
    case Activation::kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * x * x) * T(0.3989422804014327);  // 1/sqrt(2*pi)
      return cdf + x * pdf;
    }
    case Activation::kSilu: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) + x * (T(1) - s));
    }
    case Activation::kTanh: {
      const T t = std::tanh(x);
      return T(1) - t * t;
    }
    case Activation::kSigmoid: {
      const T s = T(1) / (T(1) + std::exp(-x));
      return s * (T(1) - s);
    }
  }
  return T(1);
}

}  // namespace mmfuse
