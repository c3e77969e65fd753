// Accuracy of mmfuse::vec's float exp, exp_u20, erf and tanh against libm in double precision, over a dense
// sweep and the special values; prints the worst errors and exits 1 past the documented bounds.
// Built and run by tests/test_vec.py (with -mavx2 -mfma on x86, as setup.py builds the kernels).
#include "cpu/vec.h"

#include <cmath>
#include <cstdio>
#include <limits>

using V = mmfuse::vec::Vectorized<float>;

static double ulp_error(float got, double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0 : 1e30;
  if (std::isinf(want)) return got == want ? 0 : 1e30;
  const float w = static_cast<float>(want);
  const double ulp = std::nextafter(std::fabs(w), std::numeric_limits<float>::infinity()) - std::fabs(w);
  return std::fabs(got - want) / (ulp > 0 ? ulp : std::numeric_limits<float>::denorm_min());
}

int main() {
  double worst_exp = 0, worst_erf_abs = 0, worst_tanh = 0, worst_tanh_abs = 0, worst_u20 = 0;
  float at_exp = 0, at_tanh = 0, at_u20 = 0;
  for (double x0 = -87.0; x0 < 88.5; x0 += 8 * 0.00037) {
    float xs[8];
    for (int i = 0; i < 8; ++i) xs[i] = static_cast<float>(x0 + i * 0.00037);
    float e[8], f[8], t[8], u[8];
    V::loadu(xs).exp().store(e);
    mmfuse::vec::exp_u20(V::loadu(xs)).store(u);
    V::loadu(xs).erf().store(f);
    V::loadu(xs).tanh().store(t);
    for (int i = 0; i < 8; ++i) {
      const double ee = ulp_error(e[i], std::exp(double(xs[i])));
      if (ee > worst_exp) worst_exp = ee, at_exp = xs[i];
      if (xs[i] >= -86.9f) {  // exp_u20 flushes results under ~2^-125 (x < -87) to 0
        const double ue = ulp_error(u[i], std::exp(double(xs[i])));
        if (ue > worst_u20) worst_u20 = ue, at_u20 = xs[i];
      }
      worst_erf_abs = std::fmax(worst_erf_abs, std::fabs(f[i] - std::erf(double(xs[i]))));
      const double te = ulp_error(t[i], std::tanh(double(xs[i])));
      if (te > worst_tanh) worst_tanh = te, at_tanh = xs[i];
      worst_tanh_abs = std::fmax(worst_tanh_abs, std::fabs(t[i] - std::tanh(double(xs[i]))));
    }
  }
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  float sp[8] = {-inf, inf, nan, -100.f, 100.f, 0.f, -0.f, 88.7f}, e[8], t[8], f[8];
  V::loadu(sp).exp().store(e);
  V::loadu(sp).tanh().store(t);
  V::loadu(sp).erf().store(f);
  bool special = e[0] == 0 && e[1] == inf && std::isnan(e[2]) && e[3] == 0 && e[4] == inf && e[5] == 1 && e[6] == 1 &&
                 std::isfinite(e[7]) && t[0] == -1 && t[1] == 1 && std::isnan(t[2]) && t[3] == -1 && t[4] == 1 &&
                 t[5] == 0 && f[0] == -1 && f[1] == 1 && std::isnan(f[2]) && f[5] == 0;
  const float below[8] = {-87.4f, -86.5f, -1e30f, -inf, 88.72f, 88.76f, 1e30f, -0.f};
  float fb[8];
  mmfuse::vec::exp_u20(V::loadu(below)).store(fb);
  special = special && fb[0] == 0 && fb[1] > 0 && fb[2] == 0 && fb[3] == 0 && std::isfinite(fb[4]) && fb[5] == inf &&
            fb[6] == inf && fb[7] == 1;
  float uu[8];
  mmfuse::vec::exp_u20(V::loadu(sp)).store(uu);
  const bool special_u20 = uu[0] == 0 && uu[1] == inf && std::isnan(uu[2]) && uu[3] == 0 && uu[4] == inf && uu[5] == 1 &&
                           uu[6] == 1 && std::isfinite(uu[7]) && uu[7] > 3e38f;
  float mx[11] = {1, 5, -2, 7, 3, 0, 9, -1, 4, 8, 2};
  const bool max_ok = mmfuse::vec::max_all(mx, 11) == 9 && mmfuse::vec::max_all(mx, 3) == 5;
  mx[9] = nan;
  const bool max_nan = std::isnan(mmfuse::vec::max_all(mx, 11));
  std::printf("exp_u20 worst %.2f ulp at %g; special %d\n", worst_u20, at_u20, special_u20);
  std::printf("exp worst %.2f ulp at %g; erf worst abs %.3g; tanh worst %.2f ulp at %g (abs %.3g); special %d; max %d %d\n",
              worst_exp, at_exp, worst_erf_abs, worst_tanh, at_tanh, worst_tanh_abs, special, max_ok, max_nan);
  return (worst_exp <= 2.5 && worst_u20 <= 3 && special_u20 && worst_erf_abs <= 6e-7 &&
          worst_tanh_abs <= 2e-7 && special && max_ok && max_nan) ? 0 : 1;
}
