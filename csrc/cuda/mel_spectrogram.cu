// CUDA launchers for mmfuse::mel_spectrogram and mmfuse::mel_spectrogram_backward; the kernels
// and their launch sequences are mel_spectrogram_kernel.cuh. Same contract as the CPU kernels in
// csrc/cpu/mel_spectrogram.cpp (float32 and float64, frames past frame_lengths 0, the gradient
// w.r.t. the waveform only).
//
// lengths and frame_lengths live on the GPU, and one out of range would make the kernels read
// out of bounds, so they are checked on the device and read back as one small summary: one host
// sync per call when they are given (none without them).
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/mel_spectrogram_kernel.cuh"
#include "cuda/stable_cuda.h"

namespace mmfuse {
namespace {

using cuda::MelParams;
using cuda::MelWorkspace;
using cuda::MelWorkspaceSizes;

constexpr const char* kOp = "mel_spectrogram";

void check_on_device(const Tensor& t, const Tensor& like, const char* name) {
  const Device device = t.device(), want = like.device();
  MMFUSE_CHECK(t.is_cuda() && device == want, kOp, ": ", name, " must be on ", device_str(want), ", got ",
               device_str(device));
}

void check_arguments(const Tensor& waveform, const Tensor& window, const Tensor& mel_fb,
                     const std::optional<Tensor>& lengths, const std::optional<Tensor>& frame_lengths,
                     int64_t num_frames, int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad,
                     int64_t pad_mode, double power, int64_t log_mode, int64_t energy_mode) {
  MMFUSE_CHECK(waveform.is_cuda() && waveform.dim() == 2 && waveform.is_contiguous(), kOp,
              ": waveform must be a contiguous CUDA (B, T) tensor, got ", shape(waveform), " on ",
               device_str(waveform.device()));
  MMFUSE_CHECK(waveform.scalar_type() == dtype::kFloat || waveform.scalar_type() == dtype::kDouble, kOp,
              ": waveform must be float32 or float64, got ", waveform.scalar_type());
  check_on_device(window, waveform, "window");
  check_on_device(mel_fb, waveform, "mel_fb");
  MMFUSE_CHECK(window.dim() == 1 && window.is_contiguous() && window.scalar_type() == waveform.scalar_type(), kOp,
              ": window must be contiguous 1-D in the waveform's dtype, got ", shape(window));
  MMFUSE_CHECK(n_fft >= 1 && window.size(0) >= 1 && window.size(0) <= n_fft, kOp,
              ": window length must lie in [1, n_fft=", n_fft, "], got ", window.size(0));
  MMFUSE_CHECK(n_fft <= std::numeric_limits<int>::max() / 2, kOp, ": n_fft too large: ", n_fft);
  MMFUSE_CHECK(mel_fb.dim() == 2 && mel_fb.size(0) == n_fft / 2 + 1 && mel_fb.is_contiguous() &&
                  mel_fb.scalar_type() == waveform.scalar_type(),
              kOp, ": mel_fb must be contiguous (n_fft // 2 + 1 = ", n_fft / 2 + 1, ", n_mels) in the waveform's dtype, got ",
              shape(mel_fb));
  MMFUSE_CHECK(mel_fb.size(1) <= std::numeric_limits<int>::max() / 2, kOp, ": too many mel filters: ", mel_fb.size(1));
  MMFUSE_CHECK(hop >= 1 && pad >= 0 && num_frames >= 0, kOp, ": hop must be >= 1, pad and num_frames >= 0");
  MMFUSE_CHECK(num_frames <= std::numeric_limits<int>::max(), kOp, ": too many frames: ", num_frames);
  MMFUSE_CHECK(pad_mode >= 0 && pad_mode <= 3, kOp, ": pad_mode code must be 0..3, got ", pad_mode);
  MMFUSE_CHECK(log_mode >= 0 && log_mode <= 2, kOp, ": the CUDA kernel implements log_mode 0..2 (none, natural, "
              "Whisper), not the dB (3) or offset (4) logs of MFCC; use backend='cpu', 'triton' or 'reference'; got ",
              log_mode);
  MMFUSE_CHECK(energy_mode >= 0 && energy_mode <= 2, kOp, ": energy_mode code must be 0..2, got ", energy_mode);
  MMFUSE_CHECK(power > 0.0 && std::isfinite(power), kOp, ": power must be a finite number > 0, got ", power);
  constexpr int64_t kIndexLimit = int64_t(1) << 60;
  MMFUSE_CHECK(pad < kIndexLimit && frame_offset > -kIndexLimit && frame_offset < kIndexLimit, kOp,
              ": pad and frame_offset must stay below 2**60, got ", pad, ", ", frame_offset);
  // work is sized by the signal, as on the CPU: a frame past the padded signal's end holds no sample
  const int64_t frame_bound = (waveform.size(1) + 2 * pad - std::min<int64_t>(frame_offset, 0)) / hop + 2;
  MMFUSE_CHECK(num_frames <= frame_bound, kOp, ": num_frames must be at most ", frame_bound, " for ", waveform.size(1),
              " samples (hop ", hop, ", pad ", pad, ", frame_offset ", frame_offset, "), got ", num_frames);
  // torch.stft's rule for center padding (the CPU kernel's check_edge_padding)
  const bool edge = frame_offset < 0 && (pad_mode == 1 || pad_mode == 2);
  const int64_t edge_need = pad_mode == 1 ? -frame_offset + 1 : 1;
  MMFUSE_CHECK(!edge || lengths.has_value() || waveform.size(1) + 2 * pad >= edge_need, kOp, ": waveform: pad_mode ",
              pad_mode == 1 ? "reflect" : "replicate", " with center padding of ", -frame_offset, " needs at least ",
              edge_need - 2 * pad, " samples per item, got ", waveform.size(1));
  MMFUSE_CHECK(lengths.has_value() == frame_lengths.has_value(), kOp,
              ": lengths and frame_lengths must be given together");
  MMFUSE_CHECK(waveform.size(0) <= 65535, kOp, ": the CUDA kernel takes at most 65535 items, got ", waveform.size(0));
  if (lengths) {
    for (const auto& [t, name] : {std::pair{&*lengths, "lengths"}, std::pair{&*frame_lengths, "frame_lengths"}}) {
      check_on_device(*t, waveform, name);
      MMFUSE_CHECK(t->dim() == 1 && t->size(0) == waveform.size(0) && t->scalar_type() == dtype::kLong &&
                      t->is_contiguous(),
                  kOp, ": ", name, " must be contiguous int64 (B=", waveform.size(0), "), got ", shape(*t), " ",
                  t->scalar_type());
    }
    // one read-back: {lengths in [0, T], frame_lengths in [0, num_frames], every item long enough for its edges}
    const Tensor ok_all =
        op::to_cpu(op::stack({op::all(op::logical_and(op::ge(*lengths, 0), op::le(*lengths, waveform.size(1)))),
                              op::all(op::logical_and(op::ge(*frame_lengths, 0), op::le(*frame_lengths, num_frames))),
                              edge ? op::all(op::ge(*lengths, edge_need - 2 * pad))
                                   : op::scalar_like(*lengths, 1, dtype::kBool)}));
    const bool* ok = ok_all.const_data_ptr<bool>();
    MMFUSE_CHECK(ok[0], kOp, ": lengths must lie in [0, ", waveform.size(1), "]");
    MMFUSE_CHECK(ok[1], kOp, ": frame_lengths must lie in [0, num_frames=", num_frames, "]");
    MMFUSE_CHECK(ok[2], kOp, ": lengths: pad_mode ", pad_mode == 1 ? "reflect" : "replicate",
                " with center padding of ", -frame_offset, " needs at least ", edge_need - 2 * pad,
                " samples per item");
  }
}

// The CPU kernel's MFCC and complex-spectrum modes are not in the CUDA kernel body yet
// (mmfuse.ops.spectrogram routes those cases away from backend="cuda" with this reason).
void refuse_unimplemented(const std::optional<Tensor>& dct, double top_db, bool complex_out) {
  MMFUSE_CHECK(!dct.has_value(), kOp, ": the CUDA kernel does not implement the MFCC DCT (dct); use backend='cpu', "
              "'triton' or 'reference'");
  MMFUSE_CHECK(top_db < 0.0, kOp, ": the CUDA kernel does not implement the top_db clamp; use backend='cpu', 'triton' "
              "or 'reference'");
  MMFUSE_CHECK(!complex_out, kOp, ": the CUDA kernel does not implement the complex spectrum (complex_out); use "
              "backend='cpu', 'triton' or 'reference'");
}

size_t max_shared_bytes(const Tensor& like) {
  int bytes = 0;
  MMFUSE_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, like.get_device_index()));
  return static_cast<size_t>(bytes);
}

