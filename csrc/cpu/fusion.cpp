// CPU kernels for the multimodal fusion ops:
//   fused_concat_linear: act(sum_i x_i @ W_i^T + b), W_i the column block of W for input i, so
//     the concatenation cat(x_1..x_M) is never built. Rows are processed in blocks in parallel;
//     per block the GEMMs accumulate into one buffer and the bias/activation epilogue runs
//     while it is in cache. Accumulation in fp32 (fp64 for double).
//   combine_modalities: the elementwise modes sum / product / gated in one pass over the
//     projected tensors, forward and backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "activation.h"

namespace mmfuse {
namespace {

constexpr int64_t kRowBlock = 128;    // rows of x per task of the forward GEMM
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
  const std::optional<at::Tensor> b = bias ? std::optional<at::Tensor>(bias->to(acc)) : std::nullopt;
  at::Tensor out = at::empty({n, out_features}, xs[0].options());
  at::Tensor preact = act == Activation::kNone ? at::empty({0}, xs[0].options())
                                               : at::empty({n, out_features}, xs[0].options());
  const bool direct = dtype == acc;  // accumulate straight into the output buffers

  at::parallel_for(0, (n + kRowBlock - 1) / kRowBlock, 1, [&](int64_t blk0, int64_t blk1) {
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, n - r0);
      at::Tensor sum = direct ? (act == Activation::kNone ? out : preact).narrow(0, r0, rows)
                              : at::empty({rows, out_features}, xs[0].options().dtype(acc));
      int64_t col = 0;
      for (size_t i = 0; i < xs.size(); ++i) {
        const at::Tensor x = xs[i].narrow(0, r0, rows).to(acc);
        const at::Tensor wi = w.narrow(1, col, xs[i].size(1)).t();
        if (i == 0 && b) {
          at::addmm_out(sum, b->expand({rows, out_features}), x, wi);
        } else if (i == 0) {
          at::mm_out(sum, x, wi);
        } else {
          sum.addmm_(x, wi);
        }
        col += xs[i].size(1);
      }
      if (act == Activation::kNone && direct) continue;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_concat_linear_epilogue", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t* s = sum.data_ptr<acc_t>();
        scalar_t* o = out.data_ptr<scalar_t>() + r0 * out_features;
        scalar_t* p = act == Activation::kNone ? nullptr : preact.data_ptr<scalar_t>() + r0 * out_features;
        for (int64_t e = 0; e < rows * out_features; ++e) {
          // the activation sees the pre-activation as stored, as the unfused composition does
          const acc_t z = static_cast<acc_t>(static_cast<scalar_t>(s[e]));
          if (p) p[e] = static_cast<scalar_t>(z);
          o[e] = static_cast<scalar_t>(activate(act, z));
        }
      });
    }
  });
  return {out, preact};
}

// g = grad_out * act'(preact), in the accumulation type.
at::Tensor activation_backward(const at::Tensor& grad_out, const at::Tensor& preact, Activation act) {
  const auto acc = acc_type(grad_out.scalar_type());
  at::Tensor grad = grad_out.contiguous().to(acc).clone();
  if (act == Activation::kNone) return grad;
  const at::Tensor z = preact.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "activation_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* g = grad.data_ptr<acc_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), kChunk, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) g[e] *= activate_grad(act, static_cast<acc_t>(zp[e]));
    });
  });
  return grad;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fused_concat_linear_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& weight, const at::Tensor& preact,
    c10::string_view activation, bool has_bias) {
  check_inputs(xs, "fused_concat_linear_bwd");
  const Activation act = parse_activation(activation);
  const auto dtype = xs[0].scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor g = activation_backward(grad_out, preact, act);  // (N, out)
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

template <typename A>
inline A sigmoid(A x) { return A(1) / (A(1) + std::exp(-x)); }

std::tuple<at::Tensor, at::Tensor> combine_modalities_cpu(const std::vector<at::Tensor>& projected,
                                                          c10::string_view mode_name,
                                                          const std::optional<at::Tensor>& weights,
                                                          const std::vector<at::Tensor>& gate_logits,
                                                          c10::string_view activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  at::Tensor out = at::empty_like(first);
  at::Tensor preact = act == Activation::kNone ? at::empty({0}, first.options()) : at::empty_like(first);
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
    scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* pre = act == Activation::kNone ? nullptr : preact.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kChunk, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        acc_t y = mode == Mode::kProduct ? acc_t(1) : acc_t(0);
        for (int64_t m = 0; m < num; ++m) {
          const acc_t pm = static_cast<acc_t>(p[m][e]);
          if (mode == Mode::kSum) y += w[m] * pm;
          else if (mode == Mode::kProduct) y *= pm;
          else y += sigmoid(static_cast<acc_t>(z[m][e])) * pm;
        }
        const acc_t zq = static_cast<acc_t>(static_cast<scalar_t>(y));
        if (pre) pre[e] = static_cast<scalar_t>(zq);
        o[e] = static_cast<scalar_t>(activate(act, zq));
      }
    });
  });
  return {out, preact};
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
  const at::Tensor g = activation_backward(grad_out, preact, act);
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
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t e = c * kChunk; e < std::min(numel, (c + 1) * kChunk); ++e) {
          const acc_t ge = gptr[e];
          for (int64_t m = 0; m < num; ++m) {
            const acc_t pm = static_cast<acc_t>(p[m][e]);
            if (mode == Mode::kSum) {
              gp[m][e] = static_cast<scalar_t>(ge * w[m]);
              part[c * num + m] += static_cast<double>(ge * pm);
            } else if (mode == Mode::kProduct) {
              acc_t others = acc_t(1);  // product of the other modalities: exact when some p_j == 0
              for (int64_t j = 0; j < num; ++j)
                if (j != m) others *= static_cast<acc_t>(p[j][e]);
              gp[m][e] = static_cast<scalar_t>(ge * others);
            } else {
              const acc_t s = sigmoid(static_cast<acc_t>(z[m][e]));
              gp[m][e] = static_cast<scalar_t>(ge * s);
              gz[m][e] = static_cast<scalar_t>(ge * pm * s * (acc_t(1) - s));
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
