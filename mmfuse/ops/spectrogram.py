"""Audio front ends: spectrogram, mel spectrogram, MFCC, dB conversion, Whisper log-mel, Kaldi fbank.

Each public function validates its arguments, builds the analysis window and the filterbank
once in Python (float64, then cast to the waveform's dtype) and calls the op-level function
(``mmfuse.ops.spectrogram_ops``: tensors and numbers only, it validates them and chooses a
backend), which runs the kernel through ``mmfuse.ops.spectrogram_kernels`` (each backend's
limits, and the adapters to the one ``mmfuse::mel_spectrogram`` op). The ``nn`` layers in
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

import inspect
from collections.abc import Callable

import torch

from mmfuse._checks import check_choice, check_int, check_positive, check_tensor
from mmfuse.audio.configs import (
    STYPES,
    WAVE_DTYPES,
    WHISPER_N_FFT,
    MFCC_TOP_DB,
    check_mfcc_args,
    check_spectrogram_args,
    check_stft_args,
    kaldi_fbank_config,
    whisper_mel_filters,
)
from mmfuse.audio.filterbanks import build_window, create_dct, melscale_fbanks
from mmfuse.reference import spectrogram as ref
from mmfuse.ops.spectrogram_ops import (  # the op level: tensors and numbers only
    kaldi_fbank_op,
    mel_spectrogram_op,
    mfcc_op,
    spectrogram_op,
    whisper_log_mel_op,
)



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
