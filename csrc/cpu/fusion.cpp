// CPU kernels for the multimodal fusion ops:
//   fused_concat_linear: act(sum_i x_i @ W_i^T + b), W_i the column block of W for input i, so
//     the concatenation cat(x_1..x_M) is never built. Accumulation in fp32 (fp64 for double).
//   combine_modalities: the elementwise modes sum / product / gated in one pass over the
//     projected tensors, forward and backward, the activation fused; the backward recomputes
//     the pre-activation instead of reading a stored one.
//
// LibTorch stable ABI (csrc/stable.h): the GEMMs and activations go to torch's kernels through
// the dispatcher's boxed call, except addmm (its beta/alpha are Scalars, which a StableIValue
// cannot carry), which goes through the generated C shim aoti_torch_cpu_addmm_out.
#include "../stable.h"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "vec.h"

namespace mmfuse {
namespace {

constexpr int64_t kChunk = 4096;      // elements per task of the elementwise kernels

ScalarType acc_type(ScalarType t) { return t == dtype::kDouble ? dtype::kDouble : dtype::kFloat; }

void check_inputs(const std::vector<Tensor>& xs, const char* what) {
  MMFUSE_CHECK(!xs.empty(), what, ": needs at least one input");
  for (const auto& x : xs) {
    MMFUSE_CHECK(x.is_cpu() && x.is_contiguous() && x.dim() == 2 && x.size(0) == xs[0].size(0) &&
                    x.scalar_type() == xs[0].scalar_type() && is_floating(x.scalar_type()),
                what, ": inputs must be contiguous CPU (N, D_i) tensors of one dtype, got ", shape(x));
  }
}

// ---- fused_concat_linear -------------------------------------------------------------------

void check_weight(const char* op, const std::vector<Tensor>& xs, const Tensor& weight) {
  int64_t width = 0;
  for (const auto& x : xs) width += x.size(1);
  MMFUSE_CHECK(weight.dim() == 2 && weight.size(1) == width && weight.is_cpu() &&
                  weight.scalar_type() == xs[0].scalar_type(),
              op, ": weight must be a CPU (out, ", width, ") tensor of the inputs' dtype ", xs[0].scalar_type(),
              ", got ", shape(weight), " ", weight.scalar_type());
}

// aten::addmm.out through its generated C shim: addmm's beta and alpha are Scalars, which the
// dispatcher's boxed call cannot take from a StableIValue. out may be self (addmm_).
void addmm_out(Tensor& out, const Tensor& self, const Tensor& mat1, const Tensor& mat2) {
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), self.get(), mat1.get(), mat2.get(), 1.0, 1.0));
}

Tensor mm(const Tensor& a, const Tensor& b) { return call_op("aten::mm", "", a, b); }

// The activation through ATen's vectorised CPU kernels (Sleef transcendental functions).
Tensor apply_activation(const Tensor& z, Activation act) {
  switch (act) {
    case Activation::kNone: return z;
    case Activation::kRelu: return call_op("aten::relu", "", z);
    case Activation::kGelu: return call_op("aten::gelu", "", z, std::string("none"));
    case Activation::kSilu: return call_op("aten::silu", "", z);
    case Activation::kTanh: return call_op("aten::tanh", "", z);
    case Activation::kSigmoid: return call_op("aten::sigmoid", "", z);
  }
  return z;
}

// grad_out where z > 0, else 0 (NaN z passes grad_out), in the accumulation type `acc`: what
// aten::threshold_backward(grad_out, z, 0).to(acc) gives (its Scalar threshold cannot go through
// the boxed call; selecting and rounding commute).
Tensor relu_backward(const Tensor& grad_out, const Tensor& z, ScalarType acc) {
  const Tensor g = mmfuse::contiguous(to_dtype(grad_out, acc));
  const Tensor zc = mmfuse::contiguous(z);
  Tensor out = empty_like_as(g, g.sizes(), acc);
  const int64_t numel = g.numel();
  MMFUSE_DISPATCH_FLOATING(acc, "relu_backward", [&] {
    using A = scalar_t;
    const A* gp = g.const_data_ptr<A>();
    A* op = ptr<A>(out);
    MMFUSE_DISPATCH_FLOATING_AND_HALF(zc.scalar_type(), "relu_backward", [&] {
      const scalar_t* zp = zc.const_data_ptr<scalar_t>();
      parallel_for(0, numel, 1 << 15, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) op[i] = static_cast<A>(zp[i]) <= A(0) ? A(0) : gp[i];
      });
    });
  });
  return out;
}

