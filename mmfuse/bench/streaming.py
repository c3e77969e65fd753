"""Benchmark cases: ``FeatureStream`` serving many live 16 kHz streams chunk by chunk (issue #32).

Each timed call feeds the next chunk (10 ms or 100 ms) of every stream's pre-generated signal
to all streams at once and returns the frames that became computable; when the signal runs out
the call is a ``flush`` and the streams start again (one call in 400 or 40). The streams run in
lock step. ``work`` is the audio one call consumes, in stream-seconds, so the rate column is the
throughput in stream-seconds of audio per second (``stream-s/s``) and the time column the
per-call latency. Peers, each consuming the same chunks:

- kaldi-native-fbank's ``OnlineFbank`` (80-bin Kaldi fbank), one object per stream, fed stream
  by stream and its new frames read, as a CPU server runs it (for the log-mel cases too: it is
  the online extractor there is, computing a comparable 80-bin log-mel fbank);
- the offline mmfuse op recomputed on a sliding window: every call, each stream's last
  ``chunk + width - hop`` samples (exactly the samples of its new frames, framed without edge
  padding: the least a recomputing server can do), and its last 1 s.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from mmfuse.bench.case import Case
from mmfuse.nn import FeatureStream, KaldiFbank, LogMelSpectrogram

SAMPLE_RATE = 16000
UNIT = "stream-s/s"


class _Stream:
    """One steady-state call of a FeatureStream: the next chunk of every stream."""

    def __init__(self, layer, audio: torch.Tensor, chunk: int) -> None:
        self.stream, self.audio, self.chunk, self.pos = FeatureStream(layer, audio.shape[0]), audio, chunk, 0

    def __call__(self):
        if self.pos + self.chunk > self.audio.shape[1]:
            self.pos = 0
            return self.stream.flush()
        out = self.stream(self.audio[:, self.pos:self.pos + self.chunk])
        self.pos += self.chunk
        return out


class _OnlineFbank:
    """kaldi-native-fbank's ``OnlineFbank``, one per stream, fed stream by stream."""

    def __init__(self, audio: np.ndarray, chunk: int, num_bins: int) -> None:
        import kaldi_native_fbank as knf

        self.opts = knf.FbankOptions()
        self.opts.frame_opts.dither = 0.0
        self.opts.mel_opts.num_bins = num_bins
        self.knf, self.audio, self.chunk = knf, audio, chunk
        self._start()

    def _start(self) -> None:
        self.online = [self.knf.OnlineFbank(self.opts) for _ in range(self.audio.shape[0])]
        self.done = [0] * len(self.online)
        self.pos = 0

    def __call__(self):
        if self.pos + self.chunk > self.audio.shape[1]:
            for f in self.online:
                f.input_finished()
            out = self._read()
            self._start()
            return out
        for b, f in enumerate(self.online):
            f.accept_waveform(SAMPLE_RATE, self.audio[b, self.pos:self.pos + self.chunk])
        self.pos += self.chunk
        return self._read()

    def _read(self):
        out = []
        for b, f in enumerate(self.online):
            ready = f.num_frames_ready
            out.append([f.get_frame(i) for i in range(self.done[b], ready)])
            self.done[b] = ready
        return out


class _SlidingWindow:
    """The offline layer recomputed each call on every stream's last ``window`` samples (the
    steady state: the first call already has a full window)."""

    def __init__(self, layer, audio: torch.Tensor, chunk: int, window: int) -> None:
        self.layer, self.audio, self.chunk, self.window = layer, audio, chunk, window
        self.pos = self.first = max(window - chunk, 0)

    def __call__(self):
        if self.pos + self.chunk > self.audio.shape[1]:
            self.pos = self.first
        end = self.pos + self.chunk
        self.pos = end
        return self.layer(self.audio[:, end - self.window:end])


def _kaldi(backend: str, device, **kw):
    return KaldiFbank(num_mel_bins=80, dither=0.0, backend=backend, **kw).to(device)


def _log_mel(backend: str, device, **kw):
    # Whisper's STFT (25 ms Hann window, 10 ms hop) with 80 HTK mels, dB, no whole-signal clamp
    return LogMelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=80, backend=backend, **kw).to(device)


def cases(device: torch.device, quick: bool, backends: list[str]):
    streams = 16 if quick else 256
    seconds = 1 if quick else 4
    audio = (torch.randn(streams, seconds * SAMPLE_RATE, device=device) * 3000).round()  # int16 scale
    audio_np = audio.cpu().numpy()
    have_knf = importlib.util.find_spec("kaldi_native_fbank") is not None
    # the peers' offline op: the default backend for the device
    fronts = (
        ("kaldi_fbank 80 bins", _kaldi, dict(snip_edges=True)),
        ("log-mel 80 mels", _log_mel, dict(center=False)),
    )
    for chunk_ms in (10, 100):
        chunk = SAMPLE_RATE * chunk_ms // 1000
        for label, make, edge_free in fronts:
            ours = {b: _Stream(make(b, device), audio, chunk) for b in backends}
            peers = {}
            if have_knf:
                peers["kaldi-native-fbank OnlineFbank, stream by stream"] = _OnlineFbank(audio_np, chunk, 80)
            width, hop = 400, 160
            peers["offline op, sliding window of the new frames"] = _SlidingWindow(
                make("auto", device, **edge_free), audio, chunk, chunk + width - hop)
            peers["offline op, 1 s sliding window"] = _SlidingWindow(make("auto", device), audio, chunk, SAMPLE_RATE)
            work = streams * chunk / SAMPLE_RATE  # stream-seconds of audio per call
            yield Case("feature_stream", f"{label}, {streams} streams x {chunk_ms} ms chunks", "float32", ours, peers,
                       work, UNIT)
