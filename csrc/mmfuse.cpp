// mmfuse._C: build information for Python, and every op schema of the mmfuse library.
// Kernels register themselves per dispatch key in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu.
#include <torch/extension.h>

#ifndef MMFUSE_CUDA_ARCHS
#define MMFUSE_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef MMFUSE_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = MMFUSE_CUDA_ARCHS;
  info["torch_built_against"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmfuse compiled kernels (ops are registered under torch.ops.mmfuse)";
  m.def("build_info", &build_info, "whether CUDA kernels were built, for which archs, against which torch");
}

TORCH_LIBRARY(mmfuse, m) {
  // Per sample, the valid tokens of modality 0, 1, ... concatenated (+ type_embedding[m]);
  // lengths (M, B) int32, cu_seqlens (B+1) int32; out_len = total (packed) or padded length.
  // Returns tokens (total, D) | (B, out_len, D) and modality_ids int64 (-1 on padding).
  m.def("pack_modalities(Tensor[] features, Tensor lengths, Tensor cu_seqlens, Tensor? type_embedding, bool padded, SymInt? out_len) -> (Tensor, Tensor)");
  // Inverse of pack_modalities (and its backward): tokens back to (B, sizes[m], D), zero past lengths.
  m.def("unpack_modalities(Tensor tokens, Tensor lengths, Tensor cu_seqlens, SymInt[] sizes) -> Tensor[]");
  // Log-mel front ends (torchaudio/librosa, Whisper, Kaldi) in one pass from (B, T); codes in mmfuse/ops/spectrogram.py.
  m.def("mel_spectrogram(Tensor waveform, Tensor window, Tensor mel_fb, Tensor? lengths, Tensor? frame_lengths, SymInt num_frames, int n_fft, int hop, int frame_offset, int pad, int pad_mode, bool remove_dc, float preemphasis, float power, int log_mode, float log_floor, int energy_mode, float energy_floor, bool energy_last, bool frames_major) -> Tensor");
  // Gradient of mel_spectrogram w.r.t. the waveform: (B, T).
  m.def("mel_spectrogram_backward(Tensor grad, Tensor waveform, Tensor window, Tensor mel_fb, Tensor? lengths, Tensor? frame_lengths, SymInt num_frames, int n_fft, int hop, int frame_offset, int pad, int pad_mode, bool remove_dc, float preemphasis, float power, int log_mode, float log_floor, int energy_mode, float energy_floor, bool energy_last, bool frames_major) -> Tensor");
}
