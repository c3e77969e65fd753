"""Audio front-end layers: drop-in for torchaudio's ``Spectrogram``, ``MelSpectrogram``, ``MFCC``
and ``AmplitudeToDB``,
plus log-mel, Whisper and Kaldi fbank layers.

Each layer builds its window and filterbank once (float64, stored in the default dtype as
buffers ``window`` and ``mel_fb``, moved by ``.to()`` like any buffer) and calls the same
op-level function as the matching ``mmfuse`` function, so layer and function agree. Buffers
are cast to the input's dtype at each call, so a float32 layer also takes float64 input.
``forward`` takes ``lengths`` (int ``(B,)``, samples per item of a zero-padded ``(B, T)``
batch) where the function does and then returns ``(features, frame_lengths)``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from mmfuse._checks import check_choice, check_int, check_positive, check_tensor
from mmfuse.audio import configs
from mmfuse.audio.filterbanks import build_window, create_dct, melscale_fbanks
from mmfuse.ops import spectrogram as ops
from mmfuse.ops import spectrogram_ops as op_level


class Spectrogram(nn.Module):
    """``torchaudio.transforms.Spectrogram`` (same constructor arguments); see
    ``mmfuse.spectrogram``. ``return_complex`` (deprecated in torchaudio) is accepted only as
    None or True with ``power=None`` (the output is complex then); False, the old real
    ``(..., 2)`` layout, is refused.

    Input float32/float64 ``(..., time)``; output ``(..., freq, frames)``, complex for
    ``power=None``. Buffer: ``window`` ``(win_length,)``.
    """

    def __init__(
        self,
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
        return_complex: bool | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        op = "Spectrogram"
        if return_complex is not None:
            if return_complex is not True or power is not None:
                raise ValueError(
                    f"{op}: return_complex is deprecated in torchaudio; mmfuse accepts only None, or True with "
                    f"power=None (a complex output); got return_complex={return_complex!r}, power={power!r}"
                )
            warnings.warn("Spectrogram: return_complex is deprecated (torchaudio); power=None returns a complex "
                          "tensor", DeprecationWarning, stacklevel=2)
        self.win_length, self.hop_length = configs.check_spectrogram_args(
            op, n_fft, win_length, hop_length, pad, window_fn, power, normalized, center, pad_mode, onesided,
        )
        self.n_fft, self.pad, self.power, self.normalized = n_fft, pad, power, normalized
        self.center, self.pad_mode, self.onesided, self.backend = center, pad_mode, onesided, backend
        dtype = torch.get_default_dtype()
        self.register_buffer("window", build_window(window_fn, self.win_length, wkwargs).to(dtype))

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None):
        check_tensor("Spectrogram", "waveform", waveform, dtypes=configs.WAVE_DTYPES)
        return op_level.spectrogram_op(
            waveform, self.window.to(waveform.dtype), n_fft=self.n_fft, hop_length=self.hop_length, pad=self.pad,
            power=self.power, normalized=self.normalized, center=self.center, pad_mode=self.pad_mode,
            onesided=self.onesided, lengths=lengths, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"n_fft={self.n_fft}, hop_length={self.hop_length}, power={self.power}, onesided={self.onesided}"


class MelSpectrogram(nn.Module):
    """``torchaudio.transforms.MelSpectrogram`` (every constructor argument; ``onesided``,
    deprecated and unused there, must stay None); see ``mmfuse.mel_spectrogram``.

    Input float32/float64 ``(..., time)``; output ``(..., n_mels, frames)``.
    Buffers: ``window`` ``(win_length,)``, ``mel_fb`` ``(n_fft // 2 + 1, n_mels)``.
    """

    def __init__(
        self,
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
        wkwargs: dict | None = None,
        center: bool = True,
        pad_mode: str = "reflect",
        onesided: bool | None = None,
        norm: str | None = None,
        mel_scale: str = "htk",
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if onesided is not None:
            raise ValueError(
                "MelSpectrogram: onesided is deprecated in torchaudio and has no effect there (a mel spectrogram is "
                f"always one-sided); leave it None, got {onesided!r}"
            )
        self.win_length, self.hop_length, self.f_max = configs.check_stft_args(
            "MelSpectrogram", sample_rate, n_fft, win_length, hop_length, f_min, f_max, pad, n_mels,
            window_fn, power, normalized, center, pad_mode, norm, mel_scale,
        )
        self.sample_rate, self.n_fft, self.f_min, self.pad, self.n_mels = sample_rate, n_fft, f_min, pad, n_mels
        self.power, self.normalized, self.center, self.pad_mode = power, normalized, center, pad_mode
        self.norm, self.mel_scale, self.backend = norm, mel_scale, backend
        dtype = torch.get_default_dtype()
        self.register_buffer("window", build_window(window_fn, self.win_length, wkwargs).to(dtype))
        fb = melscale_fbanks(n_fft // 2 + 1, f_min, self.f_max, n_mels, sample_rate, norm, mel_scale)
        self.register_buffer("mel_fb", fb.to(dtype))

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None):
        check_tensor("MelSpectrogram", "waveform", waveform, dtypes=configs.WAVE_DTYPES)
        return op_level.mel_spectrogram_op(
            waveform, self.window.to(waveform.dtype), self.mel_fb.to(waveform.dtype),
            n_fft=self.n_fft, hop_length=self.hop_length, pad=self.pad, power=self.power,
            normalized=self.normalized, center=self.center, pad_mode=self.pad_mode,
            lengths=lengths, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, hop_length={self.hop_length}, "
            f"n_mels={self.n_mels}, mel_scale={self.mel_scale!r}, norm={self.norm!r}"
        )


class MFCC(nn.Module):
    """``torchaudio.transforms.MFCC`` (same constructor arguments); see ``mmfuse.mfcc`` (the
    80 dB clamp's max is taken as torchaudio takes it).

    Input float32/float64 ``(..., time)``; output ``(..., n_mfcc, frames)``.
    Buffers: ``window`` ``(win_length,)``, ``mel_fb`` ``(n_fft // 2 + 1, n_mels)``, ``dct_mat``
    ``(n_mels, n_mfcc)`` (torchaudio's name).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_mfcc: int = 40,
        dct_type: int = 2,
        norm: str | None = "ortho",
        log_mels: bool = False,
        melkwargs: dict | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        mel = configs.check_mfcc_args("MFCC", sample_rate, n_mfcc, dct_type, norm, log_mels, melkwargs)
        self.sample_rate, self.n_mfcc, self.dct_type, self.norm, self.log_mels = (
            sample_rate, n_mfcc, dct_type, norm, log_mels)
        self.mel, self.backend, self.top_db = mel, backend, configs.MFCC_TOP_DB
        dtype = torch.get_default_dtype()
        self.register_buffer("window", build_window(mel["window_fn"], mel["win_length"], mel["wkwargs"]).to(dtype))
        fb = melscale_fbanks(mel["n_fft"] // 2 + 1, mel["f_min"], mel["f_max"], mel["n_mels"], sample_rate,
                             mel["norm"], mel["mel_scale"])
        self.register_buffer("mel_fb", fb.to(dtype))
        self.register_buffer("dct_mat", create_dct(n_mfcc, mel["n_mels"], norm).to(dtype))

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None):
        check_tensor("MFCC", "waveform", waveform, dtypes=configs.WAVE_DTYPES)
        m = self.mel
        return op_level.mfcc_op(
            waveform, self.window.to(waveform.dtype), self.mel_fb.to(waveform.dtype),
            self.dct_mat.to(waveform.dtype), n_fft=m["n_fft"], hop_length=m["hop_length"], pad=m["pad"],
            power=m["power"], normalized=m["normalized"], center=m["center"], pad_mode=m["pad_mode"],
            log_mels=self.log_mels, top_db=self.top_db, lengths=lengths, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_mfcc={self.n_mfcc}, n_mels={self.mel['n_mels']}, "
                f"norm={self.norm!r}, log_mels={self.log_mels}")


class AmplitudeToDB(nn.Module):
    """``torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)``; see
    ``mmfuse.amplitude_to_db`` for how the ``top_db`` max is taken on batches."""

    def __init__(self, stype: str = "power", top_db: float | None = None) -> None:
        super().__init__()
        check_choice("AmplitudeToDB", "stype", stype, configs.STYPES)
        if top_db is not None:
            check_positive("AmplitudeToDB", "top_db", top_db, allow_zero=True)
        self.stype, self.top_db = stype, top_db

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.amplitude_to_db(x, self.stype, self.top_db)

    def extra_repr(self) -> str:
        return f"stype={self.stype!r}, top_db={self.top_db}"


class LogMelSpectrogram(MelSpectrogram):
    """Mel spectrogram then a log, the usual ASR/audio-model input.

    Takes ``MelSpectrogram``'s arguments plus:

    - ``log="db"``: ``amplitude_to_db`` of the mel spectrogram, stype "power" for ``power=2``
      and "magnitude" for ``power=1`` (other powers are refused), clamped at each
      spectrogram's max − ``top_db`` when ``top_db`` is set. Unlike ``AmplitudeToDB`` on a
      3-D batch, the max is taken per spectrogram (per index of the leading dimensions), so a
      clip's features do not depend on its batch.
    - ``log="natural"``: ``ln(max(mel, eps))`` (``top_db`` must be None).

    Output ``(..., n_mels, frames)``; with ``lengths``, frames past an item's end are 0.
    """

    def __init__(self, *args, log: str = "db", top_db: float | None = None, eps: float = 1e-10, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_choice("LogMelSpectrogram", "log", log, ("db", "natural"))
        if log == "db" and self.power not in (1.0, 2.0):
            raise ValueError(f"LogMelSpectrogram: power must be 1.0 or 2.0 with log='db', got {self.power!r}")
        if top_db is not None:
            if log != "db":
                raise ValueError(f"LogMelSpectrogram: top_db needs log='db', got log={log!r}")
            check_positive("LogMelSpectrogram", "top_db", top_db, allow_zero=True)
        check_positive("LogMelSpectrogram", "eps", eps)
        self.log, self.top_db, self.eps = log, top_db, eps

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None):
        out = super().forward(waveform, lengths)
        mel, frame_lengths = out if lengths is not None else (out, None)
        return self.log_of(mel, frame_lengths)

    def log_of(self, mel: torch.Tensor, frame_lengths: torch.Tensor | None):
        """The log step on a mel spectrogram ``(..., n_mels, frames)`` (``FeatureStream`` applies
        it to the frames it computes); with ``frame_lengths``, ``(log_mel, frame_lengths)``."""
        if self.log == "natural":
            log_mel = torch.clamp(mel, min=self.eps).log()
        else:
            stype = "power" if self.power == 2.0 else "magnitude"
            # one spectrogram per leading index: amplitude_to_db takes 4-D maxima per item
            per_item = mel.reshape(-1, 1, *mel.shape[-2:])
            log_mel = ops.amplitude_to_db(per_item, stype, self.top_db).reshape(mel.shape)
        if frame_lengths is None:
            return log_mel
        valid = torch.arange(mel.shape[-1], device=mel.device) < frame_lengths.unsqueeze(-1)
        return torch.where(valid.unsqueeze(-2), log_mel, torch.zeros_like(log_mel)), frame_lengths


class WhisperLogMel(nn.Module):
    """OpenAI Whisper's log-mel front end; see ``mmfuse.whisper_log_mel``.

    Input 16 kHz float32/float64 ``(..., time)``; output ``(..., n_mels, time // 160)``.
    Buffers: ``window`` ``(400,)`` periodic Hann, ``mel_fb`` ``(201, n_mels)``.
    """

    def __init__(self, n_mels: int = 80, *, backend: str = "auto") -> None:
        super().__init__()
        check_int("WhisperLogMel", "n_mels", n_mels)
        self.n_mels, self.backend = n_mels, backend
        dtype = torch.get_default_dtype()
        self.register_buffer("window", build_window(torch.hann_window, configs.WHISPER_N_FFT).to(dtype))
        self.register_buffer("mel_fb", configs.whisper_mel_filters(n_mels).to(dtype))

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None):
        check_tensor("WhisperLogMel", "audio", audio, dtypes=configs.WAVE_DTYPES)
        return op_level.whisper_log_mel_op(
            audio, self.window.to(audio.dtype), self.mel_fb.to(audio.dtype), lengths=lengths, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"n_mels={self.n_mels}"


class KaldiFbank(nn.Module):
    """Kaldi filterbank features, ``torchaudio.compliance.kaldi.fbank`` as a layer: the keyword
    arguments are ``mmfuse.kaldi_fbank``'s (same names and defaults), plus ``backend``.

    Input int16-scale float32/float64 ``(T,)``, ``(1, T)`` or ``(B, T)``; output
    ``(frames, bins)`` or ``(B, frames, bins)``.
    Buffers: ``window`` ``(window_size,)``, ``mel_fb`` ``(padded_size // 2 + 1, num_mel_bins)``.
    """

    def __init__(self, *, backend: str = "auto", **kwargs) -> None:
        super().__init__()
        options = dict(ops.KALDI_DEFAULTS)
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise TypeError(f"KaldiFbank: unknown arguments {unknown}; known: {sorted(options)}")
        options.update(kwargs)
        self.options, self.backend = options, backend
        self.config, window, mel_fb = configs.kaldi_fbank_config(**options)
        dtype = torch.get_default_dtype()
        self.register_buffer("window", window.to(dtype))
        self.register_buffer("mel_fb", mel_fb.to(dtype))

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None):
        check_tensor("KaldiFbank", "waveform", waveform, dtypes=configs.WAVE_DTYPES)
        return op_level.kaldi_fbank_op(
            waveform, self.window.to(waveform.dtype), self.mel_fb.to(waveform.dtype), self.config,
            lengths=lengths, backend=self.backend,
        )

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != ops.KALDI_DEFAULTS[k]}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())