// grad_out * act'(z) for the pre-activation z, through ATen's vectorised backward kernels,
// in the accumulation type `acc`.
Tensor activation_backward(const Tensor& grad_out, const Tensor& z, Activation act, ScalarType acc) {
  switch (act) {
    case Activation::kNone: return to_dtype(grad_out, acc);
    case Activation::kRelu: return relu_backward(grad_out, z, acc);
    case Activation::kGelu: return to_dtype(call_op("aten::gelu_backward", "", grad_out, z, std::string("none")), acc);
    case Activation::kSilu: return to_dtype(call_op("aten::silu_backward", "", grad_out, z), acc);
    case Activation::kTanh:
      return to_dtype(call_op("aten::tanh_backward", "", grad_out, call_op("aten::tanh", "", z)), acc);
    case Activation::kSigmoid:
      return to_dtype(call_op("aten::sigmoid_backward", "", grad_out, call_op("aten::sigmoid", "", z)), acc);
  }
  return to_dtype(grad_out, acc);
}

// Forward: one GEMM per input into the same accumulator (ATen's blocked, multithreaded GEMM
// reads W_i as a strided column block, so no copy of x or W is made), then the activation.
// Measured here (2 threads, N=4096, D=(768,512,256), out=1024, fp32): as fast as cat + linear,
// which pays the same GEMM plus the concatenated copy. Half inputs accumulate in fp32 and
// round once, as a single GEMM on the concatenation would.
std::tuple<Tensor, Tensor> fused_concat_linear_cpu(const std::vector<Tensor>& xs, const Tensor& weight,
                                                   const std::optional<Tensor>& bias, const std::string& activation) {
  check_inputs(xs, "fused_concat_linear");
  const Activation act = parse_activation(activation);
  check_weight("fused_concat_linear", xs, weight);
  if (bias) {
    MMFUSE_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_cpu() &&
                    bias->scalar_type() == xs[0].scalar_type(),
                "fused_concat_linear: bias must be a CPU (out=", weight.size(0), ",) tensor of the inputs' dtype, got ",
                shape(*bias), " ", bias->scalar_type());
  }
  const auto dtype = xs[0].scalar_type();
  const auto acc = acc_type(dtype);
  Tensor w = to_dtype(weight, acc);  // no copy for fp32/fp64
  // the first GEMM starts from the bias (or writes over the uninitialised accumulator with
  // beta = 0), the others accumulate: no separate pass to broadcast the bias or zero the sum
  Tensor sum;
  int64_t col = 0;
  for (const auto& x : xs) {
    const int64_t d = x.size(1);
    const Tensor w_block = torch::stable::transpose(torch::stable::narrow(w, 1, col, d), 0, 1);
    const Tensor xa = to_dtype(x, acc);
    if (!sum.defined()) {
      if (bias) {
        sum = empty_like_as(xa, {xa.size(0), weight.size(0)}, acc);
        addmm_out(sum, to_dtype(*bias, acc), xa, w_block);
      } else {
        sum = mm(xa, w_block);
      }
    } else {
      addmm_out(sum, sum, xa, w_block);
    }
    col += d;
  }
  const Tensor preact = to_dtype(sum, dtype);
  return {apply_activation(preact, act), act == Activation::kNone ? empty_like_as(xs[0], {0}) : preact};
}

std::tuple<std::vector<Tensor>, Tensor, Tensor> fused_concat_linear_bwd_cpu(
    const Tensor& grad_out, const std::vector<Tensor>& xs, const Tensor& weight, const Tensor& preact,
    const std::string& activation, bool has_bias) {
  const char* op = "fused_concat_linear_bwd";
  check_inputs(xs, op);
  const Activation act = parse_activation(activation);
  check_weight(op, xs, weight);
  const int64_t n = xs[0].size(0), out_features = weight.size(0);
  MMFUSE_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n && grad_out.size(1) == out_features &&
                  grad_out.is_cpu() && is_floating(grad_out.scalar_type()),
              op, ": grad_out must be a CPU float (N=", n, ", out=", out_features, ") tensor, got ", shape(grad_out),
              " ", grad_out.scalar_type());
  if (act != Activation::kNone) {
    MMFUSE_CHECK(preact.sizes() == grad_out.sizes() && preact.is_cpu() &&
                    is_floating(preact.scalar_type()),
                op, ": preact must be a CPU float (N=", n, ", out=", out_features, ") tensor for activation ",
                activation, ", got ", shape(preact), " ", preact.scalar_type());
  }
  const auto dtype = xs[0].scalar_type();
  const auto acc = acc_type(dtype);
  const Tensor g = activation_backward(grad_out, preact, act, acc);  // (N, out)
  const Tensor g_t = torch::stable::transpose(g, 0, 1);
  Tensor w = to_dtype(weight, acc);
  Tensor grad_weight = empty_like_as(weight, weight.sizes(), acc);
  std::vector<Tensor> grad_xs;
  int64_t col = 0;
  for (const auto& x : xs) {
    const int64_t d = x.size(1);
    grad_xs.push_back(to_dtype(mm(g, torch::stable::narrow(w, 1, col, d)), dtype));
    // straight into the weight gradient's column block: a row-major view with leading
    // dimension `width`, which BLAS writes in place (no temporary, no copy)
    Tensor block = torch::stable::narrow(grad_weight, 1, col, d);
    call_op("aten::mm", "out", g_t, to_dtype(x, acc), block);
    col += d;
  }
  Tensor grad_bias = has_bias ? to_dtype(torch::stable::sum(g, IntArrayRef{0}), dtype) : empty_like_as(weight, {0});
  return {grad_xs, to_dtype(grad_weight, weight.scalar_type()), grad_bias};
}

