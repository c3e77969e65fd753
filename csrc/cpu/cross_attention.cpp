// CPU kernels for mmfuse::cross_attention_{fwd,bwd} and their varlen forms: blocked attention
// with an online softmax (FlashAttention-2, Dao 2023), so no (Lq, Lk) buffer exists; only a
// (BLOCK_Q, BLOCK_K) score tile per task. Tiles are multiplied by the BLAS that torch links
// (MKL's sgemm_/dgemm_), the softmax runs on mmfuse::vec vectors; accumulation is fp32 (fp64 for
// fp64 inputs), and bfloat16/float16 inputs are computed in fp32.
//
// Padded inputs also take an in-kernel additive attention mask (bool -> 0/-inf, or any float bias,
// (B or 1, Hq or 1, Lq, Lk)) and attention dropout from a counter-based Philox4x32-10 stream
// (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): see `philox8` and
// `dropout_tile`. The backward regenerates the dropout mask from (seed, offset); it is never stored.
//
// Padded and packed layouts share one kernel: both are token rows of Hq*D (q) or Hkv*D (k, v)
// elements, and a Sample gives each batch entry's first row, length and lse addressing.
//
// Built against the LibTorch stable ABI only (csrc/stable.h): tensors are torch::stable::Tensor, and
// the small tensor chores (masks to additive biases, hidden-key rows) are plain loops of ours.
#include "../attention_mask.h"
#include "../stable.h"
#include "vec.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// Fortran BLAS exported by libtorch_cpu (what ATen's own CPU gemm calls). Weak, so a torch
// built without them still loads this library and uses the portable loop instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's per-thread thread count; its gemm would otherwise start its own team inside ours.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace mmfuse {
namespace {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 256;

// C (m, n) = alpha * op(A) op(B) + beta * C, all row-major. op(A) is (m, k): A is stored (m, k)
// with leading dimension lda, or (k, m) when trans_a; likewise op(B) (k, n).
template <typename T>
void portable_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                   const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* c_row = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) c_row[j] = beta == T(0) ? T(0) : beta * c_row[j];
    for (int64_t p = 0; p < k; ++p) {
      const T a_ip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b[j * ldb + p];
      } else {
        const T* b_row = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
      }
    }
  }
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto* blas = [] {
    if constexpr (std::is_same_v<T, float>) return sgemm_;
    else return dgemm_;
  }();
  if (blas == nullptr || k == 0) {
    portable_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // row-major C is column-major C^T = op(B)^T op(A)^T: swap the operands
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mm = static_cast<int>(n), nn = static_cast<int>(m), kk = static_cast<int>(k);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  blas(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// The lanes of v combined by f in log2(lanes) shuffle steps (halves, quarters, neighbours), as
// at::vec's vec_reduce_all did: a row's sum or max in 3 dependent operations instead of 7.
template <typename T, typename F>
T reduce_lanes(vec::Vectorized<T> v, const F& f) {
  using Vec = vec::Vectorized<T>;
  using raw_t = typename Vec::raw_t;
  using mask_t = typename Vec::mask_t;
#if defined(__clang__)
#define MMFUSE_SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define MMFUSE_SHUFFLE(x, ...) __builtin_shuffle(x, mask_t{__VA_ARGS__})
#endif
  raw_t r = v.v;
  if constexpr (Vec::size() == 8) {
    r = f(Vec(r), Vec(raw_t(MMFUSE_SHUFFLE(r, 4, 5, 6, 7, 0, 1, 2, 3)))).v;
    r = f(Vec(r), Vec(raw_t(MMFUSE_SHUFFLE(r, 2, 3, 0, 1, 6, 7, 4, 5)))).v;
    r = f(Vec(r), Vec(raw_t(MMFUSE_SHUFFLE(r, 1, 0, 3, 2, 5, 4, 7, 6)))).v;
  } else {
    static_assert(Vec::size() == 4, "reduce_lanes: 8 or 4 lanes");
    r = f(Vec(r), Vec(raw_t(MMFUSE_SHUFFLE(r, 2, 3, 0, 1)))).v;
    r = f(Vec(r), Vec(raw_t(MMFUSE_SHUFFLE(r, 1, 0, 3, 2)))).v;
  }
#undef MMFUSE_SHUFFLE
  return r[0];
}

template <typename T>
T sum_lanes(vec::Vectorized<T> v) {
  return reduce_lanes(v, [](vec::Vectorized<T> a, vec::Vectorized<T> b) { return a + b; });
}

// x[i] = exp(x[i] - shift), returns the sum; exp(-inf) = 0.
template <typename T>
T exp_shifted_sum(T* x, int64_t n, T shift) {
  using Vec = vec::Vectorized<T>;
  T sum = 0;
  int64_t i = 0;
  if (std::isnan(shift)) {  // a NaN row (NaN q, or a NaN visible score): hidden keys still get exactly 0
    for (; i < n; ++i) {
      x[i] = x[i] == -std::numeric_limits<T>::infinity() ? T(0) : std::numeric_limits<T>::quiet_NaN();
      sum += x[i];
    }
    return sum;
  }
  if constexpr (std::is_same_v<T, float>) {
    // fp32: a 4-ulp polynomial exp, well inside the 1e-4 relative budget
    Vec acc(0.f);
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec e = vec::exp_u20(Vec::loadu(x + i) - Vec(shift));
      e.store(x + i);
      acc = acc + e;
    }
    sum = sum_lanes(acc);
  }
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// log(exp(a) + exp(b)), -inf when both are; NaN propagates.
template <typename T>
T logaddexp(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
  const T m = std::max(a, b);
  if (m == -std::numeric_limits<T>::infinity()) return m;
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

// sum of a[i] * b[i]: vector products summed lane-wise, then across the lanes and the tail
template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = acc + Vec::loadu(a + i) * Vec::loadu(b + i);
  T sum = sum_lanes(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// max of x[0..n), NaN if any is NaN, -inf for n = 0, with four independent accumulators: one chain
// of NaN-propagating maxima is latency-bound, and this runs once per score row.
template <typename T>
T row_max(const T* x, int64_t n) {
  using Vec = vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  Vec a0(neg_inf), a1(neg_inf), a2(neg_inf), a3(neg_inf);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = vec::maximum(a0, Vec::loadu(x + i));
    a1 = vec::maximum(a1, Vec::loadu(x + i + W));
    a2 = vec::maximum(a2, Vec::loadu(x + i + 2 * W));
    a3 = vec::maximum(a3, Vec::loadu(x + i + 3 * W));
  }
  for (; i + W <= n; i += W) a0 = vec::maximum(a0, Vec::loadu(x + i));
  if (i < n && n >= W) {  // the tail: the last W elements, overlapping the ones seen (max is idempotent)
    a1 = vec::maximum(a1, Vec::loadu(x + n - W));
    i = n;
  }
  T m = reduce_lanes(vec::maximum(vec::maximum(a0, a1), vec::maximum(a2, a3)),
                     [](Vec a, Vec b) { return vec::maximum(a, b); });
  for (; i < n; ++i) m = (x[i] > m || std::isnan(x[i])) ? x[i] : m;  // rows shorter than W; a NaN m stays
  return m;
}

// Runs worker(claim) on torch's threads; claim() hands out tasks 0..n-1 one at a time, then -1.
// Tasks differ in cost (kv_lens, causal), which a static split would leave unbalanced. Each task
// writes only its own outputs, so results do not depend on the schedule.
template <typename F>
void parallel_tasks(int64_t n, const F& worker) {
  std::atomic<int64_t> next{0};
  auto claim = [&next, n]() {
    const int64_t t = next.fetch_add(1);
    return t < n ? t : int64_t(-1);
  };
  parallel_for(0, std::min<int64_t>(n, num_threads()), 1, [&](int64_t, int64_t) {
    const int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    worker(claim);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  });
}

// One batch entry in the token-row layout.
struct Sample {
  int64_t q_row, q_len;  // first query row, number of queries
  int64_t k_row, k_len;  // first key row, number of valid keys (kv_lens[b] or the sequence length)
  const void* bias;      // (Lk,) in the compute type: 0, or -inf for a masked key; or null
  int64_t lse_base;      // lse index of (h = 0, query 0); query i of head h at lse_base + h*lse_head + i
  // in-kernel attention mask and dropout (padded layout only)
  const void* attn_bias = nullptr;  // this sample's (Hq or 1, Lq, Lk) additive mask in the compute type, or null
  int64_t index = 0;                // the batch index b, for the dropout counter
  void* dmask = nullptr;            // mask_grad: this sample's (Hq, Lq, Lk) rows of dmask, or null
  const int32_t* ranges = nullptr;  // key_ranges: this sample's (Hq or 1, Lq, 2) [start, end) per query, or null
};

struct Problem {
  int64_t batch, heads_q, heads_kv, dim;
  int64_t max_q;  // upper bound of q_len over samples
  int64_t lse_head;
  double scale;
  bool causal;
  std::vector<Sample> samples;
  // in-kernel attention mask and dropout (padded layout only; see add_mask_and_dropout)
  int64_t attn_bias_head = 0;  // elements between heads of Sample::attn_bias (0: shared by every head)
  int64_t attn_bias_row = 0;   // elements between query rows of it (Lk)
  double dropout_p = 0.0;      // 0: no dropout
  double dropout_scale = 1.0;  // 1 / (1 - dropout_p)
  uint32_t keep_threshold = 0; // keep iff the element's 32-bit draw >= floor(dropout_p * 2^32)
  uint64_t seed = 0, offset = 0;
  int64_t len_q = 0, len_k = 0;  // the padded Lq, Lk of the dropout counter
  int64_t dim_v = 0;             // v's head dim (out's, dO's, dv's); set by the problem builders
  double softcap = 0.0;          // > 0: scores become softcap * tanh(s / softcap) before the masks
  const void* sinks = nullptr;   // (Hq,) logits in the compute type joining each row's denominator, or null
  int64_t dmask_head = 0, dmask_row = 0;  // strides of Sample::dmask between heads and query rows
  int64_t ranges_head = 0;       // int32 pairs between heads of Sample::ranges (0: shared by every head)

  int64_t group() const { return heads_q / heads_kv; }
  int64_t q_stride() const { return heads_q * dim; }
  int64_t k_stride() const { return heads_kv * dim; }
  int64_t v_stride() const { return heads_kv * dim_v; }
  int64_t o_stride() const { return heads_q * dim_v; }  // out and dO rows
};

// Soft-capping (Gemma 2; "Gemma 2: Improving Open Language Models at a Practical Size", 2024):
// x = softcap * tanh(x / softcap) on a (rows, cols) score tile; t, when given, keeps tanh(x / softcap)
// for the backward's factor 1 - t².
template <typename T>
void cap_scores(const Problem& p, T* x, int64_t n, T* t = nullptr) {
  if (p.softcap <= 0) return;
  using Vec = vec::Vectorized<T>;
  const T cap = static_cast<T>(p.softcap), inv = T(1) / cap;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec th = (Vec::loadu(x + i) * Vec(inv)).tanh();
    (th * Vec(cap)).store(x + i);
    if (t != nullptr) th.store(t + i);
  }
  for (; i < n; ++i) {
    const T th = std::tanh(x[i] * inv);
    x[i] = cap * th;
    if (t != nullptr) t[i] = th;
  }
}

// row += bias, except where the bias is -inf: there the score becomes -inf whatever q·k gave
// (NaN or inf included), so a hidden key never reaches the softmax.
template <typename T>
void add_mask(T* row, const T* bias, int64_t n) {
  using Vec = vec::Vectorized<T>;
  const Vec neg_inf(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec x = Vec::loadu(row + i), b = Vec::loadu(bias + i);
    Vec::blendv(x + b, b, b == neg_inf).store(row + i);
  }
  for (; i < n; ++i) row[i] = bias[i] == -std::numeric_limits<T>::infinity() ? bias[i] : row[i] + bias[i];
}

// Keys [0, n) of the score tile row for query i with keys from kb on: hide the masked and the
// causally future ones (query i sees key j iff j <= i + k_len - q_len).
template <typename T>
void mask_row(const Problem& p, const Sample& s, int64_t h, int64_t i, int64_t kb, T* row, int64_t n) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  if (s.ranges != nullptr) {  // keys outside [start, end)
    const int32_t* r = s.ranges + h * p.ranges_head + 2 * i;
    const int64_t lo = std::clamp<int64_t>(r[0] - kb, 0, n), hi = std::clamp<int64_t>(r[1] - kb, lo, n);
    std::fill(row, row + lo, neg_inf);
    std::fill(row + hi, row + n, neg_inf);
  }
  if (p.causal) {
    const int64_t visible = std::clamp<int64_t>(i + s.k_len - s.q_len + 1 - kb, 0, n);
    std::fill(row + visible, row + n, neg_inf);
    n = visible;
  }
  if (s.bias != nullptr) add_mask(row, static_cast<const T*>(s.bias) + kb, n);
  if (s.attn_bias != nullptr)  // the in-kernel (Lq, Lk) mask row of head h
    add_mask(row, static_cast<const T*>(s.attn_bias) + h * p.attn_bias_head + i * p.attn_bias_row + kb, n);
}

// ----------------------------------------------------------------------------- dropout
// Philox4x32-10 (Salmon et al., SC 2011; the constants of Random123 and of Triton's tl.randint).
// Element (b, h, i, j) of the (B, Hq, Lq, Lk) probability matrix (padded sizes) draws word j % 4
// of Philox4x32-10 with key (seed_lo, seed_hi) and counter (g_lo, g_hi, offset_lo, offset_hi),
// g = ((b * Hq + h) * Lq + i) * ceil(Lk / 4) + j / 4: one Philox call per 4 consecutive keys.
// The element is kept iff that word >= floor(p * 2^32) and then scaled by 1 / (1 - p).
// mmfuse/contract/attention.py defines the stream; mmfuse/reference/attention.py
// (philox_uniform) and the Triton kernels compute the same words.
constexpr int kPhiloxLanes = 8;
static_assert(kBlockK % 4 == 0, "a key block must start a 4-key Philox group");

// The 4 words of the 8 counters g0 .. g0 + 7: out[w][l] is word w of counter g0 + l.
inline void philox8(uint64_t g0, uint64_t seed, uint64_t offset, uint32_t (&out)[4][kPhiloxLanes]) {
  uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    c0[l] = static_cast<uint32_t>(g0 + l);
    c1[l] = static_cast<uint32_t>((g0 + l) >> 32);
    c2[l] = static_cast<uint32_t>(offset);
    c3[l] = static_cast<uint32_t>(offset >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * c0[l];
      const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < kPhiloxLanes; ++l) {
    out[0][l] = c0[l];
    out[1][l] = c1[l];
    out[2][l] = c2[l];
    out[3][l] = c3[l];
  }
}

#if defined(__AVX2__)
// (hi, lo) 32-bit halves of the 8 products a[l] * m.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                          // lanes 0, 2, 4, 6 as 64-bit
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);    // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox8 on AVX2 registers for 8 counters g0 .. g0 + 7 that share their high word (no carry
// out of the low one), transposed into key order: out[v] holds the words of keys
// 8v .. 8v + 7 of the 32 (key 4l + w is word w of counter g0 + l).
inline void philox8_avx2(uint64_t g0, uint64_t seed, uint64_t offset, __m256i (&out)[4]) {
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g0 >> 32)));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // 4 x 8 transpose: (word, counter) -> key order
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpacklo_epi32(c2, c3);
  const __m256i t2 = _mm256_unpackhi_epi32(c0, c1), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t1);  // counters 0 | 4, words 0..3
  const __m256i u1 = _mm256_unpackhi_epi64(t0, t1);  // counters 1 | 5
  const __m256i u2 = _mm256_unpacklo_epi64(t2, t3);  // counters 2 | 6
  const __m256i u3 = _mm256_unpackhi_epi64(t2, t3);  // counters 3 | 7
  out[0] = _mm256_permute2x128_si256(u0, u1, 0x20);  // keys 0..7
  out[1] = _mm256_permute2x128_si256(u2, u3, 0x20);  // keys 8..15
  out[2] = _mm256_permute2x128_si256(u0, u1, 0x31);  // keys 16..23
  out[3] = _mm256_permute2x128_si256(u2, u3, 0x31);  // keys 24..31
}
#endif

