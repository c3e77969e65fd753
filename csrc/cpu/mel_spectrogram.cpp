// CPU kernels for mmfuse::mel_spectrogram and mmfuse::mel_spectrogram_backward.
//
// One pass per block of FB frames of one item: gather the frame straight from the waveform
// (edge padding by index arithmetic, no padded copy), Kaldi's DC removal / raw energy /
// pre-emphasis, window, real FFT, |X|^power, sparse mel projection, log. Blocks of frames are
// processed together in a structure-of-arrays layout ([element][frame in block]) so every FFT
// butterfly is a short loop over frames that the compiler vectorises. A second, light pass per
// item does Whisper's clamp at the item's max - 8.
//
// MFCC (torchaudio.transforms.MFCC): the dB or offset log, then, because top_db's clamp needs the
// max over a whole group of items, two phases: the first writes the log-mel values of the valid
// frames to a (B, n_mels, frames) scratch and keeps per-block maxima; the second clamps at the
// group max - top_db and applies the (n_mels, n_mfcc) DCT per frame into the output. The backward
// runs the same steps' adjoints: DCT^T, the clamp's gradient (ties and the max's share as
// autograd splits them), then the log's. The complex spectrum (complex_out) writes X itself as
// (B, n_bins, frames, 2) and back-propagates dL/dRe X, dL/dIm X through the same adjoint FFT.
//
// FFT: Stockham autosort mixed-radix Cooley-Tukey for any size (radix 4, 2, 3 and 5
// butterflies, a plain p-point DFT butterfly for other prime factors, O(N * sum of factors);
// e.g. 400 = 2^4 5^2, 512, 2048), twiddles precomputed in double. A real FFT of even size N is a complex FFT of N/2 (even
// samples as real parts, odd samples as imaginary parts) and one split step; odd N runs a
// complex FFT of size N on the real input. The backward runs the adjoint of the one-sided
// real DFT as one complex FFT of size N.
//
// Float logs use a branch-free Cephes logf so the loop vectorises; float64 (gradcheck) uses
// std::log and the same code otherwise, accumulating in the input's precision.
//
// Semantics match mmfuse/reference/spectrogram.py: torch.stft + torchaudio MelSpectrogram,
// openai/whisper log_mel_spectrogram (per item), Kaldi compute-fbank-feats.
#include "../stable.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mmfuse {
namespace {

constexpr int64_t FB = 8;  // frames per block: two SSE (one AVX) registers of floats per FFT element

enum PadMode : int64_t { kConstant = 0, kReflect = 1, kReplicate = 2, kKaldiReflect = 3 };
// kDbLog: 10 log10(max(x, log_floor)) (torchaudio's AmplitudeToDB, stype "power"), clamped at the
// max of its group of top_db_group items minus top_db when top_db >= 0; kOffsetLog: ln(x + log_floor)
// (torchaudio's MFCC with log_mels=True).
enum LogMode : int64_t { kNoLog = 0, kNaturalLog = 1, kWhisperLog = 2, kDbLog = 3, kOffsetLog = 4 };
enum EnergyMode : int64_t { kNoEnergy = 0, kRawEnergy = 1, kWindowedEnergy = 2 };

struct Options {
  int64_t batch, num_samples, num_frames, n_fft, win, n_bins, n_mels, n_feats;
  int64_t hop, frame_offset, pad, pad_mode;
  bool remove_dc;
  double preemphasis, power;
  int64_t log_mode;
  double log_floor;
  int64_t energy_mode;
  double energy_floor;
  bool energy_last, frames_major;
  int64_t n_mfcc;         // columns of dct (the output features when dct is given), else 0
  double top_db;          // kDbLog's clamp below the group max; < 0: none
  int64_t top_db_group;   // items [g G, (g + 1) G) share the clamp's max
  bool complex_out;       // output (B, n_bins, frames, 2): the one-sided spectrum X itself
  const int64_t* lengths;        // (B,) samples per item, or null: every item has num_samples
  const int64_t* frame_lengths;  // (B,) valid frames per item, or null: num_frames

  int64_t item_samples(int64_t b) const { return lengths ? lengths[b] : num_samples; }
  int64_t item_frames(int64_t b) const { return frame_lengths ? frame_lengths[b] : num_frames; }
  int64_t mel_column(int64_t m) const { return m + (energy_mode != kNoEnergy && !energy_last ? 1 : 0); }
  int64_t energy_column() const { return energy_last ? n_mels : 0; }
  bool clamps() const { return log_mode == kDbLog && top_db >= 0.0; }
  // Layout of the log-mel values before the DCT: (B, n_mels, frames).
  Options logs_layout() const {
    Options l = *this;
    l.n_feats = n_mels;
    l.frames_major = false;
    return l;
  }
  // Element (b, feature, frame) of the (B, frames, n_feats) or (B, n_feats, frames) output.
  int64_t out_index(int64_t b, int64_t feat, int64_t frame) const {
    return frames_major ? (b * num_frames + frame) * n_feats + feat : (b * n_feats + feat) * num_frames + frame;
  }
};

// Index into an item's samples of position j of its padded signal (`pad` zeros each side,
// then the pad_mode rule outside [0, length + 2 pad)), or -1 where the padded signal is zero.
int64_t source_index(int64_t j, int64_t length, int64_t pad, int64_t mode) {
  const int64_t padded = length + 2 * pad;
  if (padded == 0) return -1;
  if (j < 0 || j >= padded) {
    switch (mode) {
      case kConstant:
        return -1;
      case kReflect:  // torch's reflect: the edge sample is not repeated
        j = j < 0 ? -j : 2 * (padded - 1) - j;
        break;
      case kReplicate:
        break;
      default: {  // Kaldi's ExtractWindow: -1 -> 0, padded -> padded - 1, repeatedly
        j %= 2 * padded;
        if (j < 0) j += 2 * padded;
        if (j >= padded) j = 2 * padded - 1 - j;
      }
    }
    j = std::clamp<int64_t>(j, 0, padded - 1);
  }
  j -= pad;
  return j >= 0 && j < length ? j : -1;
}

// First sample of frame f in the padded-signal coordinates of source_index.
int64_t frame_start(int64_t f, int64_t hop, int64_t frame_offset) { return f * hop + frame_offset; }

// ------------------------------------------------------------------------------------------
// Complex FFT on blocks of FB signals stored as re[n][FB], im[n][FB].

template <typename T>
struct Stage {
  int64_t radix, size, stride;  // butterflies of `radix` over sub-transforms of `size`, `stride` apart
  std::vector<T> tw_re, tw_im;  // (size / radix, radix): exp(-2 pi i p k / size)
};

template <typename T>
class BlockFft {
 public:
  explicit BlockFft(int64_t n) : n_(n) {
    int64_t rest = n, stride = 1;
    while (rest > 1) {
      int64_t radix = rest % 4 == 0 ? 4 : rest % 2 == 0 ? 2 : smallest_odd_factor(rest);
      Stage<T> stage{radix, rest, stride, {}, {}};
      const int64_t m = rest / radix;
      for (int64_t p = 0; p < m; ++p)
        for (int64_t k = 0; k < radix; ++k) {
          const double angle = -2.0 * M_PI * static_cast<double>(p * k) / static_cast<double>(rest);
          stage.tw_re.push_back(static_cast<T>(std::cos(angle)));
          stage.tw_im.push_back(static_cast<T>(std::sin(angle)));
        }
      stages_.push_back(std::move(stage));
      rest = m;
      stride *= radix;
    }
  }

  int64_t size() const { return n_; }

  // Transforms (re, im) in place; (work_re, work_im) are scratch of the same (n, FB) size.
  void run(T* re, T* im, T* work_re, T* work_im) const {
    T *x_re = re, *x_im = im, *y_re = work_re, *y_im = work_im;
    for (const auto& stage : stages_) {
      if (stage.radix == 4)
        radix4(stage, x_re, x_im, y_re, y_im);
      else if (stage.radix == 2)
        radix2(stage, x_re, x_im, y_re, y_im);
      else if (stage.radix == 5)
        radix5(stage, x_re, x_im, y_re, y_im);
      else if (stage.radix == 3)
        radix3(stage, x_re, x_im, y_re, y_im);
      else
        radix_p(stage, x_re, x_im, y_re, y_im);
      std::swap(x_re, y_re);
      std::swap(x_im, y_im);
    }
    if (x_re != re) {
      std::copy(x_re, x_re + n_ * FB, re);
      std::copy(x_im, x_im + n_ * FB, im);
    }
  }