// ---- combine_modalities ----------------------------------------------------------------------
//
// Memory-bound: each kernel is one pass over its tensors, tile by tile (kTile elements, in the
// accumulation type, so the loops over a tile vectorise), with the activation applied in the
// same pass. The forward writes only `out`; the backward recomputes the pre-activation from the
// inputs it reads anyway (every mode's gradient needs every p_m), so no pre-activation tensor is
// written, stored or read back. This is the traffic a fused compiler loop (torch.compile's
// Inductor) moves: inputs once, outputs once.

enum class Mode { kSum, kProduct, kGated };

Mode parse_mode(const std::string& mode) {
  if (mode == "sum") return Mode::kSum;
  if (mode == "product") return Mode::kProduct;
  if (mode == "gated") return Mode::kGated;
  MMFUSE_CHECK(false, "combine_modalities: mode must be sum, product or gated, got ", std::string(mode));
}

void check_combine(const std::vector<Tensor>& projected, Mode mode, const std::optional<Tensor>& weights,
                   const std::vector<Tensor>& gate_logits) {
  MMFUSE_CHECK(!projected.empty(), "combine_modalities: needs at least one projected tensor");
  for (const auto& p : projected)
    MMFUSE_CHECK(p.is_cpu() && p.is_contiguous() && p.sizes() == projected[0].sizes() &&
                    p.scalar_type() == projected[0].scalar_type(),
                "combine_modalities: projected tensors must be contiguous CPU tensors of one shape and dtype");
  MMFUSE_CHECK(is_floating(projected[0].scalar_type()), "combine_modalities: projected must be float, got ",
              projected[0].scalar_type());
  if (mode == Mode::kSum)
    MMFUSE_CHECK(weights && weights->dim() == 1 && weights->numel() == static_cast<int64_t>(projected.size()) &&
                    weights->is_cpu() && is_floating(weights->scalar_type()),
                "combine_modalities: mode sum needs weights, a CPU float tensor of shape (M=", projected.size(),
                ",), got ", weights ? shape(*weights) : std::string("[]"), weights ? "" : "none");
  if (mode == Mode::kGated) {
    MMFUSE_CHECK(gate_logits.size() == projected.size(), "combine_modalities: mode gated needs M=", projected.size(),
                " gate_logits, got ", gate_logits.size());
    for (const auto& g : gate_logits)
      MMFUSE_CHECK(g.is_contiguous() && g.is_cpu() && g.sizes() == projected[0].sizes() &&
                      g.scalar_type() == projected[0].scalar_type(),
                  "combine_modalities: gate_logits must be contiguous CPU tensors shaped like projected ",
                  shape(projected[0]), " in its dtype, got ", shape(g), " ", g.scalar_type());
  }
}

template <typename T>
std::vector<const T*> pointers(const std::vector<Tensor>& ts) {
  std::vector<const T*> ptrs;
  for (const auto& t : ts) ptrs.push_back(t.template const_data_ptr<T>());
  return ptrs;
}

constexpr int64_t kTile = 512;  // elements per inner step: 2 KiB of fp32 per tile buffer, L1-resident

template <typename A, typename S>
inline void load_tile(const S* in, A* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(in[i]);
}

template <typename S, typename A>
inline void store_tile(const A* in, S* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<S>(in[i]);
}

// exp on vectors: for float the short polynomial vec::exp_u20 (within 4 ulp), which is ~2x
// faster than the accurate vec exp and far inside fp32's tolerance here.
template <typename V>
inline V vexp(V x) {
  if constexpr (std::is_same_v<V, vec::Vectorized<float>>) return vec::exp_u20(x);
  else return x.exp();
}

// x[i] = sigmoid(x[i]) in place, on mmfuse::vec vectors for float.
template <typename A>
void sigmoid_tile(A* x, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<A, float>) {
    using Vec = vec::Vectorized<float>;
    const Vec one(1.f);
    for (; i + Vec::size() <= n; i += Vec::size()) (one / (one + vexp(Vec::loadu(x + i).neg()))).store(x + i);
  }
  for (; i < n; ++i) x[i] = A(1) / (A(1) + std::exp(-x[i]));
}

