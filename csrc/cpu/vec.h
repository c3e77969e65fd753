// mmfuse::vec: the few SIMD operations the CPU kernels need, on GCC/Clang vector extensions
// (32-byte vectors: 8 floats or 4 doubles; one AVX2 register under -mavx2, two NEON registers on
// Arm). It replaces at::vec::Vectorized, whose headers the stable-ABI build may not include; the
// interface mirrors the part of it we used (loadu/store/size, arithmetic, maximum, fmadd, blendv,
// exp, erf, tanh, reductions), so the kernels read as before.
//
// The transcendental functions are polynomial approximations from Cephes (S. L. Moshier, "Methods
// and Programs for Mathematical Functions", 1989: expf's range reduction and minimax polynomial,
// tanhf's small-argument polynomial) and Abramowitz & Stegun 7.1.26 for erf (|error| <= 1.5e-7, under
// 5e-7 in float arithmetic), the same formula ATen's vectorized erf uses. exp is within 2 ulp on [-87.3, 88.7], exactly 0
// below (exp(-inf) = 0, which the softmax relies on), +inf above, NaN for NaN. Doubles take the
// scalar libm functions lane by lane.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace mmfuse {
namespace vec {

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));

template <typename T>
struct Raw;
template <>
struct Raw<float> {
  using type = f32x8;
  using mask = i32x8;
};
template <>
struct Raw<double> {
  using type = f64x4;
  using mask = i64x4;
};

template <typename T>
struct Vectorized {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "mmfuse::vec: float or double");
  using raw_t = typename Raw<T>::type;
  using mask_t = typename Raw<T>::mask;
  static constexpr int kSize = 32 / sizeof(T);

  raw_t v;

  Vectorized() : v{} {}
  Vectorized(raw_t raw) : v(raw) {}  // NOLINT: implicit, as the arithmetic below returns raw vectors
  Vectorized(T x) : v(raw_t{} + x) {}  // NOLINT: broadcast, as at::vec's
  template <typename S, typename = std::enable_if_t<std::is_arithmetic_v<S> && !std::is_same_v<S, T>>>
  Vectorized(S x) : Vectorized(static_cast<T>(x)) {}  // NOLINT: Vec(1), Vec(0.5) in generic code

  static constexpr int size() { return kSize; }
  static Vectorized loadu(const T* p) {
    Vectorized r;
    std::memcpy(&r.v, p, sizeof(raw_t));
    return r;
  }
  // the first `count` elements from p, the rest 0
  static Vectorized loadu(const T* p, int64_t count) {
    Vectorized r(T(0));
    std::memcpy(&r.v, p, sizeof(T) * count);
    return r;
  }
  void store(T* p) const { std::memcpy(p, &v, sizeof(raw_t)); }
  void store(T* p, int64_t count) const { std::memcpy(p, &v, sizeof(T) * count); }
  T operator[](int i) const { return v[i]; }

  friend Vectorized operator+(Vectorized a, Vectorized b) { return a.v + b.v; }
  friend Vectorized operator-(Vectorized a, Vectorized b) { return a.v - b.v; }
  friend Vectorized operator*(Vectorized a, Vectorized b) { return a.v * b.v; }
  friend Vectorized operator/(Vectorized a, Vectorized b) { return a.v / b.v; }
  Vectorized neg() const { return -v; }
  Vectorized abs() const {
    Vectorized r;
    for (int i = 0; i < kSize; ++i) r.v[i] = std::abs(v[i]);
    return r;
  }

  // comparisons: all-ones lanes where true, as at::vec's (a mask for blendv)
  friend mask_t operator==(Vectorized a, Vectorized b) { return a.v == b.v; }
  friend mask_t operator!=(Vectorized a, Vectorized b) { return a.v != b.v; }
  friend mask_t operator<(Vectorized a, Vectorized b) { return a.v < b.v; }
  friend mask_t operator<=(Vectorized a, Vectorized b) { return a.v <= b.v; }
  friend mask_t operator>(Vectorized a, Vectorized b) { return a.v > b.v; }
  friend mask_t operator>=(Vectorized a, Vectorized b) { return a.v >= b.v; }
  // b where mask, else a
  static Vectorized blendv(Vectorized a, Vectorized b, mask_t mask) { return mask ? b.v : a.v; }

  Vectorized exp() const;
  Vectorized erf() const;
  Vectorized tanh() const;
};

