// Host-emulator harness for csrc/cuda/mel_spectrogram_kernel.cuh: runs mel_forward /
// mel_backward, the launch sequences the CUDA launcher runs, on CPU buffers, with the op's
// arguments in mmfuse::mel_spectrogram's order. Used by tests/test_mel_spectrogram_emulator.py.
#include "harness.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "cuda/mel_spectrogram_kernel.cuh"

namespace {

using mmfuse::cuda::MelParams;
using mmfuse::cuda::MelWorkspace;
using mmfuse::cuda::MelWorkspaceSizes;

constexpr size_t kMaxShared = 227 * 1024;  // sm_90's opt-in limit, as the emulator enforces

struct Launch {
  template <typename Kernel, typename... Args>
  void operator()(Kernel kernel, dim3 grid, dim3 block, size_t shared, Args... args) const {
    harness::launch(kernel, grid, block, shared, args...);
  }
};

// Workspace buffers filled with 0xFF (NaN, -1), as uninitialised device memory may hold anything.
template <typename T>
struct Buffers {
  std::vector<int32_t> mel_range, partial_ties;
  std::vector<T> tile_max, partial_sum, logs, dlog, frame_grad;

  MelWorkspace<T> allocate(const MelWorkspaceSizes& n) {
    mel_range = poisoned<int32_t>(n.mel_range);
    partial_ties = poisoned<int32_t>(n.partials);
    tile_max = poisoned<T>(n.tile_max);
    partial_sum = poisoned<T>(n.partials);
    logs = poisoned<T>(n.logs);
    dlog = poisoned<T>(n.logs);
    frame_grad = poisoned<T>(n.frame_grad);
    return {mel_range.data(), tile_max.data(), partial_sum.data(), partial_ties.data(), logs.data(), dlog.data(),
            frame_grad.data()};
  }

  template <typename U>
  static std::vector<U> poisoned(int64_t count) {
    std::vector<U> v(static_cast<size_t>(count));
    std::memset(v.data(), 0xFF, v.size() * sizeof(U));
    return v;
  }
};

template <typename T>
MelParams<T> params(const void* waveform, const void* window, const void* mel_fb, const int64_t* lengths,
                    const int64_t* frame_lengths, int64_t batch, int64_t num_samples, int64_t win, int64_t n_mels,
                    int64_t num_frames, int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad,
                    int64_t pad_mode, int64_t remove_dc, double preemphasis, double power, int64_t log_mode,
                    double log_floor, int64_t energy_mode, double energy_floor, int64_t energy_last,
                    int64_t frames_major) {
  return mmfuse::cuda::mel_params<T>(static_cast<const T*>(waveform), static_cast<const T*>(window),
                                     static_cast<const T*>(mel_fb), lengths, frame_lengths, batch, num_samples,
                                     num_frames, n_fft, win, n_mels, hop, frame_offset, pad, pad_mode, remove_dc != 0,
                                     preemphasis, power, log_mode, log_floor, energy_mode, energy_floor,
                                     energy_last != 0, frames_major != 0);
}

}  // namespace

// Shapes (batch, num_samples, win, n_mels), then the op's numbers in schema order. `out`
// (forward) and `grad_wave` (backward) are written; `grad` has the forward output's layout.
#define MEL_ARGS_DECL                                                                                              \
  const void *waveform, const void *window, const void *mel_fb, const int64_t *lengths,                           \
      const int64_t *frame_lengths, int64_t batch, int64_t num_samples, int64_t win, int64_t n_mels,                \
      int64_t num_frames, int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad, int64_t pad_mode,          \
      int64_t remove_dc, double preemphasis, double power, int64_t log_mode, double log_floor, int64_t energy_mode, \
      double energy_floor, int64_t energy_last, int64_t frames_major
#define MEL_ARGS                                                                                                  \
  waveform, window, mel_fb, lengths, frame_lengths, batch, num_samples, win, n_mels, num_frames, n_fft, hop,      \
      frame_offset, pad, pad_mode, remove_dc, preemphasis, power, log_mode, log_floor, energy_mode, energy_floor, \
      energy_last, frames_major

#define MEL_ENTRIES(suffix, T)                                                                                    \
  extern "C" int mel_forward_##suffix(void* out, MEL_ARGS_DECL) {                                                 \
    return harness::run([&] {                                                                                     \
      MelParams<T> p = params<T>(MEL_ARGS);                                                                       \
      p.out = static_cast<T*>(out);                                                                               \
      MelWorkspaceSizes sizes;                                                                                    \
      if (!mmfuse::cuda::mel_plan(p, kMaxShared, false, &sizes)) throw std::runtime_error("n_fft too large");           \
      Buffers<T> buffers;                                                                                         \
      mmfuse::cuda::mel_forward(p, buffers.allocate(sizes), Launch{});                                            \
    });                                                                                                           \
  }                                                                                                               \
  extern "C" int mel_backward_##suffix(void* grad_wave, const void* grad, MEL_ARGS_DECL) {                        \
    return harness::run([&] {                                                                                     \
      MelParams<T> p = params<T>(MEL_ARGS);                                                                       \
      p.grad = static_cast<const T*>(grad);                                                                       \
      MelWorkspaceSizes sizes;                                                                                    \
      if (!mmfuse::cuda::mel_plan(p, kMaxShared, true, &sizes)) throw std::runtime_error("n_fft too large");            \
      Buffers<T> buffers;                                                                                         \
      mmfuse::cuda::mel_backward(p, buffers.allocate(sizes), static_cast<T*>(grad_wave), Launch{});             \
    });                                                                                                           \
  }
MEL_ENTRIES(float32, float)
MEL_ENTRIES(float64, double)
#undef MEL_ENTRIES