 private:
  static int64_t smallest_odd_factor(int64_t n) {
    for (int64_t f = 3; f * f <= n; f += 2)
      if (n % f == 0) return f;
    return n;
  }

  // One FFT element of the FB frames as a GCC vector (unaligned, aliasing T): radix 3 and 5 are
  // written on these because the compiler does not vectorise their loops over frames by itself.
  typedef T Vec __attribute__((vector_size(sizeof(T) * FB), aligned(sizeof(T)), may_alias));
  static const Vec& load(const T* p) { return *reinterpret_cast<const Vec*>(p); }
  static Vec& store_to(T* p) { return *reinterpret_cast<Vec*>(p); }

  // Stockham step: y[q + s (r p + k)] = w^(p k) * sum_j x[q + s (p + j m)] e^(-2 pi i j k / r)
  static void radix2(const Stage<T>& st, const T* __restrict__ xr, const T* __restrict__ xi, T* __restrict__ yr,
                     T* __restrict__ yi) {
    const int64_t m = st.size / 2, s = st.stride;
    for (int64_t p = 0; p < m; ++p) {
      const T wr = st.tw_re[p * 2 + 1], wi = st.tw_im[p * 2 + 1];
      for (int64_t q = 0; q < s; ++q) {
        const T* ar = xr + (q + s * p) * FB;
        const T* ai = xi + (q + s * p) * FB;
        const T* br = xr + (q + s * (p + m)) * FB;
        const T* bi = xi + (q + s * (p + m)) * FB;
        T* y0r = yr + (q + s * (2 * p)) * FB;
        T* y0i = yi + (q + s * (2 * p)) * FB;
        T* y1r = yr + (q + s * (2 * p + 1)) * FB;
        T* y1i = yi + (q + s * (2 * p + 1)) * FB;
        for (int64_t f = 0; f < FB; ++f) {
          const T dr = ar[f] - br[f], di = ai[f] - bi[f];
          y0r[f] = ar[f] + br[f];
          y0i[f] = ai[f] + bi[f];
          y1r[f] = dr * wr - di * wi;
          y1i[f] = dr * wi + di * wr;
        }
      }
    }
  }

  static void radix4(const Stage<T>& st, const T* __restrict__ xr, const T* __restrict__ xi, T* __restrict__ yr,
                     T* __restrict__ yi) {
    const int64_t m = st.size / 4, s = st.stride;
    for (int64_t p = 0; p < m; ++p) {
      const T* twr = st.tw_re.data() + p * 4;
      const T* twi = st.tw_im.data() + p * 4;
      for (int64_t q = 0; q < s; ++q) {
        const T* a0r = xr + (q + s * p) * FB;
        const T* a0i = xi + (q + s * p) * FB;
        const T* a1r = xr + (q + s * (p + m)) * FB;
        const T* a1i = xi + (q + s * (p + m)) * FB;
        const T* a2r = xr + (q + s * (p + 2 * m)) * FB;
        const T* a2i = xi + (q + s * (p + 2 * m)) * FB;
        const T* a3r = xr + (q + s * (p + 3 * m)) * FB;
        const T* a3i = xi + (q + s * (p + 3 * m)) * FB;
        T* y0r = yr + (q + s * (4 * p)) * FB;
        T* y0i = yi + (q + s * (4 * p)) * FB;
        T* y1r = y0r + s * FB;
        T* y1i = y0i + s * FB;
        T* y2r = y1r + s * FB;
        T* y2i = y1i + s * FB;
        T* y3r = y2r + s * FB;
        T* y3i = y2i + s * FB;
        for (int64_t f = 0; f < FB; ++f) {
          const T t0r = a0r[f] + a2r[f], t0i = a0i[f] + a2i[f];
          const T t1r = a0r[f] - a2r[f], t1i = a0i[f] - a2i[f];
          const T t2r = a1r[f] + a3r[f], t2i = a1i[f] + a3i[f];
          const T t3r = a1r[f] - a3r[f], t3i = a1i[f] - a3i[f];
          // y1 = t1 - i t3, y3 = t1 + i t3 (e^(-2 pi i / 4) = -i), then the twiddles
          const T u1r = t1r + t3i, u1i = t1i - t3r;
          const T u2r = t0r - t2r, u2i = t0i - t2i;
          const T u3r = t1r - t3i, u3i = t1i + t3r;
          y0r[f] = t0r + t2r;
          y0i[f] = t0i + t2i;
          y1r[f] = u1r * twr[1] - u1i * twi[1];
          y1i[f] = u1r * twi[1] + u1i * twr[1];
          y2r[f] = u2r * twr[2] - u2i * twi[2];
          y2i[f] = u2r * twi[2] + u2i * twr[2];
          y3r[f] = u3r * twr[3] - u3i * twi[3];
          y3i[f] = u3r * twi[3] + u3i * twr[3];
        }
      }
    }
  }

  // 3-point DFT: y1, y2 = a0 - (a1 + a2) / 2 -+ i sin(2 pi / 3) (a1 - a2)
  static void radix3(const Stage<T>& st, const T* __restrict__ xr, const T* __restrict__ xi, T* __restrict__ yr,
                     T* __restrict__ yi) {
    const int64_t m = st.size / 3, s = st.stride;
    const T sn = static_cast<T>(std::sin(2.0 * M_PI / 3.0));
    for (int64_t p = 0; p < m; ++p) {
      const T* twr = st.tw_re.data() + p * 3;
      const T* twi = st.tw_im.data() + p * 3;
      for (int64_t q = 0; q < s; ++q) {
        const T* a0r = xr + (q + s * p) * FB;
        const T* a0i = xi + (q + s * p) * FB;
        const T* a1r = a0r + s * m * FB;
        const T* a1i = a0i + s * m * FB;
        const T* a2r = a1r + s * m * FB;
        const T* a2i = a1i + s * m * FB;
        T* y0r = yr + (q + s * 3 * p) * FB;
        T* y0i = yi + (q + s * 3 * p) * FB;
        T* y1r = y0r + s * FB;
        T* y1i = y0i + s * FB;
        T* y2r = y1r + s * FB;
        T* y2i = y1i + s * FB;
        const Vec br = load(a1r) + load(a2r), bi = load(a1i) + load(a2i);
        const Vec dr = sn * (load(a1r) - load(a2r)), di = sn * (load(a1i) - load(a2i));
        const Vec tr = load(a0r) - T(0.5) * br, ti = load(a0i) - T(0.5) * bi;
        const Vec u1r = tr + di, u1i = ti - dr, u2r = tr - di, u2i = ti + dr;
        store_to(y0r) = load(a0r) + br;
        store_to(y0i) = load(a0i) + bi;
        store_to(y1r) = u1r * twr[1] - u1i * twi[1];
        store_to(y1i) = u1r * twi[1] + u1i * twr[1];
        store_to(y2r) = u2r * twr[2] - u2i * twi[2];
        store_to(y2i) = u2r * twi[2] + u2i * twr[2];
      }
    }
  }

