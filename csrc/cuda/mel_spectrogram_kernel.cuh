// CUDA kernel bodies for mmfuse::mel_spectrogram and mmfuse::mel_spectrogram_backward. CUDA
// headers only (no torch): nvcc compile-checks this file alone, and the host emulator
// (csrc/emu/cuda_emu.h) runs it through tests/emulator/mel_spectrogram.cpp. The semantics are
// those of the C++ CPU kernel csrc/cpu/mel_spectrogram.cpp (argument codes:
// mmfuse/contract/spectrogram.py); the launch sequence is shared by the torch launcher
// (csrc/cuda/mel_spectrogram.cu) and the emulator harness through mel_forward / mel_backward.
//
// Forward, one block of kThreads threads per (tile of up to kMaxFrames frames, item):
//   1. twiddles cos/sin(2 pi j / n_fft), j < n_fft, into shared memory, from double sincospi;
//   2. each frame's samples read straight from the waveform through the padding index
//      arithmetic (no padded copy), Kaldi's DC removal (a warp per frame reduces the mean),
//      raw energy, pre-emphasis and the window applied on the fly, into shared memory;
//   3. a direct real DFT: thread k owns bin k of every frame of the tile (registers), summing
//      y[n] * twiddle[(n k) mod n_fft] over the window; the frames' samples are warp
//      broadcasts, the angle index is advanced by k modulo n_fft in integer arithmetic;
//   4. |X|^power and the mel projection over each filter's non-zero bin range [lo, hi)
//      (found once per call by mel_ranges_kernel), the log, the energy column, written in
//      either layout; frames past the item's valid count are written as 0 here, so every
//      output element is written exactly once and nothing needs a memset.
// Whisper: the forward kernel also writes each tile's max log10 value; whisper_clamp_kernel
// reduces an item's tile maxima and clamps at max - 8, then (x + 4) / 4.
//
// Why a direct DFT with an exact twiddle table rather than an FFT or tensor cores: the accuracy
// rule (DESIGN.md: fp32 matches the float64 reference to torchaudio's tolerance, mel power atol
// 5e-4 of the peak, rtol 1e-5) is met by fp32 products and sums with twiddles rounded once from
// double (angles reduced mod n_fft exactly, as the Triton kernel's dft_basis does), for every
// n_fft (odd, prime, 400, 512, 2048) with one code path; the same code runs in float64 at 1e-9.
// A 3-term bf16 split on mma_m16n8k16 would cost 3 tensor-core products per term plus the
// splits to reach fp32 accuracy and would not serve float64; a mixed-radix shared-memory FFT
// needs a plan per size. The DFT is O(win * n_bins) per frame (160k multiply-adds for
// Whisper's 400), all in shared memory and registers, with no global traffic beyond reading
// each sample a few times (L1) and writing the output once.
//
// Backward (deterministic, no float atomics), all recomputing the forward:
//   - Whisper only: the forward into a workspace (log10 values before the clamp, tile maxima),
//     whisper_grad_partial_kernel (per chunk: the gradient the clamp sends to the item's max,
//     and the number of ties) and whisper_grad_apply_kernel (fixed-order sums of the chunks'
//     partials, then dL/dlog10 of every element, ties splitting as torch.maximum does);
//   - mel_backward_frames_kernel, per tile as in the forward: the spectrum again, dL/dmel from
//     the log, dL/d|X|^p through the mel filters, the power's derivative, the adjoint one-sided
//     DFT (thread n owns sample n of every frame), the window, windowed/raw energy,
//     pre-emphasis and DC removal: per-frame sample gradients into a (B, frames, win) workspace;
//   - mel_backward_gather_kernel: each waveform sample sums, in a fixed order, the frame
//     positions that read it: its position in the padded signal and that position's images
//     under the padding map (reflections, replicated edges, Kaldi's periodic reflection),
//     each over the frames that cover it.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "shared_memory.cuh"