// x ∘= keep / (1 - p) (and y, when given, with the same mask) on the (rows, cols) tile of
// queries i0.. and keys kb.. of head h; kb is a multiple of 4 (kBlockK is).
template <typename T>
void dropout_tile(const Problem& p, const Sample& s, int64_t h, int64_t i0, int64_t rows, int64_t kb, int64_t cols,
                  T* x, T* y = nullptr) {
  const int64_t counters_per_row = (p.len_k + 3) / 4;
  const T scale = static_cast<T>(p.dropout_scale);
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t row_counter =
        static_cast<uint64_t>(((s.index * p.heads_q + h) * p.len_q + i0 + r) * counters_per_row + kb / 4);
    T* xr = x + r * cols;
    T* yr = y != nullptr ? y + r * cols : nullptr;
    for (int64_t c0 = 0; c0 < cols; c0 += 32) {
      const uint64_t g0 = row_counter + c0 / 4;
#if defined(__AVX2__)
      if constexpr (std::is_same_v<T, float>) {
        // 8 counters x 4 words = 32 consecutive keys, one float vector per 8
        if (c0 + 32 <= cols && static_cast<uint32_t>(g0) <= 0xFFFFFFFFu - (kPhiloxLanes - 1)) {
          __m256i draws[4];  // draws[v]: keys c0 + 8v .. c0 + 8v + 7
          philox8_avx2(g0, p.seed, p.offset, draws);
          // unsigned draw >= threshold  <=>  max(draw, threshold) == draw
          const __m256i thr = _mm256_set1_epi32(static_cast<int>(p.keep_threshold));
          const __m256 sc = _mm256_set1_ps(scale);
          for (int v = 0; v < 4; ++v) {
            const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(draws[v], thr), draws[v]);
            const __m256 m = _mm256_and_ps(_mm256_castsi256_ps(keep), sc);
            float* xp = xr + c0 + 8 * v;
            _mm256_storeu_ps(xp, _mm256_mul_ps(_mm256_loadu_ps(xp), m));
            if (yr != nullptr) {
              float* yp = yr + c0 + 8 * v;
              _mm256_storeu_ps(yp, _mm256_mul_ps(_mm256_loadu_ps(yp), m));
            }
          }
          continue;
        }
      }
#endif
      uint32_t words[4][kPhiloxLanes];
      philox8(g0, p.seed, p.offset, words);
      const int64_t n = std::min<int64_t>(32, cols - c0);
      for (int64_t e = 0; e < n; ++e) {
        const T m = words[e % 4][e / 4] >= p.keep_threshold ? scale : T(0);
        xr[c0 + e] *= m;
        if (yr != nullptr) yr[c0 + e] *= m;
      }
    }
  }
}