// One kernel on the current stream, with the dynamic shared memory opt-in it needs past 48 KiB.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, Args... args) const {
    if (shared > 48 * 1024) {
      MMFUSE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
    }
    kernel<<<grid, block, shared, stream>>>(args...);
    MMFUSE_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Workspace tensors (uninitialised: the kernels write what they read) for one call.
template <typename T>
MelWorkspace<T> allocate(const MelWorkspaceSizes& n, const Tensor& like, std::vector<Tensor>* keep) {
  auto make = [&](int64_t count, ScalarType dtype) {
    keep->push_back(empty_like_as(like, {std::max<int64_t>(count, 1)}, dtype));
    return keep->back().data_ptr();
  };
  const ScalarType t = like.scalar_type();
  MelWorkspace<T> ws{};
  ws.mel_range = static_cast<int32_t*>(make(n.mel_range, dtype::kInt));
  ws.tile_max = static_cast<T*>(make(n.tile_max, t));
  ws.partial_sum = static_cast<T*>(make(n.partials, t));
  ws.partial_ties = static_cast<int32_t*>(make(n.partials, dtype::kInt));
  ws.logs = static_cast<T*>(make(n.logs, t));
  ws.dlog = static_cast<T*>(make(n.logs, t));
  ws.frame_grad = static_cast<T*>(make(n.frame_grad, t));
  return ws;
}

