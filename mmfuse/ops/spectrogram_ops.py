"""The audio front ends' op level: tensors and numbers only (``mmfuse.ops.spectrogram`` builds the
window and filterbank from the public arguments and calls these; the ``nn.audio`` layers call
them with their buffers). Each validates its tensors, chooses a backend and runs it through the
dispatch tables of ``mmfuse.ops.spectrogram_kernels``."""
from __future__ import annotations

import math
import torch

from mmfuse._checks import check_lengths, check_tensor, is_tracing
from mmfuse.audio.configs import (
    KALDI_EPSILON,
    WAVE_DTYPES,
    WHISPER_HOP,
    WHISPER_N_FFT,
    KaldiFbankConfig,
)
from mmfuse.backends import choose_backend

from mmfuse.ops.spectrogram_kernels import (
    _IMPLEMENTED,
    _KALDI_FBANK,
    _MEL_SPECTROGRAM,
    _MFCC,
    _SPECTROGRAM,
    _WHISPER_LOG_MEL,
    _kernel_limits,
)


def mel_spectrogram_op(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    *,
    n_fft: int,
    hop_length: int,
    pad: int,
    power: float,
    normalized: bool | str,
    center: bool,
    pad_mode: str,
    lengths: torch.Tensor | None,
    backend: str,
):
    """``mel_spectrogram`` from a ``(win_length,)`` window and an ``(n_fft // 2 + 1, n_mels)``
    filterbank. Pads the window to ``n_fft`` as ``torch.stft`` does and folds ``normalized``
    into it (the STFT is linear in the window), then runs the chosen backend."""
    op = "mel_spectrogram"
    _check_waveform(op, "waveform", waveform, lengths)
    check_tensor(op, "window", window, ndim=1, dtypes=(waveform.dtype,), device=waveform.device)
    check_tensor(op, "mel_fb", mel_fb, ndim=2, dtypes=(waveform.dtype,), device=waveform.device,
                 shape=(n_fft // 2 + 1, None))
    _check_stft_length(op, "waveform", waveform, lengths, n_fft=n_fft, pad=pad, center=center, pad_mode=pad_mode)
    analysis_window = _analysis_window(op, window, n_fft, normalized)
    flat = waveform.reshape(-1, waveform.shape[-1])
    chosen = choose_backend(op, backend, waveform.device, _IMPLEMENTED, _kernel_limits(waveform, window, mel_fb))
    out = _MEL_SPECTROGRAM[chosen](
        flat, analysis_window, mel_fb, hop_length=hop_length, pad=pad, power=power,
        center=center, pad_mode=pad_mode, lengths=lengths,
    )
    if lengths is not None:
        return out
    return out.reshape(waveform.shape[:-1] + out.shape[-2:])


def spectrogram_op(
    waveform: torch.Tensor,
    window: torch.Tensor,
    *,
    n_fft: int,
    hop_length: int,
    pad: int,
    power: float | None,
    normalized: bool | str,
    center: bool,
    pad_mode: str,
    onesided: bool,
    lengths: torch.Tensor | None,
    backend: str,
):
    """``spectrogram`` from a ``(win_length,)`` window: checks, the chosen backend, then the
    two-sided extension (``onesided=False``) and the leading shape."""
    op = "spectrogram"
    _check_waveform(op, "waveform", waveform, lengths)
    check_tensor(op, "window", window, ndim=1, dtypes=(waveform.dtype,), device=waveform.device)
    _check_stft_length(op, "waveform", waveform, lengths, n_fft=n_fft, pad=pad, center=center, pad_mode=pad_mode)
    analysis_window = _analysis_window(op, window, n_fft, normalized)
    flat = waveform.reshape(-1, waveform.shape[-1])
    n_bins = n_fft // 2 + 1
    # the power spectrum is the mel op with an identity filterbank; the complex one takes none
    mel_fb = (torch.eye(n_bins, dtype=waveform.dtype, device=waveform.device) if power is not None
              else waveform.new_zeros(n_bins, 0))
    limits = _kernel_limits(waveform, window, mel_fb, complex_out=power is None)
    chosen = choose_backend(op, backend, waveform.device, _IMPLEMENTED, limits)
    out = _SPECTROGRAM[chosen](
        flat, analysis_window, mel_fb, hop_length=hop_length, pad=pad, power=power, center=center,
        pad_mode=pad_mode, lengths=lengths,
    )
    spec, frame_lengths = out if lengths is not None else (out, None)
    if not onesided:
        # X[n_fft - k] = conj(X[k]) for real input
        mirror = torch.arange(n_fft - n_bins, 0, -1, device=spec.device)  # bins n_bins .. n_fft - 1
        tail = spec.index_select(-2, mirror)
        spec = torch.cat([spec, tail.conj() if spec.is_complex() else tail], dim=-2)
    if lengths is not None:
        return spec, frame_lengths
    return spec.reshape(waveform.shape[:-1] + spec.shape[-2:])


def mfcc_op(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    dct: torch.Tensor,
    *,
    n_fft: int,
    hop_length: int,
    pad: int,
    power: float,
    normalized: bool | str,
    center: bool,
    pad_mode: str,
    log_mels: bool,
    top_db: float | None,
    lengths: torch.Tensor | None,
    backend: str,
):
    """``mfcc`` from a ``(win_length,)`` window, an ``(n_fft // 2 + 1, n_mels)`` filterbank and an
    ``(n_mels, n_mfcc)`` DCT matrix; ``top_db`` applies to the dB log (not ``log_mels``)."""
    op = "mfcc"
    _check_waveform(op, "waveform", waveform, lengths)
    check_tensor(op, "window", window, ndim=1, dtypes=(waveform.dtype,), device=waveform.device)
    check_tensor(op, "mel_fb", mel_fb, ndim=2, dtypes=(waveform.dtype,), device=waveform.device,
                 shape=(n_fft // 2 + 1, None))
    check_tensor(op, "dct", dct, ndim=2, dtypes=(waveform.dtype,), device=waveform.device,
                 shape=(mel_fb.shape[1], None))
    _check_stft_length(op, "waveform", waveform, lengths, n_fft=n_fft, pad=pad, center=center, pad_mode=pad_mode)
    analysis_window = _analysis_window(op, window, n_fft, normalized)
    flat = waveform.reshape(-1, waveform.shape[-1])
    # torchaudio's amplitude_to_DB max: the whole tensor for a (C, T) input (C channels of one
    # clip), per leading index for (..., C, T); per item with lengths
    group = 1 if (waveform.dim() == 1 or lengths is not None) else waveform.shape[-2]
    top_db = None if log_mels else top_db
    chosen = choose_backend(op, backend, waveform.device, _IMPLEMENTED,
                            _kernel_limits(waveform, window, mel_fb, dct=dct, top_db=top_db))
    out = _MFCC[chosen](
        flat, analysis_window, mel_fb, dct, hop_length=hop_length, pad=pad, power=power, center=center,
        pad_mode=pad_mode, log_mels=log_mels, top_db=top_db, top_db_group=group, lengths=lengths,
    )
    if lengths is not None:
        return out
    return out.reshape(waveform.shape[:-1] + out.shape[-2:])


def whisper_log_mel_op(
    audio: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, *, lengths: torch.Tensor | None, backend: str
):
    """``whisper_log_mel`` from a ``(400,)`` window and a ``(201, n_mels)`` filterbank."""
    op = "whisper_log_mel"
    _check_waveform(op, "audio", audio, lengths)
    check_tensor(op, "window", window, dtypes=(audio.dtype,), device=audio.device, shape=(WHISPER_N_FFT,))
    check_tensor(op, "mel_fb", mel_fb, ndim=2, dtypes=(audio.dtype,), device=audio.device,
                 shape=(WHISPER_N_FFT // 2 + 1, None))
    _check_stft_length(op, "audio", audio, lengths, n_fft=WHISPER_N_FFT, pad=0, center=True, pad_mode="reflect")
    flat = audio.reshape(-1, audio.shape[-1])
    chosen = choose_backend(op, backend, audio.device, _IMPLEMENTED, _kernel_limits(audio, window, mel_fb))
    out = _WHISPER_LOG_MEL[chosen](flat, window, mel_fb, hop_length=WHISPER_HOP, lengths=lengths)
    if lengths is not None:
        return out
    return out.reshape(audio.shape[:-1] + out.shape[-2:])


def kaldi_fbank_op(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    config: KaldiFbankConfig,
    *,
    lengths: torch.Tensor | None,
    backend: str,
):
    """``kaldi_fbank`` from a ``(window_size,)`` window and a ``(padded_size // 2 + 1,
    num_mel_bins)`` filterbank (Nyquist row 0, as Kaldi's): shapes, then the chosen backend."""
    op = "kaldi_fbank"
    check_tensor(op, "waveform", waveform, ndim=(1, 2), dtypes=WAVE_DTYPES)
    _check_waveform(op, "waveform", waveform, lengths)
    check_tensor(op, "window", window, dtypes=(waveform.dtype,), device=waveform.device, shape=(config.window_size,))
    check_tensor(op, "mel_fb", mel_fb, ndim=2, dtypes=(waveform.dtype,), device=waveform.device)
    batched = waveform if waveform.dim() == 2 else waveform.unsqueeze(0)
    single = lengths is None and batched.shape[0] == 1
    if not single and config.channel != -1:
        raise ValueError(
            f"{op}: channel must be -1 for a batch; mmfuse treats (B, T) as a batch, so select a channel "
            f"before the call; got channel={config.channel} for shape {tuple(waveform.shape)}"
        )
    num_samples = batched.shape[1]
    if lengths is None and num_samples < config.window_size:
        raise ValueError(
            f"{op}: waveform must have at least {config.window_size} samples (one frame), got {num_samples}"
        )
    if lengths is None and num_samples < config.min_samples:
        out = batched.new_zeros(batched.shape[0], 0, mel_fb.shape[1] + int(config.use_energy))
        return out[0] if single else out
    if lengths is not None:
        # Kaldi skips utterances shorter than min_duration: they get no frames.
        lengths = torch.where(lengths < config.min_samples, torch.zeros_like(lengths), lengths)
    chosen = choose_backend(op, backend, waveform.device, _IMPLEMENTED, _kernel_limits(waveform, window, mel_fb))
    out = _KALDI_FBANK[chosen](
        batched, window, mel_fb,
        window_shift=config.window_shift, snip_edges=config.snip_edges,
        remove_dc_offset=config.remove_dc_offset, preemphasis_coefficient=config.preemphasis_coefficient,
        raw_energy=config.raw_energy, energy_floor=config.energy_floor, epsilon=KALDI_EPSILON,
        use_power=config.use_power, use_log_fbank=config.use_log_fbank, use_energy=config.use_energy,
        htk_compat=config.htk_compat, subtract_mean=config.subtract_mean, lengths=lengths,
    )
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------
# Validation.


def _check_waveform(op: str, name: str, waveform, lengths) -> None:
    """Float32/64 ``(..., time)``; with ``lengths``, ``(B, T)`` and ``lengths`` int ``(B,)`` in
    ``[0, T]``."""
    check_tensor(op, name, waveform, dtypes=WAVE_DTYPES)
    if waveform.dim() == 0:
        raise ValueError(f"{op}: {name} must have a time dimension (..., time), got a 0-d tensor")
    if lengths is not None:
        check_tensor(op, name, waveform, ndim=2)
        check_lengths(op, "lengths", lengths, batch=waveform.shape[0], max_len=waveform.shape[1],
                      device=waveform.device)
    if waveform.numel() == 0:
        raise ValueError(f"{op}: {name} must not be empty, got shape {tuple(waveform.shape)}")


def _check_stft_length(op, name, waveform, lengths, *, n_fft, pad, center, pad_mode) -> None:
    """What ``torch.stft`` needs of a signal of ``length + 2 pad`` samples. Without ``lengths``
    the padded size must give a frame; with ``lengths`` short items get 0 frames (center=False)
    but the edge padding must still be possible for every item."""
    num_samples = waveform.shape[-1]
    if lengths is None and not center and num_samples + 2 * pad < n_fft:
        raise ValueError(
            f"{op}: {name} must have at least n_fft - 2 * pad = {n_fft - 2 * pad} samples when center=False, "
            f"got {num_samples}"
        )
    if not center or pad_mode == "constant":
        return
    if lengths is None:
        shortest, what = num_samples, f"{name} has {num_samples} samples"
    elif is_tracing() or lengths.numel() == 0:
        return
    else:
        shortest = int(lengths.min())
        what = f"lengths has an item of {shortest} samples"
    need = n_fft // 2 + 1 - 2 * pad if pad_mode == "reflect" else 1 - 2 * pad
    if shortest < need:
        arg = name if lengths is None else "lengths"
        raise ValueError(
            f"{op}: {arg}: pad_mode={pad_mode!r} with center=True needs at least {need} samples per item "
            f"(n_fft // 2 + 1 - 2 * pad for reflect), but {what}"
        )


def _analysis_window(op: str, window: torch.Tensor, n_fft: int, normalized: bool | str) -> torch.Tensor:
    """``(n_fft,)``: ``window`` centred in ``n_fft`` zeros as ``torch.stft`` places it, scaled by
    torchaudio's ``normalized`` factor."""
    win_length = window.shape[0]
    if win_length > n_fft:
        raise ValueError(f"{op}: window must have at most n_fft ({n_fft}) samples, got {win_length}")
    left = (n_fft - win_length) // 2
    window = torch.nn.functional.pad(window, (left, n_fft - win_length - left))
    if normalized is True or normalized == "window":
        return window / window.pow(2).sum().sqrt()
    if normalized == "frame_length":
        return window / math.sqrt(n_fft)
    return window