// Keys a query block [i0, i1) can see: [0, key_end).
int64_t key_end(const Problem& p, const Sample& s, int64_t i1) {
  if (!p.causal) return s.k_len;
  return std::clamp<int64_t>(i1 - 1 + s.k_len - s.q_len + 1, 0, s.k_len);
}

// The key blocks of kBlockK keys that queries [i0, i0 + rows) of head h may see: [first, end). With
// key_ranges, the span of the rows' ranges: keys outside it are skipped, not masked (first >= end when
// every range is empty), and first is the span's start rounded down to a 4-key Philox group only, not
// to a block (a Flamingo text block sees one image's latents: 64 of 256 keys, where rounding to the
// 256-key block computed all of them).
std::pair<int64_t, int64_t> key_blocks(const Problem& p, const Sample& s, int64_t h, int64_t i0, int64_t rows) {
  int64_t first = 0, end = key_end(p, s, i0 + rows);
  if (s.ranges != nullptr) {
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
    const int32_t* r = s.ranges + h * p.ranges_head + 2 * i0;
    for (int64_t q = 0; q < rows; ++q)
      if (r[2 * q] < r[2 * q + 1]) lo = std::min<int64_t>(lo, r[2 * q]), hi = std::max<int64_t>(hi, r[2 * q + 1]);
    end = std::min(end, hi);
    first = lo >= end ? end : lo / 4 * 4;
  }
  return {first, end};
}

// Task t of the (sample, head, query block) grid: rows [i0, i0 + rows) of head h.
struct QueryBlock {
  const Sample* s;
  int64_t h, hk, i0, rows;
  int64_t q_offset(const Problem& p) const { return (s->q_row + i0) * p.q_stride() + h * p.dim; }
  int64_t lse_offset(const Problem& p) const { return s->lse_base + h * p.lse_head + i0; }
};

int64_t query_blocks(const Problem& p, int64_t block_q = kBlockQ) { return (p.max_q + block_q - 1) / block_q; }

// False for a block past its sample's queries (the grid is sized by the longest sample).
bool query_block(const Problem& p, int64_t t, QueryBlock& blk, int64_t block_q = kBlockQ) {
  const int64_t q_blocks = query_blocks(p, block_q);
  blk.s = &p.samples[t / (p.heads_q * q_blocks)];
  blk.h = (t / q_blocks) % p.heads_q;
  blk.hk = blk.h / p.group();
  blk.i0 = (t % q_blocks) * block_q;
  blk.rows = std::min(block_q, blk.s->q_len - blk.i0);
  return blk.rows > 0;
}

// The forward's query block: taller blocks mean fewer, larger GEMM calls (each BLAS call costs
// a fixed setup, which dominates 64 x 32 x 64 tiles at short key lengths), as long as the
// (sample, head, block) grid still gives every thread several tasks to balance.
int64_t forward_block_q(const Problem& p) {
  int64_t block = p.max_q >= 768 ? 256 : (p.max_q >= 192 ? 128 : 64);
  while (block > 32 && p.batch * p.heads_q * ((p.max_q + block - 1) / block) < 8 * num_threads()) block /= 2;
  return block;
}

// Forward: out (rows, Hq, D), lse. Tasks are (sample, head, query block).
template <typename T>
void forward(const Problem& p, const T* q, const T* k, const T* v, T* out, T* lse) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t D = p.dim, Dv = p.dim_v, qs = p.q_stride(), ks = p.k_stride(), vs = p.v_stride(), os = p.o_stride();
  const int64_t block_q = forward_block_q(p);
  const T* sinks = static_cast<const T*>(p.sinks);
  parallel_tasks(p.batch * p.heads_q * query_blocks(p, block_q), [&](const auto& claim) {
    std::vector<T> scores(block_q * kBlockK), acc(block_q * Dv), row_m(block_q), row_l(block_q);
    QueryBlock blk;
    for (int64_t t; (t = claim()) >= 0;) {
      if (!query_block(p, t, blk, block_q)) continue;
      const Sample& s = *blk.s;
      const int64_t h = blk.h, hk = blk.hk, i0 = blk.i0, rows = blk.rows;
      const T* q_blk = q + blk.q_offset(p);
      const T* k_head = k + s.k_row * ks + hk * D;
      const T* v_head = v + s.k_row * vs + hk * Dv;
      std::fill(acc.begin(), acc.begin() + rows * Dv, T(0));
      std::fill(row_m.begin(), row_m.end(), neg_inf);
      std::fill(row_l.begin(), row_l.end(), T(0));
      const auto [first, end] = key_blocks(p, s, h, i0, rows);
      for (int64_t kb = first; kb < end; kb += kBlockK) {
        const int64_t cols = std::min(kBlockK, end - kb);
        T* S = scores.data();  // (rows, cols), leading dimension cols
        gemm<T>(false, true, rows, cols, D, T(p.scale), q_blk, qs, k_head + kb * ks, ks, T(0), S, cols);
        cap_scores(p, S, rows * cols);
        for (int64_t r = 0; r < rows; ++r) {
          T* row = S + r * cols;
          mask_row(p, s, h, i0 + r, kb, row, cols);
          // a NaN score (from a visible key or the query) must reach the output as NaN, so the
          // max propagates it rather than std::max's silent pick of the other operand
          const T m_tile = row_max(row, cols);
          const T m_new = std::isnan(m_tile) || std::isnan(row_m[r]) ? std::numeric_limits<T>::quiet_NaN()
                                                                     : std::max(row_m[r], m_tile);
          if (m_new == neg_inf) {  // nothing visible yet: the row of P is 0
            std::fill(row, row + cols, T(0));
            continue;
          }
          const T correction = std::exp(row_m[r] - m_new);
          row_l[r] = row_l[r] * correction + exp_shifted_sum(row, cols, m_new);
          row_m[r] = m_new;
          if (correction != T(1))
            for (int64_t d = 0; d < Dv; ++d) acc[r * Dv + d] *= correction;
        }
        // row sums above use the undropped P; the PV product uses P ∘ keep / (1 - p)
        if (p.dropout_p > 0) dropout_tile(p, s, h, i0, rows, kb, cols, S);
        gemm<T>(false, false, rows, Dv, cols, T(1), S, cols, v_head + kb * vs, vs, T(1), acc.data(), Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out + (s.q_row + i0 + r) * os + h * Dv;
        const bool any = !(row_l[r] <= T(0));  // a NaN sum (NaN in a visible score) keeps its NaN
        T inv = any ? T(1) / row_l[r] : T(0);
        T row_lse = any ? row_m[r] + std::log(row_l[r]) : neg_inf;
        if (sinks != nullptr) {  // the sink joins the denominator: lse' = logaddexp(lse, sink), out ∘= exp(lse - lse')
          const T with_sink = logaddexp(row_lse, sinks[h]);
          if (any) inv *= std::exp(row_lse - with_sink);
          row_lse = with_sink;
        }
        for (int64_t d = 0; d < Dv; ++d) o[d] = acc[r * Dv + d] * inv;
        lse[blk.lse_offset(p) + r] = row_lse;
      }
    }
  });
}

// P = exp(scale * q kᵀ - lse) on a (rows, cols) tile, masked; rows with lse = -inf give 0. With
// softcap, capped first, and tanh_buf (rows, cols) keeps tanh(s / softcap) for the backward.
template <typename T>
void recompute_probs(const Problem& p, const Sample& s, int64_t h, int64_t i0, int64_t rows, int64_t kb, int64_t cols,
                     const T* q_blk, const T* k_blk, const T* lse_blk, T* P, T* tanh_buf) {
  gemm<T>(false, true, rows, cols, p.dim, T(p.scale), q_blk, p.q_stride(), k_blk, p.k_stride(), T(0), P, cols);
  cap_scores(p, P, rows * cols, tanh_buf);
  for (int64_t r = 0; r < rows; ++r) {
    T* row = P + r * cols;
    if (lse_blk[r] == -std::numeric_limits<T>::infinity()) {
      std::fill(row, row + cols, T(0));
      continue;
    }
    mask_row(p, s, h, i0 + r, kb, row, cols);
    exp_shifted_sum(row, cols, lse_blk[r]);
  }
}

// dS = P ∘ (dP - delta) in place of dP, per row; 0 where P is 0 (a hidden key), also when a NaN
// row's delta is NaN: a hidden key's gradient is exactly 0, as the reference's.
template <typename T>
void softmax_backward(int64_t rows, int64_t cols, const T* P, T* dP, const T* delta) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const T p = P[r * cols + c];
      dP[r * cols + c] = p == T(0) ? T(0) : p * (dP[r * cols + c] - delta[r]);
    }
}

// dS ∘= 1 - t² (t = tanh(s / softcap)): the gradient at the capped score becomes the one at the raw
// scaled score.
template <typename T>
void uncap_grad(const Problem& p, int64_t n, T* dS, const T* t) {
  if (p.softcap <= 0) return;
  for (int64_t e = 0; e < n; ++e) dS[e] *= T(1) - t[e] * t[e];
}

