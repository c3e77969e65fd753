// The mmfuse op library: every op schema of the mmfuse namespace, defined through the LibTorch
// stable ABI (the kernels register themselves per dispatch key in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu). Built as mmfuse/_ops.abi3.so with TORCH_TARGET_VERSION = torch 2.11, it
// holds no Python symbol and no C++ symbol of torch, and loads through torch.ops.load_library in
// every torch from 2.11 on (mmfuse/_extension.py).
#include "stable.h"

STABLE_TORCH_LIBRARY(mmfuse, m) {
  // Per sample, the valid tokens of modality 0, 1, ... concatenated (+ type_embedding[m]);
  // lengths (M, B) int32, cu_seqlens (B+1) int32; out_len = total (packed) or padded length.
  // Returns tokens (total, D) | (B, out_len, D) and modality_ids int64 (-1 on padding).
  m.def("pack_modalities(Tensor[] features, Tensor lengths, Tensor cu_seqlens, Tensor? type_embedding, bool padded, SymInt? out_len) -> (Tensor, Tensor)");
  // Inverse of pack_modalities (and its backward): tokens back to (B, sizes[m], D), zero past lengths.
  m.def("unpack_modalities(Tensor tokens, Tensor lengths, Tensor cu_seqlens, SymInt[] sizes) -> Tensor[]");
  // act(sum_i xs[i] @ weight[:, block i]^T + bias), no concatenated copy; returns (out, preact),
  // preact empty for activation "none" (the backward needs it for every other activation).
  m.def("fused_concat_linear(Tensor[] xs, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)");
  // (grad_xs, grad_weight, grad_bias) of fused_concat_linear; grad_bias empty unless has_bias.
  m.def("fused_concat_linear_bwd(Tensor grad_out, Tensor[] xs, Tensor weight, Tensor preact, str activation, bool has_bias) -> (Tensor[], Tensor, Tensor)");
  // act(sum_m weights[m] p_m | prod_m p_m | sum_m sigmoid(gate_logits[m]) p_m), one pass.
  m.def("combine_modalities(Tensor[] projected, str mode, Tensor? weights, Tensor[] gate_logits, str activation) -> Tensor");
  // (grad_projected, grad_weights (sum mode, else empty), grad_gate_logits (gated mode, else [])); the
  // pre-activation is recomputed from the inputs, which every mode's gradient reads anyway.
  m.def("combine_modalities_bwd(Tensor grad_out, Tensor[] projected, str mode, Tensor? weights, Tensor[] gate_logits, str activation) -> (Tensor[], Tensor, Tensor[])");
  // Attention over padded (B, L, H, D) q/k/v with optional kv_lens (B,) and bool key_padding_mask (B, Lk), True = ignore;
  // attn_mask (Lq, Lk) | (B or 1, Hq or 1, Lq, Lk), bool (True = ignore) or float (added to the scores); dropout_p on the
  // probabilities from philox = int64 (seed, offset); softcap > 0 caps the scaled scores at softcap * tanh(s / softcap)
  // before the mask; sinks (Hq,) float: one logit per query head in every row's softmax denominator (the returned lse
  // includes it). v (B, Lk, Hkv, Dv) may have another head dim than q/k. key_ranges int32 (B, Lq, 2) | (B, Hq, Lq, 2):
  // query i sees only keys [start, end) (intersected with the other masks; key tiles outside every range of a block are
  // skipped). mmfuse/contract/attention.py defines it all.
  // Returns out (B, Lq, Hq, Dv) and lse (B, Hq, Lq) float32 (float64 for float64 inputs); causal is bottom-right aligned.
  m.def("cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? kv_lens, Tensor? key_padding_mask, float scale, bool causal, Tensor? attn_mask=None, float dropout_p=0., Tensor? philox=None, float softcap=0., Tensor? sinks=None, Tensor? key_ranges=None) -> (Tensor out, Tensor lse)");
  // Gradients of cross_attention_fwd w.r.t. q, k, v given grad_out and (optional) grad_lse; dk/dv summed over GQA groups;
  // dmask: with mask_grad (a float attn_mask), the gradient at each final score (B, Hq, Lq, Lk) in lse's dtype, else empty.
  // The sinks' gradient is -sum(exp(sink - lse) * delta), computed by the autograd wrapper.
  m.def("cross_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? kv_lens, Tensor? key_padding_mask, float scale, bool causal, Tensor? attn_mask=None, float dropout_p=0., Tensor? philox=None, float softcap=0., Tensor? sinks=None, Tensor? key_ranges=None, bool mask_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // Attention over packed (total, H, D) sequences delimited by int32 cu_seqlens (B+1,); lse (Hq, total_q); attn_mask
  // (total_q, W) | (Hq or 1, total_q, W), column j = key j of the row's own sequence; dropout draws the padded stream
  // of the batch padded to its longest sequences; key_ranges (total_q, 2) | (Hq, total_q, 2) in the row's own key indices.
  m.def("cross_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool causal, Tensor? attn_mask=None, float dropout_p=0., Tensor? philox=None, float softcap=0., Tensor? sinks=None, Tensor? key_ranges=None) -> (Tensor out, Tensor lse)");
  // Gradients of cross_attention_varlen_fwd w.r.t. q, k, v (and dmask (Hq, total_q, W) with mask_grad).
  m.def("cross_attention_varlen_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, bool causal, Tensor? attn_mask=None, float dropout_p=0., Tensor? philox=None, float softcap=0., Tensor? sinks=None, Tensor? key_ranges=None, bool mask_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  // Log-mel front ends (torchaudio/librosa, Whisper, Kaldi), MFCC (log then dct (n_mels, n_mfcc), dB clamped top_db
  // below the max of each top_db_group items; top_db < 0: none) and the plain or complex (B, n_bins, frames, 2)
  // spectrogram, in one pass from (B, T); codes in mmfuse/contract/spectrogram.py.
  m.def("mel_spectrogram(Tensor waveform, Tensor window, Tensor mel_fb, Tensor? lengths, Tensor? frame_lengths, SymInt num_frames, int n_fft, int hop, int frame_offset, int pad, int pad_mode, bool remove_dc, float preemphasis, float power, int log_mode, float log_floor, int energy_mode, float energy_floor, bool energy_last, bool frames_major, Tensor? dct=None, float top_db=-1., int top_db_group=1, bool complex_out=False) -> Tensor");
  // Gradient of mel_spectrogram w.r.t. the waveform: (B, T).
  m.def("mel_spectrogram_backward(Tensor grad, Tensor waveform, Tensor window, Tensor mel_fb, Tensor? lengths, Tensor? frame_lengths, SymInt num_frames, int n_fft, int hop, int frame_offset, int pad, int pad_mode, bool remove_dc, float preemphasis, float power, int log_mode, float log_floor, int energy_mode, float energy_floor, bool energy_last, bool frames_major, Tensor? dct=None, float top_db=-1., int top_db_group=1, bool complex_out=False) -> Tensor");
}