// The activations and their derivatives at the pre-activation z, for one mmfuse::vec vector
// (float) or one scalar (the tail, and double). GELU is the exact erf form:
// 0.5 z (1 + erf(z / sqrt 2)), derivative Phi(z) + z phi(z). The activation is a template
// argument so that each tile loop is compiled for one activation.
template <Activation kAct, typename V>
inline V act_value(V z) {
  const V one(1), half(0.5), zero(0), inv_sqrt2(0.70710678118654752440);
  if constexpr (kAct == Activation::kRelu) return vec::maximum(z, zero);
  if constexpr (kAct == Activation::kGelu) return half * z * (one + (z * inv_sqrt2).erf());
  if constexpr (kAct == Activation::kSilu) return z / (one + vexp(z.neg()));
  if constexpr (kAct == Activation::kTanh) return z.tanh();
  if constexpr (kAct == Activation::kSigmoid) return one / (one + vexp(z.neg()));
  return z;
}

template <Activation kAct, typename V>
inline V act_grad(V z) {
  const V one(1), half(0.5), zero(0), inv_sqrt2(0.70710678118654752440), inv_sqrt_2pi(0.39894228040143267794);
  if constexpr (kAct == Activation::kRelu) return V::blendv(one, zero, z <= zero);  // NaN: 1, as torch
  if constexpr (kAct == Activation::kGelu) return half * (one + (z * inv_sqrt2).erf()) + z * inv_sqrt_2pi * vexp(z * z * V(-0.5));
  if constexpr (kAct == Activation::kSilu) {
    const V s = one / (one + vexp(z.neg()));
    return s * (one + z * (one - s));
  }
  if constexpr (kAct == Activation::kTanh) {
    const V t = z.tanh();
    return one - t * t;
  }
  if constexpr (kAct == Activation::kSigmoid) {
    const V s = one / (one + vexp(z.neg()));
    return s * (one - s);
  }
  return one;
}

template <Activation kAct, typename A>
inline A act_value_scalar(A z) {
  if constexpr (kAct == Activation::kRelu) return z < A(0) ? A(0) : z;  // NaN passes, as in torch.relu
  if constexpr (kAct == Activation::kGelu) return A(0.5) * z * (A(1) + std::erf(z * A(0.70710678118654752440)));
  if constexpr (kAct == Activation::kSilu) return z / (A(1) + std::exp(-z));
  if constexpr (kAct == Activation::kTanh) return std::tanh(z);
  if constexpr (kAct == Activation::kSigmoid) return A(1) / (A(1) + std::exp(-z));
  return z;
}

template <Activation kAct, typename A>
inline A act_grad_scalar(A z) {
  if constexpr (kAct == Activation::kRelu) return z <= A(0) ? A(0) : A(1);
  if constexpr (kAct == Activation::kGelu)
    return A(0.5) * (A(1) + std::erf(z * A(0.70710678118654752440))) +
           z * A(0.39894228040143267794) * std::exp(A(-0.5) * z * z);
  if constexpr (kAct == Activation::kSilu) {
    const A s = A(1) / (A(1) + std::exp(-z));
    return s * (A(1) + z * (A(1) - s));
  }
  if constexpr (kAct == Activation::kTanh) {
    const A t = std::tanh(z);
    return A(1) - t * t;
  }
  if constexpr (kAct == Activation::kSigmoid) {
    const A s = A(1) / (A(1) + std::exp(-z));
    return s * (A(1) - s);
  }
  return A(1);
}

// y[i] = act(y[i]) in place.
template <Activation kAct, typename A>
void activate_tile(A* y, int64_t n) {
  if constexpr (kAct == Activation::kNone) return;
  int64_t i = 0;
  if constexpr (std::is_same_v<A, float>) {
    using Vec = vec::Vectorized<float>;
    for (; i + Vec::size() <= n; i += Vec::size()) act_value<kAct>(Vec::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] = act_value_scalar<kAct>(y[i]);
}

// g[i] *= act'(z[i]).
template <Activation kAct, typename A>
void activation_grad_tile(A* g, const A* z, int64_t n) {
  if constexpr (kAct == Activation::kNone) return;
  int64_t i = 0;
  if constexpr (std::is_same_v<A, float>) {
    using Vec = vec::Vectorized<float>;
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(g + i) * act_grad<kAct>(Vec::loadu(z + i))).store(g + i);
  }
  for (; i < n; ++i) g[i] *= act_grad_scalar<kAct>(z[i]);
}

// Calls f with the activation as a compile-time constant.
template <typename F>
void dispatch_activation(Activation act, const F& f) {
  switch (act) {
    case Activation::kNone: return f(std::integral_constant<Activation, Activation::kNone>());
    case Activation::kRelu: return f(std::integral_constant<Activation, Activation::kRelu>());
    case Activation::kGelu: return f(std::integral_constant<Activation, Activation::kGelu>());
    case Activation::kSilu: return f(std::integral_constant<Activation, Activation::kSilu>());
    case Activation::kTanh: return f(std::integral_constant<Activation, Activation::kTanh>());
    case Activation::kSigmoid: return f(std::integral_constant<Activation, Activation::kSigmoid>());
  }
}

