// CPU kernels for the multimodal fusion ops:
//   fused_concat_linear: act(sum_i x_i @ W_i^T + b), W_i the column block of W for input i, so
//     the concatenation cat(x_1..x_M) is never built. Accumulation in fp32 (fp64 for double).
//   combine_modalities: the elementwise modes sum / product / gated in one pass over the
//     projected tensors, forward and backward, the activation fused; the backward recomputes
//     the pre-activation instead of reading a stored one.
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
                    x.scalar_type() == xs[0].scalar_type() && at::isFloatingType(x.scalar_type()),
                what, ": inputs must be contiguous CPU (N, D_i) tensors of one dtype, got ", x.sizes());
  }
}

// ---- fused_concat_linear -------------------------------------------------------------------

void check_weight(const char* op, const std::vector<at::Tensor>& xs, const at::Tensor& weight) {
  int64_t width = 0;
  for (const auto& x : xs) width += x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == width && weight.device().is_cpu() &&
                  weight.scalar_type() == xs[0].scalar_type(),
              op, ": weight must be a CPU (out, ", width, ") tensor of the inputs' dtype ", xs[0].scalar_type(),
              ", got ", weight.sizes(), " ", weight.scalar_type());
}

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
  check_weight("fused_concat_linear", xs, weight);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->device().is_cpu() &&
                    bias->scalar_type() == xs[0].scalar_type(),
                "fused_concat_linear: bias must be a CPU (out=", weight.size(0), ",) tensor of the inputs' dtype, got ",
                bias->sizes(), " ", bias->scalar_type());
  }
  const auto dtype = xs[0].scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor w = weight.to(acc);  // no copy for fp32/fp64
  // the first GEMM starts from the bias (or writes over the uninitialised accumulator with
  // beta = 0), the others accumulate: no separate pass to broadcast the bias or zero the sum
  at::Tensor sum;
  int64_t col = 0;
  for (const auto& x : xs) {
    const at::Tensor w_block = w.narrow(1, col, x.size(1)).t();
    if (!sum.defined()) {
      sum = bias ? at::addmm(bias->to(acc), x.to(acc), w_block) : at::mm(x.to(acc), w_block);
    } else {
      sum.addmm_(x.to(acc), w_block);
    }
    col += x.size(1);
  }
  const at::Tensor preact = sum.to(dtype);
  return {apply_activation(preact, act), act == Activation::kNone ? at::empty({0}, xs[0].options()) : preact};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fused_concat_linear_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& xs, const at::Tensor& weight, const at::Tensor& preact,
    c10::string_view activation, bool has_bias) {
  const char* op = "fused_concat_linear_bwd";
  check_inputs(xs, op);
  const Activation act = parse_activation(activation);
  check_weight(op, xs, weight);
  const int64_t n = xs[0].size(0), out_features = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n && grad_out.size(1) == out_features &&
                  grad_out.device().is_cpu() && at::isFloatingType(grad_out.scalar_type()),
              op, ": grad_out must be a CPU float (N=", n, ", out=", out_features, ") tensor, got ", grad_out.sizes(),
              " ", grad_out.scalar_type());
  if (act != Activation::kNone) {
    TORCH_CHECK(preact.sizes() == grad_out.sizes() && preact.device().is_cpu() &&
                    at::isFloatingType(preact.scalar_type()),
                op, ": preact must be a CPU float (N=", n, ", out=", out_features, ") tensor for activation ",
                std::string(activation), ", got ", preact.sizes(), " ", preact.scalar_type());
  }
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
    // straight into the weight gradient's column block: a row-major view with leading
    // dimension `width`, which BLAS writes in place (no temporary, no copy)
    at::Tensor block = grad_weight.narrow(1, col, d);
    at::mm_out(block, g.t(), x.to(acc));
    col += d;
  }
  at::Tensor grad_bias = has_bias ? g.sum(0).to(dtype) : at::empty({0}, weight.options());
  return {grad_xs, grad_weight.to(weight.scalar_type()), grad_bias};
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
  TORCH_CHECK(at::isFloatingType(projected[0].scalar_type()), "combine_modalities: projected must be float, got ",
              projected[0].scalar_type());
  if (mode == Mode::kSum)
    TORCH_CHECK(weights && weights->dim() == 1 && weights->numel() == static_cast<int64_t>(projected.size()) &&
                    weights->device().is_cpu() && at::isFloatingType(weights->scalar_type()),
                "combine_modalities: mode sum needs weights, a CPU float tensor of shape (M=", projected.size(),
                ",), got ", weights ? weights->sizes() : at::IntArrayRef{}, weights ? "" : "none");
  if (mode == Mode::kGated) {
    TORCH_CHECK(gate_logits.size() == projected.size(), "combine_modalities: mode gated needs M=", projected.size(),
                " gate_logits, got ", gate_logits.size());
    for (const auto& g : gate_logits)
      TORCH_CHECK(g.is_contiguous() && g.device().is_cpu() && g.sizes() == projected[0].sizes() &&
                      g.scalar_type() == projected[0].scalar_type(),
                  "combine_modalities: gate_logits must be contiguous CPU tensors shaped like projected ",
                  projected[0].sizes(), " in its dtype, got ", g.sizes(), " ", g.scalar_type());
  }
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> ptrs;
  for (const auto& t : ts) ptrs.push_back(t.data_ptr<T>());
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

