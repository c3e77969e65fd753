// CUDA launchers for mmfuse::mel_spectrogram and mmfuse::mel_spectrogram_backward; the kernels
// and their launch sequences are mel_spectrogram_kernel.cuh. Same contract as the CPU kernels in
// csrc/cpu/mel_spectrogram.cpp (float32 and float64, frames past frame_lengths 0, the gradient
// w.r.t. the waveform only).
//
// lengths and frame_lengths live on the GPU, and one out of range would make the kernels read
// out of bounds, so they are checked on the device and read back as one small summary: one host
// sync per call when they are given (none without them).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/mel_spectrogram_kernel.cuh"

namespace mmfuse {
namespace {

using cuda::MelParams;
using cuda::MelWorkspace;
using cuda::MelWorkspaceSizes;

constexpr const char* kOp = "mel_spectrogram";

void check_on_device(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), kOp, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
}

void check_arguments(const at::Tensor& waveform, const at::Tensor& window, const at::Tensor& mel_fb,
                     const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& frame_lengths,
                     int64_t num_frames, int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad,
                     int64_t pad_mode, double power, int64_t log_mode, int64_t energy_mode) {
  TORCH_CHECK(waveform.is_cuda() && waveform.dim() == 2 && waveform.is_contiguous(), kOp,
              ": waveform must be a contiguous CUDA (B, T) tensor, got ", waveform.sizes(), " on ", waveform.device());
  TORCH_CHECK(waveform.scalar_type() == at::kFloat || waveform.scalar_type() == at::kDouble, kOp,
              ": waveform must be float32 or float64, got ", waveform.scalar_type());
  check_on_device(window, waveform, "window");
  check_on_device(mel_fb, waveform, "mel_fb");
  TORCH_CHECK(window.dim() == 1 && window.is_contiguous() && window.scalar_type() == waveform.scalar_type(), kOp,
              ": window must be contiguous 1-D in the waveform's dtype, got ", window.sizes());
  TORCH_CHECK(n_fft >= 1 && window.size(0) >= 1 && window.size(0) <= n_fft, kOp,
              ": window length must lie in [1, n_fft=", n_fft, "], got ", window.size(0));
  TORCH_CHECK(n_fft <= std::numeric_limits<int>::max() / 2, kOp, ": n_fft too large: ", n_fft);
  TORCH_CHECK(mel_fb.dim() == 2 && mel_fb.size(0) == n_fft / 2 + 1 && mel_fb.is_contiguous() &&
                  mel_fb.scalar_type() == waveform.scalar_type(),
              kOp, ": mel_fb must be contiguous (n_fft // 2 + 1 = ", n_fft / 2 + 1, ", n_mels) in the waveform's dtype, got ",
              mel_fb.sizes());
  TORCH_CHECK(mel_fb.size(1) <= std::numeric_limits<int>::max() / 2, kOp, ": too many mel filters: ", mel_fb.size(1));
  TORCH_CHECK(hop >= 1 && pad >= 0 && num_frames >= 0, kOp, ": hop must be >= 1, pad and num_frames >= 0");
  TORCH_CHECK(num_frames <= std::numeric_limits<int>::max(), kOp, ": too many frames: ", num_frames);
  TORCH_CHECK(pad_mode >= 0 && pad_mode <= 3, kOp, ": pad_mode code must be 0..3, got ", pad_mode);
  TORCH_CHECK(log_mode >= 0 && log_mode <= 2, kOp, ": the CUDA kernel implements log_mode 0..2 (none, natural, "
              "Whisper), not the dB (3) or offset (4) logs of MFCC; use backend='cpu', 'triton' or 'reference'; got ",
              log_mode);
  TORCH_CHECK(energy_mode >= 0 && energy_mode <= 2, kOp, ": energy_mode code must be 0..2, got ", energy_mode);
  TORCH_CHECK(power > 0.0 && std::isfinite(power), kOp, ": power must be a finite number > 0, got ", power);
  constexpr int64_t kIndexLimit = int64_t(1) << 60;
  TORCH_CHECK(pad < kIndexLimit && frame_offset > -kIndexLimit && frame_offset < kIndexLimit, kOp,
              ": pad and frame_offset must stay below 2**60, got ", pad, ", ", frame_offset);
  // work is sized by the signal, as on the CPU: a frame past the padded signal's end holds no sample
  const int64_t frame_bound = (waveform.size(1) + 2 * pad - std::min<int64_t>(frame_offset, 0)) / hop + 2;
  TORCH_CHECK(num_frames <= frame_bound, kOp, ": num_frames must be at most ", frame_bound, " for ", waveform.size(1),
              " samples (hop ", hop, ", pad ", pad, ", frame_offset ", frame_offset, "), got ", num_frames);
  // torch.stft's rule for center padding (the CPU kernel's check_edge_padding)
  const bool edge = frame_offset < 0 && (pad_mode == 1 || pad_mode == 2);
  const int64_t edge_need = pad_mode == 1 ? -frame_offset + 1 : 1;
  TORCH_CHECK(!edge || lengths.has_value() || waveform.size(1) + 2 * pad >= edge_need, kOp, ": waveform: pad_mode ",
              pad_mode == 1 ? "reflect" : "replicate", " with center padding of ", -frame_offset, " needs at least ",
              edge_need - 2 * pad, " samples per item, got ", waveform.size(1));
  TORCH_CHECK(lengths.has_value() == frame_lengths.has_value(), kOp,
              ": lengths and frame_lengths must be given together");
  TORCH_CHECK(waveform.size(0) <= 65535, kOp, ": the CUDA kernel takes at most 65535 items, got ", waveform.size(0));
  if (lengths) {
    for (const auto& [t, name] : {std::pair{&*lengths, "lengths"}, std::pair{&*frame_lengths, "frame_lengths"}}) {
      check_on_device(*t, waveform, name);
      TORCH_CHECK(t->dim() == 1 && t->size(0) == waveform.size(0) && t->scalar_type() == at::kLong &&
                      t->is_contiguous(),
                  kOp, ": ", name, " must be contiguous int64 (B=", waveform.size(0), "), got ", t->sizes(), " ",
                  t->scalar_type());
    }
    // one read-back: {lengths in [0, T], frame_lengths in [0, num_frames], every item long enough for its edges}
    const at::Tensor ok = at::stack({(lengths->ge(0) & lengths->le(waveform.size(1))).all(),
                                     (frame_lengths->ge(0) & frame_lengths->le(num_frames)).all(),
                                     edge ? lengths->ge(edge_need - 2 * pad).all() : at::ones({}, lengths->options())
                                                                                        .to(at::kBool)})
                              .cpu();
    TORCH_CHECK(ok[0].item<bool>(), kOp, ": lengths must lie in [0, ", waveform.size(1), "]");
    TORCH_CHECK(ok[1].item<bool>(), kOp, ": frame_lengths must lie in [0, num_frames=", num_frames, "]");
    TORCH_CHECK(ok[2].item<bool>(), kOp, ": lengths: pad_mode ", pad_mode == 1 ? "reflect" : "replicate",
                " with center padding of ", -frame_offset, " needs at least ", edge_need - 2 * pad,
                " samples per item");
  }
}

// The CPU kernel's MFCC and complex-spectrum modes are not in the CUDA kernel body yet
// (mmfuse.ops.spectrogram routes those cases away from backend="cuda" with this reason).
void refuse_unimplemented(const std::optional<at::Tensor>& dct, double top_db, bool complex_out) {
  TORCH_CHECK(!dct.has_value(), kOp, ": the CUDA kernel does not implement the MFCC DCT (dct); use backend='cpu', "
              "'triton' or 'reference'");
  TORCH_CHECK(top_db < 0.0, kOp, ": the CUDA kernel does not implement the top_db clamp; use backend='cpu', 'triton' "
              "or 'reference'");
  TORCH_CHECK(!complex_out, kOp, ": the CUDA kernel does not implement the complex spectrum (complex_out); use "
              "backend='cpu', 'triton' or 'reference'");
}

size_t max_shared_bytes(const at::Tensor& like) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, like.get_device()));
  return static_cast<size_t>(bytes);
}