// max(a, b) that propagates NaN from either side, as at::vec::maximum
template <typename T>
inline Vectorized<T> maximum(Vectorized<T> a, Vectorized<T> b) {
  return (a.v > b.v || a.v != a.v) ? a.v : b.v;
}

template <typename T>
inline Vectorized<T> fmadd(Vectorized<T> a, Vectorized<T> b, Vectorized<T> c) {
  return a.v * b.v + c.v;  // contracted to vfmadd under -mfma
}

template <typename T>
inline T reduce_add(Vectorized<T> x) {
  T s = 0;
  for (int i = 0; i < Vectorized<T>::kSize; ++i) s += x.v[i];
  return s;
}

template <typename T>
inline T reduce_max(Vectorized<T> x) {
  T m = x.v[0];
  for (int i = 1; i < Vectorized<T>::kSize; ++i) m = (x.v[i] > m || x.v[i] != x.v[i]) ? x.v[i] : m;
  return m;
}

// max over x[0..n), NaN if any element is NaN, -inf for n = 0
template <typename T>
inline T max_all(const T* x, int64_t n) {
  using V = Vectorized<T>;
  int64_t i = 0;
  T m = -std::numeric_limits<T>::infinity();
  if (n >= V::size()) {
    V acc = V::loadu(x);
    for (i = V::size(); i + V::size() <= n; i += V::size()) acc = maximum(acc, V::loadu(x + i));
    m = reduce_max(acc);
  }
  for (; i < n; ++i) m = (x[i] > m || x[i] != x[i] || m != m) ? (m != m ? m : x[i]) : m;
  return m;
}

// ---- float transcendental functions ----------------------------------------------------------
template <>
inline Vectorized<float> Vectorized<float>::exp() const {
  using V = Vectorized<float>;
  constexpr float kHi = 88.7228391f, kLo = -87.3365447f;  // exp overflows above, is subnormal below
  const raw_t x = v;
  raw_t c = x > kHi ? raw_t{} + kHi : x;
  c = c < kLo ? raw_t{} + kLo : c;
  // n = round(x / ln 2); r = x - n ln 2 in two parts (Cody-Waite)
  const raw_t t = c * 1.44269504088896341f;
  const mask_t n = __builtin_convertvector(t + (t >= 0 ? raw_t{} + 0.5f : raw_t{} - 0.5f), mask_t);
  const raw_t nf = __builtin_convertvector(n, raw_t);
  raw_t r = c - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  raw_t p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // times 2^n through the exponent bits (n in [-126, 128]: 2^n split in two factors for n = 128)
  const mask_t half_n = n >> 1;
  raw_t s1, s2;
  const mask_t b1 = (half_n + 127) << 23, b2 = (n - half_n + 127) << 23;
  std::memcpy(&s1, &b1, sizeof(raw_t));
  std::memcpy(&s2, &b2, sizeof(raw_t));
  raw_t y = p * s1 * s2;
  y = x < kLo ? raw_t{} : y;
  y = x > kHi ? raw_t{} + std::numeric_limits<float>::infinity() : y;
  y = x != x ? x : y;
  return V(y);
}

template <>
inline Vectorized<float> Vectorized<float>::erf() const {
  // Abramowitz & Stegun 7.1.26: erf(x) = 1 - (a1 t + ... + a5 t^5) exp(-x^2), t = 1 / (1 + p |x|)
  using V = Vectorized<float>;
  const raw_t x = v;
  const raw_t ax = x < 0 ? -x : x;
  const raw_t t = 1.0f / (ax * 0.3275911f + 1.0f);
  raw_t poly = t * 1.061405429f - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  poly = poly * t;
  const raw_t e = V(-(x * x)).exp().v;
  const raw_t y = 1.0f - poly * e;
  raw_t r = x < 0 ? -y : y;
  r = x != x ? x : r;
  return V(r);
}