// One (rows, cols) tile of the backward, shared by both schedules: recompute P, then
// dV += P_vᵀ dO (P_v: P after dropout, as the forward multiplied V by it), dS = P ∘ (dP - delta)
// (dP = dO Vᵀ, with the same dropout mask; written to dmask when asked, then times the softcap
// factor) left in dP, and dK += scale dSᵀ Q. The caller adds dQ += scale dS K where it owns dQ.
// dk/dv point at the tile's first key row (leading dims D, Dv).
template <typename T>
void tile_dk_dv(const Problem& p, const Sample& s, int64_t h, int64_t i0, int64_t rows, int64_t kb, int64_t cols,
                const T* q_blk, const T* g_blk, const T* k_blk, const T* v_blk, const T* lse_blk, const T* delta_blk,
                T* dk, T* dv, T* P, T* P_drop, T* dP, T* tanh_buf) {
  const int64_t D = p.dim, Dv = p.dim_v, qs = p.q_stride(), vs = p.v_stride(), os = p.o_stride();
  recompute_probs(p, s, h, i0, rows, kb, cols, q_blk, k_blk, lse_blk, P, tanh_buf);
  // dP (rows, cols) = dO Vᵀ
  gemm<T>(false, true, rows, cols, Dv, T(1), g_blk, os, v_blk, vs, T(0), dP, cols);
  const T* P_v = P;  // the probabilities the forward multiplied V by
  if (p.dropout_p > 0) {  // dV takes the dropped P, dP the same mask: dP ∘= keep / (1 - p)
    std::copy(P, P + rows * cols, P_drop);
    dropout_tile(p, s, h, i0, rows, kb, cols, P_drop, dP);
    P_v = P_drop;
  }
  // dV (cols, Dv) += P_vᵀ dO
  gemm<T>(true, false, cols, Dv, rows, T(1), P_v, cols, g_blk, os, T(1), dv, Dv);
  softmax_backward(rows, cols, P, dP, delta_blk);
  if (s.dmask != nullptr)  // the gradient at the final score is the bias's
    for (int64_t r = 0; r < rows; ++r)
      std::copy(dP + r * cols, dP + (r + 1) * cols,
                static_cast<T*>(s.dmask) + h * p.dmask_head + (i0 + r) * p.dmask_row + kb);
  uncap_grad(p, rows * cols, dP, tanh_buf);
  // dK (cols, D) += scale dSᵀ Q
  gemm<T>(true, false, cols, D, rows, T(p.scale), dP, cols, q_blk, qs, T(1), dk, D);
}

// With enough (sample, kv head) pairs to keep every thread busy, the backward runs as one pass:
// a task owns a (sample, kv head) and every query head of its group, so it accumulates dK and dV
// over all its query blocks and finishes each query block's dQ in the same sweep over the keys.
// P is recomputed once per tile, not twice (once for dK/dV and once for dQ, as the two-pass
// form below must, whose tasks split a head's keys to find parallelism when pairs are few):
// five GEMMs per tile instead of seven. PyTorch's CPU flash-attention backward is organised
// the same way (one task per (sample, head)).
constexpr int64_t kOnePassTasksPerThread = 4;

template <typename T>
void backward_one_pass(const Problem& p, const T* dout, const T* q, const T* k, const T* v, const T* lse,
                       const T* delta, int64_t max_k, T* dq, T* dk, T* dv) {
  const int64_t D = p.dim, Dv = p.dim_v, qs = p.q_stride(), ks = p.k_stride(), vs = p.v_stride(), os = p.o_stride();
  parallel_tasks(p.batch * p.heads_kv, [&](const auto& claim) {
    std::vector<T> P(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), dq_acc(kBlockQ * D);
    std::vector<T> dk_acc(max_k * D), dv_acc(max_k * Dv);
    std::vector<T> P_drop(p.dropout_p > 0 ? kBlockQ * kBlockK : 0);  // P ∘ keep / (1 - p)
    std::vector<T> tanh_buf(p.softcap > 0 ? kBlockQ * kBlockK : 0);
    for (int64_t t; (t = claim()) >= 0;) {
      const Sample& s = p.samples[t / p.heads_kv];
      const int64_t hk = t % p.heads_kv;
      if (s.k_len == 0) continue;  // dk, dv stay zero; the queries' dq are zero (written below)
      const T* k_head = k + s.k_row * ks + hk * D;
      const T* v_head = v + s.k_row * vs + hk * Dv;
      std::fill(dk_acc.begin(), dk_acc.begin() + s.k_len * D, T(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + s.k_len * Dv, T(0));
      for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
        for (int64_t i0 = 0; i0 < s.q_len; i0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, s.q_len - i0);
          const T* q_blk = q + (s.q_row + i0) * qs + h * D;
          const T* g_blk = dout + (s.q_row + i0) * os + h * Dv;
          const int64_t lse_at = s.lse_base + h * p.lse_head + i0;
          std::fill(dq_acc.begin(), dq_acc.begin() + rows * D, T(0));
          const auto [first, end] = key_blocks(p, s, h, i0, rows);
          for (int64_t kb = first; kb < end; kb += kBlockK) {
            const int64_t cols = std::min(kBlockK, end - kb);
            const T* k_blk = k_head + kb * ks;
            const T* v_blk = v_head + kb * vs;
            tile_dk_dv(p, s, h, i0, rows, kb, cols, q_blk, g_blk, k_blk, v_blk, lse + lse_at, delta + lse_at,
                       dk_acc.data() + kb * D, dv_acc.data() + kb * Dv, P.data(), P_drop.data(), dP.data(),
                       tanh_buf.data());
            // dQ (rows, D) += scale dS K
            gemm<T>(false, false, rows, D, cols, T(p.scale), dP.data(), cols, k_blk, ks, T(1), dq_acc.data(), D);
          }
          for (int64_t r = 0; r < rows; ++r)
            std::copy(dq_acc.data() + r * D, dq_acc.data() + (r + 1) * D, dq + (s.q_row + i0 + r) * qs + h * D);
        }
      }
      for (int64_t c = 0; c < s.k_len; ++c) {
        std::copy(dk_acc.data() + c * D, dk_acc.data() + (c + 1) * D, dk + (s.k_row + c) * ks + hk * D);
        std::copy(dv_acc.data() + c * Dv, dv_acc.data() + (c + 1) * Dv, dv + (s.k_row + c) * vs + hk * Dv);
      }
    }
  });
  // samples without keys: their queries' dq is zero
  for (const Sample& s : p.samples) {
    if (s.k_len != 0) continue;
    for (int64_t i = 0; i < s.q_len; ++i) std::fill(dq + (s.q_row + i) * qs, dq + (s.q_row + i + 1) * qs, T(0));
  }
}