  // 5-point DFT with c_k = cos(2 pi k / 5), s_k = sin(2 pi k / 5), b = a1 + a4, a2 + a3 and
  // d = a1 - a4, a2 - a3: y1, y4 = a0 + c1 b1 + c2 b2 -+ i (s1 d1 + s2 d2); y2, y3 likewise
  static void radix5(const Stage<T>& st, const T* __restrict__ xr, const T* __restrict__ xi, T* __restrict__ yr,
                     T* __restrict__ yi) {
    const int64_t m = st.size / 5, s = st.stride;
    const T c1 = static_cast<T>(std::cos(2.0 * M_PI / 5.0)), c2 = static_cast<T>(std::cos(4.0 * M_PI / 5.0));
    const T s1 = static_cast<T>(std::sin(2.0 * M_PI / 5.0)), s2 = static_cast<T>(std::sin(4.0 * M_PI / 5.0));
    for (int64_t p = 0; p < m; ++p) {
      const T* twr = st.tw_re.data() + p * 5;
      const T* twi = st.tw_im.data() + p * 5;
      const T w1r = twr[1], w1i = twi[1], w2r = twr[2], w2i = twi[2];
      const T w3r = twr[3], w3i = twi[3], w4r = twr[4], w4i = twi[4];
      for (int64_t q = 0; q < s; ++q) {
        const T* a0r = xr + (q + s * p) * FB;
        const T* a0i = xi + (q + s * p) * FB;
        const T* a1r = a0r + s * m * FB;
        const T* a1i = a0i + s * m * FB;
        const T* a2r = a1r + s * m * FB;
        const T* a2i = a1i + s * m * FB;
        const T* a3r = a2r + s * m * FB;
        const T* a3i = a2i + s * m * FB;
        const T* a4r = a3r + s * m * FB;
        const T* a4i = a3i + s * m * FB;
        T* y0r = yr + (q + s * 5 * p) * FB;
        T* y0i = yi + (q + s * 5 * p) * FB;
        T* y1r = y0r + s * FB;
        T* y1i = y0i + s * FB;
        T* y2r = y1r + s * FB;
        T* y2i = y1i + s * FB;
        T* y3r = y2r + s * FB;
        T* y3i = y2i + s * FB;
        T* y4r = y3r + s * FB;
        T* y4i = y3i + s * FB;
        const Vec x0r = load(a0r), x0i = load(a0i), x1r = load(a1r), x1i = load(a1i), x2r = load(a2r),
                  x2i = load(a2i), x3r = load(a3r), x3i = load(a3i), x4r = load(a4r), x4i = load(a4i);
        const Vec b1r = x1r + x4r, b1i = x1i + x4i, b2r = x2r + x3r, b2i = x2i + x3i;
        const Vec d1r = x1r - x4r, d1i = x1i - x4i, d2r = x2r - x3r, d2i = x2i - x3i;
        const Vec t1r = x0r + c1 * b1r + c2 * b2r, t1i = x0i + c1 * b1i + c2 * b2i;
        const Vec t2r = x0r + c2 * b1r + c1 * b2r, t2i = x0i + c2 * b1i + c1 * b2i;
        const Vec u1r = s1 * d1r + s2 * d2r, u1i = s1 * d1i + s2 * d2i;
        const Vec u2r = s2 * d1r - s1 * d2r, u2i = s2 * d1i - s1 * d2i;
        const Vec v1r = t1r + u1i, v1i = t1i - u1r, v4r = t1r - u1i, v4i = t1i + u1r;
        const Vec v2r = t2r + u2i, v2i = t2i - u2r, v3r = t2r - u2i, v3i = t2i + u2r;
        store_to(y0r) = x0r + b1r + b2r;
        store_to(y0i) = x0i + b1i + b2i;
        store_to(y1r) = v1r * w1r - v1i * w1i;
        store_to(y1i) = v1r * w1i + v1i * w1r;
        store_to(y2r) = v2r * w2r - v2i * w2i;
        store_to(y2i) = v2r * w2i + v2i * w2r;
        store_to(y3r) = v3r * w3r - v3i * w3i;
        store_to(y3i) = v3r * w3i + v3i * w3r;
        store_to(y4r) = v4r * w4r - v4i * w4i;
        store_to(y4i) = v4r * w4i + v4i * w4r;
      }
    }
  }

  // Any radix r: an r-point DFT per butterfly (r^2 complex multiply-adds).
  static void radix_p(const Stage<T>& st, const T* __restrict__ xr, const T* __restrict__ xi, T* __restrict__ yr,
                      T* __restrict__ yi) {
    const int64_t r = st.radix, m = st.size / r, s = st.stride;
    std::vector<T> cr(r), ci(r);
    for (int64_t k = 0; k < r; ++k) {
      cr[k] = static_cast<T>(std::cos(-2.0 * M_PI * k / r));
      ci[k] = static_cast<T>(std::sin(-2.0 * M_PI * k / r));
    }
    T acc_r[FB], acc_i[FB];
    for (int64_t p = 0; p < m; ++p) {
      for (int64_t q = 0; q < s; ++q) {
        for (int64_t k = 0; k < r; ++k) {
          std::fill(acc_r, acc_r + FB, T(0));
          std::fill(acc_i, acc_i + FB, T(0));
          for (int64_t j = 0; j < r; ++j) {
            const T c = cr[(j * k) % r], d = ci[(j * k) % r];
            const T* ar = xr + (q + s * (p + j * m)) * FB;
            const T* ai = xi + (q + s * (p + j * m)) * FB;
            for (int64_t f = 0; f < FB; ++f) {
              acc_r[f] += ar[f] * c - ai[f] * d;
              acc_i[f] += ar[f] * d + ai[f] * c;
            }
          }
          const T wr = st.tw_re[p * r + k], wi = st.tw_im[p * r + k];
          T* outr = yr + (q + s * (r * p + k)) * FB;
          T* outi = yi + (q + s * (r * p + k)) * FB;
          for (int64_t f = 0; f < FB; ++f) {
            outr[f] = acc_r[f] * wr - acc_i[f] * wi;
            outi[f] = acc_r[f] * wi + acc_i[f] * wr;
          }
        }
      }
    }
  }

  int64_t n_;
  std::vector<Stage<T>> stages_;
};

// ------------------------------------------------------------------------------------------
// Everything the per-block analysis reads, built once per call.

template <typename T>
struct Plan {
  Options opt;
  const T* waveform;  // (B, T)
  const T* window;    // (win,)
  const T* dct;       // (n_mels, n_mfcc) or null
  std::vector<int64_t> mel_lo, mel_hi, mel_offset;  // mel m is nonzero on bins [lo, hi)
  std::vector<T> mel_weights;                       // packed fb[lo..hi, m] per m
  BlockFft<T> fft;                                  // n_fft / 2 points (even n_fft) or n_fft
  std::vector<T> split_re, split_im;                // (n_fft / 2 + 1,): exp(-2 pi i k / n_fft)

  Plan(const Options& o, const T* wave, const T* win, const T* fb, const T* dct_matrix)
      : opt(o), waveform(wave), window(win), dct(dct_matrix), fft(o.n_fft % 2 == 0 ? o.n_fft / 2 : o.n_fft) {
    int64_t offset = 0;
    for (int64_t m = 0; m < o.n_mels; ++m) {
      int64_t lo = 0, hi = 0;
      for (int64_t k = 0; k < o.n_bins; ++k)
        if (fb[k * o.n_mels + m] != T(0)) {
          if (hi == 0) lo = k;
          hi = k + 1;
        }
      mel_lo.push_back(lo);
      mel_hi.push_back(hi);
      mel_offset.push_back(offset);
      for (int64_t k = lo; k < hi; ++k) mel_weights.push_back(fb[k * o.n_mels + m]);
      offset += hi - lo;
    }
    for (int64_t k = 0; k < o.n_bins; ++k) {
      const double angle = -2.0 * M_PI * static_cast<double>(k) / static_cast<double>(o.n_fft);
      split_re.push_back(static_cast<T>(std::cos(angle)));
      split_im.push_back(static_cast<T>(std::sin(angle)));
    }
  }
};

// Per-thread scratch and the block's intermediate results, kept for the backward.
template <typename T>
struct Block {
  std::vector<T> raw;          // (FB, win): frame samples after DC removal, before pre-emphasis
  std::vector<T> windowed;     // (FB, n_fft): pre-emphasised, windowed, zero-padded frame
  std::vector<T> re, im, work_re, work_im;  // (fft size, FB)
  std::vector<T> spec_re, spec_im;          // (n_bins, FB): one-sided spectrum X
  std::vector<T> mag;                       // (n_bins, FB): |X|^power
  std::vector<T> mel;                       // (n_mels, FB)
  std::vector<T> energy;                    // (FB,): energy before the log