// sum_i a[i] * b[i] and out[i] = a[i] * w in one pass; 4 vector accumulators for float (a
// single running sum would serialise on the FMA latency).
template <typename A>
A scale_and_dot(const A* a, const A* b, A w, A* out, int64_t n) {
  int64_t i = 0;
  A dot = A(0);
  if constexpr (std::is_same_v<A, float>) {
    using Vec = vec::Vectorized<float>;
    constexpr int64_t kStep = 4 * Vec::size();
    Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
    const Vec wv(w);
    for (; i + kStep <= n; i += kStep) {
      const Vec a0 = Vec::loadu(a + i), a1 = Vec::loadu(a + i + Vec::size());
      const Vec a2 = Vec::loadu(a + i + 2 * Vec::size()), a3 = Vec::loadu(a + i + 3 * Vec::size());
      acc0 = vec::fmadd(a0, Vec::loadu(b + i), acc0);
      acc1 = vec::fmadd(a1, Vec::loadu(b + i + Vec::size()), acc1);
      acc2 = vec::fmadd(a2, Vec::loadu(b + i + 2 * Vec::size()), acc2);
      acc3 = vec::fmadd(a3, Vec::loadu(b + i + 3 * Vec::size()), acc3);
      (a0 * wv).store(out + i);
      (a1 * wv).store(out + i + Vec::size());
      (a2 * wv).store(out + i + 2 * Vec::size());
      (a3 * wv).store(out + i + 3 * Vec::size());
    }
    dot = vec::reduce_add((acc0 + acc1) + (acc2 + acc3));
  }
  for (; i < n; ++i) {
    dot += a[i] * b[i];
    out[i] = a[i] * w;
  }
  return dot;
}

// One tile's pre-activation from the cached input tiles: P[m] (p_m) and, in "gated" mode,
// S[m] (sigmoid of z_m, computed here in place of the loaded logits). Rounded to the input
// dtype as the stored pre-activation of an unfused composition would be.
template <typename T, typename A>
void combine_tile(Mode mode, int64_t num, const A* w, A* const* P, A* const* S, A* y, int64_t len) {
  const A init = mode == Mode::kProduct ? A(1) : A(0);
  for (int64_t i = 0; i < len; ++i) y[i] = init;
  for (int64_t m = 0; m < num; ++m) {
    const A* pm = P[m];
    if (mode == Mode::kSum) {
      const A wm = w[m];
      for (int64_t i = 0; i < len; ++i) y[i] += wm * pm[i];
    } else if (mode == Mode::kProduct) {
      for (int64_t i = 0; i < len; ++i) y[i] *= pm[i];
    } else {
      sigmoid_tile(S[m], len);
      const A* sm = S[m];
      for (int64_t i = 0; i < len; ++i) y[i] += sm[i] * pm[i];
    }
  }
  if constexpr (!std::is_same_v<T, A>)
    for (int64_t i = 0; i < len; ++i) y[i] = static_cast<A>(static_cast<T>(y[i]));
}

// Per-thread tile buffers: M input tiles, M gate tiles ("gated"), and a few scratch tiles.
template <typename A>
struct TileBuffers {
  std::vector<A> storage;
  std::vector<A*> P, S;
  A *y, *g, *a;
  TileBuffers(int64_t num, bool gated) : storage((2 * num + 3) * kTile) {
    for (int64_t m = 0; m < num; ++m) P.push_back(storage.data() + m * kTile);
    for (int64_t m = 0; m < num; ++m) S.push_back(gated ? storage.data() + (num + m) * kTile : nullptr);
    y = storage.data() + 2 * num * kTile;
    g = y + kTile;
    a = g + kTile;
  }
};

template <typename T, typename A>
std::vector<A> normalized_weights(Mode mode, const std::optional<Tensor>& weights, int64_t num) {
  std::vector<A> w(num, A(0));
  if (mode == Mode::kSum) {
    const Tensor wc = mmfuse::contiguous(to_dtype(*weights, scalar_type_of<A>()));
    const A* wp = wc.const_data_ptr<A>();
    for (int64_t m = 0; m < num; ++m) w[m] = wp[m];
  }
  return w;
}

// ---- the float path: one mmfuse::vec vector of every tensor at a time, no tile buffers --------------

using VecF = vec::Vectorized<float>;
constexpr int64_t kMaxVecModalities = 8;  // register arrays of the float path; more takes the tile path

// Stores of the outputs. Large outputs are written with non-temporal (streaming) stores: they
// bypass the cache, so a line is not first read from memory to be overwritten (x86's
// read-for-ownership), which saves a third of a write-heavy kernel's traffic. Only when every
// output is 32-byte aligned (torch's allocations are 64-byte aligned; chunks start at multiples
// of the vector width) and large enough not to be wanted back from the cache soon.
constexpr int64_t kStreamingBytes = 1 << 21;

template <bool kStream>
inline void store_vec(const VecF& v, float* ptr) {
#if defined(__AVX2__)
  if constexpr (kStream) {
    _mm256_stream_ps(ptr, v.v);
    return;
  }
#endif
  v.store(ptr);
}