// Backward (FlashAttention-2's): delta = rowsum(dO ∘ O) - dlse, then dK/dV per (sample, kv head,
// key block) over every query of the head group, and dQ per (sample, head, query block). Each
// output element has one owner task and a fixed summation order, so results are deterministic.
template <typename T>
void backward(const Problem& p, const T* dout, const T* dlse, const T* q, const T* k, const T* v, const T* out,
              const T* lse, int64_t lse_numel, T* dq, T* dk, T* dv) {
  const int64_t D = p.dim, Dv = p.dim_v, qs = p.q_stride(), ks = p.k_stride(), vs = p.v_stride(), os = p.o_stride();
  std::vector<T> delta(lse_numel, T(0));  // indexed like lse
  parallel_for(0, p.batch * p.heads_q, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Sample& s = p.samples[t / p.heads_q];
      const int64_t h = t % p.heads_q;
      for (int64_t i = 0; i < s.q_len; ++i) {
        const T* o = out + (s.q_row + i) * os + h * Dv;
        const T* g = dout + (s.q_row + i) * os + h * Dv;
        const T sum = dot(o, g, Dv);
        const int64_t idx = s.lse_base + h * p.lse_head + i;
        delta[idx] = sum - (dlse != nullptr ? dlse[idx] : T(0));
      }
    }
  });

  int64_t max_k = 0;
  for (const Sample& s : p.samples) max_k = std::max(max_k, s.k_len);
  if (p.batch * p.heads_kv >= kOnePassTasksPerThread * num_threads()) {
    backward_one_pass(p, dout, q, k, v, lse, delta.data(), max_k, dq, dk, dv);
    return;
  }
  const int64_t k_blocks = (max_k + kBlockK - 1) / kBlockK;
  parallel_tasks(p.batch * p.heads_kv * k_blocks, [&](const auto& claim) {
    std::vector<T> P(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), dk_acc(kBlockK * D), dv_acc(kBlockK * Dv);
    std::vector<T> P_drop(p.dropout_p > 0 ? kBlockQ * kBlockK : 0);  // P ∘ keep / (1 - p)
    std::vector<T> tanh_buf(p.softcap > 0 ? kBlockQ * kBlockK : 0);
    for (int64_t t; (t = claim()) >= 0;) {
      const Sample& s = p.samples[t / (p.heads_kv * k_blocks)];
      const int64_t hk = (t / k_blocks) % p.heads_kv, kb = (t % k_blocks) * kBlockK;
      if (kb >= s.k_len) continue;
      const int64_t cols = std::min(kBlockK, s.k_len - kb);
      const T* k_blk = k + (s.k_row + kb) * ks + hk * D;
      const T* v_blk = v + (s.k_row + kb) * vs + hk * Dv;
      std::fill(dk_acc.begin(), dk_acc.end(), T(0));
      std::fill(dv_acc.begin(), dv_acc.end(), T(0));
      // causal: queries before this one see no key of the block
      const int64_t first_q = p.causal ? std::max<int64_t>(0, kb - (s.k_len - s.q_len)) : 0;
      for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
        for (int64_t i0 = (first_q / kBlockQ) * kBlockQ; i0 < s.q_len; i0 += kBlockQ) {
          const int64_t rows = std::min(kBlockQ, s.q_len - i0);
          const auto [first, end] = key_blocks(p, s, h, i0, rows);
          if (kb + cols <= first || kb >= end) continue;  // no query of the block sees this key block
          const T* q_blk = q + (s.q_row + i0) * qs + h * D;
          const T* g_blk = dout + (s.q_row + i0) * os + h * Dv;
          const int64_t lse_at = s.lse_base + h * p.lse_head + i0;
          tile_dk_dv(p, s, h, i0, rows, kb, cols, q_blk, g_blk, k_blk, v_blk, lse + lse_at, delta.data() + lse_at,
                     dk_acc.data(), dv_acc.data(), P.data(), P_drop.data(), dP.data(), tanh_buf.data());
        }
      }
      for (int64_t c = 0; c < cols; ++c) {
        for (int64_t d = 0; d < D; ++d) dk[(s.k_row + kb + c) * ks + hk * D + d] = dk_acc[c * D + d];
        for (int64_t d = 0; d < Dv; ++d) dv[(s.k_row + kb + c) * vs + hk * Dv + d] = dv_acc[c * Dv + d];
      }
    }
  });

  parallel_tasks(p.batch * p.heads_q * query_blocks(p), [&](const auto& claim) {
    std::vector<T> P(kBlockQ * kBlockK), dP(kBlockQ * kBlockK), dq_acc(kBlockQ * D);
    std::vector<T> tanh_buf(p.softcap > 0 ? kBlockQ * kBlockK : 0);
    QueryBlock blk;
    for (int64_t t; (t = claim()) >= 0;) {
      if (!query_block(p, t, blk)) continue;
      const Sample& s = *blk.s;
      const int64_t i0 = blk.i0, rows = blk.rows;
      const T* q_blk = q + blk.q_offset(p);
      const T* g_blk = dout + (s.q_row + i0) * os + blk.h * Dv;
      const int64_t lse_at = blk.lse_offset(p);
      std::fill(dq_acc.begin(), dq_acc.end(), T(0));
      const auto [first, end] = key_blocks(p, s, blk.h, i0, rows);
      for (int64_t kb = first; kb < end; kb += kBlockK) {
        const int64_t cols = std::min(kBlockK, end - kb);
        const T* k_blk = k + (s.k_row + kb) * ks + blk.hk * D;
        const T* v_blk = v + (s.k_row + kb) * vs + blk.hk * Dv;
        recompute_probs(p, s, blk.h, i0, rows, kb, cols, q_blk, k_blk, lse + lse_at, P.data(), tanh_buf.data());
        gemm<T>(false, true, rows, cols, Dv, T(1), g_blk, os, v_blk, vs, T(0), dP.data(), cols);
        if (p.dropout_p > 0) dropout_tile(p, s, blk.h, i0, rows, kb, cols, dP.data());
        softmax_backward(rows, cols, P.data(), dP.data(), delta.data() + lse_at);
        uncap_grad(p, rows * cols, dP.data(), tanh_buf.data());
        // dQ (rows, D) += scale dS K
        gemm<T>(false, false, rows, D, cols, T(p.scale), dP.data(), cols, k_blk, ks, T(1), dq_acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t d = 0; d < D; ++d) dq[blk.q_offset(p) + r * qs + d] = dq_acc[r * D + d];
    }
  });
}

// ----------------------------------------------------------------------------- bindings

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, int64_t ndim) {
  for (const Tensor* t : {&q, &k, &v}) {
    MMFUSE_CHECK(t->dim() == ndim && t->is_cpu() && t->scalar_type() == q.scalar_type(), op,
                 ": q, k, v must be CPU tensors of rank ", ndim, " and one dtype, got ", shape(*t), " ",
                 t->scalar_type());
  }
  MMFUSE_CHECK(is_floating(q.scalar_type()), op, ": q, k, v must be floating point, got ", q.scalar_type());
  // the BLAS takes int sizes and leading dimensions: a token row (Hq * D or Hq * Dv elements) must fit
  MMFUSE_CHECK(q.size(-2) * std::max(q.size(-1), v.size(-1)) <= std::numeric_limits<int>::max(), op,
               ": q's heads * head dim (and v's head dim) must be at most 2**31 - 1, got q ", shape(q), " v ",
               shape(v));
  MMFUSE_CHECK(k.sizes().slice(0, ndim - 1) == v.sizes().slice(0, ndim - 1) && k.size(-1) == q.size(-1) &&
                   k.size(-1) > 0 && v.size(-1) > 0 && k.size(-2) > 0 && q.size(-2) > 0 &&
                   q.size(-2) % k.size(-2) == 0,
               op, ": k must have q's head dim and a head count dividing q's, v k's shape but for its head dim; got q ",
               shape(q), " k ", shape(k), " v ", shape(v));
}

ScalarType compute_type(const Tensor& q) {
  return q.scalar_type() == dtype::kDouble ? dtype::kDouble : dtype::kFloat;
}

// out's (and grad_out's) shape: q's with v's head dim
std::vector<int64_t> out_shape(const Tensor& q, const Tensor& v) {
  const IntArrayRef sizes = q.sizes();
  std::vector<int64_t> dims(sizes.begin(), sizes.end());
  dims.back() = v.size(-1);
  return dims;
}

// t in the compute type, contiguous (t itself when it already is)
Tensor compute_copy(const Tensor& t, ScalarType ct) { return mmfuse::contiguous(to_dtype(t, ct)); }

Problem padded_problem(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                       const std::optional<Tensor>& kv_lens, const Tensor& bias, double scale, bool causal) {
  const int64_t batch = q.size(0), len_q = q.size(1), len_k = k.size(1);
  MMFUSE_CHECK(k.size(0) == batch, op, ": k must have q's batch size ", batch, ", got ", shape(k));
  Problem p{batch, q.size(2), k.size(2), q.size(3), len_q, len_q, scale, causal, {}};
  p.dim_v = v.size(3);
  Tensor lens_c;
  const int64_t* lens = nullptr;
  if (kv_lens) {
    MMFUSE_CHECK(kv_lens->dim() == 1 && kv_lens->size(0) == batch && kv_lens->is_cpu() &&
                     is_integral(kv_lens->scalar_type(), /*include_bool=*/false),
                 op, ": kv_lens must be a CPU integer (B=", batch, ",) tensor, got ", shape(*kv_lens), " ",
                 kv_lens->scalar_type());
    lens_c = compute_copy(*kv_lens, dtype::kLong);
    lens = lens_c.const_data_ptr<int64_t>();
  }
  const bool has_bias = bias.defined();
  const char* bias_rows = has_bias ? static_cast<const char*>(bias.data_ptr()) : nullptr;
  const int64_t bias_row_bytes = len_k * static_cast<int64_t>(has_bias ? bias.element_size() : 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lens != nullptr ? lens[b] : len_k;
    MMFUSE_CHECK(n >= 0 && n <= len_k, op, ": kv_lens[", b, "] must lie in [0, ", len_k, "], got ", n);
    p.samples.push_back({b * len_q, len_q, b * len_k, n, bias_rows ? bias_rows + b * bias_row_bytes : nullptr,
                         b * p.heads_q * len_q, nullptr, b});
  }
  return p;
}

// out[i] = -inf where mask[i], else 0: the additive form of a bool mask, in a new contiguous tensor of
// mask's shape, dtype `type` (float or double), on like's device.
Tensor additive_from_bool(const Tensor& mask, const Tensor& like, ScalarType type) {
  const Tensor m = mmfuse::contiguous(mask);
  Tensor out = empty_like_as(like, m.sizes(), type);
  const int64_t n = m.numel();
  if (n == 0) return out;
  const bool* src = m.const_data_ptr<bool>();
  MMFUSE_DISPATCH_FLOATING(type, "additive_from_bool", [&] {
    scalar_t* dst = ptr<scalar_t>(out);
    constexpr scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
    parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) dst[i] = src[i] ? neg_inf : scalar_t(0);
    });
  });
  return out;
}

// (B, Lk) additive mask in the compute type, -inf on ignored keys: one vector add per score row.
Tensor mask_bias(const char* op, const std::optional<Tensor>& key_padding_mask, const Tensor& k) {
  if (!key_padding_mask) return Tensor();
  MMFUSE_CHECK(key_padding_mask->scalar_type() == dtype::kBool && key_padding_mask->dim() == 2 &&
                   key_padding_mask->size(0) == k.size(0) && key_padding_mask->size(1) == k.size(1) &&
                   key_padding_mask->is_cpu(),
               op, ": key_padding_mask must be a CPU bool (B, Lk) tensor, got ", shape(*key_padding_mask));
  return additive_from_bool(*key_padding_mask, k, compute_type(k));
}

