// CPU kernels for the multimodal fusion ops:
//   fused_concat_linear: act(sum_i x_i @ W_i^T + b), W_i the column block of W for input i, so
//     the concatenation cat(x_1..x_M) is never built. Accumulation in fp32 (fp64 for double).
//   combine_modalities: the elementwise modes sum / product / gated in one pass over the
//     projected tensors, forward and backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "activation.h"

namespace mmfuse {
namespace {

constexpr int64_t kChunk = 4096;      // elements per task of the elementwise kernels

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const std::vector<at::Tensor>& xs, const char* what) {
  TORCH_CHECK(!xs.empty(), what, ": needs at least one input");
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2 && x.size(0) == xs[0].size(0) &&
                    x.scalar_type() == xs[0].scalar_type(),
                what, ": inputs must be contiguous CPU (N, D_i) tensors of one dtype, got ", x.sizes());
  }
}

// ---- fused_concat_linear -------------------------------------------------------------------

// The activation through ATen's vectorised CPU kernels (Sleef transcendental functions).
at::Tensor apply_activation(const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kNone: return z;
    case Activation::kRelu: return at::relu(z);
    case Activation::kGelu: return at::gelu(z);
    case Activation::kSilu: return at::silu(z);
    case Activation::kTanh: return at::tanh(z);
    case Activation::kSigmoid: return at::sigmoid(z);
  }
  return z;
}

// grad_out * act'(z) for the pre-activation z, through ATen's vectorised backward kernels.
at::Tensor activation_backward(const at::Tensor& grad_out, const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::kNone: return grad_out;
    case Activation::kRelu: return at::threshold_backward(grad_out, z, 0);
    case Activation::kGelu: return at::gelu_backward(grad_out, z);
    case Activation::kSilu: return at::silu_backward(grad_out, z);
    case Activation::kTanh: return at::tanh_backward(grad_out, at::tanh(z));
    case Activation::kSigmoid: return at::sigmoid_backward(grad_out, at::sigmoid(z));
  }
  return grad_out;
}

// Forward: one GEMM per input into the same accumulator (ATen's blocked, multithreaded GEMM
// reads W_i as a strided column block, so no copy of x or W is made), then the activation.
// Measured here (2 threads, N=4096, D=(768,512,256), out=1024, fp32): as fast as cat + linear,
// which pays the same GEMM plus the concatenated copy. Half inputs accumulate in fp32 and
// round once, as a single GEMM on the concatenation would.
std::tuple<at::Tensor, at::Tensor> fused_concat_linear_cpu(const std::vector<at::Tensor>& xs,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           c10::string_view activation) {
  check_inputs(xs, "fused_concat_linear");
  const Activation act = parse_activation(activation);
  const int64_t n = xs[0].size(0), out_features = weight.size(0);
  int64_t width = 0;
  for (const auto& x : xs) width += x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == width, "fused_concat_linear: weight must be (out, ", width,
              "), got ", weight.sizes());
  const auto dtype = xs[0].scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor w = weight.to(acc);  // no copy for fp32/fp64
  at::Tensor sum = at::empty({n, out_features}, xs[0].options().dtype(acc));
  if (bias) {
    sum.copy_(bias->to(acc).expand({n, out_features}));
  } else {
    sum.zero_();
  }
  int64_t col = 0;
  for (const auto& x : xs) {
    sum.addmm_(x.to(acc), w.narrow(1, col, x.size(1)).t());
    col += x.size(1);
  }
  const at::Tensor preact = sum.to(dtype);
  return {apply_activation(preact, act), act == Activation::kNone ? at::empty({0}, xs[0].options()) : preact};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fused_concat_linear_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& weight, const at::Tensor& preact,
    c10::string_view activation, bool has_bias) {
  check_inputs(xs, "fused_concat_linear_bwd");
  const Activation act = parse_activation(activation);
  const auto dtype = xs[0].scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor g = activation_backward(grad_out, preact, act).to(acc);  // (N, out)
  const at::Tensor w = weight.to(acc);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options().dtype(acc));
  std::vector<at::Tensor> grad_xs;
  int64_t col = 0;
  for (const auto& x : xs) {
    const int64_t d = x.size(1);
    grad_xs.push_back(at::mm(g, w.narrow(1, col, d)).to(dtype));
    grad_weight.narrow(1, col, d).copy_(at::mm(g.t(), x.to(acc)));
    col += d;
  }
  at::Tensor grad_bias = has_bias ? g.sum(0).to(dtype) : at::empty({0}, weight.options());
  return {grad_xs, grad_weight.to(weight.scalar_type()), grad_bias};
}