  explicit Block(const Options& o, int64_t fft_size)
      : raw(FB * o.win), windowed(FB * o.n_fft), re(fft_size * FB), im(fft_size * FB),
        work_re(fft_size * FB), work_im(fft_size * FB), spec_re(o.n_bins * FB), spec_im(o.n_bins * FB),
        mag(o.n_bins * FB), mel(o.n_mels * FB), energy(FB) {}
};

// Bin k of the real FFT from the half-size complex FFT Z of the even/odd samples:
// X[k] = E + e^(-2 pi i k / n) O, E = (Z[k] + conj Z[h-k]) / 2, O = (Z[k] - conj Z[h-k]) / 2i.
template <typename T>
void split_bin(const T* __restrict__ zr, const T* __restrict__ zi, const T* __restrict__ cr,
               const T* __restrict__ ci, T wr, T wi, T* __restrict__ xr, T* __restrict__ xi) {
  for (int64_t f = 0; f < FB; ++f) {
    const T er = T(0.5) * (zr[f] + cr[f]), ei = T(0.5) * (zi[f] - ci[f]);
    const T or_ = T(0.5) * (zi[f] + ci[f]), oi = T(-0.5) * (zr[f] - cr[f]);
    xr[f] = er + wr * or_ - wi * oi;
    xi[f] = ei + wr * oi + wi * or_;
  }
}

// Frames [f0, f0 + count) of item b (count <= FB; missing frames are zero signals).
template <typename T>
void analyse_block(const Plan<T>& plan, Block<T>& blk, int64_t b, int64_t f0, int64_t count) {
  const Options& o = plan.opt;
  const int64_t length = o.item_samples(b);
  const T* x = plan.waveform + b * o.num_samples;
  const T c = static_cast<T>(o.preemphasis);
  // no Kaldi extras: the windowed frame is the samples times the window (raw stays unused)
  const bool plain = !o.remove_dc && c == T(0) && o.energy_mode == kNoEnergy;
  const int64_t n = o.n_fft;
  const int64_t first = frame_start(f0, o.hop, o.frame_offset), last = frame_start(f0 + FB - 1, o.hop, o.frame_offset);
  // A full block inside the signal with no Kaldi extras and an n_fft-long window goes straight
  // from the waveform into the FFT's (even, odd) sample layout.
  const bool direct =
      plain && count == FB && o.win == n && n % 2 == 0 && first >= o.pad && last + n <= o.pad + length;
  if (!direct) {
    for (int64_t f = 0; f < FB; ++f) {
      T* raw = blk.raw.data() + f * o.win;
      if (f >= count) {
        std::fill(raw, raw + o.win, T(0));
        std::fill(blk.windowed.begin() + f * o.n_fft, blk.windowed.begin() + (f + 1) * o.n_fft, T(0));
        blk.energy[f] = T(0);
        continue;
      }
      T* y = blk.windowed.data() + f * o.n_fft;
      std::fill(y + o.win, y + o.n_fft, T(0));
      const int64_t start = frame_start(f0 + f, o.hop, o.frame_offset);
      const bool inside = start >= o.pad && start + o.win <= o.pad + length;  // no padding to apply
      if (inside && plain) {
        const T* __restrict__ in = x + start - o.pad;
        for (int64_t k = 0; k < o.win; ++k) y[k] = in[k] * plan.window[k];
        continue;
      }
      if (inside) {
        std::copy(x + start - o.pad, x + start - o.pad + o.win, raw);
      } else {
        for (int64_t k = 0; k < o.win; ++k) {
          const int64_t src = source_index(start + k, length, o.pad, o.pad_mode);
          raw[k] = src >= 0 ? x[src] : T(0);
        }
      }
      if (o.remove_dc) {
        T mean = 0;
        for (int64_t k = 0; k < o.win; ++k) mean += raw[k];
        mean /= static_cast<T>(o.win);
        for (int64_t k = 0; k < o.win; ++k) raw[k] -= mean;
      }
      if (c != T(0)) {
        y[0] = raw[0] - c * raw[0];  // Kaldi's Preemphasize: x[0] -= c * x[0]
        for (int64_t k = 1; k < o.win; ++k) y[k] = raw[k] - c * raw[k - 1];
      } else {
        std::copy(raw, raw + o.win, y);
      }
      for (int64_t k = 0; k < o.win; ++k) y[k] *= plan.window[k];
      if (o.energy_mode != kNoEnergy) {
        const T* e = o.energy_mode == kRawEnergy ? raw : y;
        T sum = 0;
        for (int64_t k = 0; k < o.win; ++k) sum += e[k] * e[k];
        blk.energy[f] = sum;
      }
    }
  }

  if (n % 2 == 0) {
    const int64_t h = n / 2;
    if (direct) {
      const T* in = x + first - o.pad;
      const T* w = plan.window;
      for (int64_t k = 0; k < h; ++k)
        for (int64_t f = 0; f < FB; ++f) {
          blk.re[k * FB + f] = in[f * o.hop + 2 * k] * w[2 * k];
          blk.im[k * FB + f] = in[f * o.hop + 2 * k + 1] * w[2 * k + 1];
        }
    } else {
      const T* y = blk.windowed.data();
      for (int64_t k = 0; k < h; ++k)
        for (int64_t f = 0; f < FB; ++f) {
          blk.re[k * FB + f] = y[f * n + 2 * k];
          blk.im[k * FB + f] = y[f * n + 2 * k + 1];
        }
    }
    plan.fft.run(blk.re.data(), blk.im.data(), blk.work_re.data(), blk.work_im.data());
    for (int64_t k = 0; k <= h; ++k)
      split_bin(blk.re.data() + (k % h) * FB, blk.im.data() + (k % h) * FB, blk.re.data() + ((h - k) % h) * FB,
                blk.im.data() + ((h - k) % h) * FB, plan.split_re[k], plan.split_im[k], blk.spec_re.data() + k * FB,
                blk.spec_im.data() + k * FB);
  } else {
    for (int64_t f = 0; f < FB; ++f) {
      const T* y = blk.windowed.data() + f * n;
      for (int64_t k = 0; k < n; ++k) {
        blk.re[k * FB + f] = y[k];
        blk.im[k * FB + f] = T(0);
      }
    }
    plan.fft.run(blk.re.data(), blk.im.data(), blk.work_re.data(), blk.work_im.data());
    std::copy(blk.re.begin(), blk.re.begin() + o.n_bins * FB, blk.spec_re.begin());
    std::copy(blk.im.begin(), blk.im.begin() + o.n_bins * FB, blk.spec_im.begin());
  }

  const int64_t n_values = o.n_bins * FB;
  const T* xr = blk.spec_re.data();
  const T* xi = blk.spec_im.data();
  T* mag = blk.mag.data();
  for (int64_t i = 0; i < n_values; ++i) mag[i] = xr[i] * xr[i] + xi[i] * xi[i];
  if (o.power == 1.0) {
    for (int64_t i = 0; i < n_values; ++i) mag[i] = std::sqrt(mag[i]);
  } else if (o.power != 2.0) {
    const T half_power = static_cast<T>(o.power / 2.0);
    for (int64_t i = 0; i < n_values; ++i) mag[i] = std::pow(mag[i], half_power);
  }
  for (int64_t m = 0; m < o.n_mels; ++m) {
    T acc[FB] = {};
    const T* w = plan.mel_weights.data() + plan.mel_offset[m];
    for (int64_t k = plan.mel_lo[m]; k < plan.mel_hi[m]; ++k) {
      const T wk = w[k - plan.mel_lo[m]];
      const T* p = blk.mag.data() + k * FB;
      for (int64_t f = 0; f < FB; ++f) acc[f] += wk * p[f];
    }
    std::copy(acc, acc + FB, blk.mel.data() + m * FB);
  }
}

// ln x for positive normal floats, branch-free so that a loop of it vectorises: x = m 2^e with
// m in [sqrt(1/2), sqrt(2)), then Cephes' logf polynomial (error ~5e-8 relative to max(1, |ln x|)).
inline float vector_log(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  // below sqrt(1/2) take 2m and e - 1, so that m - 1 lies in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float low = static_cast<float>(bits < 0x3f3504f3u);
  float m;
  std::memcpy(&m, &bits, sizeof m);
  const float e = static_cast<float>(exponent) - low;
  m = m * (1.0f + low) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  return m + y + 0.693359375f * e;
}

inline double vector_log(double x) { return std::log(x); }

// values[i] = log(max(values[i], log_floor)) (natural or base 10) for the log modes.
template <typename T>
void log_features(const Options& o, T* values, int64_t n) {
  if (o.log_mode == kNoLog) return;
  const T floor = static_cast<T>(std::max(o.log_floor, static_cast<double>(std::numeric_limits<T>::min())));
  if (o.log_mode == kOffsetLog) {
    const T offset = static_cast<T>(o.log_floor);
    for (int64_t i = 0; i < n; ++i) values[i] = vector_log(values[i] + offset);
    return;
  }
  const T scale = o.log_mode == kWhisperLog ? static_cast<T>(1.0 / M_LN10)
                  : o.log_mode == kDbLog    ? static_cast<T>(10.0 / M_LN10)
                                            : T(1);
  for (int64_t i = 0; i < n; ++i) values[i] = vector_log(values[i] > floor ? values[i] : floor) * scale;
}

template <typename T>
T log_energy(const Options& o, T energy) {
  T value = std::log(std::max(energy, static_cast<T>(o.log_floor)));
  if (o.energy_floor > 0.0) value = std::max(value, static_cast<T>(std::log(o.energy_floor)));
  return value;
}

// Calls fn(blk, b, f0, count) for every block of valid frames, in parallel over (item, block),
// with one scratch Block per parallel chunk.
template <typename T, typename Fn>
void for_each_block(const Plan<T>& plan, const Fn& fn) {
  const Options& o = plan.opt;
  const int64_t blocks_per_item = (o.num_frames + FB - 1) / FB;
  parallel_for(0, o.batch * blocks_per_item, 1, [&](int64_t i0, int64_t i1) {
    Block<T> blk(o, plan.fft.size());
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / blocks_per_item, f0 = (i % blocks_per_item) * FB;
      const int64_t count = std::min<int64_t>(FB, o.item_frames(b) - f0);
      if (count > 0) fn(blk, b, f0, count);
    }
  });
}