// exp on vectors: the 20-ulp polynomial (as the attention kernel's softmax) for float, which
// is ~2x faster than Sleef's 1-ulp exp and far inside fp32's tolerance here.
template <typename V>
inline V vexp(V x) {
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) return x.exp_u20();
  else return x.exp();
}

// x[i] = sigmoid(x[i]) in place, on at::vec vectors for float.
template <typename A>
void sigmoid_tile(A* x, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<A, float>) {
    using Vec = at::vec::Vectorized<float>;
    const Vec one(1.f);
    for (; i + Vec::size() <= n; i += Vec::size()) (one / (one + vexp(Vec::loadu(x + i).neg()))).store(x + i);
  }
  for (; i < n; ++i) x[i] = A(1) / (A(1) + std::exp(-x[i]));
}

// The activations and their derivatives at the pre-activation z, for one at::vec vector
// (float) or one scalar (the tail, and double). GELU is the exact erf form:
// 0.5 z (1 + erf(z / sqrt 2)), derivative Phi(z) + z phi(z). The activation is a template
// argument so that each tile loop is compiled for one activation.
template <Activation kAct, typename V>
inline V act_value(V z) {
  const V one(1), half(0.5), zero(0), inv_sqrt2(0.70710678118654752440);
  if constexpr (kAct == Activation::kRelu) return at::vec::maximum(z, zero);
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
    using Vec = at::vec::Vectorized<float>;
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
    using Vec = at::vec::Vectorized<float>;
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
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t kStep = 4 * Vec::size();
    Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
    const Vec wv(w);
    for (; i + kStep <= n; i += kStep) {
      const Vec a0 = Vec::loadu(a + i), a1 = Vec::loadu(a + i + Vec::size());
      const Vec a2 = Vec::loadu(a + i + 2 * Vec::size()), a3 = Vec::loadu(a + i + 3 * Vec::size());
      acc0 = at::vec::fmadd(a0, Vec::loadu(b + i), acc0);
      acc1 = at::vec::fmadd(a1, Vec::loadu(b + i + Vec::size()), acc1);
      acc2 = at::vec::fmadd(a2, Vec::loadu(b + i + 2 * Vec::size()), acc2);
      acc3 = at::vec::fmadd(a3, Vec::loadu(b + i + 3 * Vec::size()), acc3);
      (a0 * wv).store(out + i);
      (a1 * wv).store(out + i + Vec::size());
      (a2 * wv).store(out + i + 2 * Vec::size());
      (a3 * wv).store(out + i + 3 * Vec::size());
    }
    dot = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, (acc0 + acc1) + (acc2 + acc3));
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
std::vector<A> normalized_weights(Mode mode, const std::optional<at::Tensor>& weights, int64_t num) {
  std::vector<A> w(num, A(0));
  if (mode == Mode::kSum) {
    const at::Tensor wc = weights->to(c10::CppTypeToScalarType<A>::value).contiguous();
    for (int64_t m = 0; m < num; ++m) w[m] = wc.data_ptr<A>()[m];
  }
  return w;
}

// ---- the float path: one at::vec vector of every tensor at a time, no tile buffers --------------

using VecF = at::vec::Vectorized<float>;
constexpr int64_t kMaxVecModalities = 8;  // register arrays of the float path; more takes the tile path

// Stores of the outputs. Large outputs are written with non-temporal (streaming) stores: they
// bypass the cache, so a line is not first read from memory to be overwritten (x86's
// read-for-ownership), which saves a third of a write-heavy kernel's traffic. Only when every
// output is 32-byte aligned (torch's allocations are 64-byte aligned; chunks start at multiples
// of the vector width) and large enough not to be wanted back from the cache soon.
constexpr int64_t kStreamingBytes = 1 << 21;

template <bool kStream>
inline void store_vec(const VecF& v, float* ptr) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kStream) {
    _mm256_stream_ps(ptr, v);
    return;
  }
#endif
  v.store(ptr);
}

inline void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline bool can_stream(std::initializer_list<const std::vector<at::Tensor>*> outputs) {
#if defined(CPU_CAPABILITY_AVX2)
  for (const auto* ts : outputs)
    for (const auto& t : *ts)
      if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 32 != 0 || t.nbytes() < kStreamingBytes) return false;
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
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), _mm256_min_ps(vexp(x.neg()), _mm256_set1_ps(1.2676506e30f)));
  const __m256 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.f)));
#else
  return VecF(1.f) / (VecF(1.f) + vexp(x.neg()));
#endif
}