namespace mmfuse {
namespace cuda {

namespace mel {

constexpr int kThreads = 128;      // analysis kernels: 4 warps
constexpr int kMaxFrames = 8;      // frames per analysis tile (registers per DFT thread)
constexpr int kTwiddleResync = 17;  // DFT steps between exact twiddles from the table (TwiddleWalk)
constexpr int kWarps = kThreads / 32;
constexpr int kElementThreads = 256;  // Whisper and gather kernels
constexpr int kElementsPerThread = 8;
constexpr int kChunk = kElementThreads * kElementsPerThread;  // elements per Whisper block
constexpr size_t kPreferredShared = 48 * 1024;  // without the opt-in; larger tiles only when needed

enum PadMode : int { kConstant = 0, kReflect = 1, kReplicate = 2, kKaldiReflect = 3 };
enum LogMode : int { kNoLog = 0, kNaturalLog = 1, kWhisperLog = 2 };
enum EnergyMode : int { kNoEnergy = 0, kRawEnergy = 1, kWindowedEnergy = 2 };
enum PowerMode : int { kSquare = 0, kMagnitude = 1, kGeneralPower = 2 };

}  // namespace mel

template <typename T>
struct MelParams {
  const T* waveform;              // (B, num_samples), contiguous
  const T* window;                // (win,)
  const T* mel_fb;                // (n_bins, n_mels), contiguous
  const int64_t* lengths;         // (B,) samples per item, or null: num_samples each
  const int64_t* frame_lengths;   // (B,) valid frames per item, or null: num_frames each
  const int32_t* mel_range;       // (n_mels, 2): filter m is non-zero on bins [lo, hi)
  T* out;                         // (B, n_feats, frames), or (B, frames, n_feats) if frames_major
  T* tile_max;                    // (B, tiles_per_item): Whisper's per-tile max log10 value
  const T* grad;                  // backward: dL/d(out before the Whisper clamp), out's layout
  T* frame_grad;                  // backward: (B, num_frames, win) per-frame sample gradients
  int64_t batch, num_samples, num_frames, hop, frame_offset, pad;
  int n_fft, win, n_bins, n_mels, n_feats;
  int frames_per_tile, tiles_per_item;
  int pad_mode, log_mode, energy_mode, power_mode;
  bool remove_dc, energy_last, frames_major, floor_energy;
  T preemphasis;
  T half_power;            // power / 2 (kGeneralPower)
  T power;                 // power, and power / 2 - 1, for the backward's d|X|^p
  T half_power_minus_one;
  T log_floor;             // the floor of the logs and of the energy's log
  T mel_floor;             // max(log_floor, smallest normal T): the mel values' log floor
  T log_energy_floor;      // ln(energy_floor), used when floor_energy
};

// ------------------------------------------------------------------------------------------
// Index arithmetic shared with the CPU kernel.

__host__ __device__ __forceinline__ int64_t item_samples(const int64_t* lengths, int64_t n, int64_t b) {
  return lengths != nullptr ? lengths[b] : n;
}

template <typename T>
__host__ __device__ __forceinline__ int64_t out_index(const MelParams<T>& p, int64_t b, int64_t feat, int64_t frame) {
  return p.frames_major ? (b * p.num_frames + frame) * p.n_feats + feat : (b * p.n_feats + feat) * p.num_frames + frame;
}

template <typename T>
__host__ __device__ __forceinline__ int mel_column(const MelParams<T>& p, int m) {
  return m + (p.energy_mode != mel::kNoEnergy && !p.energy_last ? 1 : 0);
}

template <typename T>
__host__ __device__ __forceinline__ int energy_column(const MelParams<T>& p) {
  return p.energy_last ? p.n_mels : 0;
}

// Index into an item's samples of position j of its padded signal (`pad` zeros each side,
// then the pad_mode rule outside [0, length + 2 pad)), or -1 where the padded signal is zero.
__host__ __device__ __forceinline__ int64_t source_index(int64_t j, int64_t length, int64_t pad, int mode) {
  const int64_t padded = length + 2 * pad;
  if (padded == 0) return -1;
  if (j < 0 || j >= padded) {
    switch (mode) {
      case mel::kConstant:
        return -1;
      case mel::kReflect:  // torch's reflect: the edge sample is not repeated
        j = j < 0 ? -j : 2 * (padded - 1) - j;
        break;
      case mel::kReplicate:
        break;
      default: {  // Kaldi's ExtractWindow: -1 -> 0, padded -> padded - 1, repeatedly
        j %= 2 * padded;
        if (j < 0) j += 2 * padded;
        if (j >= padded) j = 2 * padded - 1 - j;
      }
    }
    j = j < 0 ? 0 : (j > padded - 1 ? padded - 1 : j);
  }
  j -= pad;
  return j >= 0 && j < length ? j : -1;
}

__host__ __device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// ------------------------------------------------------------------------------------------
// Math in the input's precision.

__device__ __forceinline__ float mel_log(float x) { return logf(x); }
__device__ __forceinline__ double mel_log(double x) { return log(x); }
__device__ __forceinline__ float mel_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double mel_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float mel_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double mel_pow(double x, double y) { return pow(x, y); }
// x^y for x > 0 in the backward's hot loop: double pow() is an out-of-line call there whose
// ABI spills registers, exp(y ln x) is inlined (relative error ~1e-15 |y ln x|).
__device__ __forceinline__ float positive_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double positive_pow(double x, double y) { return exp(y * log(x)); }

template <typename T>
__device__ __forceinline__ T lowest() {
  return -static_cast<T>(INFINITY);
}

// cos and sin of 2 pi j / n in double, exact to the last bit of T after rounding.
__device__ __forceinline__ void twiddle(int j, int n, double* c, double* s) {
#ifdef MMFUSE_CUDA_EMULATOR
  const double angle = 2.0 * M_PI * static_cast<double>(j) / static_cast<double>(n);
  *c = std::cos(angle);
  *s = std::sin(angle);
#else
  sincospi(2.0 * static_cast<double>(j) / static_cast<double>(n), s, c);
#endif
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum (or max) over the block in a fixed tree: deterministic for a given blockDim.x (a power
// of two). `scratch` holds blockDim.x values; ends with a barrier so it can be reused.
template <typename T, bool kMax>
__device__ T block_reduce(T v, T* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      const T other = scratch[threadIdx.x + half];
      scratch[threadIdx.x] = kMax ? (other > scratch[threadIdx.x] ? other : scratch[threadIdx.x])
                                  : scratch[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const T result = scratch[0];
  __syncthreads();
  return result;
}

// ------------------------------------------------------------------------------------------
// Shared memory of the analysis kernels, in units of T: twiddles (2 n_fft), the tile's frames
// (frames * win), the spectrum (re, im: 2 * frames * n_bins; the backward reuses it for the
// frames' sample gradients, which fit since win <= n_fft < 2 n_bins), the backward's dL/dmel
// (frames * n_mels), per-frame statistics and a block reduction's scratch.

template <typename T>
struct TileShared {
  T *cos_tab, *sin_tab, *frame, *re, *im, *dmel, *mean, *energy, *denergy, *dmean, *scratch;

  __device__ TileShared(const MelParams<T>& p, T* base) {
    const int nf = p.frames_per_tile;
    cos_tab = base;
    sin_tab = cos_tab + p.n_fft;
    frame = sin_tab + p.n_fft;
    re = frame + nf * p.win;
    im = re + nf * p.n_bins;
    dmel = im + nf * p.n_bins;
    mean = dmel + nf * p.n_mels;
    energy = mean + mel::kMaxFrames;
    denergy = energy + mel::kMaxFrames;
    dmean = denergy + mel::kMaxFrames;
    scratch = dmean + mel::kMaxFrames;  // kThreads values for block reductions
  }
};

// Bytes of TileShared for `frames` frames per tile.
inline size_t tile_shared_bytes(int n_fft, int win, int n_mels, int frames, size_t elem) {
  const int n_bins = n_fft / 2 + 1;
  const size_t count = 2 * static_cast<size_t>(n_fft) +
                       static_cast<size_t>(frames) * (static_cast<size_t>(win) + 2 * n_bins + n_mels) +
                       4 * mel::kMaxFrames + mel::kThreads;
  return count * elem;
}

template <typename T>
__device__ __forceinline__ T frame_sample(const MelParams<T>& p, const T* x, int64_t start, int k, int64_t length) {
  const int64_t src = source_index(start + k, length, p.pad, p.pad_mode);
  return src >= 0 ? x[src] : T(0);
}

// Frames [f0, f0 + count) of item b into s.frame (DC removed, pre-emphasised, windowed), their
// means and energies into s.mean / s.energy, and the twiddle table. Ends with a barrier.
template <typename T>
__device__ void load_tile(const MelParams<T>& p, const TileShared<T>& s, int64_t b, int64_t f0, int count) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  for (int j = tid; j < p.n_fft; j += blockDim.x) {
    double c, sn;
    twiddle(j, p.n_fft, &c, &sn);
    s.cos_tab[j] = static_cast<T>(c);
    s.sin_tab[j] = static_cast<T>(sn);
  }
  const int64_t length = item_samples(p.lengths, p.num_samples, b);
  const T* x = p.waveform + b * p.num_samples;
  for (int f = warp; f < count; f += mel::kWarps) {
    const int64_t start = (f0 + f) * p.hop + p.frame_offset;
    T mean = 0;
    if (p.remove_dc) {
      for (int k = lane; k < p.win; k += 32) mean += frame_sample(p, x, start, k, length);
      mean = warp_sum(mean) / static_cast<T>(p.win);
    }
    T energy = 0;
    if (p.energy_mode == mel::kRawEnergy) {
      for (int k = lane; k < p.win; k += 32) {
        const T r = frame_sample(p, x, start, k, length) - mean;
        energy += r * r;
      }
      energy = warp_sum(energy);
    }
    if (lane == 0) {
      s.mean[f] = mean;
      s.energy[f] = energy;
    }
  }
  __syncthreads();
  const T c = p.preemphasis;
  for (int i = tid; i < count * p.win; i += blockDim.x) {
    const int f = i / p.win, k = i % p.win;
    const int64_t start = (f0 + f) * p.hop + p.frame_offset;
    const T raw = frame_sample(p, x, start, k, length) - s.mean[f];
    T y = raw;
    if (c != T(0)) {  // Kaldi's Preemphasize: y[0] = raw[0] - c raw[0], y[k] = raw[k] - c raw[k - 1]
      const T prev = k > 0 ? frame_sample(p, x, start, k - 1, length) - s.mean[f] : raw;
      y = raw - c * prev;
    }
    s.frame[f * p.win + k] = y * p.window[k];
  }
  __syncthreads();
  if (p.energy_mode == mel::kWindowedEnergy) {
    for (int f = warp; f < count; f += mel::kWarps) {
      T energy = 0;
      for (int k = lane; k < p.win; k += 32) energy += s.frame[f * p.win + k] * s.frame[f * p.win + k];
      energy = warp_sum(energy);
      if (lane == 0) s.energy[f] = energy;
    }
    __syncthreads();
  }
}

// The twiddles e^(2 pi i j m / n_fft), j = 0, 1, 2, ... of one lane's DFT loop (m its bin or
// sample): reading the table at j m mod n_fft would make the lanes of a warp (consecutive m)
// stride through it by j words, 2.6-3.3 passes through the banks per read on average (counted
// by the emulator, tools/emu_report.py). Instead the walk rotates by e^(2 pi i m / n_fft) (one
// read, consecutive lanes at consecutive words) and takes the exact value from the table only
// every kTwiddleResync steps, which bounds the rotation's rounding drift to that many steps.
// The interval is odd: at step j the lanes read the table j m apart, and an even j (16, say)
// would put 16 of them in every bank used.
template <typename T>
struct TwiddleWalk {
  T c, s, step_c, step_s;
  int angle = 0, m, n_fft;

  __device__ TwiddleWalk(const TileShared<T>& t, int m_, int n_fft_)
      : c(1), s(0), step_c(t.cos_tab[m_]), step_s(t.sin_tab[m_]), m(m_), n_fft(n_fft_) {}

  // The twiddle of step j (steps taken in order from 0).
  __device__ __forceinline__ void at(const TileShared<T>& t, int j) {
    if (j % mel::kTwiddleResync == 0) {
      c = t.cos_tab[angle];
      s = t.sin_tab[angle];
    }
  }
  __device__ __forceinline__ void next() {
    const T rotated_c = c * step_c - s * step_s;
    s = s * step_c + c * step_s;
    c = rotated_c;
    angle += m;
    if (angle >= n_fft) angle -= n_fft;
  }
};

// One-sided DFT of the tile's frames into s.re / s.im: X[k] = sum_n y[n] e^(-2 pi i n k / n_fft).
// Ends with a barrier.
template <typename T>
__device__ void dft_tile(const MelParams<T>& p, const TileShared<T>& s, int count) {
  for (int k = threadIdx.x; k < p.n_bins; k += blockDim.x) {
    T acc_re[mel::kMaxFrames], acc_im[mel::kMaxFrames];
#pragma unroll
    for (int f = 0; f < mel::kMaxFrames; ++f) acc_re[f] = acc_im[f] = T(0);
    TwiddleWalk<T> w(s, k, p.n_fft);  // e^(2 pi i n k / n_fft)
    for (int n = 0; n < p.win; ++n) {
      w.at(s, n);
      const T c = w.c, sn = w.s;
#pragma unroll
      for (int f = 0; f < mel::kMaxFrames; ++f) {
        if (f < count) {
          const T y = s.frame[f * p.win + n];
          acc_re[f] += y * c;
          acc_im[f] -= y * sn;
        }
      }
      w.next();
    }
#pragma unroll
    for (int f = 0; f < mel::kMaxFrames; ++f) {
      if (f < count) {
        s.re[f * p.n_bins + k] = acc_re[f];
        s.im[f * p.n_bins + k] = acc_im[f];
      }
    }
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ T power_of(const MelParams<T>& p, T re, T im) {
  const T mag = re * re + im * im;
  if (p.power_mode == mel::kSquare) return mag;
  if (p.power_mode == mel::kMagnitude) return mel_sqrt(mag);
  return mel_pow(mag, p.half_power);
}

// Mel value m of tile frame f (before the log).
template <typename T>
__device__ __forceinline__ T mel_value(const MelParams<T>& p, const TileShared<T>& s, int f, int m) {
  const int lo = p.mel_range[2 * m], hi = p.mel_range[2 * m + 1];
  T acc = 0;
  for (int k = lo; k < hi; ++k) {
    acc += p.mel_fb[static_cast<int64_t>(k) * p.n_mels + m] * power_of(p, s.re[f * p.n_bins + k], s.im[f * p.n_bins + k]);
  }
  return acc;
}

template <typename T>
__device__ __forceinline__ T log_mel(const MelParams<T>& p, T v) {
  if (p.log_mode == mel::kNoLog) return v;
  const T floored = v > p.mel_floor ? v : p.mel_floor;
  return p.log_mode == mel::kWhisperLog ? mel_log(floored) * static_cast<T>(1.0 / M_LN10) : mel_log(floored);
}

template <typename T>
__device__ __forceinline__ T log_energy(const MelParams<T>& p, T energy) {
  T value = mel_log(energy > p.log_floor ? energy : p.log_floor);
  if (p.floor_energy && p.log_energy_floor > value) value = p.log_energy_floor;
  return value;
}

// (frame, mel) element i of a tile's nf * n_mels, ordered so that consecutive threads write
// consecutive output addresses in either layout.
template <typename T>
__device__ __forceinline__ void tile_element(const MelParams<T>& p, int i, int* f, int* m) {
  if (p.frames_major) {
    *f = i / p.n_mels;
    *m = i % p.n_mels;
  } else {
    *m = i / p.frames_per_tile;
    *f = i % p.frames_per_tile;
  }
}

// ------------------------------------------------------------------------------------------
// Forward kernels.

// Filter m's non-zero bins [lo, hi) (0, 0 when all zero), as the CPU kernel's Plan finds them.
template <typename T>
__global__ void mel_ranges_kernel(const T* mel_fb, int n_bins, int n_mels, int32_t* range) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= n_mels) return;
  int lo = 0, hi = 0;
  for (int k = 0; k < n_bins; ++k) {
    if (mel_fb[static_cast<int64_t>(k) * n_mels + m] != T(0)) {
      if (hi == 0) lo = k;
      hi = k + 1;
    }
  }
  range[2 * m] = lo;
  range[2 * m + 1] = hi;
}

// grid (tiles_per_item, B), block kThreads, dynamic shared tile_shared_bytes.
template <typename T>
__global__ void __launch_bounds__(mel::kThreads) mel_forward_kernel(MelParams<T> p) {
  MMFUSE_DYNAMIC_SHARED(T, shared);
  const TileShared<T> s(p, shared);
  const int64_t b = blockIdx.y, f0 = static_cast<int64_t>(blockIdx.x) * p.frames_per_tile;
  const int64_t item_frames = item_samples(p.frame_lengths, p.num_frames, b);
  const int64_t left = item_frames - f0;
  const int count = left <= 0 ? 0 : (left < p.frames_per_tile ? static_cast<int>(left) : p.frames_per_tile);
  const int64_t tile_end = f0 + p.frames_per_tile < p.num_frames ? f0 + p.frames_per_tile : p.num_frames;
  const int in_tile = static_cast<int>(tile_end - f0);  // output frames of this tile

  if (count > 0) {
    load_tile(p, s, b, f0, count);
    dft_tile(p, s, count);
  }
  T local_max = lowest<T>();
  for (int i = threadIdx.x; i < p.frames_per_tile * p.n_mels; i += blockDim.x) {
    int f, m;
    tile_element(p, i, &f, &m);
    if (f >= in_tile) continue;
    T v = 0;  // frames past the item's end hold 0
    if (f < count) {
      v = log_mel(p, mel_value(p, s, f, m));
      local_max = v > local_max ? v : local_max;
    }
    p.out[out_index(p, b, mel_column(p, m), f0 + f)] = v;
  }
  if (p.energy_mode != mel::kNoEnergy) {
    for (int f = threadIdx.x; f < in_tile; f += blockDim.x) {
      p.out[out_index(p, b, energy_column(p), f0 + f)] = f < count ? log_energy(p, s.energy[f]) : T(0);
    }
  }
  if (p.log_mode == mel::kWhisperLog) {
    const T tile_max = block_reduce<T, true>(local_max, s.scratch);
    if (threadIdx.x == 0) p.tile_max[b * p.tiles_per_item + blockIdx.x] = tile_max;
  }
}

// The item's largest log10 mel value, from its tiles' maxima (every block of the item reduces
// them the same way).
template <typename T>
__device__ T item_max(const MelParams<T>& p, int64_t b, T* scratch) {
  T best = lowest<T>();
  for (int i = threadIdx.x; i < p.tiles_per_item; i += blockDim.x) {
    const T v = p.tile_max[b * p.tiles_per_item + i];
    best = v > best ? v : best;
  }
  return block_reduce<T, true>(best, scratch);
}

// Element i of an item's n_feats * num_frames, as (feature, frame) in channel-major order.
template <typename T>
__device__ __forceinline__ void item_element(const MelParams<T>& p, int64_t i, int* feat, int64_t* frame) {
  const int64_t q = i / p.num_frames;  // one 64-bit division (a subroutine call), not two
  *feat = static_cast<int>(q);
  *frame = i - q * p.num_frames;
}

// Whisper's clamp at the item's max - 8, then (x + 4) / 4, on the valid mel elements.
// grid (ceil(n_mels * num_frames / kChunk), B), block kElementThreads, shared kElementThreads T.
template <typename T>
__global__ void __launch_bounds__(mel::kElementThreads) whisper_clamp_kernel(MelParams<T> p) {
  MMFUSE_DYNAMIC_SHARED(T, scratch);
  const int64_t b = blockIdx.y;
  const T floor = item_max(p, b, scratch) - T(8);
  const int64_t frames = item_samples(p.frame_lengths, p.num_frames, b);
  const int64_t total = static_cast<int64_t>(p.n_mels) * p.num_frames;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * mel::kChunk;
  for (int64_t i = begin + threadIdx.x; i < begin + mel::kChunk && i < total; i += blockDim.x) {
    int m;
    int64_t f;
    item_element(p, i, &m, &f);
    if (f >= frames) continue;
    T& v = p.out[out_index(p, b, mel_column(p, m), f)];
    v = ((v > floor ? v : floor) + T(4)) * T(0.25);
  }
}

// ------------------------------------------------------------------------------------------
// Backward kernels.

// Whisper: over the chunk's valid mel elements, the gradient the clamp sends to the item's max
// (elements below max - 8, and half of those equal to it) and the number of elements equal to
// the max. `logs`: the forward's log10 values (p.out); p.grad: dL/d(Whisper output).
// grid as whisper_clamp_kernel; shared kElementThreads T.
template <typename T>
__global__ void __launch_bounds__(mel::kElementThreads)
whisper_grad_partial_kernel(MelParams<T> p, T* partial_sum, int32_t* partial_ties) {
  MMFUSE_DYNAMIC_SHARED(T, scratch);
  const int64_t b = blockIdx.y;
  const T best = item_max(p, b, scratch), floor = best - T(8);
  const int64_t frames = item_samples(p.frame_lengths, p.num_frames, b);
  const int64_t total = static_cast<int64_t>(p.n_mels) * p.num_frames;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * mel::kChunk;
  T to_max = 0;
  T ties = 0;  // an exact integer count in T
  for (int64_t i = begin + threadIdx.x; i < begin + mel::kChunk && i < total; i += blockDim.x) {
    int m;
    int64_t f;
    item_element(p, i, &m, &f);
    if (f >= frames) continue;
    const int64_t at = out_index(p, b, mel_column(p, m), f);
    const T g = p.grad[at] / T(4), l = p.out[at];
    to_max += l < floor ? g : (l == floor ? g / T(2) : T(0));
    ties += l == best ? T(1) : T(0);
  }
  to_max = block_reduce<T, false>(to_max, scratch);
  ties = block_reduce<T, false>(ties, scratch);
  if (threadIdx.x == 0) {
    partial_sum[b * gridDim.x + blockIdx.x] = to_max;
    partial_ties[b * gridDim.x + blockIdx.x] = static_cast<int32_t>(ties);
  }
}

// dL/dlog10 of every element (0 off the valid mel elements), as autograd gives it for
// torch.maximum(l, amax(l) - 8): writes all of `dlog` (out's layout).
template <typename T>
__global__ void __launch_bounds__(mel::kElementThreads)
whisper_grad_apply_kernel(MelParams<T> p, const T* partial_sum, const int32_t* partial_ties, T* dlog) {
  MMFUSE_DYNAMIC_SHARED(T, scratch);
  const int64_t b = blockIdx.y;
  const T best = item_max(p, b, scratch), floor = best - T(8);
  T to_max = 0;
  int64_t ties = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) to_max += partial_sum[b * gridDim.x + i];
  to_max = block_reduce<T, false>(to_max, scratch);
  for (unsigned i = 0; i < gridDim.x; ++i) ties += partial_ties[b * gridDim.x + i];
  const int64_t frames = item_samples(p.frame_lengths, p.num_frames, b);
  const int64_t total = static_cast<int64_t>(p.n_feats) * p.num_frames;
  const int64_t chunk = (total + gridDim.x - 1) / gridDim.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int mel_begin = mel_column(p, 0);
  // each element equal to the max takes an equal share (one division here: in the loop, the
  // division subroutine's call made ptxas spill on sm_120)
  const T share = ties > 0 ? to_max / static_cast<T>(ties) : T(0);
  for (int64_t i = begin + threadIdx.x; i < begin + chunk && i < total; i += blockDim.x) {
    int feat;
    int64_t f;
    item_element(p, i, &feat, &f);
    const int64_t at = out_index(p, b, feat, f);
    T d = 0;
    if (f < frames && feat >= mel_begin && feat < mel_begin + p.n_mels) {
      const T g = p.grad[at] * T(0.25), l = p.out[at];
      d = l > floor ? g : (l == floor ? g * T(0.5) : T(0));
      if (l == best) d += share;
    }
    dlog[at] = d;
  }
}

// Per-frame sample gradients of a tile into p.frame_grad (valid frames only). p.grad: dL/d(the
// features before the Whisper clamp). grid, block and shared memory as mel_forward_kernel.
template <typename T>
__global__ void __launch_bounds__(mel::kThreads) mel_backward_frames_kernel(MelParams<T> p) {
  MMFUSE_DYNAMIC_SHARED(T, shared);
  const TileShared<T> s(p, shared);
  const int64_t b = blockIdx.y, f0 = static_cast<int64_t>(blockIdx.x) * p.frames_per_tile;
  const int64_t left = item_samples(p.frame_lengths, p.num_frames, b) - f0;
  if (left <= 0) return;
  const int count = left < p.frames_per_tile ? static_cast<int>(left) : p.frames_per_tile;
  load_tile(p, s, b, f0, count);
  dft_tile(p, s, count);

  // dL/dmel through the log (taken as 0 below the floor, as the CPU kernel does)
  for (int i = threadIdx.x; i < count * p.n_mels; i += blockDim.x) {
    const int f = i / p.n_mels, m = i % p.n_mels;
    T g = p.grad[out_index(p, b, mel_column(p, m), f0 + f)];
    if (p.log_mode != mel::kNoLog) {
      const T v = mel_value(p, s, f, m);
      const T scale = p.log_mode == mel::kWhisperLog ? static_cast<T>(M_LN10) : T(1);
      g = v >= p.log_floor ? g / (v * scale) : T(0);
    }
    s.dmel[i] = g;
  }
  for (int f = threadIdx.x; f < count; f += blockDim.x) {
    T denergy = 0;
    if (p.energy_mode != mel::kNoEnergy) {
      const T e = s.energy[f];
      const T g = p.log_mode == mel::kWhisperLog ? T(0) : p.grad[out_index(p, b, energy_column(p), f0 + f)];
      const bool floored = p.floor_energy && mel_log(e > p.log_floor ? e : p.log_floor) < p.log_energy_floor;
      denergy = e >= p.log_floor && !floored ? g / e : T(0);
    }
    s.denergy[f] = denergy;
  }
  __syncthreads();

  // dL/dX = dL/d|X|^p * d|X|^p/dX, in place of X; conj taken so the adjoint DFT below is a sum
  // of c_re cos + c_im sin
  for (int i = threadIdx.x; i < count * p.n_bins; i += blockDim.x) {
    const int f = i / p.n_bins, k = i % p.n_bins;
    T dmag = 0;
    for (int m = 0; m < p.n_mels; ++m) {
      if (k >= p.mel_range[2 * m] && k < p.mel_range[2 * m + 1]) {
        dmag += p.mel_fb[static_cast<int64_t>(k) * p.n_mels + m] * s.dmel[f * p.n_mels + m];
      }
    }
    const T xr = s.re[i], xi = s.im[i], mag = xr * xr + xi * xi;
    T scale;
    if (p.power_mode == mel::kSquare) {
      scale = T(2);
    } else if (mag == T(0)) {
      scale = T(0);
    } else {
      scale = p.power * positive_pow(mag, p.half_power_minus_one);
    }
    s.re[i] = dmag * scale * xr;
    s.im[i] = -dmag * scale * xi;
  }
  __syncthreads();

  // adjoint of the one-sided DFT, then the windowed energy and the window, into s.frame
  for (int n = threadIdx.x; n < p.win; n += blockDim.x) {
    T acc[mel::kMaxFrames];
#pragma unroll
    for (int f = 0; f < mel::kMaxFrames; ++f) acc[f] = T(0);
    TwiddleWalk<T> w(s, n, p.n_fft);  // e^(2 pi i k n / n_fft)
    for (int k = 0; k < p.n_bins; ++k) {
      w.at(s, k);
      const T c = w.c, sn = w.s;
#pragma unroll
      for (int f = 0; f < mel::kMaxFrames; ++f) {
        if (f < count) acc[f] += s.re[f * p.n_bins + k] * c + s.im[f * p.n_bins + k] * sn;
      }
      w.next();
    }
#pragma unroll
    for (int f = 0; f < mel::kMaxFrames; ++f) {
      if (f < count) {
        T d = acc[f];
        T& y = s.frame[f * p.win + n];
        if (p.energy_mode == mel::kWindowedEnergy) d += s.denergy[f] * T(2) * y;
        y = d * p.window[n];
      }
    }
  }
  __syncthreads();

  // adjoint of pre-emphasis (u[0] = (1 - c) v[0], u[k] = v[k] - c v[k-1]) and the raw energy,
  // into the spectrum's space (free now)
  T* draw = s.re;
  const int64_t length = item_samples(p.lengths, p.num_samples, b);
  const T* x = p.waveform + b * p.num_samples;
  const T c = p.preemphasis;
  for (int i = threadIdx.x; i < count * p.win; i += blockDim.x) {
    const int f = i / p.win, k = i % p.win;
    const T* dy = s.frame + f * p.win;
    T d = dy[k];
    if (c != T(0)) {
      d = dy[k] - (k + 1 < p.win ? c * dy[k + 1] : T(0));
      if (k == 0) d -= c * dy[0];
    }
    if (p.energy_mode == mel::kRawEnergy) {
      const int64_t start = (f0 + f) * p.hop + p.frame_offset;
      d += s.denergy[f] * T(2) * (frame_sample(p, x, start, k, length) - s.mean[f]);
    }
    draw[i] = d;
  }
  __syncthreads();
  if (p.remove_dc) {  // adjoint of subtracting the mean: subtract the gradients' mean
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int f = warp; f < count; f += mel::kWarps) {
      T sum = 0;
      for (int k = lane; k < p.win; k += 32) sum += draw[f * p.win + k];
      sum = warp_sum(sum);
      if (lane == 0) s.dmean[f] = sum / static_cast<T>(p.win);
    }
    __syncthreads();
  }
  T* out = p.frame_grad + (b * p.num_frames + f0) * p.win;
  for (int i = threadIdx.x; i < count * p.win; i += blockDim.x) {
    out[i] = p.remove_dc ? draw[i] - s.dmean[i / p.win] : draw[i];
  }
}

// Adds the frame gradients at padded position j (every frame that covers it) to *acc.
template <typename T>
__device__ __forceinline__ void add_position(const MelParams<T>& p, const T* frame_grad, int64_t frames, int64_t j,
                                             T* acc) {
  const int64_t rel = j - p.frame_offset;
  int64_t first = floor_div(rel - p.win + 1 + p.hop - 1, p.hop);  // ceil((rel - win + 1) / hop)
  int64_t last = floor_div(rel, p.hop);
  if (first < 0) first = 0;
  if (last > frames - 1) last = frames - 1;
  for (int64_t f = first; f <= last; ++f) *acc += frame_grad[f * p.win + (rel - f * p.hop)];
}

// Positions [lo, hi] intersected with the frames' reach [reach_lo, reach_hi], in order.
template <typename T>
__device__ __forceinline__ void add_positions(const MelParams<T>& p, const T* frame_grad, int64_t frames, int64_t lo,
                                              int64_t hi, int64_t reach_lo, int64_t reach_hi, T* acc) {
  if (lo < reach_lo) lo = reach_lo;
  if (hi > reach_hi) hi = reach_hi;
  for (int64_t j = lo; j <= hi; ++j) add_position(p, frame_grad, frames, j, acc);
}

// dL/dwaveform[b, i]: the sum over every padded position that reads sample i (source_index ==
// i) of the frames' gradients there. grid (ceil(num_samples / kElementThreads), B).
template <typename T>
__global__ void __launch_bounds__(mel::kElementThreads) mel_backward_gather_kernel(MelParams<T> p, T* grad_wave) {
  const int64_t b = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.num_samples) return;
  const int64_t length = item_samples(p.lengths, p.num_samples, b);
  const int64_t frames = item_samples(p.frame_lengths, p.num_frames, b);
  T acc = 0;
  if (i < length && frames > 0) {
    const T* fg = p.frame_grad + b * p.num_frames * p.win;
    const int64_t padded = length + 2 * p.pad, pos = i + p.pad;
    const int64_t lo = p.frame_offset, hi = (frames - 1) * p.hop + p.frame_offset + p.win - 1;
    const int64_t far = hi - lo + padded + 1;  // beyond the reach on either side
    switch (p.pad_mode) {
      case mel::kConstant:
        add_positions(p, fg, frames, pos, pos, lo, hi, &acc);
        break;
      case mel::kReflect:
        if (pos == padded - 1) add_positions(p, fg, frames, lo - far, -padded, lo, hi, &acc);
        if (pos > 0) add_positions(p, fg, frames, -pos, -pos, lo, hi, &acc);
        add_positions(p, fg, frames, pos, pos, lo, hi, &acc);
        if (pos < padded - 1) add_positions(p, fg, frames, 2 * (padded - 1) - pos, 2 * (padded - 1) - pos, lo, hi, &acc);
        if (pos == 0) add_positions(p, fg, frames, 2 * padded - 1, hi + far, lo, hi, &acc);
        break;
      case mel::kReplicate:
        if (pos == 0) add_positions(p, fg, frames, lo - far, -1, lo, hi, &acc);
        add_positions(p, fg, frames, pos, pos, lo, hi, &acc);
        if (pos == padded - 1) add_positions(p, fg, frames, padded, hi + far, lo, hi, &acc);
        break;
      default: {  // Kaldi: j mod 2 padded is pos or 2 padded - 1 - pos
        const int64_t period = 2 * padded, mirror = period - 1 - pos;
        const int64_t first = pos < mirror ? pos : mirror, second = pos < mirror ? mirror : pos;
        for (int64_t base = floor_div(lo, period) * period; base <= hi; base += period) {
          add_positions(p, fg, frames, base + first, base + first, lo, hi, &acc);
          add_positions(p, fg, frames, base + second, base + second, lo, hi, &acc);
        }
      }
    }
  }
  grad_wave[b * p.num_samples + i] = acc;
}

// ------------------------------------------------------------------------------------------
// Host side, torch-free: tiling, workspace sizes and the launch sequences, shared by the torch
// launcher and the emulator harness. `launch(kernel, grid, block, shared_bytes, args...)` runs
// one kernel (<<<>>> on a stream and a check, or emu::launch).

// The kernels' parameters from the op's arguments (mmfuse::mel_spectrogram's schema, codes of
// mmfuse/contract/spectrogram.py), constants rounded to T as the CPU kernel rounds them.
template <typename T>
inline MelParams<T> mel_params(const T* waveform, const T* window, const T* mel_fb, const int64_t* lengths,
                               const int64_t* frame_lengths, int64_t batch, int64_t num_samples, int64_t num_frames,
                               int64_t n_fft, int64_t win, int64_t n_mels, int64_t hop, int64_t frame_offset,
                               int64_t pad, int64_t pad_mode, bool remove_dc, double preemphasis, double power,
                               int64_t log_mode, double log_floor, int64_t energy_mode, double energy_floor,
                               bool energy_last, bool frames_major) {
  MelParams<T> p{};
  p.waveform = waveform;
  p.window = window;
  p.mel_fb = mel_fb;
  p.lengths = lengths;
  p.frame_lengths = frame_lengths;
  p.batch = batch;
  p.num_samples = num_samples;
  p.num_frames = num_frames;
  p.hop = hop;
  p.frame_offset = frame_offset;
  p.pad = pad;
  p.n_fft = static_cast<int>(n_fft);
  p.win = static_cast<int>(win);
  p.n_bins = static_cast<int>(n_fft / 2 + 1);
  p.n_mels = static_cast<int>(n_mels);
  p.n_feats = static_cast<int>(n_mels + (energy_mode != mel::kNoEnergy ? 1 : 0));
  p.pad_mode = static_cast<int>(pad_mode);
  p.log_mode = static_cast<int>(log_mode);
  p.energy_mode = static_cast<int>(energy_mode);
  p.power_mode = power == 2.0 ? mel::kSquare : (power == 1.0 ? mel::kMagnitude : mel::kGeneralPower);
  p.remove_dc = remove_dc;
  p.energy_last = energy_last;
  p.frames_major = frames_major;
  p.floor_energy = energy_floor > 0.0;
  p.preemphasis = static_cast<T>(preemphasis);
  p.half_power = static_cast<T>(power / 2.0);
  p.power = static_cast<T>(power);
  p.half_power_minus_one = static_cast<T>(power / 2.0 - 1.0);
  p.log_floor = static_cast<T>(log_floor);
  p.mel_floor = static_cast<T>(log_floor > static_cast<double>(std::numeric_limits<T>::min())
                                   ? log_floor
                                   : static_cast<double>(std::numeric_limits<T>::min()));
  p.log_energy_floor = p.floor_energy ? static_cast<T>(std::log(energy_floor)) : T(0);
  return p;
}

// Frames per tile: the most (<= kMaxFrames) whose shared memory fits kPreferredShared, else the
// most that fit max_shared. 0 when not even one frame fits.
inline int mel_frames_per_tile(int n_fft, int win, int n_mels, size_t elem, size_t max_shared) {
  for (size_t limit : {mel::kPreferredShared < max_shared ? mel::kPreferredShared : max_shared, max_shared}) {
    for (int frames = mel::kMaxFrames; frames >= 1; frames /= 2) {
      if (tile_shared_bytes(n_fft, win, n_mels, frames, elem) <= limit) return frames;
    }
  }
  return 0;
}

// Workspace of one call, in elements: the caller allocates each (uninitialised) and passes it.
struct MelWorkspaceSizes {
  int64_t mel_range;    // int32
  int64_t tile_max;     // T
  int64_t partials;     // T and int32 (Whisper backward)
  int64_t logs;         // T: the forward's log10 values and dL/dlog10 (Whisper backward), each
  int64_t frame_grad;   // T (backward)
};

template <typename T>
struct MelWorkspace {
  int32_t* mel_range;
  T* tile_max;
  T* partial_sum;
  int32_t* partial_ties;
  T* logs;
  T* dlog;
  T* frame_grad;
};

template <typename T>
inline int64_t whisper_chunks(const MelParams<T>& p) {
  return (static_cast<int64_t>(p.n_mels) * p.num_frames + mel::kChunk - 1) / mel::kChunk;
}

// Fills p.frames_per_tile / p.tiles_per_item and the workspace sizes; false when n_fft does
// not fit in max_shared bytes of shared memory.
template <typename T>
inline bool mel_plan(MelParams<T>& p, size_t max_shared, bool backward, MelWorkspaceSizes* sizes) {
  p.frames_per_tile = mel_frames_per_tile(p.n_fft, p.win, p.n_mels, sizeof(T), max_shared);
  if (p.frames_per_tile == 0) return false;
  p.tiles_per_item = static_cast<int>((p.num_frames + p.frames_per_tile - 1) / p.frames_per_tile);
  const bool whisper = p.log_mode == mel::kWhisperLog;
  sizes->mel_range = 2 * static_cast<int64_t>(p.n_mels);
  sizes->tile_max = whisper ? p.batch * p.tiles_per_item : 0;
  sizes->partials = whisper && backward ? p.batch * whisper_chunks(p) : 0;
  sizes->logs = whisper && backward ? p.batch * p.n_feats * p.num_frames : 0;
  sizes->frame_grad = backward ? p.batch * p.num_frames * p.win : 0;
  return true;
}

template <typename T>
inline size_t mel_tile_shared(const MelParams<T>& p) {
  return tile_shared_bytes(p.n_fft, p.win, p.n_mels, p.frames_per_tile, sizeof(T));
}

// Forward: p.out written in full. p planned by mel_plan; ws.mel_range and ws.tile_max set.
template <typename T, typename Launch>
void mel_forward(MelParams<T> p, const MelWorkspace<T>& ws, Launch&& launch) {
  if (p.batch == 0 || p.num_frames == 0) return;
  p.mel_range = ws.mel_range;
  p.tile_max = ws.tile_max;
  if (p.n_mels > 0) {
    launch(mel_ranges_kernel<T>, dim3((p.n_mels + 127) / 128), dim3(128), 0, p.mel_fb, p.n_bins, p.n_mels,
           ws.mel_range);
  }
  const dim3 tiles(static_cast<unsigned>(p.tiles_per_item), static_cast<unsigned>(p.batch));
  launch(mel_forward_kernel<T>, tiles, dim3(mel::kThreads), mel_tile_shared(p), p);
  if (p.log_mode == mel::kWhisperLog && p.n_mels > 0) {
    launch(whisper_clamp_kernel<T>, dim3(static_cast<unsigned>(whisper_chunks(p)), static_cast<unsigned>(p.batch)),
           dim3(mel::kElementThreads), mel::kElementThreads * sizeof(T), p);
  }
}

// Backward: grad_wave (B, num_samples) written in full from p.grad (dL/dout). p planned by
// mel_plan(backward = true); every workspace pointer that mel_plan sized set.
template <typename T, typename Launch>
void mel_backward(MelParams<T> p, const MelWorkspace<T>& ws, T* grad_wave, Launch&& launch) {
  if (p.batch == 0 || p.num_samples == 0) return;
  const dim3 samples(static_cast<unsigned>((p.num_samples + mel::kElementThreads - 1) / mel::kElementThreads),
                     static_cast<unsigned>(p.batch));
  p.mel_range = ws.mel_range;
  p.tile_max = ws.tile_max;
  p.frame_grad = ws.frame_grad;
  if (p.num_frames > 0) {
    if (p.n_mels > 0) {
      launch(mel_ranges_kernel<T>, dim3((p.n_mels + 127) / 128), dim3(128), 0, p.mel_fb, p.n_bins, p.n_mels,
             ws.mel_range);
    }
    const dim3 tiles(static_cast<unsigned>(p.tiles_per_item), static_cast<unsigned>(p.batch));
    if (p.log_mode == mel::kWhisperLog && p.n_mels > 0) {
      MelParams<T> fwd = p;
      fwd.out = ws.logs;
      launch(mel_forward_kernel<T>, tiles, dim3(mel::kThreads), mel_tile_shared(p), fwd);
      const dim3 chunks(static_cast<unsigned>(whisper_chunks(p)), static_cast<unsigned>(p.batch));
      const size_t scratch = mel::kElementThreads * sizeof(T);
      launch(whisper_grad_partial_kernel<T>, chunks, dim3(mel::kElementThreads), scratch, fwd, ws.partial_sum,
             ws.partial_ties);
      launch(whisper_grad_apply_kernel<T>, chunks, dim3(mel::kElementThreads), scratch, fwd,
             static_cast<const T*>(ws.partial_sum), static_cast<const int32_t*>(ws.partial_ties), ws.dlog);
      p.grad = ws.dlog;
    }
    launch(mel_backward_frames_kernel<T>, tiles, dim3(mel::kThreads), mel_tile_shared(p), p);
  }
  launch(mel_backward_gather_kernel<T>, samples, dim3(mel::kElementThreads), 0, p, grad_wave);
}

}  // namespace cuda
}  // namespace mmfuse