// Calls fn(index) for every valid output element of item b's mel columns, contiguous runs innermost.
template <typename Fn>
void for_each_valid_mel(const Options& o, int64_t b, const Fn& fn) {
  const int64_t frames = o.item_frames(b);
  if (o.frames_major) {
    for (int64_t f = 0; f < frames; ++f)
      for (int64_t m = 0; m < o.n_mels; ++m) fn(o.out_index(b, o.mel_column(m), f));
  } else {
    for (int64_t m = 0; m < o.n_mels; ++m) {
      const int64_t row = o.out_index(b, o.mel_column(m), 0);
      for (int64_t f = 0; f < frames; ++f) fn(row + f);
    }
  }
}

// First pass: every valid frame's features in layout `lo` (the output's, or logs_layout()),
// logs not yet clamped (Whisper, top_db). Returns each item's largest mel feature (the clamps'
// reference), from per-block lane-wise maxima.
template <typename T>
std::vector<T> write_features(const Plan<T>& plan, const Options& lo, T* out) {
  const Options& o = lo;
  const int64_t blocks_per_item = (o.num_frames + FB - 1) / FB;
  constexpr T lowest = -std::numeric_limits<T>::infinity();
  std::vector<T> block_max(o.batch * blocks_per_item, lowest);
  for_each_block(plan, [&](Block<T>& blk, int64_t b, int64_t f0, int64_t count) {
    analyse_block(plan, blk, b, f0, count);
    T* mel = blk.mel.data();
    log_features(o, mel, o.n_mels * FB);
    for (int64_t m = 0; m < o.n_mels; ++m)
      for (int64_t f = 0; f < count; ++f) out[o.out_index(b, o.mel_column(m), f0 + f)] = mel[m * FB + f];
    if (o.energy_mode != kNoEnergy)
      for (int64_t f = 0; f < count; ++f) out[o.out_index(b, o.energy_column(), f0 + f)] = log_energy(o, blk.energy[f]);
    T lanes[FB];
    std::fill(lanes, lanes + FB, lowest);
    for (int64_t m = 0; m < o.n_mels; ++m)
      for (int64_t f = 0; f < FB; ++f) lanes[f] = mel[m * FB + f] > lanes[f] ? mel[m * FB + f] : lanes[f];
    block_max[b * blocks_per_item + f0 / FB] = *std::max_element(lanes, lanes + count);
  });
  std::vector<T> best(o.batch, lowest);
  for (int64_t b = 0; b < o.batch; ++b)
    for (int64_t i = 0; i < blocks_per_item; ++i) best[b] = std::max(best[b], block_max[b * blocks_per_item + i]);
  return best;
}

// Frames past each item's end hold 0 (the output is allocated uninitialised).
template <typename T>
void zero_invalid_frames(const Options& o, T* out) {
  for (int64_t b = 0; b < o.batch; ++b) {
    const int64_t frames = o.item_frames(b);
    if (o.frames_major) {
      std::fill(out + o.out_index(b, 0, frames), out + o.out_index(b, 0, o.num_frames), T(0));
    } else {
      for (int64_t c = 0; c < o.n_feats; ++c)
        std::fill(out + o.out_index(b, c, frames), out + o.out_index(b, c, o.num_frames), T(0));
    }
  }
}

// The clamps' reference per item: Whisper's item max, or top_db's max over the item's group
// (torchaudio's amplitude_to_DB takes it over (channel, freq, time) per leading index).
template <typename T>
std::vector<T> clamp_reference(const Options& o, std::vector<T> best) {
  if (o.log_mode != kDbLog) return best;
  const int64_t g = o.top_db_group;
  for (int64_t b0 = 0; b0 < o.batch; b0 += g) {
    T top = best[b0];
    for (int64_t b = b0; b < b0 + g; ++b) top = std::max(top, best[b]);
    for (int64_t b = b0; b < b0 + g; ++b) best[b] = top;
  }
  return best;
}

// Distance of the clamp below the reference: 8 (Whisper) or top_db.
inline double clamp_depth(const Options& o) { return o.log_mode == kWhisperLog ? 8.0 : o.top_db; }

// out (layout lo) = clamp(out) in place on valid mel columns: Whisper's (max(l, ref - 8) + 4) / 4
// or top_db's max(l, ref - top_db).
template <typename T>
void apply_clamp(const Options& lo, const std::vector<T>& ref, T* out) {
  const bool whisper = lo.log_mode == kWhisperLog;
  parallel_for(0, lo.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T floor = ref[b] - static_cast<T>(clamp_depth(lo));
      if (whisper)
        for_each_valid_mel(lo, b, [&](int64_t i) { out[i] = ((out[i] > floor ? out[i] : floor) + T(4)) * T(0.25); });
      else
        for_each_valid_mel(lo, b, [&](int64_t i) { out[i] = out[i] > floor ? out[i] : floor; });
    }
  });
}

// out[b, c, f] = sum_m dct[m, c] logs[b, m, f] on valid frames (torchaudio MFCC's matmul by its
// create_dct matrix, (n_mels, n_mfcc)); logs in logs_layout().
template <typename T>
void apply_dct(const Plan<T>& plan, const T* logs, T* out) {
  const Options& o = plan.opt;
  parallel_for(0, o.batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> acc;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t frames = o.item_frames(b);
      acc.assign(frames, T(0));
      for (int64_t c = 0; c < o.n_mfcc; ++c) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t m = 0; m < o.n_mels; ++m) {
          const T w = plan.dct[m * o.n_mfcc + c];
          const T* row = logs + (b * o.n_mels + m) * o.num_frames;
          for (int64_t f = 0; f < frames; ++f) acc[f] += w * row[f];
        }
        for (int64_t f = 0; f < frames; ++f) out[o.out_index(b, c, f)] = acc[f];
      }
    }
  });
}