// attn_mask as a contiguous additive tensor of dtype `bias_type` (bool: True -> -inf, False -> 0; any
// float dtype converted), or undefined without one; shapes as attention_mask_view returns them.
Tensor attention_mask_bias(const char* op, const std::optional<Tensor>& attn_mask, const Tensor& q, const Tensor& k,
                           bool varlen, int64_t min_width, ScalarType bias_type) {
  const Tensor full = attention_mask_view(op, attn_mask, q, k, varlen, min_width);
  if (!full.defined()) return full;
  if (full.scalar_type() == dtype::kBool) return additive_from_bool(full, q, bias_type);
  return compute_copy(full, bias_type);
}

// The variant arguments every entry point shares.
struct Variants {
  const std::optional<Tensor>& attn_mask;
  double dropout_p;
  const std::optional<Tensor>& philox;
  double softcap;
  const std::optional<Tensor>& sinks;
};

// Points p's samples at the attention mask `bias` (from attention_mask_bias; its last dim is the row stride)
// and sets up dropout from philox = (seed, offset) int64, softcap and sinks (kept alive in `sinks_c`).
// len_q, len_k: the padded sizes of the dropout counter. Varlen samples' masks start at their first row.
void add_variants(const char* op, Problem& p, const Tensor& bias, const Variants& x, int64_t len_q, int64_t len_k,
                  bool varlen, const Tensor& q, Tensor& sinks_c) {
  if (bias.defined()) {
    const int64_t rows = bias.size(-2), width = bias.size(-1);
    p.attn_bias_row = width;
    p.attn_bias_head = bias.size(-3) == 1 ? 0 : rows * width;
    const int64_t sample_stride = varlen ? 0 : (bias.size(0) == 1 ? 0 : bias.size(1) * rows * width);
    const char* base = static_cast<const char*>(bias.data_ptr());
    const int64_t element = static_cast<int64_t>(bias.element_size());
    for (Sample& s : p.samples) {
      const int64_t first = varlen ? s.q_row * width : s.index * sample_stride;
      s.attn_bias = base + first * element;
    }
  }
  MMFUSE_CHECK(std::isfinite(x.softcap) && x.softcap >= 0.0, op,
               ": softcap must be a finite float >= 0 (0: off), got ", x.softcap);
  // in float32 compute a cap outside float's normal range would become inf (NaN scores) or 0 (no cap)
  MMFUSE_CHECK(compute_type(q) == dtype::kDouble || x.softcap == 0.0 ||
                   (x.softcap >= std::numeric_limits<float>::min() && x.softcap <= std::numeric_limits<float>::max()),
               op, ": softcap must be 0 or within float32's normal range [", std::numeric_limits<float>::min(), ", ",
               std::numeric_limits<float>::max(), "] for ", q.scalar_type(), " inputs, got ", x.softcap);
  p.softcap = x.softcap;
  if (x.sinks) {
    const Tensor& t = *x.sinks;
    MMFUSE_CHECK(t.dim() == 1 && t.size(0) == p.heads_q && t.is_cpu() && is_floating(t.scalar_type()), op,
                 ": sinks must be a CPU float (Hq,) = (", p.heads_q, ",) tensor, got ", shape(t), " ",
                 t.scalar_type());
    sinks_c = compute_copy(t, compute_type(q));
    p.sinks = sinks_c.data_ptr();
  }
  MMFUSE_CHECK(x.dropout_p >= 0.0 && x.dropout_p < 1.0, op, ": dropout_p must lie in [0, 1), got ", x.dropout_p);
  if (x.dropout_p == 0.0) return;
  const auto& philox = x.philox;
  MMFUSE_CHECK(philox && philox->dim() == 1 && philox->size(0) == 2 && philox->scalar_type() == dtype::kLong &&
                   philox->is_cpu(),
               op, ": dropout needs philox, a CPU int64 (2,) tensor (seed, offset), got ",
               philox ? shape(*philox) : std::string("[]"), philox ? " " : " none");
  const Tensor ph = mmfuse::contiguous(*philox);
  const int64_t* seed_offset = ph.const_data_ptr<int64_t>();
  p.seed = static_cast<uint64_t>(seed_offset[0]);
  p.offset = static_cast<uint64_t>(seed_offset[1]);
  p.dropout_p = x.dropout_p;
  p.dropout_scale = 1.0 / (1.0 - x.dropout_p);
  p.keep_threshold = static_cast<uint32_t>(std::floor(x.dropout_p * 4294967296.0));
  p.len_q = len_q;
  p.len_k = len_k;
}

// Points p's samples at key_ranges (kept alive in `ranges_c`): padded (B, Lq, 2) or (B, Hq, Lq, 2),
// varlen (total_q, 2) or (Hq, total_q, 2), int32 [start, end) with 0 <= start <= end <= the sample's
// key count (padded: Lk; varlen: its sequence's length); the first bad query is named.
void add_ranges(const char* op, Problem& p, const std::optional<Tensor>& key_ranges, const Tensor& q,
                const Tensor& k, bool varlen, Tensor& ranges_c) {
  if (!key_ranges) return;
  const Tensor& r = *key_ranges;
  const int64_t rows = varlen ? q.size(0) : q.size(1), batch = p.batch, heads = p.heads_q;
  const bool per_head = varlen ? r.dim() == 3 : r.dim() == 4;
  const bool shape_ok =
      r.size(-1) == 2 && r.dim() >= 2 && r.size(-2) == rows &&
      (varlen ? (r.dim() == 2 || (r.dim() == 3 && r.size(0) == heads))
              : ((r.dim() == 3 && r.size(0) == batch) || (r.dim() == 4 && r.size(0) == batch && r.size(1) == heads)));
  MMFUSE_CHECK(shape_ok && r.scalar_type() == dtype::kInt && r.is_cpu(), op, ": key_ranges must be a CPU int32 ",
               varlen ? "(total_q, 2) or (Hq, total_q, 2)" : "(B, Lq, 2) or (B, Hq, Lq, 2)", " tensor with rows = ",
               rows, ", B = ", batch, ", Hq = ", heads, ", got ", shape(r), " ", r.scalar_type(), " on ",
               device_str(r.device()));
  ranges_c = mmfuse::contiguous(r);
  const int32_t* base = ranges_c.const_data_ptr<int32_t>();
  p.ranges_head = per_head ? rows * 2 : 0;  // a head's (rows, 2) block, or shared by every head
  const int64_t heads_in = per_head ? heads : 1;
  const int64_t len_k = varlen ? 0 : k.size(1);
  for (Sample& s : p.samples) {
    s.ranges = varlen ? base + 2 * s.q_row : base + s.index * heads_in * rows * 2;
    const int64_t bound = varlen ? s.k_len : len_k;  // its sequence's keys, or the padded Lk
    for (int64_t h = 0; h < heads_in; ++h)
      for (int64_t i = 0; i < s.q_len; ++i) {
        const int32_t* x = s.ranges + h * p.ranges_head + 2 * i;
        MMFUSE_CHECK(0 <= x[0] && x[0] <= x[1] && x[1] <= bound, op,
                     ": key_ranges must satisfy 0 <= start <= end <= ", bound,
                     varlen ? " (the sequence's key count)" : " (Lk)", ", got [", x[0], ", ", x[1], ") at sample ",
                     s.index, per_head ? ", head " : "", per_head ? std::to_string(h) : std::string(), ", query ", i);
      }
  }
}

// mask_grad's output, zero-filled, with p's samples pointing at their rows: padded (B, Hq, Lq, Lk), varlen
// (Hq, total_q, W); an empty tensor without mask_grad.
Tensor add_dmask(const char* op, Problem& p, bool mask_grad, const Tensor& bias, const Tensor& q, bool varlen) {
  const ScalarType ct = compute_type(q);
  if (!mask_grad) return empty_like_as(q, std::vector<int64_t>{0}, ct);
  MMFUSE_CHECK(bias.defined(), op, ": mask_grad needs attn_mask (the gradient is the mask's), got none");
  const int64_t rows = varlen ? q.size(0) : q.size(1), width = bias.size(-1);
  Tensor dmask;
  if (varlen)
    dmask = zeros_like_as(q, {p.heads_q, rows, width}, ct);
  else
    dmask = zeros_like_as(q, {p.batch, p.heads_q, rows, width}, ct);
  p.dmask_row = width;
  p.dmask_head = rows * width;
  char* base = static_cast<char*>(dmask.data_ptr());
  const int64_t element = static_cast<int64_t>(dmask.element_size());
  for (Sample& s : p.samples) {
    const int64_t first = varlen ? s.q_row * width : s.index * p.heads_q * rows * width;
    s.dmask = base + first * element;
  }
  return dmask;
}

