"""Contract of ``mmfuse::mel_spectrogram`` and its backward: the argument codes, fake kernels
and autograd, shared by the compiled op and its Triton twin.

One op, ``mmfuse::mel_spectrogram``, serves the three front ends: they
differ only in how frames are cut (offset, padding rule), Kaldi's per-frame extras, the
spectrum's power, the log and the output layout, all passed as numbers. Its arguments:

  waveform (B, T); window (win,), win <= n_fft, applied to the frame's first win samples,
      which are then zero-padded to n_fft; mel_fb (n_fft // 2 + 1, n_mels);
  lengths, frame_lengths: int64 (B,) or None: samples and valid frames per item (frames
      past frame_lengths[b] are 0); num_frames: frames of the output;
  frame f of item b reads samples f * hop + frame_offset + [0, win) of the item's signal
      zero-padded by `pad` on both sides, outside which pad_mode applies (PAD_MODE_CODES);
  remove_dc, preemphasis: Kaldi's DC removal and pre-emphasis before the window;
  power: |X| ** power; log_mode: LOG_NONE, LOG_NATURAL ln(max(x, log_floor)) or LOG_WHISPER
      log10(max(x, log_floor)) clamped at the item's max - 8, then (x + 4) / 4;
  energy_mode: ENERGY_NONE, ENERGY_RAW (after DC removal) or ENERGY_WINDOWED, as
      max(ln(max(E, log_floor)), ln(energy_floor)) (energy_floor > 0) in the first column,
      or the last with energy_last;
  frames_major: output (B, frames, feats) (Kaldi) instead of (B, feats, frames);
  dct: None or (n_mels, n_mfcc), applied after the log and the clamp (MFCC): output
      (B, n_mfcc, frames); log_mode LOG_DB is 10 log10(max(x, log_floor)) (torchaudio's
      AmplitudeToDB(stype="power")), LOG_OFFSET ln(x + log_floor) (MFCC's log_mels);
  top_db: >= 0 clamps LOG_DB values from below at the max over each group of top_db_group
      consecutive items minus top_db (torchaudio's amplitude_to_DB on (channel, freq, time));
      < 0: no clamp. Kernels take the max in a first pass over the group's valid frames, then
      clamp (and apply the DCT) in a second;
  complex_out: output the one-sided spectrum X itself as (B, n_bins, frames, 2) real/imag pairs
      (torch.view_as_complex gives torchaudio's power=None spectrogram); takes no log, no
      dct, an (n_bins, 0) mel_fb (unused) and frames_major=False. The power spectrogram
      is the plain op with an identity mel_fb (the C++ kernel skips its zeros).
"""
from __future__ import annotations

import torch

from mmfuse import _extension

PAD_MODE_CODES = {"constant": 0, "reflect": 1, "replicate": 2, "kaldi": 3}
# the most mel bins the Triton kernel takes (one tile of them per program; `make triton-check`
# compiles every tile size up to it)
TRITON_MAX_N_MELS = 512
LOG_NONE, LOG_NATURAL, LOG_WHISPER, LOG_DB, LOG_OFFSET = 0, 1, 2, 3, 4
# torchaudio MFCC's log_mels offset and AmplitudeToDB's amin
MFCC_LOG_OFFSET, DB_AMIN = 1e-6, 1e-10
ENERGY_NONE, ENERGY_RAW, ENERGY_WINDOWED = 0, 1, 2


def fake_mel_spectrogram(waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset,
                         pad, pad_mode, remove_dc, preemphasis, power, log_mode, log_floor, energy_mode,
                         energy_floor, energy_last, frames_major, dct=None, top_db=-1.0, top_db_group=1,
                         complex_out=False):
    if complex_out:
        return waveform.new_empty((waveform.shape[0], mel_fb.shape[0], num_frames, 2))
    n_feats = dct.shape[1] if dct is not None else mel_fb.shape[1] + int(energy_mode != ENERGY_NONE)
    shape = (waveform.shape[0], num_frames, n_feats) if frames_major else (waveform.shape[0], n_feats, num_frames)
    return waveform.new_empty(shape)


def fake_mel_spectrogram_backward(grad, waveform, *args):
    return waveform.new_empty(waveform.shape)


def register_mel_autograd(forward_op, backward_op) -> None:
    """The gradient w.r.t. the waveform is ``backward_op``; window and filterbank get none
    (``mmfuse.ops.spectrogram`` sends cases that need them to the reference)."""

    def setup_context(ctx, inputs, output):
        waveform, window, mel_fb, lengths, frame_lengths = inputs[:5]
        dct = inputs[20] if len(inputs) > 20 else None
        ctx.save_for_backward(waveform, window, mel_fb, lengths, frame_lengths, dct)
        ctx.numbers, ctx.extra = inputs[5:20], inputs[21:]
        ctx.n_inputs = len(inputs)

    def backward(ctx, grad):
        waveform, window, mel_fb, lengths, frame_lengths, dct = ctx.saved_tensors
        grad_waveform = backward_op(grad.contiguous(), waveform, window, mel_fb, lengths, frame_lengths, *ctx.numbers,
                                    dct, *ctx.extra)
        return (grad_waveform,) + (None,) * (ctx.n_inputs - 1)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    torch.library.register_fake("mmfuse::mel_spectrogram", fake_mel_spectrogram)
    torch.library.register_fake("mmfuse::mel_spectrogram_backward", fake_mel_spectrogram_backward)
    register_mel_autograd(torch.ops.mmfuse.mel_spectrogram.default, torch.ops.mmfuse.mel_spectrogram_backward.default)