// The complex one-sided spectrum, (B, n_bins, frames, 2), frames past an item's end 0.
template <typename T>
void forward_complex(const Plan<T>& plan, T* out) {
  const Options& o = plan.opt;
  for (int64_t b = 0; b < o.batch; ++b)
    for (int64_t k = 0; k < o.n_bins; ++k) {
      T* row = out + (b * o.n_bins + k) * o.num_frames * 2;
      std::fill(row + 2 * o.item_frames(b), row + 2 * o.num_frames, T(0));
    }
  for_each_block(plan, [&](Block<T>& blk, int64_t b, int64_t f0, int64_t count) {
    analyse_block(plan, blk, b, f0, count);
    for (int64_t k = 0; k < o.n_bins; ++k) {
      T* row = out + ((b * o.n_bins + k) * o.num_frames + f0) * 2;
      for (int64_t f = 0; f < count; ++f) {
        row[2 * f] = blk.spec_re[k * FB + f];
        row[2 * f + 1] = blk.spec_im[k * FB + f];
      }
    }
  });
}

template <typename T>
void forward(const Plan<T>& plan, T* out) {
  const Options& o = plan.opt;
  if (o.complex_out) return forward_complex(plan, out);
  zero_invalid_frames(o, out);
  if (plan.dct == nullptr) {
    const std::vector<T> best = write_features(plan, o, out);
    if (o.log_mode == kWhisperLog || o.clamps()) apply_clamp(o, clamp_reference(o, best), out);
    return;
  }
  // MFCC: log-mel values of the valid frames, the clamp at the group max (which needs every
  // frame of the group first), then the DCT.
  const Options lo = o.logs_layout();
  std::vector<T> logs(o.batch * o.n_mels * o.num_frames, T(0));
  const std::vector<T> best = write_features(plan, lo, logs.data());
  if (o.clamps()) apply_clamp(lo, clamp_reference(o, best), logs.data());
  apply_dct(plan, logs.data(), out);
}

// ------------------------------------------------------------------------------------------
// Backward: recompute each block, then d(log) -> d(mel) -> d|X|^power -> dX -> adjoint real DFT
// -> window, pre-emphasis, energy, DC removal -> per-frame sample gradients, overlap-added per
// item through the same padding index arithmetic.

// The gradient w.r.t. the log values l (layout lo) before a clamp at ref - depth, given the
// gradient `grad` after it (Whisper: also after the affine map), as autograd gives it for
// torch.maximum(l, amax(l) - depth) with amax over the clamp's group: ties split evenly.
template <typename T>
std::vector<T> clamp_grad(const Plan<T>& plan, const Options& lo, const T* grad) {
  const int64_t total = lo.batch * lo.n_feats * lo.num_frames;
  std::vector<T> logs(total, T(0));
  const std::vector<T> ref = clamp_reference(lo, write_features(plan, lo, logs.data()));
  std::vector<T> dlog(total, T(0));
  const T scale = lo.log_mode == kWhisperLog ? T(0.25) : T(1);
  const T depth = static_cast<T>(clamp_depth(lo));
  const int64_t group = lo.log_mode == kDbLog ? lo.top_db_group : 1;
  parallel_for(0, lo.batch / group, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      T to_max = 0;
      int64_t ties = 0;
      for (int64_t b = g * group; b < (g + 1) * group; ++b) {
        const T floor = ref[b] - depth;
        for_each_valid_mel(lo, b, [&](int64_t i) {
          const T gi = grad[i] * scale, l = logs[i];
          dlog[i] = l > floor ? gi : l == floor ? gi / T(2) : T(0);
          to_max += l < floor ? gi : l == floor ? gi / T(2) : T(0);
          ties += l == ref[b];
        });
      }
      for (int64_t b = g * group; b < (g + 1) * group; ++b)
        for_each_valid_mel(lo, b, [&](int64_t i) {
          if (logs[i] == ref[b]) dlog[i] += to_max / static_cast<T>(ties);
        });
    }
  });
  return dlog;
}

// DCT^T: the gradient w.r.t. the log-mel values (logs_layout()) from the output's.
template <typename T>
std::vector<T> dct_grad(const Plan<T>& plan, const T* grad) {
  const Options& o = plan.opt;
  std::vector<T> dlog(o.batch * o.n_mels * o.num_frames, T(0));
  parallel_for(0, o.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < o.n_mfcc; ++c)
        for (int64_t m = 0; m < o.n_mels; ++m) {
          const T w = plan.dct[m * o.n_mfcc + c];
          T* row = dlog.data() + (b * o.n_mels + m) * o.num_frames;
          for (int64_t f = 0; f < o.item_frames(b); ++f) row[f] += w * grad[o.out_index(b, c, f)];
        }
  });
  return dlog;
}

template <typename T>
void backward(const Plan<T>& plan, const T* grad_out, T* grad_wave) {
  const Options& o = plan.opt;
  // gl: the layout of `grad`, the gradient w.r.t. the (unclamped) log features
  Options gl = o;
  std::vector<T> dct_g, clamp_g;
  const T* grad = grad_out;
  if (!o.complex_out && plan.dct != nullptr) {
    gl = o.logs_layout();
    dct_g = dct_grad(plan, grad_out);
    grad = dct_g.data();
  }
  if (!o.complex_out && (o.log_mode == kWhisperLog || o.clamps())) {
    clamp_g = clamp_grad(plan, gl, grad);
    grad = clamp_g.data();
  }
  // (B, frames, win): gradient w.r.t. each frame's samples, and where each was read from
  std::vector<T> frame_grad(o.batch * o.num_frames * o.win, T(0));
  std::vector<int64_t> frame_src(o.batch * o.num_frames * o.win, -1);
  const BlockFft<T> inverse(o.n_fft);
  for_each_block(plan, [&](Block<T>& blk, int64_t b, int64_t f0, int64_t count) {
    analyse_block(plan, blk, b, f0, count);
    const int64_t n = o.n_fft;
    std::vector<T> c_re(n * FB, T(0)), c_im(n * FB, T(0)), work_re(n * FB), work_im(n * FB);
    if (o.complex_out) {
      // dy[n] = Re sum_k conj(G_k) e^(-2 pi i k n / N), G = dL/dRe X + i dL/dIm X
      for (int64_t k = 0; k < o.n_bins; ++k) {
        const T* g = grad + ((b * o.n_bins + k) * o.num_frames + f0) * 2;
        for (int64_t f = 0; f < count; ++f) {
          c_re[k * FB + f] = g[2 * f];
          c_im[k * FB + f] = -g[2 * f + 1];
        }
      }
    } else {
      std::vector<T> dmag(o.n_bins * FB, T(0));
      for (int64_t m = 0; m < o.n_mels; ++m) {
        const T* w = plan.mel_weights.data() + plan.mel_offset[m];
        for (int64_t f = 0; f < count; ++f) {
          const T mel = blk.mel[m * FB + f];
          T g = grad[gl.out_index(b, gl.mel_column(m), f0 + f)];
          const bool above = mel >= static_cast<T>(o.log_floor);
          if (o.log_mode == kNaturalLog) g = above ? g / mel : T(0);
          if (o.log_mode == kWhisperLog) g = above ? g / (mel * static_cast<T>(M_LN10)) : T(0);
          if (o.log_mode == kDbLog) g = above ? g * static_cast<T>(10.0 / M_LN10) / mel : T(0);
          if (o.log_mode == kOffsetLog) g = g / (mel + static_cast<T>(o.log_floor));
          for (int64_t k = plan.mel_lo[m]; k < plan.mel_hi[m]; ++k) dmag[k * FB + f] += w[k - plan.mel_lo[m]] * g;
        }
      }
      // d|X|^p / dX: p |X|^(p-2) (re, im); taken as 0 where X = 0 for p < 2
      for (int64_t k = 0; k < o.n_bins; ++k)
        for (int64_t f = 0; f < FB; ++f) {
          const int64_t i = k * FB + f;
          const T xr = blk.spec_re[i], xi = blk.spec_im[i], p = xr * xr + xi * xi;
          T scale;
          if (o.power == 2.0) scale = T(2);
          else if (p == T(0)) scale = T(0);
          else scale = static_cast<T>(o.power) * std::pow(p, static_cast<T>(o.power / 2.0 - 1.0));
          // dy[n] = Re sum_k conj(G_k) e^(-2 pi i k n / N), G = dRe + i dIm
          c_re[i] = dmag[i] * scale * xr;
          c_im[i] = -dmag[i] * scale * xi;
        }
    }
    inverse.run(c_re.data(), c_im.data(), work_re.data(), work_im.data());
    std::vector<T> dy(o.win), draw(o.win);
    const T c = static_cast<T>(o.preemphasis);
    for (int64_t f = 0; f < count; ++f) {
      const T* raw = blk.raw.data() + f * o.win;
      const T* y = blk.windowed.data() + f * n;
      T denergy = 0;
      if (o.energy_mode != kNoEnergy) {
        const T e = blk.energy[f];
        const T g = grad[o.out_index(b, o.energy_column(), f0 + f)];
        const bool floored = o.energy_floor > 0.0 && std::log(std::max(e, static_cast<T>(o.log_floor))) <
                                                         static_cast<T>(std::log(o.energy_floor));
        denergy = (e >= static_cast<T>(o.log_floor) && !floored) ? g / e : T(0);
      }
      for (int64_t k = 0; k < o.win; ++k) {
        T d = c_re[k * FB + f];
        if (o.energy_mode == kWindowedEnergy) d += denergy * T(2) * y[k];
        dy[k] = d * plan.window[k];
      }
      // adjoint of Kaldi's pre-emphasis (u[0] = (1 - c) v[0], u[k] = v[k] - c v[k-1])
      if (c != T(0)) {
        for (int64_t k = 0; k < o.win; ++k) draw[k] = dy[k] - (k + 1 < o.win ? c * dy[k + 1] : T(0));
        draw[0] -= c * dy[0];
      } else {
        std::copy(dy.begin(), dy.end(), draw.begin());
      }
      if (o.energy_mode == kRawEnergy)
        for (int64_t k = 0; k < o.win; ++k) draw[k] += denergy * T(2) * raw[k];
      if (o.remove_dc) {
        T mean = 0;
        for (int64_t k = 0; k < o.win; ++k) mean += draw[k];
        mean /= static_cast<T>(o.win);
        for (int64_t k = 0; k < o.win; ++k) draw[k] -= mean;
      }
      const int64_t row = (b * o.num_frames + f0 + f) * o.win;
      std::copy(draw.begin(), draw.end(), frame_grad.begin() + row);
      const int64_t start = frame_start(f0 + f, o.hop, o.frame_offset);
      for (int64_t k = 0; k < o.win; ++k) frame_src[row + k] = source_index(start + k, o.item_samples(b), o.pad, o.pad_mode);
    }
  });
  parallel_for(0, o.batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* gx = grad_wave + b * o.num_samples;
      for (int64_t i = (b * o.num_frames) * o.win; i < (b * o.num_frames + o.item_frames(b)) * o.win; ++i)
        if (frame_src[i] >= 0) gx[frame_src[i]] += frame_grad[i];
    }
  });
}