Problem varlen_problem(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                       const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal) {
  for (const Tensor* cu : {&cu_q, &cu_k})
    MMFUSE_CHECK(cu->dim() == 1 && cu->size(0) >= 1 && cu->scalar_type() == dtype::kInt && cu->is_cpu(), op,
                 ": cu_seqlens must be CPU int32 (B+1,) tensors, got ", shape(*cu), " ", cu->scalar_type());
  MMFUSE_CHECK(cu_q.size(0) == cu_k.size(0), op, ": cu_seqlens_q and cu_seqlens_k must have one length");
  const int64_t batch = cu_q.size(0) - 1, total_q = q.size(0), total_k = k.size(0);
  Problem p{batch, q.size(1), k.size(1), q.size(2), max_q, total_q, scale, causal, {}};
  p.dim_v = v.size(2);
  const Tensor cq = mmfuse::contiguous(cu_q), ck = mmfuse::contiguous(cu_k);
  const int32_t* a = cq.const_data_ptr<int32_t>();
  const int32_t* c = ck.const_data_ptr<int32_t>();
  MMFUSE_CHECK(a[0] == 0 && c[0] == 0 && a[batch] == total_q && c[batch] == total_k, op,
               ": cu_seqlens_q and cu_seqlens_k must run from 0 to q's and k's row counts (", total_q, ", ", total_k,
               "), got [", a[0], ", ", a[batch], "] and [", c[0], ", ", c[batch], "]");
  // the task grid is sized by the longest real sequence, never by the caller's upper bound
  p.max_q = 0;
  for (int64_t b = 0; b < batch; ++b) {
    MMFUSE_CHECK(a[b + 1] >= a[b] && c[b + 1] >= c[b], op,
                 ": cu_seqlens_q and cu_seqlens_k must be non-decreasing, ", "got a decrease at sample ", b);
    const int64_t len_q = a[b + 1] - a[b], len_k = c[b + 1] - c[b];
    MMFUSE_CHECK(len_q <= max_q, op, ": max_seqlen_q must be >= the longest query sequence, got ", max_q, " < ",
                 len_q, " (sample ", b, ")");
    MMFUSE_CHECK(len_k <= max_k, op, ": max_seqlen_k must be >= the longest key sequence, got ", max_k, " < ", len_k,
                 " (sample ", b, ")");
    p.max_q = std::max(p.max_q, len_q);
    p.samples.push_back({a[b], len_q, c[b], len_k, nullptr, a[b], nullptr, b});
  }
  return p;
}

int64_t longest_keys(const Problem& p) {
  int64_t n = 0;
  for (const Sample& s : p.samples) n = std::max(n, s.k_len);
  return n;
}

// Per token row of k and v ((B, Lk) padded, b-major; (total_k,) packed): 1 for a key that no query
// can see. None when nothing can hide a key.
using HiddenRows = std::optional<std::vector<uint8_t>>;

// Whether a row of t (rows, ...) that `mask` (rows,) marks holds a non-finite value: one read of
// the marked rows. t is contiguous float or double.
bool hidden_row_not_finite(const Tensor& t, const std::vector<uint8_t>& mask) {
  const uint8_t* h = mask.data();
  const int64_t rows = static_cast<int64_t>(mask.size()), row_size = rows == 0 ? 0 : t.numel() / rows;
  if (row_size == 0) return false;
  std::atomic<bool> dirty{false};
  MMFUSE_DISPATCH_FLOATING(t.scalar_type(), "hidden_row_not_finite", [&] {
    const scalar_t* data = t.const_data_ptr<scalar_t>();
    parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1 && !dirty.load(std::memory_order_relaxed); ++r) {
        if (!h[r]) continue;
        const scalar_t* row = data + r * row_size;
        for (int64_t e = 0; e < row_size; ++e)
          if (!std::isfinite(row[e])) {
            dirty = true;
            break;
          }
      }
    });
  });
  return dirty;
}

// Zeroes the rows of t (contiguous float or double, (rows, ...)) that `mask` marks, in place.
void zero_rows(Tensor& t, const std::vector<uint8_t>& mask) {
  const int64_t rows = static_cast<int64_t>(mask.size()), row_size = rows == 0 ? 0 : t.numel() / rows;
  if (row_size == 0) return;
  char* data = static_cast<char*>(t.data_ptr());
  const int64_t row_bytes = row_size * static_cast<int64_t>(t.element_size());
  for (int64_t r = 0; r < rows; ++r)
    if (mask[r]) std::memset(data + r * row_bytes, 0, row_bytes);
}

// k or v in the compute type, contiguous, with the rows of keys that no query can see (hidden, or
// none) zeroed in a copy: a score tile or a product with V multiplies every key of the tile, and
// 0 · NaN would let a hidden key's NaN or inf through. The copy is made only when a hidden row
// holds a non-finite value: finding that out reads the hidden rows once, where zeroing every call
// would read and write all of k and v.
Tensor key_rows(const Tensor& t, ScalarType ct, const HiddenRows& hidden) {
  Tensor c = compute_copy(t, ct);
  if (!hidden || !hidden_row_not_finite(c, *hidden)) return c;
  if (c.data_ptr() == t.data_ptr()) c = torch::stable::clone(c);  // never write the caller's tensor
  zero_rows(c, *hidden);
  return c;
}

// The keys [lo, hi) that query i of sample s may see by its key range (head h) and the causal rule.
std::pair<int64_t, int64_t> row_window(const Problem& p, const Sample& s, int64_t h, int64_t i) {
  int64_t lo = 0, hi = s.k_len;
  if (p.causal) hi = std::clamp<int64_t>(i + s.k_len - s.q_len + 1, 0, s.k_len);
  if (s.ranges != nullptr) {
    const int32_t* r = s.ranges + h * p.ranges_head + 2 * i;
    lo = r[0], hi = std::min<int64_t>(hi, r[1]);
  }
  return {lo, std::max(lo, hi)};
}

// Whether each key j < seen.size() of sample s is seen by some query (any head) through its window
// (row_window) and, when `mask` (an additive attention mask, -inf = hidden) is given, its mask row:
// row (mask head hm, query i) at mask + hm * head_stride + i * width (a mask with one head serves every
// head). Without a mask the windows are summed in a difference array: O(Lq + Lk) per head.
template <typename T>
std::vector<uint8_t> seen_keys(const Problem& p, const Sample& s, int64_t n, const T* mask, int64_t mask_heads,
                               int64_t head_stride, int64_t width) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t range_heads = p.ranges_head != 0 ? p.heads_q : 1;
  std::vector<uint8_t> seen(n, 0);
  std::vector<int64_t> diff(n + 1, 0);
  for (int64_t h = 0; h < std::max(range_heads, mask_heads); ++h)
    for (int64_t i = 0; i < s.q_len; ++i) {
      const auto [lo, hi] = row_window(p, s, range_heads == 1 ? 0 : h, i);
      if (mask == nullptr) {
        diff[std::min(lo, n)] += 1, diff[std::min(hi, n)] -= 1;
        continue;
      }
      const T* row = mask + (mask_heads == 1 ? 0 : h) * head_stride + i * width;
      for (int64_t j = lo; j < std::min(hi, n); ++j) seen[j] |= row[j] != neg_inf;
    }
  for (int64_t j = 0, run = 0; j < n; ++j) seen[j] |= (run += diff[j]) > 0;
  return seen;
}

// Calls f with attn_bias's element pointer (float or double; a null float pointer when undefined).
template <typename F>
void with_bias_ptr(const Tensor& attn_bias, const F& f) {
  if (attn_bias.defined() && attn_bias.scalar_type() == dtype::kDouble)
    f(attn_bias.const_data_ptr<double>());
  else
    f(attn_bias.defined() ? attn_bias.const_data_ptr<float>() : static_cast<const float*>(nullptr));
}

// (B, Lk) rows: keys hidden from every query by key_padding_mask, attn_mask (its additive form,
// -inf where hidden) or key_ranges (with the causal rule: query i of sample b sees key j causally iff
// j <= i + kv_len[b] - Lq); none when none of them can hide a key.
HiddenRows hidden_keys(const std::optional<Tensor>& key_padding_mask, const Tensor& attn_bias, const Problem& p,
                       int64_t len_k) {
  const bool ranges = !p.samples.empty() && p.samples[0].ranges != nullptr;
  const bool has_bias = attn_bias.defined();
  if (!key_padding_mask && !has_bias && !ranges) return std::nullopt;
  std::vector<uint8_t> hidden(p.batch * len_k, 0);
  if (key_padding_mask) {  // (B, Lk) bool, checked by mask_bias
    const Tensor m = mmfuse::contiguous(*key_padding_mask);
    const bool* src = m.const_data_ptr<bool>();
    for (int64_t e = 0; e < p.batch * len_k; ++e) hidden[e] = src[e];
  }
  if (!has_bias && !ranges) return hidden;
  // attn_bias: (B or 1, Hq or 1, Lq, Lk)
  const int64_t mask_batch = has_bias ? attn_bias.size(0) : 1, mask_heads = has_bias ? attn_bias.size(1) : 1;
  const int64_t len_q = has_bias ? attn_bias.size(2) : 0;
  with_bias_ptr(attn_bias, [&](const auto* bias) {
    for (const Sample& s : p.samples) {
      const auto* mask = bias != nullptr ? bias + (mask_batch == 1 ? 0 : s.index) * mask_heads * len_q * len_k : nullptr;
      const std::vector<uint8_t> seen = seen_keys(p, s, len_k, mask, mask_heads, len_q * len_k, len_k);
      uint8_t* out = hidden.data() + s.index * len_k;
      for (int64_t j = 0; j < len_k; ++j) out[j] |= !seen[j];
    }
  });
  return hidden;
}

