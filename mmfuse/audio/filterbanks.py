"""Analysis windows and mel filterbanks of torchaudio/librosa and Kaldi, built in float64 on the
CPU; the ops cast them to the waveform's dtype and device."""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch


def build_window(window_fn: Callable[..., torch.Tensor], win_length: int, wkwargs: dict | None = None) -> torch.Tensor:
    """``window_fn(win_length, dtype=torch.float64, **wkwargs)``: float64 ``(win_length,)``, as
    torchaudio's ``Spectrogram`` builds its window (torch's window functions are periodic by
    default)."""
    window = window_fn(win_length, dtype=torch.float64, **(wkwargs or {}))
    if not isinstance(window, torch.Tensor) or window.shape != (win_length,):
        raise ValueError(
            f"window_fn must return a tensor of shape ({win_length},), got "
            f"{tuple(window.shape) if isinstance(window, torch.Tensor) else type(window).__name__}"
        )
    return window


def melscale_fbanks(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: float, norm: str | None, mel_scale: str
) -> torch.Tensor:
    """Triangular mel filterbank, float64 ``(n_freqs, n_mels)``, as
    ``torchaudio.functional.melscale_fbanks`` (which follows ``librosa.filters.mel``): bins at
    ``linspace(0, sample_rate // 2, n_freqs)`` Hz, ``n_mels + 2`` points equally spaced on the
    HTK (``2595 log10(1 + f / 700)``) or Slaney (linear below 1 kHz, log above) mel scale,
    ``norm="slaney"`` dividing each triangle by half its width in Hz. Warns, like torchaudio,
    when a filter is all zero. The returned tensor is cached: do not modify it."""
    fb = _melscale_fbanks(n_freqs, float(f_min), float(f_max), n_mels, sample_rate, norm, mel_scale)
    if (fb.amax(dim=0) == 0.0).any():
        warnings.warn(
            f"mmfuse: at least one mel filter is all zero; n_mels ({n_mels}) may be too high "
            f"or n_freqs ({n_freqs}) too low.",
            stacklevel=3,
        )
    return fb


@functools.lru_cache(maxsize=64)
def _melscale_fbanks(n_freqs, f_min, f_max, n_mels, sample_rate, norm, mel_scale) -> torch.Tensor:
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(_hz_to_mel(f_min, mel_scale), _hz_to_mel(f_max, mel_scale), n_mels + 2, dtype=torch.float64)
    f_pts = _mel_to_hz(m_pts, mel_scale)
    fb = _triangles(all_freqs, f_pts)
    if norm == "slaney":
        fb = fb * (2.0 / (f_pts[2:] - f_pts[:-2]))
    return fb


def _hz_to_mel(freq: float, mel_scale: str) -> float:
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + freq / 700.0)
    # Slaney (Auditory Toolbox): linear, 200/3 Hz per mel, below 1 kHz; log above.
    if freq < 1000.0:
        return freq * 3.0 / 200.0
    return 15.0 + math.log(freq / 1000.0) / (math.log(6.4) / 27.0)


def _mel_to_hz(mels: torch.Tensor, mel_scale: str) -> torch.Tensor:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    return torch.where(mels >= 15.0, 1000.0 * torch.exp(math.log(6.4) / 27.0 * (mels - 15.0)), mels * 200.0 / 3.0)


def _triangles(freqs: torch.Tensor, f_pts: torch.Tensor) -> torch.Tensor:
    """Filter ``m`` rises from ``f_pts[m]`` to 1 at ``f_pts[m + 1]`` and falls to ``f_pts[m + 2]``:
    ``(n_freqs, len(f_pts) - 2)``."""
    widths = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - freqs.unsqueeze(1)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def kaldi_frame_sizes(
    op: str, sample_frequency: float, frame_length: float, frame_shift: float, round_to_power_of_two: bool
) -> tuple[int, int, int]:
    """(window_shift, window_size, padded_size) in samples, truncated as Kaldi truncates them."""
    window_shift = int(sample_frequency * frame_shift * 0.001)
    window_size = int(sample_frequency * frame_length * 0.001)
    padded_size = 1 << (window_size - 1).bit_length() if round_to_power_of_two else window_size
    if window_size < 2:
        raise ValueError(f"{op}: frame_length must span at least 2 samples, got {window_size} ({frame_length} ms)")
    if window_shift < 1:
        raise ValueError(f"{op}: frame_shift must span at least 1 sample, got {frame_shift} ms")
    if padded_size % 2:
        raise ValueError(
            f"{op}: frame_length must give an even FFT size; got {padded_size} samples "
            "(set round_to_power_of_two=True or change frame_length)"
        )
    return window_shift, window_size, padded_size