// The pre-activation of one vector at element i; pv[m] receives p_m, sv[m] sigmoid(z_m) ("gated").
template <Mode kMode>
inline VecF combine_vec(int64_t num, const float* const* p, const float* const* z, const float* w, int64_t i,
                        VecF* pv, VecF* sv) {
  const VecF one(1.f);
  VecF y(kMode == Mode::kProduct ? 1.f : 0.f);
  for (int64_t m = 0; m < num; ++m) {
    const VecF x = VecF::loadu(p[m] + i);
    pv[m] = x;
    if constexpr (kMode == Mode::kSum) {
      y = at::vec::fmadd(VecF(w[m]), x, y);
    } else if constexpr (kMode == Mode::kProduct) {
      y = y * x;
    } else {
      const VecF sig = fast_sigmoid(VecF::loadu(z[m] + i));
      sv[m] = sig;
      y = at::vec::fmadd(sig, x, y);
    }
  }
  return y;
}

// out[e0, e1) with e1 - e0 a multiple of the vector width.
// kNum > 0: the number of modalities as a constant (loops over m unroll, the M inputs' loads
// and sigmoids interleave); 0: num at run time.
// flatten: everything these loops call is inlined into them (at::vec's exp_u20 and the helpers
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
  VecF pv[kMaxVecModalities], sv[kMaxVecModalities];
  for (int64_t i = e0; i < e1; i += VecF::size())
    store_vec<kStream>(act_value<kAct>(combine_vec<kMode>(num, p, z, w, i, pv, sv)), out + i);
}

// Gradients on [e0, e1) (a multiple of the vector width); "sum" adds g * p_m into dot[m].
template <Mode kMode, Activation kAct, bool kStream, int kNum>
MMFUSE_FLATTEN void combine_backward_f32(int64_t num_runtime, const float* const* p, const float* const* z, const float* w,
                          const float* grad_out, float* const* gp, float* const* gz, int64_t e0, int64_t e1,
                          VecF* dot) {
  const int64_t num = kNum > 0 ? kNum : num_runtime;
  const VecF one(1.f);
  VecF pv[kMaxVecModalities], sv[kMaxVecModalities];
  for (int64_t i = e0; i < e1; i += VecF::size()) {
    VecF g = VecF::loadu(grad_out + i);
    const VecF y = combine_vec<kMode>(num, p, z, w, i, pv, sv);
    if constexpr (kAct != Activation::kNone) g = g * act_grad<kAct>(y);
    for (int64_t m = 0; m < num; ++m) {
      if constexpr (kMode == Mode::kSum) {
        store_vec<kStream>(g * VecF(w[m]), gp[m] + i);
        dot[m] = at::vec::fmadd(g, pv[m], dot[m]);
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

at::Tensor combine_modalities_cpu(const std::vector<at::Tensor>& projected, c10::string_view mode_name,
                                  const std::optional<at::Tensor>& weights, const std::vector<at::Tensor>& gate_logits,
                                  c10::string_view activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  at::Tensor out = at::empty_like(first);
  const int64_t numel = first.numel(), num = static_cast<int64_t>(projected.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "combine_modalities_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto p = pointers<scalar_t>(projected);
    const auto z = pointers<scalar_t>(gate_logits);
    const std::vector<A> w = normalized_weights<scalar_t, A>(mode, weights, num);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    const bool vec_path = std::is_same_v<scalar_t, float> && num <= kMaxVecModalities;
    const std::vector<at::Tensor> outs{out};
    const bool stream = vec_path && can_stream({&outs});
    dispatch_activation(act, [&](auto act_tag) {
      constexpr Activation kAct = decltype(act_tag)::value;
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
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

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> combine_modalities_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& projected, c10::string_view mode_name,
    const std::optional<at::Tensor>& weights, const std::vector<at::Tensor>& gate_logits, c10::string_view activation) {
  const Mode mode = parse_mode(mode_name);
  check_combine(projected, mode, weights, gate_logits);
  const Activation act = parse_activation(activation);
  const auto& first = projected[0];
  TORCH_CHECK(grad_out.sizes() == first.sizes() && grad_out.scalar_type() == first.scalar_type(),
              "combine_modalities_bwd: grad_out must be shaped like projected, got ", grad_out.sizes());
  const at::Tensor go = grad_out.contiguous();
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
    using A = at::opmath_type<scalar_t>;
    const auto p = pointers<scalar_t>(projected);
    const auto z = pointers<scalar_t>(gate_logits);
    std::vector<scalar_t*> gp, gz;
    for (auto& t : grad_p) gp.push_back(t.data_ptr<scalar_t>());
    for (auto& t : grad_z) gz.push_back(t.data_ptr<scalar_t>());
    const std::vector<A> w = normalized_weights<scalar_t, A>(mode, weights, num);
    const scalar_t* gptr = go.data_ptr<scalar_t>();
    double* part = mode == Mode::kSum ? partial.data_ptr<double>() : nullptr;
    const bool vec_path = std::is_same_v<scalar_t, float> && num <= kMaxVecModalities;
    const bool stream = vec_path && can_stream({&grad_p, &grad_z});
    dispatch_activation(act, [&](auto act_tag) {
    constexpr Activation kAct = decltype(act_tag)::value;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
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
                part[c * num + m] += at::vec::vec_reduce_all<float>([](VecF x, VecF y) { return x + y; }, dot[m]);
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