// (total_k,) rows: the packed keys that the varlen attention mask (Hq or 1, total_q, W), key_ranges and
// the causal rule hide from every query of their sequence; none without a mask or ranges.
HiddenRows hidden_keys_varlen(const Tensor& attn_bias, const Problem& p, int64_t total_k) {
  const bool ranges = !p.samples.empty() && p.samples[0].ranges != nullptr;
  const bool has_bias = attn_bias.defined();
  if (!has_bias && !ranges) return std::nullopt;
  const int64_t mask_heads = has_bias ? attn_bias.size(0) : 1, width = has_bias ? attn_bias.size(2) : 0;
  const int64_t total_q = has_bias ? attn_bias.size(1) : 0;
  std::vector<uint8_t> hidden(total_k, 1);
  with_bias_ptr(attn_bias, [&](const auto* bias) {
    for (const Sample& s : p.samples) {
      const auto* mask = bias != nullptr ? bias + s.q_row * width : nullptr;
      const std::vector<uint8_t> seen = seen_keys(p, s, s.k_len, mask, mask_heads, total_q * width, width);
      for (int64_t j = 0; j < s.k_len; ++j) hidden[s.k_row + j] = !seen[j];
    }
  });
  return hidden;
}

// lse or grad_lse: a CPU float tensor of the forward's lse shape.
void check_lse(const char* op, const char* name, const Tensor& lse, IntArrayRef lse_shape) {
  MMFUSE_CHECK(lse.sizes() == lse_shape && is_floating(lse.scalar_type()) && lse.is_cpu(), op, ": ", name,
               " must be a CPU float tensor of shape ", shape_str(lse_shape), " (the forward's lse), got ", shape(lse),
               " ", lse.scalar_type());
}

std::tuple<Tensor, Tensor> run_forward(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                                       IntArrayRef lse_shape, const HiddenRows& hidden) {
  const ScalarType ct = compute_type(q);
  const Tensor qc = compute_copy(q, ct), kc = key_rows(k, ct, hidden), vc = key_rows(v, ct, hidden);
  const std::vector<int64_t> o_shape = out_shape(q, v);
  Tensor out = empty_like_as(qc, o_shape, ct);
  Tensor lse = empty_like_as(qc, lse_shape, ct);
  MMFUSE_DISPATCH_FLOATING(ct, "cross_attention_fwd_cpu", [&] {
    forward<scalar_t>(p, qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                      ptr<scalar_t>(out), ptr<scalar_t>(lse));
  });
  return {to_dtype(out, q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> run_backward(const Problem& p, const Tensor& grad_out,
                                                        const std::optional<Tensor>& grad_lse, const Tensor& q,
                                                        const Tensor& k, const Tensor& v, const Tensor& out,
                                                        const Tensor& lse, const char* op, IntArrayRef lse_shape,
                                                        const HiddenRows& hidden, const Tensor& dmask) {
  const std::vector<int64_t> o_shape = out_shape(q, v);
  const IntArrayRef o_sizes(o_shape);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad_out", &grad_out}, {"out", &out}})
    MMFUSE_CHECK(t->sizes() == o_sizes && t->is_cpu() && is_floating(t->scalar_type()), op, ": ", name,
                 " must be a CPU float tensor of shape ", shape_str(o_sizes), " (q's with v's head dim), got ",
                 shape(*t), " ", t->scalar_type());
  check_lse(op, "lse", lse, lse_shape);
  if (grad_lse) check_lse(op, "grad_lse", *grad_lse, lse_shape);
  const ScalarType ct = compute_type(q);
  const Tensor g = compute_copy(grad_out, ct), qc = compute_copy(q, ct), kc = key_rows(k, ct, hidden),
               vc = key_rows(v, ct, hidden), oc = compute_copy(out, ct), lc = compute_copy(lse, ct);
  const Tensor dl = grad_lse ? compute_copy(*grad_lse, ct) : Tensor();
  const bool has_dl = grad_lse.has_value();
  Tensor dq = empty_like_as(qc, qc.sizes(), ct);
  // keys past a sample's length get no gradient and are not visited by the kernel
  Tensor dk = zeros_like_as(kc, kc.sizes(), ct), dv = zeros_like_as(vc, vc.sizes(), ct);
  MMFUSE_DISPATCH_FLOATING(ct, "cross_attention_bwd_cpu", [&] {
    backward<scalar_t>(p, g.const_data_ptr<scalar_t>(), has_dl ? dl.const_data_ptr<scalar_t>() : nullptr,
                       qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                       oc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(), lc.numel(), ptr<scalar_t>(dq),
                       ptr<scalar_t>(dk), ptr<scalar_t>(dv));
  });
  // exactly 0 for keys no query sees: their dS is 0, so a hidden row of dk/dv is 0 unless a NaN
  // query row multiplied it; only then is it written (no pass over dk/dv on every masked call)
  if (hidden) {
    for (Tensor* d : {&dk, &dv})
      if (hidden_row_not_finite(*d, *hidden)) zero_rows(*d, *hidden);
  }
  const ScalarType st = q.scalar_type();
  return {to_dtype(dq, st), to_dtype(dk, st), to_dtype(dv, st), dmask};
}

// A padded call's checked inputs, shared by the forward and the backward: the Problem and the tensors
// its samples point into (kept alive here), and the keys no query sees.
struct Padded {
  Tensor bias, attn_bias, sinks_c, ranges_c;
  HiddenRows hidden;
  Problem p;
  Padded(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& kv_lens,
         const std::optional<Tensor>& key_padding_mask, double scale, bool causal, const Variants& x,
         const std::optional<Tensor>& key_ranges) {
    check_qkv(op, q, k, v, 4);
    bias = mask_bias(op, key_padding_mask, k);
    attn_bias = attention_mask_bias(op, x.attn_mask, q, k, false, 0, compute_type(q));
    p = padded_problem(op, q, k, v, kv_lens, bias, scale, causal);
    add_variants(op, p, attn_bias, x, q.size(1), k.size(1), false, q, sinks_c);
    add_ranges(op, p, key_ranges, q, k, false, ranges_c);
    hidden = hidden_keys(key_padding_mask, attn_bias, p, k.size(1));
  }
};

// The same for a packed (varlen) call.
struct Varlen {
  Tensor attn_bias, sinks_c, ranges_c;
  HiddenRows hidden;
  Problem p;
  Varlen(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
         int64_t max_q, int64_t max_k, double scale, bool causal, const Variants& x,
         const std::optional<Tensor>& key_ranges) {
    check_qkv(op, q, k, v, 3);
    p = varlen_problem(op, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
    const int64_t longest_k = longest_keys(p);
    attn_bias = attention_mask_bias(op, x.attn_mask, q, k, true, longest_k, compute_type(q));
    add_variants(op, p, attn_bias, x, p.max_q, longest_k, true, q, sinks_c);
    add_ranges(op, p, key_ranges, q, k, true, ranges_c);
    hidden = hidden_keys_varlen(attn_bias, p, k.size(0));
  }
};

std::tuple<Tensor, Tensor> cross_attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const std::optional<Tensor>& kv_lens,
                                                   const std::optional<Tensor>& key_padding_mask, double scale,
                                                   bool causal, const std::optional<Tensor>& attn_mask,
                                                   double dropout_p, const std::optional<Tensor>& philox,
                                                   double softcap, const std::optional<Tensor>& sinks,
                                                   const std::optional<Tensor>& key_ranges) {
  const char* op = "cross_attention_fwd";
  const Padded s(op, q, k, v, kv_lens, key_padding_mask, scale, causal, {attn_mask, dropout_p, philox, softcap, sinks},
                 key_ranges);
  return run_forward(s.p, q, k, v, {q.size(0), q.size(2), q.size(1)}, s.hidden);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_attention_bwd_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const std::optional<Tensor>& kv_lens,
    const std::optional<Tensor>& key_padding_mask, double scale, bool causal, const std::optional<Tensor>& attn_mask,
    double dropout_p, const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges, bool mask_grad) {
  const char* op = "cross_attention_bwd";
  Padded s(op, q, k, v, kv_lens, key_padding_mask, scale, causal, {attn_mask, dropout_p, philox, softcap, sinks},
           key_ranges);
  const Tensor dmask = add_dmask(op, s.p, mask_grad, s.attn_bias, q, false);
  return run_backward(s.p, grad_out, grad_lse, q, k, v, out, lse, op, {q.size(0), q.size(2), q.size(1)}, s.hidden,
                      dmask);
}

std::tuple<Tensor, Tensor> cross_attention_varlen_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, const std::optional<Tensor>& attn_mask,
    double dropout_p, const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges) {
  const char* op = "cross_attention_varlen_fwd";
  const Varlen s(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
                 {attn_mask, dropout_p, philox, softcap, sinks}, key_ranges);
  return run_forward(s.p, q, k, v, {q.size(1), q.size(0)}, s.hidden);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_attention_varlen_bwd_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, const std::optional<Tensor>& attn_mask,
    double dropout_p, const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges, bool mask_grad) {
  const char* op = "cross_attention_varlen_bwd";
  Varlen s(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
           {attn_mask, dropout_p, philox, softcap, sinks}, key_ranges);
  const Tensor dmask = add_dmask(op, s.p, mask_grad, s.attn_bias, q, true);
  return run_backward(s.p, grad_out, grad_lse, q, k, v, out, lse, op, {q.size(1), q.size(0)}, s.hidden, dmask);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CPU, m) {
  m.impl("cross_attention_fwd", MMFUSE_BOX(&cross_attention_fwd_cpu));
  m.impl("cross_attention_bwd", MMFUSE_BOX(&cross_attention_bwd_cpu));
  m.impl("cross_attention_varlen_fwd", MMFUSE_BOX(&cross_attention_varlen_fwd_cpu));
  m.impl("cross_attention_varlen_bwd", MMFUSE_BOX(&cross_attention_varlen_bwd_cpu));
}

}  // namespace mmfuse