inline void streaming_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

inline bool can_stream(std::initializer_list<const std::vector<Tensor>*> outputs) {
#if defined(__AVX2__)
  for (const auto* ts : outputs)
    for (const auto& t : *ts)
      if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 32 != 0 || nbytes(t) < kStreamingBytes) return false;
  return true;
#else
  return false;
#endif
}

template <typename F>
void dispatch_bool(bool b, const F& f) {
  if (b) return f(std::true_type());
  return f(std::false_type());
}

// sigmoid(x) = 1 / (1 + exp(-x)) with the division done as a reciprocal estimate refined by one
// Newton step (relative error ~1e-7, like the division's rounding), which is several times
// cheaper than a divide; gated mode takes M sigmoids per element and is compute-bound on them.
// exp(-x) is capped at 2^100 so that the estimate never sees infinity (sigmoid < 1e-30 there).
inline VecF fast_sigmoid(const VecF& x) {
#if defined(__AVX2__)
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), _mm256_min_ps(vexp(x.neg()).v, _mm256_set1_ps(1.2676506e30f)));
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
#else
  return VecF(1.f) / (VecF(1.f) + vexp(x.neg()));
#endif
}

// The pre-activation of one vector at element i; pv[m] receives p_m, sv[m] sigmoid(z_m) ("gated").
template <Mode kMode>
inline VecF combine_vec(int64_t num, const float* const* p, const float* const* z, const VecF* w, int64_t i,
                        VecF* pv, VecF* sv) {
  const VecF one(1.f);
  VecF y(kMode == Mode::kProduct ? 1.f : 0.f);
  for (int64_t m = 0; m < num; ++m) {
    const VecF x = VecF::loadu(p[m] + i);
    pv[m] = x;
    if constexpr (kMode == Mode::kSum) {
      y = vec::fmadd(w[m], x, y);
    } else if constexpr (kMode == Mode::kProduct) {
      y = y * x;
    } else {
      const VecF sig = fast_sigmoid(VecF::loadu(z[m] + i));
      sv[m] = sig;
      y = vec::fmadd(sig, x, y);
    }
  }
  return y;
}

// out[e0, e1) with e1 - e0 a multiple of the vector width.
// kNum > 0: the number of modalities as a constant (loops over m unroll, the M inputs' loads
// and sigmoids interleave); 0: num at run time.
// flatten: everything these loops call is inlined into them (vec.h's exp_u20 and the helpers
// above are otherwise out-of-line calls per vector that spill the pv/sv arrays to memory and
// reload the polynomial constants every time: measured at ~60% of the gated kernel's time).
#if defined(__GNUC__)
#define MMFUSE_FLATTEN __attribute__((flatten))
#else
#define MMFUSE_FLATTEN
#endif

template <Mode kMode, Activation kAct, bool kStream, int kNum>
MMFUSE_FLATTEN void combine_forward_f32(int64_t num_runtime, const float* const* p, const float* const* z, const float* w, float* out,
                         int64_t e0, int64_t e1) {
  const int64_t num = kNum > 0 ? kNum : num_runtime;
  VecF pv[kMaxVecModalities], sv[kMaxVecModalities], wv[kMaxVecModalities];
  for (int64_t m = 0; m < num; ++m) wv[m] = VecF(w[m]);  // broadcast once, not per vector
  for (int64_t i = e0; i < e1; i += VecF::size())
    store_vec<kStream>(act_value<kAct>(combine_vec<kMode>(num, p, z, wv, i, pv, sv)), out + i);
}

// Gradients on [e0, e1) (a multiple of the vector width); "sum" adds g * p_m into dot[m].
template <Mode kMode, Activation kAct, bool kStream, int kNum>
MMFUSE_FLATTEN void combine_backward_f32(int64_t num_runtime, const float* const* p, const float* const* z, const float* w,
                          const float* grad_out, float* const* gp, float* const* gz, int64_t e0, int64_t e1,
                          VecF* dot) {
  const int64_t num = kNum > 0 ? kNum : num_runtime;
  const VecF one(1.f);
  VecF pv[kMaxVecModalities], sv[kMaxVecModalities], wv[kMaxVecModalities];
  for (int64_t m = 0; m < num; ++m) wv[m] = VecF(w[m]);  // broadcast once, not per vector
  for (int64_t i = e0; i < e1; i += VecF::size()) {
    VecF g = VecF::loadu(grad_out + i);
    const VecF y = combine_vec<kMode>(num, p, z, wv, i, pv, sv);
    if constexpr (kAct != Activation::kNone) g = g * act_grad<kAct>(y);
    for (int64_t m = 0; m < num; ++m) {
      if constexpr (kMode == Mode::kSum) {
        store_vec<kStream>(g * wv[m], gp[m] + i);
        dot[m] = vec::fmadd(g, pv[m], dot[m]);
      } else if constexpr (kMode == Mode::kProduct) {
        // the product of the other modalities, not out / p_m: exact when some p_j == 0
        VecF a = g;
        for (int64_t j = 0; j < num; ++j)
          if (j != m) a = a * pv[j];
        store_vec<kStream>(a, gp[m] + i);
      } else {
        const VecF a = g * sv[m];
        store_vec<kStream>(a, gp[m] + i);
        store_vec<kStream>(a * pv[m] * (one - sv[m]), gz[m] + i);
      }
    }
  }
}