// ---- combine_modalities ----------------------------------------------------------------------

enum class Mode { kSum, kProduct, kGated };

Mode parse_mode(c10::string_view mode) {
  if (mode == "sum") return Mode::kSum;
  if (mode == "product") return Mode::kProduct;
  if (mode == "gated") return Mode::kGated;
  TORCH_CHECK(false, "combine_modalities: mode must be sum, product or gated, got ", std::string(mode));
}

void check_combine(const std::vector<at::Tensor>& projected, Mode mode, const std::optional<at::Tensor>& weights,
                   const std::vector<at::Tensor>& gate_logits) {
  TORCH_CHECK(!projected.empty(), "combine_modalities: needs at least one projected tensor");
  for (const auto& p : projected)
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.sizes() == projected[0].sizes() &&
                    p.scalar_type() == projected[0].scalar_type(),
                "combine_modalities: projected tensors must be contiguous CPU tensors of one shape and dtype");
  if (mode == Mode::kSum)
    TORCH_CHECK(weights && weights->numel() == static_cast<int64_t>(projected.size()),
                "combine_modalities: mode sum needs weights of shape (M,)");
  if (mode == Mode::kGated) {
    TORCH_CHECK(gate_logits.size() == projected.size(), "combine_modalities: mode gated needs M gate_logits");
    for (const auto& g : gate_logits)
      TORCH_CHECK(g.is_contiguous() && g.sizes() == projected[0].sizes() && g.scalar_type() == projected[0].scalar_type(),
                  "combine_modalities: gate_logits must be contiguous and shaped like projected");
  }
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> ptrs;
  for (const auto& t : ts) ptrs.push_back(t.data_ptr<T>());
  return ptrs;
}

constexpr int64_t kTile = 256;  // elements per inner step: the per-tile loops vectorise

// out[i] = sigmoid(in[i]) on at::vec vectors (Sleef exp); in and out may alias.
template <typename A>
void sigmoid_tile(const A* in, A* out, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  const Vec one(A(1));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x = Vec::loadu(in + i);
    (one / (one + x.neg().exp())).store(out + i);
  }
  for (; i < n; ++i) out[i] = A(1) / (A(1) + std::exp(-in[i]));
}

template <typename A, typename S>
void load_tile(const S* in, A* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(in[i]);
}