// One kernel on the current stream, with the dynamic shared memory opt-in it needs past 48 KiB.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, Args... args) const {
    if (shared > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
    }
    kernel<<<grid, block, shared, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Workspace tensors (uninitialised: the kernels write what they read) for one call.
template <typename T>
MelWorkspace<T> allocate(const MelWorkspaceSizes& n, const at::Tensor& like, std::vector<at::Tensor>* keep) {
  auto make = [&](int64_t count, at::ScalarType dtype) {
    keep->push_back(at::empty({std::max<int64_t>(count, 1)}, like.options().dtype(dtype)));
    return keep->back().data_ptr();
  };
  const at::ScalarType t = like.scalar_type();
  MelWorkspace<T> ws{};
  ws.mel_range = static_cast<int32_t*>(make(n.mel_range, at::kInt));
  ws.tile_max = static_cast<T*>(make(n.tile_max, t));
  ws.partial_sum = static_cast<T*>(make(n.partials, t));
  ws.partial_ties = static_cast<int32_t*>(make(n.partials, at::kInt));
  ws.logs = static_cast<T*>(make(n.logs, t));
  ws.dlog = static_cast<T*>(make(n.logs, t));
  ws.frame_grad = static_cast<T*>(make(n.frame_grad, t));
  return ws;
}

#define MMFUSE_MEL_ARGS_DECL                                                                                   \
  const at::Tensor &waveform, const at::Tensor &window, const at::Tensor &mel_fb,                              \
      const std::optional<at::Tensor>&lengths, const std::optional<at::Tensor>&frame_lengths, int64_t num_frames, \
      int64_t n_fft, int64_t hop, int64_t frame_offset, int64_t pad, int64_t pad_mode, bool remove_dc,          \
      double preemphasis, double power, int64_t log_mode, double log_floor, int64_t energy_mode,               \
      double energy_floor, bool energy_last, bool frames_major, const std::optional<at::Tensor>&dct, double top_db, \
      int64_t top_db_group, bool complex_out