#ifdef MMFUSE_KERNEL_COMPILE_CHECK
// Instantiated only by the nvcc compile check (tests/test_build.py): both dtypes, every kernel.
#define MMFUSE_INSTANTIATE_MEL(T)                                                                                 \
  template __global__ void mmfuse::cuda::mel_ranges_kernel<T>(const T*, int, int, int32_t*);                      \
  template __global__ void mmfuse::cuda::mel_forward_kernel<T>(mmfuse::cuda::MelParams<T>);                       \
  template __global__ void mmfuse::cuda::whisper_clamp_kernel<T>(mmfuse::cuda::MelParams<T>);                     \
  template __global__ void mmfuse::cuda::whisper_grad_partial_kernel<T>(mmfuse::cuda::MelParams<T>, T*, int32_t*); \
  template __global__ void mmfuse::cuda::whisper_grad_apply_kernel<T>(mmfuse::cuda::MelParams<T>, const T*,       \
                                                                      const int32_t*, T*);                        \
  template __global__ void mmfuse::cuda::mel_backward_frames_kernel<T>(mmfuse::cuda::MelParams<T>);               \
  template __global__ void mmfuse::cuda::mel_backward_gather_kernel<T>(mmfuse::cuda::MelParams<T>, T*);
MMFUSE_INSTANTIATE_MEL(float)
MMFUSE_INSTANTIATE_MEL(double)
#undef MMFUSE_INSTANTIATE_MEL
#endif