def kaldi_window(window_type: str, window_size: int, blackman_coeff: float) -> torch.Tensor:
    """Kaldi's frame window (feature-window.cc), float64 ``(window_size,)``; "povey" is a
    symmetric Hann window raised to 0.85."""
    if window_type == "hanning":
        return torch.hann_window(window_size, periodic=False, dtype=torch.float64)
    if window_type == "hamming":
        return torch.hamming_window(window_size, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float64)
    if window_type == "povey":
        return torch.hann_window(window_size, periodic=False, dtype=torch.float64).pow(0.85)
    if window_type == "rectangular":
        return torch.ones(window_size, dtype=torch.float64)
    a = 2 * math.pi / (window_size - 1) * torch.arange(window_size, dtype=torch.float64)
    return blackman_coeff - 0.5 * torch.cos(a) + (0.5 - blackman_coeff) * torch.cos(2 * a)


def kaldi_mel_banks(
    op: str, num_bins: int, padded_size: int, sample_frequency: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Kaldi's mel bins (mel-computations.cc, torchaudio ``kaldi.get_mel_banks`` without VTLN),
    float64 ``(padded_size // 2 + 1, num_bins)``; the Nyquist bin gets weight 0 as in Kaldi."""
    nyquist = 0.5 * sample_frequency
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    if not 0.0 <= low_freq < nyquist:
        raise ValueError(f"{op}: low_freq must lie in [0, {nyquist}) (the Nyquist frequency), got {low_freq!r}")
    if not (0.0 < high <= nyquist and low_freq < high):
        raise ValueError(
            f"{op}: high_freq must give a cutoff in ({low_freq}, {nyquist}] (<= 0 is an offset from Nyquist), "
            f"got high_freq={high_freq!r} (cutoff {high})"
        )
    return _kaldi_mel_banks(num_bins, padded_size, float(sample_frequency), float(low_freq), float(high))


@functools.lru_cache(maxsize=64)
def _kaldi_mel_banks(num_bins, padded_size, sample_frequency, low_freq, high_freq) -> torch.Tensor:
    def mel(f):
        return 1127.0 * torch.log1p(torch.as_tensor(f, dtype=torch.float64) / 700.0)

    mel_low, mel_high = mel(low_freq), mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * torch.arange(num_bins + 2, dtype=torch.float64)
    fft_mels = mel(sample_frequency / padded_size * torch.arange(padded_size // 2, dtype=torch.float64))
    rising = (fft_mels.unsqueeze(1) - edges[:-2]) / delta
    falling = (edges[2:] - fft_mels.unsqueeze(1)) / delta
    bins = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(bins, (0, 0, 0, 1))


def create_dct(n_mfcc: int, n_mels: int, norm: str | None) -> torch.Tensor:
    """DCT-II matrix, float64 ``(n_mels, n_mfcc)``, as ``torchaudio.functional.create_dct``:
    ``cos(pi / n_mels * (n + 0.5) * k)``, times 2 for ``norm=None`` (scipy's unnormalised
    DCT-II) or scaled to an orthonormal basis for ``norm="ortho"`` (row ``k = 0`` by
    ``sqrt(1 / n_mels)``, the others by ``sqrt(2 / n_mels)``)."""
    n = torch.arange(n_mels, dtype=torch.float64)
    k = torch.arange(n_mfcc, dtype=torch.float64).unsqueeze(1)
    dct = torch.cos(math.pi / n_mels * (n + 0.5) * k)  # (n_mfcc, n_mels)
    if norm is None:
        dct = dct * 2.0
    else:
        dct[0] *= 1.0 / math.sqrt(2.0)
        dct = dct * math.sqrt(2.0 / n_mels)
    return dct.t().contiguous()