// ------------------------------------------------------------------------------------------
// Bindings.

// torch.stft's rule for center padding, checked here so that it holds however the op is called
// (eagerly, or from a compiled graph whose Python checks could not see the lengths): a reflected
// edge needs more samples than it reflects, a replicated one at least one sample.
void check_edge_padding(const Options& o, int64_t length, int64_t item) {
  if (o.frame_offset >= 0 || (o.pad_mode != kReflect && o.pad_mode != kReplicate)) return;
  const int64_t padded = length + 2 * o.pad;
  const int64_t need = o.pad_mode == kReflect ? -o.frame_offset + 1 : 1;
  if (padded >= need) return;
  if (item < 0)
    MMFUSE_CHECK(false, "mel_spectrogram: waveform: pad_mode ", o.pad_mode == kReflect ? "reflect" : "replicate",
                " with center padding of ", -o.frame_offset, " needs at least ", need - 2 * o.pad,
                " samples per item, got ", length);
  MMFUSE_CHECK(false, "mel_spectrogram: lengths[", item, "]: pad_mode ", o.pad_mode == kReflect ? "reflect" : "replicate",
              " with center padding of ", -o.frame_offset, " needs at least ", need - 2 * o.pad,
              " samples per item, got ", length);
}

Options check_options(const Tensor& waveform, const Tensor& window, const Tensor& mel_fb,
                      const std::optional<Tensor>& lengths, const std::optional<Tensor>& frame_lengths,
                      int64_t num_frames, int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad,
                      int64_t pad_mode, bool remove_dc, double preemphasis, double power, int64_t log_mode,
                      double log_floor, int64_t energy_mode, double energy_floor, bool energy_last,
                      bool frames_major, const std::optional<Tensor>& dct, double top_db, int64_t top_db_group,
                      bool complex_out) {
  MMFUSE_CHECK(waveform.dim() == 2 && waveform.is_contiguous() && waveform.is_cpu(),
              "mel_spectrogram: waveform must be a contiguous CPU (B, T) tensor, got ", shape(waveform));
  MMFUSE_CHECK(waveform.scalar_type() == dtype::kFloat || waveform.scalar_type() == dtype::kDouble,
              "mel_spectrogram: waveform must be float32 or float64, got ", waveform.scalar_type());
  MMFUSE_CHECK(window.dim() == 1 && window.is_contiguous() && window.scalar_type() == waveform.scalar_type(),
              "mel_spectrogram: window must be contiguous 1-D in the waveform's dtype, got ", shape(window));
  MMFUSE_CHECK(n_fft >= 1 && window.size(0) >= 1 && window.size(0) <= n_fft,
              "mel_spectrogram: window length must lie in [1, n_fft=", n_fft, "], got ", window.size(0));
  MMFUSE_CHECK(mel_fb.dim() == 2 && mel_fb.size(0) == n_fft / 2 + 1 && mel_fb.is_contiguous() &&
                  mel_fb.scalar_type() == waveform.scalar_type(),
              "mel_spectrogram: mel_fb must be contiguous (n_fft // 2 + 1 = ", n_fft / 2 + 1,
              ", n_mels) in the waveform's dtype, got ", shape(mel_fb));
  MMFUSE_CHECK(hop >= 1 && pad >= 0 && num_frames >= 0, "mel_spectrogram: hop must be >= 1, pad and num_frames >= 0");
  MMFUSE_CHECK(pad_mode >= kConstant && pad_mode <= kKaldiReflect, "mel_spectrogram: pad_mode code must be 0..3, got ",
              pad_mode);
  MMFUSE_CHECK(log_mode >= kNoLog && log_mode <= kOffsetLog, "mel_spectrogram: log_mode code must be 0..4, got ", log_mode);
  MMFUSE_CHECK(top_db < 0.0 || log_mode == kDbLog, "mel_spectrogram: top_db >= 0 needs log_mode 3 (dB), got log_mode ",
              log_mode);
  MMFUSE_CHECK(top_db_group >= 1 && waveform.size(0) % top_db_group == 0,
              "mel_spectrogram: top_db_group must be >= 1 and divide the batch (", waveform.size(0), "), got ",
              top_db_group);
  MMFUSE_CHECK(energy_mode == kNoEnergy || (log_mode <= kWhisperLog && !dct && !complex_out),
              "mel_spectrogram: Kaldi's energy column is not combined with the dB/offset logs, dct or complex_out");
  MMFUSE_CHECK(!complex_out || (!dct && log_mode == kNoLog && !frames_major),
              "mel_spectrogram: complex_out takes no log, no dct and frames_major=False");
  MMFUSE_CHECK(complex_out || mel_fb.size(1) >= 1, "mel_spectrogram: mel_fb must have at least one filter, got ",
              shape(mel_fb));
  if (dct) {
    MMFUSE_CHECK(log_mode == kDbLog || log_mode == kOffsetLog, "mel_spectrogram: dct takes log_mode 3 (dB) or 4 ",
                "(offset), got ", log_mode);
    MMFUSE_CHECK(dct->dim() == 2 && dct->size(1) >= 1 && dct->size(0) == mel_fb.size(1) && dct->is_contiguous() &&
                    dct->scalar_type() == waveform.scalar_type() && dct->is_cpu(),
                "mel_spectrogram: dct must be a contiguous CPU (n_mels=", mel_fb.size(1),
                ", n_mfcc) tensor in the waveform's dtype, got ", shape(*dct), " ", dct->scalar_type());
  }
  MMFUSE_CHECK(energy_mode >= kNoEnergy && energy_mode <= kWindowedEnergy,
              "mel_spectrogram: energy_mode code must be 0..2, got ", energy_mode);
  MMFUSE_CHECK(power > 0.0 && std::isfinite(power), "mel_spectrogram: power must be a finite number > 0, got ", power);
  MMFUSE_CHECK(window.is_cpu() && mel_fb.is_cpu(),
              "mel_spectrogram: window and mel_fb must be CPU tensors like the waveform, got ",
              device_str(window.device()), " and ", device_str(mel_fb.device()));
  // every sample index below is frame * hop + frame_offset + [0, n_fft) or length + 2 pad: keep them in int64
  constexpr int64_t kIndexLimit = int64_t(1) << 60;
  MMFUSE_CHECK(hop < kIndexLimit / std::max<int64_t>(num_frames, 1) && pad < kIndexLimit && n_fft < kIndexLimit &&
                  frame_offset > -kIndexLimit && frame_offset < kIndexLimit,
              "mel_spectrogram: hop * num_frames, pad, n_fft and frame_offset must stay below 2**60, got hop ", hop,
              ", num_frames ", num_frames, ", pad ", pad, ", n_fft ", n_fft, ", frame_offset ", frame_offset);
  // work is sized by the signal: a frame that starts past the padded signal's end holds no sample
  const int64_t frame_bound = (waveform.size(1) + 2 * pad - std::min<int64_t>(frame_offset, 0)) / hop + 2;
  MMFUSE_CHECK(num_frames <= frame_bound, "mel_spectrogram: num_frames must be at most ", frame_bound,
              " for ", waveform.size(1), " samples (hop ", hop, ", pad ", pad, ", frame_offset ", frame_offset,
              "), got ", num_frames);
  MMFUSE_CHECK(lengths.has_value() == frame_lengths.has_value(),
              "mel_spectrogram: lengths and frame_lengths must be given together");
  const int64_t batch = waveform.size(0);
  Options o{};
  o.batch = batch;
  o.num_samples = waveform.size(1);
  o.num_frames = num_frames;
  o.n_fft = n_fft;
  o.win = window.size(0);
  o.n_bins = n_fft / 2 + 1;
  o.n_mels = mel_fb.size(1);
  o.n_feats = complex_out ? o.n_bins : dct ? dct->size(1) : o.n_mels + (energy_mode != kNoEnergy ? 1 : 0);
  o.n_mfcc = dct ? dct->size(1) : 0;
  o.top_db = top_db;
  o.top_db_group = top_db_group;
  o.complex_out = complex_out;
  o.hop = hop;
  o.frame_offset = frame_offset;
  o.pad = pad;
  o.pad_mode = pad_mode;
  o.remove_dc = remove_dc;
  o.preemphasis = preemphasis;
  o.power = power;
  o.log_mode = log_mode;
  o.log_floor = log_floor;
  o.energy_mode = energy_mode;
  o.energy_floor = energy_floor;
  o.energy_last = energy_last;
  o.frames_major = frames_major;
  if (lengths) {
    for (const auto* t : {&*lengths, &*frame_lengths})
      MMFUSE_CHECK(t->dim() == 1 && t->size(0) == batch && t->scalar_type() == dtype::kLong && t->is_contiguous() &&
                      t->is_cpu(),
                  "mel_spectrogram: lengths and frame_lengths must be contiguous int64 CPU (B=", batch, "), got ",
                  shape(*t), " ", t->scalar_type());
    o.lengths = lengths->const_data_ptr<int64_t>();
    o.frame_lengths = frame_lengths->const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      MMFUSE_CHECK(o.lengths[b] >= 0 && o.lengths[b] <= o.num_samples, "mel_spectrogram: lengths[", b,
                  "] must lie in [0, ", o.num_samples, "], got ", o.lengths[b]);
      check_edge_padding(o, o.lengths[b], b);
      MMFUSE_CHECK(o.frame_lengths[b] >= 0 && o.frame_lengths[b] <= num_frames, "mel_spectrogram: frame_lengths[", b,
                  "] must lie in [0, num_frames=", num_frames, "], got ", o.frame_lengths[b]);
    }
  }
  if (!lengths) check_edge_padding(o, o.num_samples, -1);
  return o;
}