// Calls f with the modality count as a constant for the common 2, 3 and 4, else 0 (at run time).
template <typename F>
void dispatch_num(int64_t num, const F& f) {
  switch (num) {
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    default: return f(std::integral_constant<int, 0>());
  }
}

template <typename F>
void dispatch_mode(Mode mode, const F& f) {
  switch (mode) {
    case Mode::kSum: return f(std::integral_constant<Mode, Mode::kSum>());
    case Mode::kProduct: return f(std::integral_constant<Mode, Mode::kProduct>());
    case Mode::kGated: return f(std::integral_constant<Mode, Mode::kGated>());
  }
}

Tensor combine_modalities_cpu(const std::vector<Tensor>& projected, const std::string& mode_name,
                                  const std::optional<Tensor>& weights, const std::vector<Tensor>& gate_logits,
                                  const std::string& activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  Tensor out = torch::stable::empty_like(first);
  const int64_t numel = first.numel(), num = static_cast<int64_t>(projected.size());
  MMFUSE_DISPATCH_FLOATING_AND_HALF(first.scalar_type(), "combine_modalities_cpu", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = pointers<scalar_t>(projected);
    const auto z = pointers<scalar_t>(gate_logits);
    const std::vector<A> w = normalized_weights<scalar_t, A>(mode, weights, num);
    scalar_t* o = ptr<scalar_t>(out);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    const bool vec_path = std::is_same_v<scalar_t, float> && num <= kMaxVecModalities;
    const std::vector<Tensor> outs{out};
    const bool stream = vec_path && can_stream({&outs});
    dispatch_activation(act, [&](auto act_tag) {
      constexpr Activation kAct = decltype(act_tag)::value;
      parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        TileBuffers<A> buf(num, mode == Mode::kGated);
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t end = std::min(numel, (c + 1) * kChunk);
          int64_t e = c * kChunk;
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (vec_path) {
              const int64_t vec_end = e + (end - e) / VecF::size() * VecF::size();
              dispatch_mode(mode, [&](auto mode_tag) {
                dispatch_bool(stream, [&](auto stream_tag) {
                  dispatch_num(num, [&](auto num_tag) {
                    combine_forward_f32<decltype(mode_tag)::value, kAct, decltype(stream_tag)::value,
                                        decltype(num_tag)::value>(num, p.data(), z.data(), w.data(), o, e, vec_end);
                  });
                });
              });
              e = vec_end;
            }
          }
          for (int64_t t0 = e; t0 < end; t0 += kTile) {  // the tile path: other dtypes, and the tail
            const int64_t len = std::min(kTile, end - t0);
            for (int64_t m = 0; m < num; ++m) {
              load_tile(p[m] + t0, buf.P[m], len);
              if (mode == Mode::kGated) load_tile(z[m] + t0, buf.S[m], len);
            }
            combine_tile<scalar_t>(mode, num, w.data(), buf.P.data(), buf.S.data(), buf.y, len);
            activate_tile<kAct>(buf.y, len);
            store_tile(buf.y, o + t0, len);
          }
        }
        if (stream) streaming_fence();  // this thread's streaming stores, visible before the op returns
      });
    });
  });
  return out;
}