#define MMFUSE_MEL_ARGS_DECL                                                                                   \
  const Tensor &waveform, const Tensor &window, const Tensor &mel_fb,                              \
      const std::optional<Tensor>&lengths, const std::optional<Tensor>&frame_lengths, int64_t num_frames, \
      int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad, int64_t pad_mode, bool remove_dc,          \
      double preemphasis, double power, int64_t log_mode, double log_floor, int64_t energy_mode,               \
      double energy_floor, bool energy_last, bool frames_major, const std::optional<Tensor>&dct, double top_db, \
      int64_t top_db_group, bool complex_out

template <typename T>
MelParams<T> params(MMFUSE_MEL_ARGS_DECL) {
  return cuda::mel_params<T>(ptr<T>(waveform), ptr<T>(window), ptr<T>(mel_fb),
                             lengths ? ptr<int64_t>(*lengths) : nullptr,
                             frame_lengths ? ptr<int64_t>(*frame_lengths) : nullptr, waveform.size(0),
                             waveform.size(1), num_frames, n_fft, window.size(0), mel_fb.size(1), hop, frame_offset,
                             pad, pad_mode, remove_dc, preemphasis, power, log_mode, log_floor, energy_mode,
                             energy_floor, energy_last, frames_major);
}

#define MMFUSE_MEL_ARGS                                                                                       \
  waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode,      \
      remove_dc, preemphasis, power, log_mode, log_floor, energy_mode, energy_floor, energy_last, frames_major, dct, \
      top_db, top_db_group, complex_out

