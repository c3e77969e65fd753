"""The audio front ends' kernel dispatch: what each kernel backend can take (``_kernel_limits``),
the adapters from the op level's arguments to the single ``mmfuse::mel_spectrogram`` op's, and
per front end the table from backend name to callable."""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from mmfuse.contract.spectrogram import (
    ENERGY_NONE,
    ENERGY_RAW,
    ENERGY_WINDOWED,
    LOG_DB,
    LOG_NATURAL,
    LOG_OFFSET,
    MFCC_LOG_OFFSET,
    DB_AMIN,
    LOG_NONE,
    LOG_WHISPER,
    PAD_MODE_CODES,
    TRITON_MAX_N_MELS,
)
from mmfuse.reference import spectrogram as ref


_IMPLEMENTED = {"cuda", "cpu", "triton", "reference"}


def _kernel_limits(waveform: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, *,
                   dct: torch.Tensor | None = None, top_db: float | None = None, complex_out: bool = False):
    """Why a kernel backend cannot take this case. The kernels differentiate w.r.t. the waveform
    only (a window, filterbank or DCT matrix that needs a gradient goes to the reference); the
    Triton kernel (forward and backward: mmfuse/triton/mel_backward.py) computes in float32; the CUDA kernel takes
    at most 65535 items (its grid's second dimension), needs one frame's DFT tables in shared memory and
    has neither the MFCC steps (dB/offset log, top_db clamp, DCT) nor the complex spectrum."""

    def unsupported(backend: str) -> str | None:
        if backend == "reference":
            return None
        if window.requires_grad or mel_fb.requires_grad or (dct is not None and dct.requires_grad):
            return ("gradients w.r.t. the window or the filterbank (or the DCT matrix) are computed by the 'reference' "
                    "backend only")
        if backend == "cuda":
            if dct is not None or top_db is not None:
                return "the CUDA kernel does not implement MFCC (the dB/offset log, top_db clamp and DCT) yet"
            if complex_out:
                return "the CUDA kernel does not implement the complex spectrum (power=None) yet"
        if backend == "triton":
            if waveform.dtype != torch.float32:
                return f"the Triton kernel computes in float32, got {waveform.dtype}"
            if mel_fb.shape[1] > TRITON_MAX_N_MELS:
                return f"the Triton kernel takes at most {TRITON_MAX_N_MELS} mel bins, got {mel_fb.shape[1]}"
            if dct is not None and dct.shape[1] > TRITON_MAX_N_MELS:
                return f"the Triton kernel takes at most {TRITON_MAX_N_MELS} coefficients, got {dct.shape[1]}"
        if backend == "cuda":
            batch = waveform.reshape(-1, waveform.shape[-1]).shape[0] if waveform.dim() > 0 else 1
            if batch > 65535:
                return f"the CUDA kernel takes at most 65535 items per call, got {batch}"
            if waveform.is_cuda:
                n_fft = 2 * mel_fb.shape[0] - 1  # at least n_fft: mel_fb has n_fft // 2 + 1 rows
                need = _cuda_tile_bytes(n_fft, n_fft, mel_fb.shape[1], waveform.element_size())
                have = torch.cuda.get_device_properties(waveform.device).shared_memory_per_block_optin
                if need > have:
                    return (f"{mel_fb.shape[0]} frequency bins need {need} bytes of shared memory per frame in "
                            f"{waveform.dtype}, this GPU has {have} per block")
        return None

    return unsupported