// Forward: the combination in one pass over the M inputs, tile by tile so that the per-tile
// loops vectorise, then the activation through ATen.
std::tuple<at::Tensor, at::Tensor> combine_modalities_cpu(const std::vector<at::Tensor>& projected,
                                                          c10::string_view mode_name,
                                                          const std::optional<at::Tensor>& weights,
                                                          const std::vector<at::Tensor>& gate_logits,
                                                          c10::string_view activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  at::Tensor preact = at::empty_like(first);
  const int64_t numel = first.numel(), num = static_cast<int64_t>(projected.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "combine_modalities_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = pointers<scalar_t>(projected);
    const auto z = pointers<scalar_t>(gate_logits);
    std::vector<acc_t> w(num, acc_t(0));
    if (mode == Mode::kSum) {
      const at::Tensor wc = weights->to(acc_type(first.scalar_type())).contiguous();
      for (int64_t m = 0; m < num; ++m) w[m] = wc.data_ptr<acc_t>()[m];
    }
    scalar_t* out = preact.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kChunk, [&](int64_t e0, int64_t e1) {
      acc_t y[kTile], s[kTile];
      for (int64_t t0 = e0; t0 < e1; t0 += kTile) {
        const int64_t len = std::min(kTile, e1 - t0);
        const acc_t init = mode == Mode::kProduct ? acc_t(1) : acc_t(0);
        for (int64_t i = 0; i < len; ++i) y[i] = init;
        for (int64_t m = 0; m < num; ++m) {
          const scalar_t* pm = p[m] + t0;
          if (mode == Mode::kSum) {
            for (int64_t i = 0; i < len; ++i) y[i] += w[m] * static_cast<acc_t>(pm[i]);
          } else if (mode == Mode::kProduct) {
            for (int64_t i = 0; i < len; ++i) y[i] *= static_cast<acc_t>(pm[i]);
          } else {
            load_tile(z[m] + t0, s, len);
            sigmoid_tile(s, s, len);
            for (int64_t i = 0; i < len; ++i) y[i] += s[i] * static_cast<acc_t>(pm[i]);
          }
        }
        for (int64_t i = 0; i < len; ++i) out[t0 + i] = static_cast<scalar_t>(y[i]);
      }
    });
  });
  return {apply_activation(preact, act), act == Activation::kNone ? at::empty({0}, first.options()) : preact};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> combine_modalities_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& projected, c10::string_view mode_name,
    const std::optional<at::Tensor>& weights, const std::vector<at::Tensor>& gate_logits, const at::Tensor& preact,
    c10::string_view activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  const auto acc = acc_type(first.scalar_type());
  const at::Tensor g = activation_backward(grad_out, preact, act).to(acc).contiguous();
  const int64_t numel = first.numel(), num = static_cast<int64_t>(projected.size());
  std::vector<at::Tensor> grad_p, grad_z;
  for (int64_t m = 0; m < num; ++m) grad_p.push_back(at::empty_like(first));
  if (mode == Mode::kGated)
    for (int64_t m = 0; m < num; ++m) grad_z.push_back(at::empty_like(first));
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  // per-chunk partial sums of g * p_m in double, reduced in chunk order: accurate, and
  // deterministic for any thread count
  at::Tensor partial = at::zeros({mode == Mode::kSum ? chunks : 0, num}, first.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "combine_modalities_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = pointers<scalar_t>(projected);
    const auto z = pointers<scalar_t>(gate_logits);
    std::vector<scalar_t*> gp, gz;
    for (auto& t : grad_p) gp.push_back(t.data_ptr<scalar_t>());
    for (auto& t : grad_z) gz.push_back(t.data_ptr<scalar_t>());
    std::vector<acc_t> w(num, acc_t(0));
    if (mode == Mode::kSum) {
      const at::Tensor wc = weights->to(acc).contiguous();
      for (int64_t m = 0; m < num; ++m) w[m] = wc.data_ptr<acc_t>()[m];
    }
    const acc_t* gptr = g.data_ptr<acc_t>();
    double* part = mode == Mode::kSum ? partial.data_ptr<double>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      acc_t a[kTile], b[kTile];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(numel, (c + 1) * kChunk);
        for (int64_t t0 = c * kChunk; t0 < end; t0 += kTile) {
          const int64_t len = std::min(kTile, end - t0);
          const acc_t* ge = gptr + t0;
          for (int64_t m = 0; m < num; ++m) {
            scalar_t* gpm = gp[m] + t0;
            if (mode == Mode::kSum) {
              acc_t dot = acc_t(0);
              for (int64_t i = 0; i < len; ++i) {
                gpm[i] = static_cast<scalar_t>(ge[i] * w[m]);
                dot += ge[i] * static_cast<acc_t>(p[m][t0 + i]);
              }
              part[c * num + m] += static_cast<double>(dot);
            } else if (mode == Mode::kProduct) {
              // product of the other modalities, not out / p_m: exact when some p_j == 0
              for (int64_t i = 0; i < len; ++i) a[i] = ge[i];
              for (int64_t j = 0; j < num; ++j) {
                if (j == m) continue;
                for (int64_t i = 0; i < len; ++i) a[i] *= static_cast<acc_t>(p[j][t0 + i]);
              }
              for (int64_t i = 0; i < len; ++i) gpm[i] = static_cast<scalar_t>(a[i]);
            } else {
              load_tile(z[m] + t0, a, len);
              sigmoid_tile(a, a, len);
              load_tile(p[m] + t0, b, len);
              scalar_t* gzm = gz[m] + t0;
              for (int64_t i = 0; i < len; ++i) {
                gpm[i] = static_cast<scalar_t>(ge[i] * a[i]);
                gzm[i] = static_cast<scalar_t>(ge[i] * b[i] * a[i] * (acc_t(1) - a[i]));
              }
            }
          }
        }
      }
    });
  });
  at::Tensor grad_w = mode == Mode::kSum ? partial.sum(0).to(weights->scalar_type()) : at::empty({0}, first.options());
  return {grad_p, grad_w, grad_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CPU, m) {
  m.impl("fused_concat_linear", &fused_concat_linear_cpu);
  m.impl("fused_concat_linear_bwd", &fused_concat_linear_bwd_cpu);
  m.impl("combine_modalities", &combine_modalities_cpu);
  m.impl("combine_modalities_bwd", &combine_modalities_bwd_cpu);
}

}  // namespace mmfuse
