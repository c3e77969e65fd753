"""The front ends' configurations: torchaudio's ``MelSpectrogram`` arguments with its defaults,
Whisper's fixed STFT and filters, and Kaldi's ``fbank`` options turned into the numbers a
backend takes. Each validates what it is given and names the bad argument."""
from __future__ import annotations

import dataclasses

import torch

from mmfuse._checks import check_choice, check_int, check_positive
from mmfuse.audio.filterbanks import kaldi_frame_sizes, kaldi_mel_banks, kaldi_window, melscale_fbanks

WAVE_DTYPES = (torch.float32, torch.float64)
PAD_MODES = ("reflect", "constant", "replicate")
MEL_SCALES = ("htk", "slaney")
MEL_NORMS = (None, "slaney")
STYPES = ("power", "magnitude")
KALDI_WINDOWS = ("hamming", "hanning", "povey", "rectangular", "blackman")

# Whisper's fixed STFT (whisper/audio.py: N_FFT, HOP_LENGTH, SAMPLE_RATE).
WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_SAMPLE_RATE = 16000

# Kaldi floors spectra and energies at FLT_EPSILON whatever the dtype (torchaudio does too).
KALDI_EPSILON = float(torch.finfo(torch.float32).eps)


def check_stft_args(
    op, sample_rate, n_fft, win_length, hop_length, f_min, f_max, pad, n_mels, window_fn, power,
    normalized, center, pad_mode, norm, mel_scale,
) -> tuple[int, int, float]:
    """Validate ``MelSpectrogram``'s arguments; return (win_length, hop_length, f_max) with
    torchaudio's defaults filled in."""
    check_positive(op, "sample_rate", sample_rate)
    check_positive(op, "power", power)  # the mel spectrogram has no complex form
    win_length, hop_length = check_spectrogram_args(
        op, n_fft, win_length, hop_length, pad, window_fn, power, normalized, center, pad_mode, True,
    )
    check_int(op, "n_mels", n_mels)
    check_positive(op, "f_min", f_min, allow_zero=True)
    if f_max is None:
        f_max = float(sample_rate // 2)
    check_positive(op, "f_max", f_max)
    if f_min >= f_max:
        raise ValueError(f"{op}: f_min must be < f_max ({f_max}), got {f_min}")
    check_choice(op, "norm", norm, MEL_NORMS)
    check_choice(op, "mel_scale", mel_scale, MEL_SCALES)
    return win_length, hop_length, float(f_max)


def check_spectrogram_args(
    op, n_fft, win_length, hop_length, pad, window_fn, power, normalized, center, pad_mode, onesided,
) -> tuple[int, int]:
    """Validate ``Spectrogram``'s arguments (``power=None``: the complex spectrum); return
    (win_length, hop_length) with torchaudio's defaults filled in."""
    check_int(op, "n_fft", n_fft)
    if win_length is None:
        win_length = n_fft
    check_int(op, "win_length", win_length)
    if win_length > n_fft:
        raise ValueError(f"{op}: win_length must be <= n_fft ({n_fft}), got {win_length}")
    if hop_length is None:
        hop_length = win_length // 2
    check_int(op, "hop_length", hop_length)
    check_int(op, "pad", pad, allow_zero=True)
    if not callable(window_fn):
        raise TypeError(f"{op}: window_fn must be callable like torch.hann_window, got {type(window_fn).__name__}")
    if power is not None:
        check_positive(op, "power", power)
    if not (isinstance(normalized, bool) or normalized in ("window", "frame_length")):
        raise ValueError(f"{op}: normalized must be one of [False, True, 'window', 'frame_length'], got {normalized!r}")
    if not isinstance(center, bool):
        raise TypeError(f"{op}: center must be a bool, got {type(center).__name__}")
    if not isinstance(onesided, bool):
        raise TypeError(f"{op}: onesided must be a bool, got {type(onesided).__name__}")
    check_choice(op, "pad_mode", pad_mode, PAD_MODES)
    return win_length, hop_length


# torchaudio.transforms.MelSpectrogram's arguments after sample_rate, with its defaults
MEL_DEFAULTS = dict(n_fft=400, win_length=None, hop_length=None, f_min=0.0, f_max=None, pad=0, n_mels=128,
                    window_fn=torch.hann_window, power=2.0, normalized=False, wkwargs=None, center=True,
                    pad_mode="reflect", onesided=None, norm=None, mel_scale="htk")
DCT_TYPES = (2,)
DCT_NORMS = (None, "ortho")
# torchaudio.transforms.MFCC's AmplitudeToDB(stype="power", top_db=80.0)
MFCC_TOP_DB = 80.0


def check_mfcc_args(op, sample_rate, n_mfcc, dct_type, norm, log_mels, melkwargs) -> dict:
    """Validate ``MFCC``'s arguments; return the ``MelSpectrogram`` arguments (torchaudio's
    defaults, updated by ``melkwargs``) after checking them and ``n_mfcc <= n_mels``."""
    check_positive(op, "sample_rate", sample_rate)
    check_int(op, "n_mfcc", n_mfcc)
    if dct_type not in DCT_TYPES or isinstance(dct_type, bool):
        raise ValueError(f"{op}: dct_type must be 2 (torchaudio supports only DCT-II), got {dct_type!r}")
    check_choice(op, "norm", norm, DCT_NORMS)
    if not isinstance(log_mels, bool):
        raise TypeError(f"{op}: log_mels must be a bool, got {type(log_mels).__name__}")
    if melkwargs is not None and not isinstance(melkwargs, dict):
        raise TypeError(f"{op}: melkwargs must be a dict of MelSpectrogram arguments or None, got "
                        f"{type(melkwargs).__name__}")
    mel = dict(MEL_DEFAULTS)
    unknown = sorted(set(melkwargs or {}) - set(mel))
    if unknown:
        raise TypeError(f"{op}: melkwargs has unknown MelSpectrogram arguments {unknown}; known: {sorted(mel)} "
                        "(sample_rate is MFCC's own argument)")
    mel.update(melkwargs or {})
    if mel.get("onesided") is not None:
        raise ValueError(f"{op}: melkwargs['onesided'] is deprecated in torchaudio and unused; leave it None")
    mel.pop("onesided")
    win_length, hop_length, f_max = check_stft_args(
        op, sample_rate, mel["n_fft"], mel["win_length"], mel["hop_length"], mel["f_min"], mel["f_max"], mel["pad"],
        mel["n_mels"], mel["window_fn"], mel["power"], mel["normalized"], mel["center"], mel["pad_mode"],
        mel["norm"], mel["mel_scale"],
    )
    mel.update(win_length=win_length, hop_length=hop_length, f_max=f_max)
    if n_mfcc > mel["n_mels"]:
        raise ValueError(f"{op}: n_mfcc must be <= n_mels ({mel['n_mels']}): cannot select more MFCC coefficients "
                         f"than mel bins, got {n_mfcc}")
    return mel


def whisper_mel_filters(n_mels: int) -> torch.Tensor:
    """float64 ``(201, n_mels)``: ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels).T``,
    the filters Whisper ships in ``mel_filters.npz`` (Slaney scale and normalisation)."""
    return melscale_fbanks(
        WHISPER_N_FFT // 2 + 1, 0.0, WHISPER_SAMPLE_RATE / 2, n_mels, WHISPER_SAMPLE_RATE, "slaney", "slaney"
    )


@dataclasses.dataclass(frozen=True)
class KaldiFbankConfig:
    """The numbers ``kaldi_fbank`` passes to a backend, from validated Kaldi options.
    Sizes in samples; ``min_samples`` is ``min_duration * sample_frequency``."""

    channel: int
    window_shift: int
    window_size: int
    min_samples: float
    snip_edges: bool
    remove_dc_offset: bool
    preemphasis_coefficient: float
    raw_energy: bool
    energy_floor: float
    use_power: bool
    use_log_fbank: bool
    use_energy: bool
    htk_compat: bool
    subtract_mean: bool


def kaldi_fbank_config(
    *, blackman_coeff, channel, dither, energy_floor, frame_length, frame_shift, high_freq, htk_compat,
    low_freq, min_duration, num_mel_bins, preemphasis_coefficient, raw_energy, remove_dc_offset,
    round_to_power_of_two, sample_frequency, snip_edges, subtract_mean, use_energy, use_log_fbank,
    use_power, vtln_high, vtln_low, vtln_warp, window_type,
) -> tuple[KaldiFbankConfig, torch.Tensor, torch.Tensor]:
    """Validate ``kaldi_fbank``'s options; return the config, the float64 window
    ``(window_size,)`` and the float64 mel bins ``(padded_size // 2 + 1, num_mel_bins)``.
    ``vtln_low`` and ``vtln_high`` only matter with VTLN, which is not supported."""
    op = "kaldi_fbank"
    if channel not in (-1, 0) or isinstance(channel, bool):
        raise ValueError(
            f"{op}: channel must be -1 or 0; mmfuse treats (B, T) as a batch, so select a channel "
            f"before the call; got {channel!r}"
        )
    if dither != 0.0:
        raise ValueError(f"{op}: dither must be 0.0 (dithering draws random noise, which mmfuse does not add), got {dither!r}")
    if vtln_warp != 1.0:
        raise ValueError(f"{op}: vtln_warp must be 1.0 (VTLN warping is not supported), got {vtln_warp!r}")
    check_choice(op, "window_type", window_type, KALDI_WINDOWS)
    check_positive(op, "sample_frequency", sample_frequency)
    check_positive(op, "frame_shift", frame_shift)
    check_positive(op, "frame_length", frame_length)
    check_positive(op, "energy_floor", energy_floor, allow_zero=True)
    check_positive(op, "min_duration", min_duration, allow_zero=True)
    if not 0.0 <= preemphasis_coefficient <= 1.0:
        raise ValueError(f"{op}: preemphasis_coefficient must lie in [0, 1], got {preemphasis_coefficient!r}")
    check_int(op, "num_mel_bins", num_mel_bins)
    if num_mel_bins <= 3:
        raise ValueError(f"{op}: num_mel_bins must be > 3 (Kaldi's minimum), got {num_mel_bins}")
    window_shift, window_size, padded_size = kaldi_frame_sizes(
        op, sample_frequency, frame_length, frame_shift, round_to_power_of_two
    )
    config = KaldiFbankConfig(
        channel=channel,
        window_shift=window_shift,
        window_size=window_size,
        min_samples=min_duration * sample_frequency,
        snip_edges=bool(snip_edges),
        remove_dc_offset=bool(remove_dc_offset),
        preemphasis_coefficient=float(preemphasis_coefficient),
        raw_energy=bool(raw_energy),
        energy_floor=float(energy_floor),
        use_power=bool(use_power),
        use_log_fbank=bool(use_log_fbank),
        use_energy=bool(use_energy),
        htk_compat=bool(htk_compat),
        subtract_mean=bool(subtract_mean),
    )
    window = kaldi_window(window_type, window_size, blackman_coeff)
    mel_fb = kaldi_mel_banks(op, num_mel_bins, padded_size, sample_frequency, low_freq, high_freq)
    return config, window, mel_fb