template <typename T>
void plan(MelParams<T>& p, const Tensor& waveform, bool backward, MelWorkspaceSizes* sizes) {
  MMFUSE_CHECK(cuda::mel_plan(p, max_shared_bytes(waveform), backward, sizes), kOp, ": n_fft=", p.n_fft,
              " (window ", p.win, ", ", p.n_mels, " mel filters) needs more shared memory than this GPU has for one ",
              "frame in ", sizeof(T) == 4 ? "float32" : "float64");
}

Tensor mel_spectrogram_cuda(MMFUSE_MEL_ARGS_DECL) {
  check_arguments(waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode, power,
                  log_mode, energy_mode);
  refuse_unimplemented(dct, top_db, complex_out);
  const DeviceGuard guard(waveform.get_device_index());
  const int64_t n_feats = mel_fb.size(1) + (energy_mode != 0 ? 1 : 0);
  const int64_t batch = waveform.size(0);
  Tensor out = frames_major ? empty_like_as(waveform, {batch, num_frames, n_feats})
                            : empty_like_as(waveform, {batch, n_feats, num_frames});
  if (out.numel() == 0) return out;
  const StreamLaunch launch{current_stream(waveform.get_device_index())};
  MMFUSE_DISPATCH_FLOATING(waveform.scalar_type(), "mel_spectrogram_cuda", [&] {
    MelParams<scalar_t> p = params<scalar_t>(MMFUSE_MEL_ARGS);
    p.out = ptr<scalar_t>(out);
    MelWorkspaceSizes sizes;
    plan(p, waveform, false, &sizes);
    std::vector<Tensor> keep;
    cuda::mel_forward(p, allocate<scalar_t>(sizes, waveform, &keep), launch);
  });
  return out;
}

Tensor mel_spectrogram_backward_cuda(const Tensor& grad, MMFUSE_MEL_ARGS_DECL) {
  check_arguments(waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode, power,
                  log_mode, energy_mode);
  refuse_unimplemented(dct, top_db, complex_out);
  check_on_device(grad, waveform, "grad");
  const int64_t n_feats = mel_fb.size(1) + (energy_mode != 0 ? 1 : 0);
  const std::vector<int64_t> out_shape = frames_major ? std::vector<int64_t>{waveform.size(0), num_frames, n_feats}
                                                      : std::vector<int64_t>{waveform.size(0), n_feats, num_frames};
  MMFUSE_CHECK(grad.sizes().equals(out_shape) && grad.scalar_type() == waveform.scalar_type(),
               "mel_spectrogram_backward: grad must match the forward output ", shape_str(out_shape), " ",
               waveform.scalar_type(), ", got ", shape(grad), " ", grad.scalar_type());
  const DeviceGuard guard(waveform.get_device_index());
  const Tensor g = mmfuse::contiguous(grad);
  Tensor grad_wave = torch::stable::empty_like(waveform);  // the gather kernel writes every sample
  if (grad_wave.numel() == 0) return grad_wave;
  const StreamLaunch launch{current_stream(waveform.get_device_index())};
  MMFUSE_DISPATCH_FLOATING(waveform.scalar_type(), "mel_spectrogram_backward_cuda", [&] {
    MelParams<scalar_t> p = params<scalar_t>(MMFUSE_MEL_ARGS);
    p.grad = ptr<scalar_t>(g);
    MelWorkspaceSizes sizes;
    plan(p, waveform, true, &sizes);
    std::vector<Tensor> keep;
    cuda::mel_backward(p, allocate<scalar_t>(sizes, waveform, &keep), ptr<scalar_t>(grad_wave), launch);
  });
  return grad_wave;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("mel_spectrogram", MMFUSE_BOX(&mel_spectrogram_cuda));
  m.impl("mel_spectrogram_backward", MMFUSE_BOX(&mel_spectrogram_backward_cuda));
}

}  // namespace mmfuse
