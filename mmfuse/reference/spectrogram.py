"""Pure-PyTorch audio front ends at op level: the oracle for the kernels and the last fallback.

Each function takes the waveform, the window and filterbank tensors built by
``mmfuse.ops.spectrogram`` and plain numbers; arguments are already validated there. Works in
float32 and float64 and is differentiable with respect to the waveform.

``lengths`` (int ``(B,)``, samples per item of a zero-padded ``(B, T)`` batch): each item is
computed alone on its first ``lengths[b]`` samples, written into a zero output with the frame
count of the padded size ``T``, and the valid frame counts are returned as int64 ``(B,)``.
Reading the lengths is a host sync; this is the reference, not the fast path.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def mel_spectrogram(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    *,
    hop_length: int,
    pad: int,
    power: float,
    center: bool,
    pad_mode: str,
    lengths: torch.Tensor | None,
):
    """``mel_fb^T |STFT(waveform)|^power``, as torchaudio's ``MelSpectrogram``.

    Args:
        waveform: ``(B, T)``. window: ``(n_fft,)``, the analysis window (already zero-padded
            to ``n_fft`` and scaled for normalisation). mel_fb: ``(n_fft // 2 + 1, n_mels)``.
        hop_length, pad: samples; ``pad`` zeros go on both sides before the STFT.

    Returns:
        ``(B, n_mels, frames)``; with ``lengths``, ``(mel, frame_lengths)``.
    """
    n_fft = window.shape[0]

    def compute(x):
        return _mel_power(x, window, mel_fb, hop_length=hop_length, pad=pad, power=power,
                          center=center, pad_mode=pad_mode)

    if lengths is None:
        return compute(waveform)
    frame_lengths = stft_num_frames(lengths.long(), n_fft, hop_length, pad=pad, center=center)
    n_frames = stft_num_frames(waveform.shape[-1], n_fft, hop_length, pad=pad, center=center)
    out = waveform.new_zeros(waveform.shape[0], mel_fb.shape[1], n_frames)
    return _per_item(compute, waveform, lengths, frame_lengths, out), frame_lengths


def spectrogram(
    waveform: torch.Tensor,
    window: torch.Tensor,
    *,
    hop_length: int,
    pad: int,
    power: float | None,
    center: bool,
    pad_mode: str,
    lengths: torch.Tensor | None,
):
    """torchaudio's ``Spectrogram`` (one-sided): ``|STFT|^power``, or the complex STFT for
    ``power=None``.

    Args:
        waveform: ``(B, T)``. window: ``(n_fft,)``, already zero-padded and scaled.

    Returns:
        ``(B, n_fft // 2 + 1, frames)`` real, or complex for ``power=None``; with ``lengths``,
        ``(spec, frame_lengths)``.
    """
    n_fft = window.shape[0]

    def compute(x):
        if pad > 0:
            x = F.pad(x, (pad, pad))
        spec = torch.stft(x, n_fft, hop_length=hop_length, window=window, center=center, pad_mode=pad_mode,
                          return_complex=True)
        if power is None:
            return spec
        return _magnitude(spec, power)

    if lengths is None:
        return compute(waveform)
    frame_lengths = stft_num_frames(lengths.long(), n_fft, hop_length, pad=pad, center=center)
    n_frames = stft_num_frames(waveform.shape[-1], n_fft, hop_length, pad=pad, center=center)
    dtype = waveform.dtype if power is not None else (torch.complex64 if waveform.dtype == torch.float32
                                                       else torch.complex128)
    out = torch.zeros(waveform.shape[0], n_fft // 2 + 1, n_frames, dtype=dtype, device=waveform.device)
    return _per_item(compute, waveform, lengths, frame_lengths, out), frame_lengths


def mfcc(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    dct: torch.Tensor,
    *,
    hop_length: int,
    pad: int,
    power: float,
    center: bool,
    pad_mode: str,
    log_mels: bool,
    top_db: float | None,
    top_db_group: int,
    lengths: torch.Tensor | None,
):
    """torchaudio's ``MFCC``: the mel spectrogram, then ``ln(mel + 1e-6)`` (``log_mels``) or
    ``10 log10(max(mel, 1e-10))`` clamped at the max over each group of ``top_db_group``
    consecutive items minus ``top_db``, then ``dct`` ``(n_mels, n_mfcc)`` over the mel axis.
    With ``lengths`` each item is computed alone (its own max).

    Returns:
        ``(B, n_mfcc, frames)``; with ``lengths``, ``(mfcc, frame_lengths)``.
    """
    n_fft = window.shape[0]

    def compute(x, group):
        mel = _mel_power(x, window, mel_fb, hop_length=hop_length, pad=pad, power=power,
                         center=center, pad_mode=pad_mode)
        if log_mels:
            logs = torch.log(mel + 1e-6)
        else:
            logs = 10.0 * torch.clamp(mel, min=1e-10).log10()
            if top_db is not None:
                grouped = logs.reshape(-1, group, *logs.shape[-2:])
                top = grouped.amax(dim=(-3, -2, -1), keepdim=True)
                logs = torch.maximum(grouped, top - top_db).reshape(logs.shape)
        return (logs.transpose(-1, -2) @ dct).transpose(-1, -2)

    if lengths is None:
        return compute(waveform, top_db_group)
    frame_lengths = stft_num_frames(lengths.long(), n_fft, hop_length, pad=pad, center=center)
    n_frames = stft_num_frames(waveform.shape[-1], n_fft, hop_length, pad=pad, center=center)
    out = waveform.new_zeros(waveform.shape[0], dct.shape[1], n_frames)
    return _per_item(lambda x: compute(x, 1), waveform, lengths, frame_lengths, out), frame_lengths


def whisper_log_mel(
    audio: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, *, hop_length: int, lengths: torch.Tensor | None
):
    """Whisper's ``log_mel_spectrogram`` (openai/whisper, whisper/audio.py), per item.

    Args:
        audio: ``(B, T)``. window: ``(n_fft,)`` periodic Hann. mel_fb: ``(n_fft // 2 + 1, n_mels)``.

    Returns:
        ``(B, n_mels, T // hop_length)``; with ``lengths``, ``(log_mel, lengths // hop_length)``.
    """

    def compute(x):
        power = _mel_power(x, window, mel_fb, hop_length=hop_length, pad=0, power=2.0,
                           center=True, pad_mode="reflect")
        # Whisper drops the last STFT frame: T // hop frames, one per hop of audio.
        log_spec = torch.clamp(power[..., :-1], min=1e-10).log10()
        item_max = log_spec.amax(dim=(-2, -1), keepdim=True)
        return (torch.maximum(log_spec, item_max - 8.0) + 4.0) / 4.0

    if lengths is None:
        return compute(audio)
    frame_lengths = torch.div(lengths.long(), hop_length, rounding_mode="floor")
    out = audio.new_zeros(audio.shape[0], mel_fb.shape[1], audio.shape[-1] // hop_length)
    return _per_item(compute, audio, lengths, frame_lengths, out), frame_lengths


def kaldi_fbank(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    *,
    window_shift: int,
    snip_edges: bool,
    remove_dc_offset: bool,
    preemphasis_coefficient: float,
    raw_energy: bool,
    energy_floor: float,
    epsilon: float,
    use_power: bool,
    use_log_fbank: bool,
    use_energy: bool,
    htk_compat: bool,
    subtract_mean: bool,
    lengths: torch.Tensor | None,
):
    """Kaldi's fbank features (feat/feature-fbank.cc), as ``torchaudio.compliance.kaldi.fbank``.

    Args:
        waveform: ``(B, T)``, int16 scale. window: ``(window_size,)``.
        mel_fb: ``(padded_size // 2 + 1, num_mel_bins)``; ``padded_size`` (the FFT size) is
            read from it. window_shift: samples. epsilon: the floor of energies and mel
            energies before the log (Kaldi: FLT_EPSILON).

    Returns:
        ``(B, frames, num_mel_bins + use_energy)``; with ``lengths``, ``(feats, frame_lengths)``.
    """
    window_size = window.shape[0]
    padded_size = 2 * (mel_fb.shape[0] - 1)

    def compute(x):
        frames = _kaldi_frames(x, window_size, window_shift, snip_edges)  # (B, F, window_size)
        if remove_dc_offset:
            frames = frames - frames.mean(dim=-1, keepdim=True)
        if raw_energy:
            log_energy = _log_energy(frames, epsilon, energy_floor)
        if preemphasis_coefficient != 0.0:
            # x[j] -= c * x[j - 1], and x[0] -= c * x[0] (Kaldi's Preemphasize)
            previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
            frames = frames - preemphasis_coefficient * previous
        frames = F.pad(frames * window, (0, padded_size - window_size))
        if not raw_energy:
            log_energy = _log_energy(frames, epsilon, energy_floor)
        spectrum = torch.fft.rfft(frames)
        spectrum = _power(spectrum) if use_power else spectrum.abs()
        feats = spectrum @ mel_fb
        if use_log_fbank:
            feats = torch.clamp(feats, min=epsilon).log()
        if use_energy:
            parts = (feats, log_energy.unsqueeze(-1)) if htk_compat else (log_energy.unsqueeze(-1), feats)
            feats = torch.cat(parts, dim=-1)
        if subtract_mean:
            feats = feats - feats.mean(dim=-2, keepdim=True)
        return feats

    if lengths is None:
        return compute(waveform)
    frame_lengths = kaldi_num_frames(lengths.long(), window_size, window_shift, snip_edges)
    n_frames = kaldi_num_frames(waveform.shape[-1], window_size, window_shift, snip_edges)
    n_feats = mel_fb.shape[1] + int(use_energy)
    out = waveform.new_zeros(waveform.shape[0], n_feats, n_frames)
    # _per_item writes along the last dimension; features are (frames, bins), hence the transposes.
    out = _per_item(lambda x: compute(x).transpose(-1, -2), waveform, lengths, frame_lengths, out)
    return out.transpose(-1, -2), frame_lengths


def amplitude_to_db(x: torch.Tensor, *, multiplier: float, amin: float, db_multiplier: float, top_db: float | None):
    """``torchaudio.functional.amplitude_to_DB``: ``multiplier (log10(max(x, amin)) -
    db_multiplier)``, clamped at ``max - top_db`` with the max over the whole tensor for up to
    3 dimensions and over the last 3 dimensions per leading index for more."""
    x_db = multiplier * (torch.clamp(x, min=amin).log10() - db_multiplier)
    if top_db is None:
        return x_db
    dims = tuple(range(max(x_db.dim() - 3, 0), x_db.dim()))
    return torch.maximum(x_db, x_db.amax(dim=dims, keepdim=True) - top_db)


def stft_num_frames(length, n_fft: int, hop_length: int, *, pad: int, center: bool):
    """``torch.stft``'s frame count for a ``length``-sample signal (int or int tensor) after
    ``pad`` zeros each side: ``1 + (length + 2 pad) // hop`` with ``center`` (even ``n_fft``),
    else ``1 + (length + 2 pad - n_fft) // hop``, at least 0."""
    padded = length + 2 * pad
    if center:
        # torch.stft pads n_fft // 2 on each side: 1 + padded // hop for even n_fft
        padded = padded + 2 * (n_fft // 2)
    return _at_least_zero(1 + (padded - n_fft) // hop_length)


def kaldi_num_frames(length, window_size: int, window_shift: int, snip_edges: bool):
    """Kaldi's ``NumFrames`` (feature-window.cc) for ``length`` samples (int or int tensor)."""
    if snip_edges:
        return _at_least_zero(1 + (length - window_size) // window_shift)
    return (length + window_shift // 2) // window_shift


def _at_least_zero(n):
    return n.clamp(min=0) if isinstance(n, torch.Tensor) else max(n, 0)


def _mel_power(x, window, mel_fb, *, hop_length, pad, power, center, pad_mode):
    """``(B, T) -> (B, n_mels, frames)``: torchaudio's ``spectrogram`` then ``MelScale``."""
    if pad > 0:
        x = F.pad(x, (pad, pad))
    n_fft = window.shape[0]
    spec = torch.stft(x, n_fft, hop_length=hop_length, window=window, center=center, pad_mode=pad_mode,
                      return_complex=True)  # (B, n_fft // 2 + 1, frames)
    magnitude = _magnitude(spec, power)
    return (magnitude.transpose(-1, -2) @ mel_fb).transpose(-1, -2)


def _magnitude(spec: torch.Tensor, power: float) -> torch.Tensor:
    """``|spec| ** power`` with the kernels' gradient: 0 where the spectrum is 0 (``abs().pow(p)``
    gives inf · 0 = NaN there for p < 1)."""
    if power == 2.0:
        return _power(spec)
    squared = _power(spec)
    nonzero = squared > 0
    # the inner where keeps pow's gradient finite at 0, the outer one sets it to 0 there
    return torch.where(nonzero, torch.where(nonzero, squared, 1.0).pow(power / 2), 0.0)


def _power(spec: torch.Tensor) -> torch.Tensor:
    # re² + im² rather than abs()², whose gradient is undefined where the spectrum is 0
    return spec.real.square() + spec.imag.square()


def _kaldi_frames(x: torch.Tensor, window_size: int, window_shift: int, snip_edges: bool) -> torch.Tensor:
    """``(B, n) -> (B, frames, window_size)``. Without ``snip_edges`` frame ``f`` starts at
    ``f * shift + shift // 2 - window_size // 2`` and samples outside ``[0, n)`` are reflected
    as Kaldi's ``ExtractWindow`` reflects them (``-1 -> 0``, ``n -> n - 1``), repeatedly."""
    n = x.shape[-1]
    n_frames = kaldi_num_frames(n, window_size, window_shift, snip_edges)
    starts = torch.arange(n_frames, device=x.device) * window_shift
    if not snip_edges:
        starts = starts + window_shift // 2 - window_size // 2
    index = starts.unsqueeze(1) + torch.arange(window_size, device=x.device)
    if not snip_edges:
        index = torch.remainder(index, 2 * n)
        index = torch.where(index >= n, 2 * n - 1 - index, index)
    return x[:, index]


def _log_energy(frames: torch.Tensor, epsilon: float, energy_floor: float) -> torch.Tensor:
    log_energy = torch.clamp(frames.square().sum(dim=-1), min=epsilon).log()
    if energy_floor > 0.0:
        log_energy = torch.clamp(log_energy, min=math.log(energy_floor))
    return log_energy


def _per_item(
    compute: Callable[[torch.Tensor], torch.Tensor],
    waveform: torch.Tensor,
    lengths: torch.Tensor,
    frame_lengths: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[b, ..., :frame_lengths[b]] = compute(waveform[b:b+1, :lengths[b]])[0]``; items with
    no frames keep their zeros. ``out`` is a fresh zero tensor, so writing into it keeps the
    graph to the waveform."""
    for b, (n, n_frames) in enumerate(zip(lengths.tolist(), frame_lengths.tolist())):
        if n_frames > 0:
            out[b, ..., :n_frames] = compute(waveform[b : b + 1, :n])[0]
    return out
