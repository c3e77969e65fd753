"""Audio front ends: spectrogram, mel spectrogram, MFCC, dB conversion, Whisper log-mel, Kaldi fbank.

Each public function validates its arguments, builds the analysis window and the filterbank
once in Python (float64, then cast to the waveform's dtype), chooses a backend and calls the
op-level function, which takes only tensors and numbers. The ``nn`` layers in
``mmfuse.nn.audio`` hold the same window and filterbank as buffers and call the same op-level
functions, so a layer and its function compute the same thing.

Compatibility targets:

- ``mel_spectrogram``: ``torchaudio.transforms.MelSpectrogram`` (``functional.spectrogram`` +
  ``functional.melscale_fbanks``), which follows ``librosa.feature.melspectrogram``.
- ``spectrogram``: ``torchaudio.transforms.Spectrogram`` (``functional.spectrogram``),
  ``power=None`` giving the complex STFT.
- ``mfcc``: ``torchaudio.transforms.MFCC``: ``MelSpectrogram``, ``AmplitudeToDB("power",
  top_db=80)`` (or ``ln(mel + 1e-6)`` with ``log_mels``), then ``create_dct``'s DCT-II.
- ``amplitude_to_db``: ``torchaudio.transforms.AmplitudeToDB`` / ``functional.amplitude_to_DB``.
- ``whisper_log_mel``: ``whisper.audio.log_mel_spectrogram`` (openai/whisper).
- ``kaldi_fbank``: ``torchaudio.compliance.kaldi.fbank``, i.e. Kaldi's ``compute-fbank-feats``.

Backends: "cpu" and "cuda" are the fused C++ and CUDA kernels of ``mmfuse::mel_spectrogram``
(float32/float64, with a backward w.r.t. the waveform), "triton" the fused Triton kernel (float32, fwd + bwd; exact fp32
products), "reference" the PyTorch composition in ``mmfuse.reference.spectrogram``. The
kernels take one op for all the front ends (its arguments: ``mmfuse.contract.spectrogram``):
``spectrogram`` is that op with an identity filterbank (``|X|^power``) or its complex output
(``power=None``: C++ and Triton), ``mfcc`` adds the dB/offset log, the 80 dB clamp and the DCT
(C++ and Triton, forward and backward); the CUDA kernel has neither MFCC nor the complex
spectrum yet, and asking it for them raises with that reason.

Variable-length batches: pass a zero-padded ``(B, T)`` waveform and ``lengths`` (samples per
item, integer ``(B,)``). Each item is then computed as if it were alone (edge padding at its
true end), the number of valid frames per item is returned as int64 ``(B,)``, and frames past
an item's end hold 0. The output keeps the frame count of the padded size ``T``.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import torch

from mmfuse._checks import check_choice, check_int, check_lengths, check_positive, check_tensor, is_tracing
from mmfuse.audio.configs import (
    KALDI_EPSILON,
    STYPES,
    WAVE_DTYPES,
    WHISPER_HOP,
    WHISPER_N_FFT,
    KaldiFbankConfig,
    MFCC_TOP_DB,
    check_mfcc_args,
    check_spectrogram_args,
    check_stft_args,
    kaldi_fbank_config,
    whisper_mel_filters,
)
from mmfuse.audio.filterbanks import build_window, create_dct, melscale_fbanks
from mmfuse.backends import choose_backend
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


def mel_spectrogram(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    n_fft: int = 400,
    win_length: int | None = None,
    hop_length: int | None = None,
    f_min: float = 0.0,
    f_max: float | None = None,
    pad: int = 0,
    n_mels: int = 128,
    window_fn: Callable[..., torch.Tensor] = torch.hann_window,
    power: float = 2.0,
    normalized: bool | str = False,
    center: bool = True,
    pad_mode: str = "reflect",
    norm: str | None = None,
    mel_scale: str = "htk",
    *,
    wkwargs: dict | None = None,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Mel spectrogram, as ``torchaudio.transforms.MelSpectrogram`` with the same arguments.

    The STFT is ``torch.stft`` semantics: ``window_fn(win_length, dtype=...)`` zero-padded on
    both sides to ``n_fft``, frames ``hop_length`` apart, ``center`` pads ``n_fft // 2``
    samples on each side with ``pad_mode``; ``pad`` zeros are added on both sides first.
    ``|STFT| ** power`` is multiplied by the mel filterbank of
    ``torchaudio.functional.melscale_fbanks`` (``mel_scale`` "htk" or "slaney", ``norm`` None
    or "slaney", bins ``linspace(0, sample_rate // 2, n_fft // 2 + 1)``).

    Args:
        waveform: float32 or float64 ``(..., time)``; ``(B, T)`` when ``lengths`` is given.
        sample_rate: Hz. ``n_fft``, ``win_length`` (default ``n_fft``), ``hop_length``
            (default ``win_length // 2``), ``pad``: samples.
        f_min, f_max: Hz; ``f_max`` defaults to ``sample_rate // 2``.
        normalized: True or "window" divides the STFT by the window's L2 norm; "frame_length"
            divides it by ``sqrt(n_fft)``.
        pad_mode: "reflect", "constant" or "replicate".
        lengths: optional int ``(B,)``, samples per item of a zero-padded ``(B, T)`` batch.
        backend: "auto", "cuda", "triton", "cpu" or "reference" (see ``mmfuse.backends``).

    Returns:
        ``(..., n_mels, frames)`` in the waveform's dtype, frames ``1 + (T + 2 pad) // hop``
        with ``center`` else ``1 + (T + 2 pad - n_fft) // hop``. With ``lengths``:
        ``(mel (B, n_mels, frames), frame_lengths int64 (B,))``, frames past an item's end 0.
    """
    op = "mel_spectrogram"
    win_length, hop_length, f_max = check_stft_args(
        op, sample_rate, n_fft, win_length, hop_length, f_min, f_max, pad, n_mels, window_fn,
        power, normalized, center, pad_mode, norm, mel_scale,
    )
    check_tensor(op, "waveform", waveform, dtypes=WAVE_DTYPES)
    window = build_window(window_fn, win_length, wkwargs).to(device=waveform.device, dtype=waveform.dtype)
    mel_fb = melscale_fbanks(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm, mel_scale)
    mel_fb = mel_fb.to(device=waveform.device, dtype=waveform.dtype)
    return mel_spectrogram_op(
        waveform, window, mel_fb, n_fft=n_fft, hop_length=hop_length, pad=pad, power=power,
        normalized=normalized, center=center, pad_mode=pad_mode, lengths=lengths, backend=backend,
    )