template <>
inline Vectorized<float> Vectorized<float>::tanh() const {
  // Cephes tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (exp(2|x|) + 1) above
  using V = Vectorized<float>;
  const raw_t x = v;
  const raw_t ax = x < 0 ? -x : x;
  const raw_t z = x * x;
  raw_t p = z * -5.70498872745e-3f + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const raw_t small = p * z * x + x;
  const raw_t e = V(ax * 2.0f).exp().v;
  raw_t large = 1.0f - 2.0f / (e + 1.0f);
  large = x < 0 ? -large : large;
  raw_t r = ax < 0.625f ? small : large;
  r = x != x ? x : r;
  return V(r);
}

// doubles: lane by lane through libm
template <>
inline Vectorized<double> Vectorized<double>::exp() const {
  Vectorized<double> r;
  for (int i = 0; i < kSize; ++i) r.v[i] = std::exp(v[i]);
  return r;
}
template <>
inline Vectorized<double> Vectorized<double>::erf() const {
  Vectorized<double> r;
  for (int i = 0; i < kSize; ++i) r.v[i] = std::erf(v[i]);
  return r;
}
template <>
inline Vectorized<double> Vectorized<double>::tanh() const {
  Vectorized<double> r;
  for (int i = 0; i < kSize; ++i) r.v[i] = std::tanh(v[i]);
  return r;
}

// A faster float exp for the attention softmax and the fused activations (silu, sigmoid, GELU's
// derivative), where exp is the cost of the loop: one rounding step (the 1.5 * 2^23 shift), a two-part ln 2, a degree-5 polynomial
// (1 + r + c2 r^2 + ... + c5 r^5, its c2..c5 fitted here for the least relative error on
// |r| <= ln 2 / 2, all doubled so that the scale 2^(n-1) stays a normal float for n = 128) and one
// exponent-bits scale, with no selects on x86: the clamps are min/max ordered so that NaN passes.
// Within 3 ulp of exp on [-86.9, 88.7]; results below about 2^-125 (x < -87) flush to 0, exp(-inf)
// = 0; +inf above 88.72 and for +inf; NaN for NaN. Half the instructions of Vectorized<float>::exp
// (the name mirrors at::vec's exp_u20, whose role it takes). Its clamps cost the same on -inf lanes,
// which masked attention score rows are full of, as on finite ones. Doubles take exp().
inline Vectorized<float> exp_u20(Vectorized<float> xv) {
  using raw_t = Vectorized<float>::raw_t;
  using mask_t = Vectorized<float>::mask_t;
  constexpr float kLo = -87.3365447f;    // round(kLo log2 e) = -126: 2^(n-1) = 0 there and below
  constexpr float kHi = 88.75f;          // past ln(FLT_MAX): exp(kHi) overflows to +inf
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: t = x log2(e) + kShift holds round(x log2 e) in its low bits
  constexpr int32_t kShiftBits = 0x4b400000;  // the bits of kShift
  const raw_t x = xv.v;
#if defined(__AVX__)
  // min/max return their second operand when either is NaN: x there, so NaN flows through
  raw_t c = _mm256_max_ps(raw_t{} + kLo, _mm256_min_ps(raw_t{} + kHi, x));
#else
  raw_t c = x < kHi ? x : raw_t{} + kHi;
  c = c > kLo ? c : raw_t{} + kLo;
  c = x != x ? x : c;
#endif
  const raw_t t = c * 1.44269504088896341f + kShift;
  const raw_t nf = t - kShift;
  raw_t r = c - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  // 2 exp(r)
  raw_t p = r * 1.66250542e-2f + 8.37802365e-2f;
  p = p * r + 3.33342284e-1f;
  p = p * r + 9.99984622e-1f;
  p = p * r + 2.0f;
  p = p * r + 2.0f;
  mask_t bits;
  std::memcpy(&bits, &t, sizeof(raw_t));
  const mask_t e = (bits - (kShiftBits - 126)) << 23;  // 2^(n-1), n = bits(t) - bits(kShift) in [-126, 128]
  raw_t scale;
  std::memcpy(&scale, &e, sizeof(raw_t));
  return Vectorized<float>(p * scale);
}
inline Vectorized<double> exp_u20(Vectorized<double> x) { return x.exp(); }

}  // namespace vec
}  // namespace mmfuse