std::tuple<std::vector<Tensor>, Tensor, std::vector<Tensor>> combine_modalities_bwd_cpu(
    const Tensor& grad_out, const std::vector<Tensor>& projected, const std::string& mode_name,
    const std::optional<Tensor>& weights, const std::vector<Tensor>& gate_logits, const std::string& activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  MMFUSE_CHECK(grad_out.sizes() == first.sizes() && grad_out.scalar_type() == first.scalar_type(),
              "combine_modalities_bwd: grad_out must be shaped like projected, got ", shape(grad_out));
  const Tensor go = mmfuse::contiguous(grad_out);
  const int64_t numel = first.numel(), num = static_cast<int64_t>(projected.size());
  std::vector<Tensor> grad_p, grad_z;
  for (int64_t m = 0; m < num; ++m) grad_p.push_back(torch::stable::empty_like(first));
  if (mode == Mode::kGated)
    for (int64_t m = 0; m < num; ++m) grad_z.push_back(torch::stable::empty_like(first));
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  // per-chunk partial sums of g * p_m in double, reduced in chunk order: accurate, and
  // deterministic for any thread count
  Tensor partial = zeros_like_as(first, {mode == Mode::kSum ? chunks : 0, num}, dtype::kDouble);
  MMFUSE_DISPATCH_FLOATING_AND_HALF(first.scalar_type(), "combine_modalities_bwd_cpu", [&] {
    using A = opmath_t<scalar_t>;
    const auto p = pointers<scalar_t>(projected);
    const auto z = pointers<scalar_t>(gate_logits);
    std::vector<scalar_t*> gp, gz;
    for (auto& t : grad_p) gp.push_back(ptr<scalar_t>(t));
    for (auto& t : grad_z) gz.push_back(ptr<scalar_t>(t));
    const std::vector<A> w = normalized_weights<scalar_t, A>(mode, weights, num);
    const scalar_t* gptr = go.const_data_ptr<scalar_t>();
    double* part = mode == Mode::kSum ? ptr<double>(partial) : nullptr;
    const bool vec_path = std::is_same_v<scalar_t, float> && num <= kMaxVecModalities;
    const bool stream = vec_path && can_stream({&grad_p, &grad_z});
    dispatch_activation(act, [&](auto act_tag) {
    constexpr Activation kAct = decltype(act_tag)::value;
    parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      TileBuffers<A> buf(num, mode == Mode::kGated);
      A* const g = buf.g;
      A* const a = buf.a;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t end = std::min(numel, (c + 1) * kChunk);
        int64_t e = c * kChunk;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (vec_path) {
            const int64_t vec_end = e + (end - e) / VecF::size() * VecF::size();
            VecF dot[kMaxVecModalities];
            for (auto& d : dot) d = VecF(0.f);
            dispatch_mode(mode, [&](auto mode_tag) {
              dispatch_bool(stream, [&](auto stream_tag) {
                dispatch_num(num, [&](auto num_tag) {
                  combine_backward_f32<decltype(mode_tag)::value, kAct, decltype(stream_tag)::value,
                                       decltype(num_tag)::value>(num, p.data(), z.data(), w.data(), gptr, gp.data(),
                                                                 gz.data(), e, vec_end, dot);
                });
              });
            });
            if (mode == Mode::kSum)
              for (int64_t m = 0; m < num; ++m)
                part[c * num + m] += vec::reduce_add(dot[m]);
            e = vec_end;
          }
        }
        for (int64_t t0 = e; t0 < end; t0 += kTile) {  // the tile path: other dtypes, and the tail
          const int64_t len = std::min(kTile, end - t0);
          for (int64_t m = 0; m < num; ++m) {
            load_tile(p[m] + t0, buf.P[m], len);
            if (mode == Mode::kGated) load_tile(z[m] + t0, buf.S[m], len);
          }
          load_tile(gptr + t0, g, len);
          if (kAct != Activation::kNone || mode == Mode::kGated) {
            // the pre-activation (and, gated, the sigmoids) from the tiles just read
            combine_tile<scalar_t>(mode, num, w.data(), buf.P.data(), buf.S.data(), buf.y, len);
            activation_grad_tile<kAct>(g, buf.y, len);
          }
          for (int64_t m = 0; m < num; ++m) {
            const A* pm = buf.P[m];
            if (mode == Mode::kSum) {
              part[c * num + m] += static_cast<double>(scale_and_dot(g, pm, w[m], a, len));
            } else if (mode == Mode::kProduct) {
              // the product of the other modalities, not out / p_m: exact when some p_j == 0
              for (int64_t i = 0; i < len; ++i) a[i] = g[i];
              for (int64_t j = 0; j < num; ++j) {
                if (j == m) continue;
                const A* pj = buf.P[j];
                for (int64_t i = 0; i < len; ++i) a[i] *= pj[i];
              }
            } else {
              const A* sm = buf.S[m];
              A* b = buf.y;  // the pre-activation is no longer needed
              for (int64_t i = 0; i < len; ++i) {
                a[i] = g[i] * sm[i];
                b[i] = a[i] * pm[i] * (A(1) - sm[i]);
              }
              store_tile(b, gz[m] + t0, len);
            }
            store_tile(a, gp[m] + t0, len);
          }
        }
      }
      if (stream) streaming_fence();  // this thread's streaming stores, visible before the op returns
    });
    });
  });
  Tensor grad_w = mode == Mode::kSum ? to_dtype(torch::stable::sum(partial, IntArrayRef{0}), weights->scalar_type())
                                     : empty_like_as(first, {0});
  return {grad_p, grad_w, grad_z};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CPU, m) {
  m.impl("fused_concat_linear", TORCH_BOX(&fused_concat_linear_cpu));
  m.impl("fused_concat_linear_bwd", TORCH_BOX(&fused_concat_linear_bwd_cpu));
  m.impl("combine_modalities", TORCH_BOX(&combine_modalities_cpu));
  m.impl("combine_modalities_bwd", TORCH_BOX(&combine_modalities_bwd_cpu));
}

}  // namespace mmfuse