template <typename T>
MelParams<T> params(MMFUSE_MEL_ARGS_DECL) {
  return cuda::mel_params<T>(waveform.data_ptr<T>(), window.data_ptr<T>(), mel_fb.data_ptr<T>(),
                             lengths ? lengths->data_ptr<int64_t>() : nullptr,
                             frame_lengths ? frame_lengths->data_ptr<int64_t>() : nullptr, waveform.size(0),
                             waveform.size(1), num_frames, n_fft, window.size(0), mel_fb.size(1), hop, frame_offset,
                             pad, pad_mode, remove_dc, preemphasis, power, log_mode, log_floor, energy_mode,
                             energy_floor, energy_last, frames_major);
}

#define MMFUSE_MEL_ARGS                                                                                       \
  waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode,      \
      remove_dc, preemphasis, power, log_mode, log_floor, energy_mode, energy_floor, energy_last, frames_major, dct, \
      top_db, top_db_group, complex_out

template <typename T>
void plan(MelParams<T>& p, const at::Tensor& waveform, bool backward, MelWorkspaceSizes* sizes) {
  TORCH_CHECK(cuda::mel_plan(p, max_shared_bytes(waveform), backward, sizes), kOp, ": n_fft=", p.n_fft,
              " (window ", p.win, ", ", p.n_mels, " mel filters) needs more shared memory than this GPU has for one ",
              "frame in ", sizeof(T) == 4 ? "float32" : "float64");
}

at::Tensor mel_spectrogram_cuda(MMFUSE_MEL_ARGS_DECL) {
  check_arguments(waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode, power,
                  log_mode, energy_mode);
  refuse_unimplemented(dct, top_db, complex_out);
  const c10::cuda::CUDAGuard guard(waveform.device());
  const int64_t n_feats = mel_fb.size(1) + (energy_mode != 0 ? 1 : 0);
  at::Tensor out = frames_major ? at::empty({waveform.size(0), num_frames, n_feats}, waveform.options())
                                : at::empty({waveform.size(0), n_feats, num_frames}, waveform.options());
  if (out.numel() == 0) return out;
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  AT_DISPATCH_FLOATING_TYPES(waveform.scalar_type(), "mel_spectrogram_cuda", [&] {
    MelParams<scalar_t> p = params<scalar_t>(MMFUSE_MEL_ARGS);
    p.out = out.data_ptr<scalar_t>();
    MelWorkspaceSizes sizes;
    plan(p, waveform, false, &sizes);
    std::vector<at::Tensor> keep;
    cuda::mel_forward(p, allocate<scalar_t>(sizes, waveform, &keep), launch);
  });
  return out;
}

at::Tensor mel_spectrogram_backward_cuda(const at::Tensor& grad, MMFUSE_MEL_ARGS_DECL) {
  check_arguments(waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad, pad_mode, power,
                  log_mode, energy_mode);
  refuse_unimplemented(dct, top_db, complex_out);
  check_on_device(grad, waveform, "grad");
  const int64_t n_feats = mel_fb.size(1) + (energy_mode != 0 ? 1 : 0);
  const std::vector<int64_t> out_shape = frames_major ? std::vector<int64_t>{waveform.size(0), num_frames, n_feats}
                                                      : std::vector<int64_t>{waveform.size(0), n_feats, num_frames};
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape) && grad.scalar_type() == waveform.scalar_type(),
              "mel_spectrogram_backward: grad must match the forward output ", at::IntArrayRef(out_shape), " ",
              waveform.scalar_type(), ", got ", grad.sizes(), " ", grad.scalar_type());
  const c10::cuda::CUDAGuard guard(waveform.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_wave = at::empty_like(waveform);  // the gather kernel writes every sample
  if (grad_wave.numel() == 0) return grad_wave;
  const StreamLaunch launch{c10::cuda::getCurrentCUDAStream()};
  AT_DISPATCH_FLOATING_TYPES(waveform.scalar_type(), "mel_spectrogram_backward_cuda", [&] {
    MelParams<scalar_t> p = params<scalar_t>(MMFUSE_MEL_ARGS);
    p.grad = g.data_ptr<scalar_t>();
    MelWorkspaceSizes sizes;
    plan(p, waveform, true, &sizes);
    std::vector<at::Tensor> keep;
    cuda::mel_backward(p, allocate<scalar_t>(sizes, waveform, &keep), grad_wave.data_ptr<scalar_t>(), launch);
  });
  return grad_wave;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("mel_spectrogram", &mel_spectrogram_cuda);
  m.impl("mel_spectrogram_backward", &mel_spectrogram_backward_cuda);
}

}  // namespace mmfuse