def _cuda_tile_bytes(n_fft: int, win: int, n_mels: int, element_size: int) -> int:
    """Shared memory of one frame's tile in the CUDA kernel (``tile_shared_bytes`` in
    csrc/cuda/mel_spectrogram_kernel.cuh): twiddles, the frame, its spectrum, dL/dmel, per-frame
    statistics (4 x 8) and a 128-value reduction scratch."""
    return (2 * n_fft + win + 2 * (n_fft // 2 + 1) + n_mels + 4 * 8 + 128) * element_size


# ---------------------------------------------------------------------------------------------
# Each front end's contract on the one fused op ``mmfuse::mel_spectrogram`` (its arguments and
# codes: ``mmfuse.contract.spectrogram``), for the C++ and CUDA kernels and their Triton twin.


def _compiled_op():
    """The C++ op: the dispatcher runs its CPU kernel on CPU tensors, its CUDA kernel on CUDA ones."""
    return torch.ops.mmfuse.mel_spectrogram.default


def _triton_op():
    # the backward module imports the forward and registers the op's autograd
    from mmfuse.triton import mel_backward, mel_spectrogram  # noqa: F401

    return mel_spectrogram.mel_spectrogram_triton


def _frame_lengths(lengths: torch.Tensor | None, count: Callable) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if lengths is None:
        return None, None
    lengths = lengths.to(torch.int64).contiguous()
    return lengths, count(lengths).to(torch.int64).contiguous()


def _whisper_log_mel_kernel(op, audio, window, mel_fb, *, hop_length, lengths):
    """``ref.whisper_log_mel``'s contract on the fused op: Whisper drops the last STFT frame,
    leaving ``T // hop`` frames."""
    n_fft = window.shape[0]
    lengths, frame_lengths = _frame_lengths(lengths, lambda n: torch.div(n, hop_length, rounding_mode="floor"))
    out = op()(
        audio.contiguous(), window.contiguous(), mel_fb.contiguous(), lengths, frame_lengths,
        audio.shape[-1] // hop_length, n_fft, hop_length, -(n_fft // 2), 0, PAD_MODE_CODES["reflect"],
        False, 0.0, 2.0, LOG_WHISPER, 1e-10, ENERGY_NONE, 0.0, False, False,
    )
    return out if lengths is None else (out, frame_lengths)


def _kaldi_fbank_kernel(
    op, waveform, window, mel_fb, *, window_shift, snip_edges, remove_dc_offset, preemphasis_coefficient,
    raw_energy, energy_floor, epsilon, use_power, use_log_fbank, use_energy, htk_compat, subtract_mean, lengths,
):
    """``ref.kaldi_fbank``'s contract on the fused op; ``subtract_mean`` (a per-item mean over
    the valid frames) runs after it in PyTorch."""
    window_size = window.shape[0]
    padded_size = 2 * (mel_fb.shape[0] - 1)

    def count(n):
        return ref.kaldi_num_frames(n, window_size, window_shift, snip_edges)

    lengths, frame_lengths = _frame_lengths(lengths, count)
    energy_mode = ENERGY_NONE if not use_energy else ENERGY_RAW if raw_energy else ENERGY_WINDOWED
    feats = op()(
        waveform.contiguous(), window.contiguous(), mel_fb.contiguous(), lengths, frame_lengths,
        count(waveform.shape[-1]), padded_size, window_shift,
        0 if snip_edges else window_shift // 2 - window_size // 2, 0,
        PAD_MODE_CODES["constant" if snip_edges else "kaldi"], remove_dc_offset, preemphasis_coefficient,
        2.0 if use_power else 1.0, LOG_NATURAL if use_log_fbank else LOG_NONE, epsilon, energy_mode,
        energy_floor, htk_compat, True,
    )
    if subtract_mean:
        if frame_lengths is None:
            feats = feats - feats.mean(dim=-2, keepdim=True)
        else:
            # invalid frames hold 0: sum over all frames, divide by the valid count
            valid = torch.arange(feats.shape[-2], device=feats.device) < frame_lengths.unsqueeze(-1)
            mean = feats.sum(dim=-2, keepdim=True) / frame_lengths.clamp(min=1).to(feats.dtype)[:, None, None]
            feats = torch.where(valid.unsqueeze(-1), feats - mean, torch.zeros_like(feats))
    return feats if lengths is None else (feats, frame_lengths)


def _fused_front_end(op, waveform, window, mel_fb, *, hop_length, pad, power, center, pad_mode, lengths,
                     log_mode=LOG_NONE, log_floor=0.0, dct=None, top_db=None, top_db_group=1, complex_out=False):
    """The fused mel op on ``(B, T)`` with framing from ``window`` (``n_fft`` long), no DC
    removal, pre-emphasis or energy; returns ``(out, frame_lengths)`` (None without lengths)."""
    n_fft = window.shape[0]

    def count(n):
        return ref.stft_num_frames(n, n_fft, hop_length, pad=pad, center=center)

    lengths, frame_lengths = _frame_lengths(lengths, count)
    out = op()(
        waveform.contiguous(), window.contiguous(), mel_fb.contiguous(), lengths, frame_lengths,
        count(waveform.shape[-1]), n_fft, hop_length, -(n_fft // 2) if center else 0, pad,
        PAD_MODE_CODES[pad_mode], False, 0.0, float(power), log_mode, log_floor, ENERGY_NONE, 0.0, False, False,
        None if dct is None else dct.contiguous(), -1.0 if top_db is None else float(top_db), top_db_group,
        complex_out,
    )
    return out, frame_lengths


def _spectrogram_kernel(op, waveform, window, mel_fb, *, power, lengths, **kw):
    """``ref.mel_spectrogram``'s and ``ref.spectrogram``'s contract on the fused op: ``mel_fb``
    (an identity for the plain spectrogram's ``|X|^power``), or ``complex_out`` (real/imag pairs
    viewed as complex) for ``power=None``."""
    out, frame_lengths = _fused_front_end(op, waveform, window, mel_fb, power=2.0 if power is None else power,
                                          lengths=lengths, complex_out=power is None, **kw)
    if power is None:
        out = torch.view_as_complex(out)
    return out if lengths is None else (out, frame_lengths)


def _mfcc_kernel(op, waveform, window, mel_fb, dct, *, log_mels, lengths, **kw):
    """``ref.mfcc``'s contract on the fused op: LOG_OFFSET or LOG_DB (+ top_db), then ``dct``."""
    out, frame_lengths = _fused_front_end(
        op, waveform, window, mel_fb, lengths=lengths, log_mode=LOG_OFFSET if log_mels else LOG_DB,
        log_floor=MFCC_LOG_OFFSET if log_mels else DB_AMIN, dct=dct, **kw,
    )
    return out if lengths is None else (out, frame_lengths)


def _spectrogram_cpu(waveform, window, mel_fb, *, power, lengths, **kw):
    """The C++ backend of ``spectrogram``. The complex spectrum of a batch without ``lengths``
    is one STFT with nothing to fuse after it, and there ATen's FFT (MKL / pocketfft, through
    ``torch.stft``) beats the kernel's own real DFT (8 x 30 s: 12.3 ms kernel, 9.4 ms
    ``torch.stft``, ``make bench``), so that case runs ``torch.stft``; the power spectrum (fused
    ``|X|^p``) and anything with ``lengths`` (each item framed and padded as if alone, in one
    pass) run the kernel."""
    if power is None and lengths is None:
        return ref.spectrogram(waveform, window, power=None, lengths=None, **kw)
    return _spectrogram_kernel(_compiled_op, waveform, window, mel_fb, power=power, lengths=lengths, **kw)


_SPECTROGRAM = {
    "reference": lambda waveform, window, mel_fb, **kw: ref.spectrogram(waveform, window, **kw),
    "cpu": _spectrogram_cpu,
    "cuda": functools.partial(_spectrogram_kernel, _compiled_op),
    "triton": functools.partial(_spectrogram_kernel, _triton_op),
}
_MFCC = {
    "reference": ref.mfcc,
    "cpu": functools.partial(_mfcc_kernel, _compiled_op),
    "cuda": functools.partial(_mfcc_kernel, _compiled_op),
    "triton": functools.partial(_mfcc_kernel, _triton_op),
}
_MEL_SPECTROGRAM = {
    "reference": ref.mel_spectrogram,
    "cpu": functools.partial(_spectrogram_kernel, _compiled_op),
    "cuda": functools.partial(_spectrogram_kernel, _compiled_op),
    "triton": functools.partial(_spectrogram_kernel, _triton_op),
}
_WHISPER_LOG_MEL = {
    "reference": ref.whisper_log_mel,
    "cpu": functools.partial(_whisper_log_mel_kernel, _compiled_op),
    "cuda": functools.partial(_whisper_log_mel_kernel, _compiled_op),
    "triton": functools.partial(_whisper_log_mel_kernel, _triton_op),
}
_KALDI_FBANK = {
    "reference": ref.kaldi_fbank,
    "cpu": functools.partial(_kaldi_fbank_kernel, _compiled_op),
    "cuda": functools.partial(_kaldi_fbank_kernel, _compiled_op),
    "triton": functools.partial(_kaldi_fbank_kernel, _triton_op),
}