def spectrogram(
    waveform: torch.Tensor,
    n_fft: int = 400,
    win_length: int | None = None,
    hop_length: int | None = None,
    pad: int = 0,
    window_fn: Callable[..., torch.Tensor] = torch.hann_window,
    power: float | None = 2.0,
    normalized: bool | str = False,
    wkwargs: dict | None = None,
    center: bool = True,
    pad_mode: str = "reflect",
    onesided: bool = True,
    *,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Spectrogram, as ``torchaudio.transforms.Spectrogram`` with the same arguments.

    The STFT of ``mel_spectrogram`` (same framing, window, padding and ``normalized``), then
    ``|X| ** power``, or the complex ``X`` itself for ``power=None``. ``onesided=False``
    appends bins ``n_fft // 2 + 1 .. n_fft - 1`` (conjugates of the one-sided bins, as
    ``torch.stft`` gives them for real input).

    Backends: the power spectrogram is the fused mel op with an identity filterbank (C++,
    CUDA, Triton); the complex spectrum is its ``complex_out`` mode (C++ and Triton; the CUDA
    kernel does not have it), except that on the CPU a complex spectrum without ``lengths`` runs
    ATen's FFT (``torch.stft``), which is faster there than the kernel's DFT. Gradients w.r.t.
    the waveform in both (C++ and Triton backward).

    Args:
        waveform: float32 or float64 ``(..., time)``; ``(B, T)`` when ``lengths`` is given.
        power: > 0, or None for the complex spectrum (complex64 / complex128).
        lengths: optional int ``(B,)``, samples per item of a zero-padded ``(B, T)`` batch.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        ``(..., freq, frames)`` with ``freq = n_fft // 2 + 1`` (``n_fft`` if not onesided). With
        ``lengths``: ``(spec (B, freq, frames), frame_lengths int64 (B,))``, frames past an
        item's end 0.
    """
    op = "spectrogram"
    win_length, hop_length = check_spectrogram_args(
        op, n_fft, win_length, hop_length, pad, window_fn, power, normalized, center, pad_mode, onesided,
    )
    check_tensor(op, "waveform", waveform, dtypes=WAVE_DTYPES)
    window = build_window(window_fn, win_length, wkwargs).to(device=waveform.device, dtype=waveform.dtype)
    return spectrogram_op(
        waveform, window, n_fft=n_fft, hop_length=hop_length, pad=pad, power=power, normalized=normalized,
        center=center, pad_mode=pad_mode, onesided=onesided, lengths=lengths, backend=backend,
    )


def mfcc(
    waveform: torch.Tensor,
    sample_rate: int = 16000,
    n_mfcc: int = 40,
    dct_type: int = 2,
    norm: str | None = "ortho",
    log_mels: bool = False,
    melkwargs: dict | None = None,
    *,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
):
    """MFCC, as ``torchaudio.transforms.MFCC`` with the same arguments.

    ``MelSpectrogram(sample_rate, **melkwargs)`` (torchaudio's defaults: n_fft 400, 128 mels,
    power 2), then ``10 log10(max(mel, 1e-10))`` clamped from below at ``max - 80`` dB
    (``AmplitudeToDB("power", top_db=80)``), or ``ln(mel + 1e-6)`` with ``log_mels``, then the
    DCT-II of ``create_dct(n_mfcc, n_mels, norm)`` over the mel axis. The log, the clamp and
    the DCT run inside the fused kernel (C++ and Triton: forward and backward).

    The 80 dB clamp's max is taken as torchaudio takes it: over the whole ``(n_mels, frames)``
    of a ``(T,)`` input, over all channels of a ``(C, T)`` input (torchaudio reads the leading
    dimension of a 3-D spectrogram as channels of one clip), and per leading index over
    ``(C, n_mels, frames)`` for ``(..., C, T)``. With ``lengths`` each item of the ``(B, T)``
    batch takes its own max over its valid frames (as if computed alone), and frames past its
    end are 0.

    Args:
        waveform: float32 or float64 ``(..., time)``; ``(B, T)`` when ``lengths`` is given.
        n_mfcc: coefficients kept, <= n_mels. dct_type: 2. norm: "ortho" or None.
        melkwargs: ``MelSpectrogram`` arguments (not ``sample_rate``).
        lengths: optional int ``(B,)``, samples per item.

    Returns:
        ``(..., n_mfcc, frames)``; with ``lengths``, ``(mfcc, frame_lengths int64 (B,))``.
    """
    op = "mfcc"
    mel = check_mfcc_args(op, sample_rate, n_mfcc, dct_type, norm, log_mels, melkwargs)
    check_tensor(op, "waveform", waveform, dtypes=WAVE_DTYPES)
    window = build_window(mel["window_fn"], mel["win_length"], mel["wkwargs"]).to(
        device=waveform.device, dtype=waveform.dtype)
    mel_fb = melscale_fbanks(mel["n_fft"] // 2 + 1, mel["f_min"], mel["f_max"], mel["n_mels"], sample_rate,
                             mel["norm"], mel["mel_scale"]).to(device=waveform.device, dtype=waveform.dtype)
    dct = create_dct(n_mfcc, mel["n_mels"], norm).to(device=waveform.device, dtype=waveform.dtype)
    return mfcc_op(
        waveform, window, mel_fb, dct, n_fft=mel["n_fft"], hop_length=mel["hop_length"], pad=mel["pad"],
        power=mel["power"], normalized=mel["normalized"], center=mel["center"], pad_mode=mel["pad_mode"],
        log_mels=log_mels, top_db=MFCC_TOP_DB, lengths=lengths, backend=backend,
    )


def amplitude_to_db(x: torch.Tensor, stype: str = "power", top_db: float | None = None) -> torch.Tensor:
    """Decibels, as ``torchaudio.transforms.AmplitudeToDB(stype, top_db)``.

    ``multiplier * log10(max(x, 1e-10))`` with multiplier 10 for "power" and 20 for
    "magnitude" (reference value 1.0). With ``top_db`` values are clamped from below at
    ``max - top_db``, the max taken as ``torchaudio.functional.amplitude_to_DB`` takes it:
    over the whole tensor for inputs of up to 3 dimensions (a ``(channel, freq, time)``
    spectrogram is one item), and per index of the leading dimensions over the last 3
    dimensions for 4-D and larger inputs.

    Args:
        x: float ``(...)``, a power or magnitude spectrogram. stype: "power" or "magnitude".
        top_db: None or a number >= 0, in dB.

    Returns:
        A tensor of ``x``'s shape and dtype, in dB.
    """
    op = "amplitude_to_db"
    check_tensor(op, "x", x, dtypes=WAVE_DTYPES)
    check_choice(op, "stype", stype, STYPES)
    if top_db is not None:
        check_positive(op, "top_db", top_db, allow_zero=True)
    multiplier = 10.0 if stype == "power" else 20.0
    return ref.amplitude_to_db(x, multiplier=multiplier, amin=1e-10, db_multiplier=0.0, top_db=top_db)


def whisper_log_mel(
    audio: torch.Tensor, n_mels: int = 80, *, lengths: torch.Tensor | None = None, backend: str = "auto"
):
    """OpenAI Whisper's log-mel front end (``whisper.audio.log_mel_spectrogram``).

    16 kHz audio, n_fft 400, hop 160, periodic Hann window, centre reflect padding, the last
    STFT frame dropped, power spectrum times ``librosa.filters.mel(sr=16000, n_fft=400,
    n_mels)`` (Slaney scale, Slaney area normalisation), ``log10(max(x, 1e-10))``, clamped from
    below at the item's max − 8, then ``(x + 4) / 4``.

    One difference from Whisper: Whisper takes the max over the whole input tensor; here it is
    taken per item (per index of the leading dimensions), so a batch gives each clip the result
    it gets alone. Whisper pads clips to 30 s before this step (``pad_or_trim``); do that first
    to reproduce its features exactly.

    Args:
        audio: float32 or float64 ``(..., time)`` at 16 kHz, more than 200 samples;
            ``(B, T)`` when ``lengths`` is given.
        n_mels: 80 (Whisper v1-v3) or 128 (large-v3).
        lengths: optional int ``(B,)``, samples per item of a zero-padded batch.

    Returns:
        ``(..., n_mels, T // 160)`` in the audio's dtype. With ``lengths``:
        ``(log_mel (B, n_mels, T // 160), frame_lengths int64 (B,) = lengths // 160)``;
        frames past an item's end hold 0 (not the item's floor value).
    """
    op = "whisper_log_mel"
    check_int(op, "n_mels", n_mels)
    check_tensor(op, "audio", audio, dtypes=WAVE_DTYPES)
    window = build_window(torch.hann_window, WHISPER_N_FFT).to(device=audio.device, dtype=audio.dtype)
    mel_fb = whisper_mel_filters(n_mels).to(device=audio.device, dtype=audio.dtype)
    return whisper_log_mel_op(audio, window, mel_fb, lengths=lengths, backend=backend)


def kaldi_fbank(
    waveform: torch.Tensor,
    blackman_coeff: float = 0.42,
    channel: int = -1,
    dither: float = 0.0,
    energy_floor: float = 1.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    high_freq: float = 0.0,
    htk_compat: bool = False,
    low_freq: float = 20.0,
    min_duration: float = 0.0,
    num_mel_bins: int = 23,
    preemphasis_coefficient: float = 0.97,
    raw_energy: bool = True,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    sample_frequency: float = 16000.0,
    snip_edges: bool = True,
    subtract_mean: bool = False,
    use_energy: bool = False,
    use_log_fbank: bool = True,
    use_power: bool = True,
    vtln_high: float = -500.0,
    vtln_low: float = 100.0,
    vtln_warp: float = 1.0,
    window_type: str = "povey",
    *,
    lengths: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Kaldi filterbank features, as ``torchaudio.compliance.kaldi.fbank`` (same arguments).

    Kaldi's ``compute-fbank-feats`` (feat/feature-fbank.cc, feature-window.cc,
    mel-computations.cc): frames of ``frame_length`` ms every ``frame_shift`` ms (with
    ``snip_edges=False`` centred and reflected at the ends as Kaldi does), DC removal, raw log
    energy, pre-emphasis, window, zero-padding to a power of two, ``|FFT|^2`` (or ``|FFT|``),
    triangular mel bins on Kaldi's ``1127 ln(1 + f / 700)`` scale between ``low_freq`` and
    ``high_freq`` (<= 0: offset from Nyquist), ``log(max(x, FLT_EPSILON))``.

    Differences from torchaudio: a ``(B, T)`` input with B > 1 is a batch, not channels to pick
    from (``channel`` must then be -1); ``dither`` must be 0 (dither needs randomness) and
    ``vtln_warp`` 1 (no VTLN); an input shorter than ``min_duration`` seconds gives 0 frames,
    shape ``(0, bins)``, where torchaudio returns ``torch.empty(0)``.

    Args:
        waveform: float32 or float64 ``(T,)``, ``(1, T)`` or ``(B, T)``, in Kaldi's int16 scale
            (not [-1, 1]), at least one frame (``frame_length`` ms) long.
        lengths: optional int ``(B,)``, samples per item of a zero-padded ``(B, T)`` batch;
            items too short for one frame get 0 frames, as Kaldi gives.

    Returns:
        ``(frames, bins)`` for ``(T,)`` or ``(1, T)`` input, ``(B, frames, bins)`` for B > 1,
        ``bins = num_mel_bins + use_energy``. With ``lengths``: ``(feats (B, frames, bins),
        frame_lengths int64 (B,))``, frames past an item's end 0.
    """
    config, window, mel_fb = kaldi_fbank_config(
        blackman_coeff=blackman_coeff, channel=channel, dither=dither, energy_floor=energy_floor,
        frame_length=frame_length, frame_shift=frame_shift, high_freq=high_freq, htk_compat=htk_compat,
        low_freq=low_freq, min_duration=min_duration, num_mel_bins=num_mel_bins,
        preemphasis_coefficient=preemphasis_coefficient, raw_energy=raw_energy,
        remove_dc_offset=remove_dc_offset, round_to_power_of_two=round_to_power_of_two,
        sample_frequency=sample_frequency, snip_edges=snip_edges, subtract_mean=subtract_mean,
        use_energy=use_energy, use_log_fbank=use_log_fbank, use_power=use_power, vtln_high=vtln_high,
        vtln_low=vtln_low, vtln_warp=vtln_warp, window_type=window_type,
    )
    check_tensor("kaldi_fbank", "waveform", waveform, dtypes=WAVE_DTYPES)
    window = window.to(device=waveform.device, dtype=waveform.dtype)
    mel_fb = mel_fb.to(device=waveform.device, dtype=waveform.dtype)
    return kaldi_fbank_op(waveform, window, mel_fb, config, lengths=lengths, backend=backend)


# kaldi_fbank's options and defaults, for the KaldiFbank layer
KALDI_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(kaldi_fbank).parameters.items()
    if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name != "waveform"
}


# ---------------------------------------------------------------------------------------------
# Op level: tensors and numbers only. The nn layers call these with their buffers.


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