#define MMFUSE_MEL_ARGS_DECL                                                                                   \
  const Tensor &waveform, const Tensor &window, const Tensor &mel_fb,                              \
      const std::optional<Tensor>&lengths, const std::optional<Tensor>&frame_lengths, int64_t num_frames, \
      int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad, int64_t pad_mode, bool remove_dc,          \
      double preemphasis, double power, int64_t log_mode, double log_floor, int64_t energy_mode,               \
      double energy_floor, bool energy_last, bool frames_major, const std::optional<Tensor>&dct, double top_db, \
      int64_t top_db_group, bool complex_out
#define MMFUSE_MEL_ARGS                                                                                       \
  waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode,      \
      remove_dc, preemphasis, power, log_mode, log_floor, energy_mode, energy_floor, energy_last, frames_major, dct, \
      top_db, top_db_group, complex_out

// (B, frames, feats) frames-major, (B, n_bins, frames, 2) complex, else (B, feats, frames).
std::vector<int64_t> output_shape(const Options& o) {
  if (o.complex_out) return {o.batch, o.n_bins, o.num_frames, 2};
  if (o.frames_major) return {o.batch, o.num_frames, o.n_feats};
  return {o.batch, o.n_feats, o.num_frames};
}

Tensor mel_spectrogram_cpu(MMFUSE_MEL_ARGS_DECL) {
  const Options o = check_options(MMFUSE_MEL_ARGS);
  Tensor out = empty_like_as(waveform, output_shape(o));
  if (out.numel() == 0) return out;  // no plan (its FFT tables are sized by n_fft) for no output
  MMFUSE_DISPATCH_FLOATING(waveform.scalar_type(), "mel_spectrogram_cpu", [&] {
    const Plan<scalar_t> plan(o, waveform.const_data_ptr<scalar_t>(), window.const_data_ptr<scalar_t>(),
                              mel_fb.const_data_ptr<scalar_t>(),
                              dct ? dct->const_data_ptr<scalar_t>() : nullptr);
    forward(plan, ptr<scalar_t>(out));
  });
  return out;
}

Tensor mel_spectrogram_backward_cpu(const Tensor& grad, MMFUSE_MEL_ARGS_DECL) {
  const Options o = check_options(MMFUSE_MEL_ARGS);
  const std::vector<int64_t> out_shape = output_shape(o);
  MMFUSE_CHECK(grad.sizes() == IntArrayRef(out_shape) && grad.scalar_type() == waveform.scalar_type(),
              "mel_spectrogram_backward: grad must match the forward output ", shape_str(out_shape), ", got ",
              shape(grad));
  const Tensor g = mmfuse::contiguous(grad);
  Tensor grad_wave = zeros_like_as(waveform, waveform.sizes());
  if (g.numel() == 0) return grad_wave;
  MMFUSE_DISPATCH_FLOATING(waveform.scalar_type(), "mel_spectrogram_backward_cpu", [&] {
    const Plan<scalar_t> plan(o, waveform.const_data_ptr<scalar_t>(), window.const_data_ptr<scalar_t>(),
                              mel_fb.const_data_ptr<scalar_t>(),
                              dct ? dct->const_data_ptr<scalar_t>() : nullptr);
    backward(plan, g.const_data_ptr<scalar_t>(), ptr<scalar_t>(grad_wave));
  });
  return grad_wave;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CPU, m) {
  m.impl("mel_spectrogram", TORCH_BOX(&mel_spectrogram_cpu));
  m.impl("mel_spectrogram_backward", TORCH_BOX(&mel_spectrogram_backward_cpu));
}

}  // namespace mmfuse
