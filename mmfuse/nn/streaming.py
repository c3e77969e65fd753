"""``FeatureStream``: a batch of live audio streams fed chunk by chunk through one of the audio
front-end layers, giving exactly the frames the offline layer gives on each whole signal.

How it works. Every front end cuts its (padded) signal into frames ``f`` whose first sample is
``a(f) = f * hop + offset`` (relative to the signal's first sample) and ``width`` samples long;
samples before the signal's start and after its end come from a fixed rule (torchaudio's
``pad`` zeros and ``center`` padding: reflect, replicate or zeros; Kaldi's ``snip_edges=False``
mirror, ``-1 -> 0``, ``n -> n - 1``). A frame is computable before the signal ends once every
sample it reads is known: its last sample has arrived and, for the first frames, the samples
the start padding mirrors have too (at the end of a signal nothing can be known before
``flush``). This is the rule of Kaldi's online feature extraction (kaldi/src/feat/online-feature.cc,
``OnlineGenericBaseFeature::ComputeFeatures`` with ``NumFrames(..., flush=false)`` of
feature-window.cc; kaldi-native-fbank's ``OnlineFbank`` follows it), applied to the torchaudio
front ends as well.

Each call gathers the newly computable frames of every stream at once (from its kept tail, the
new chunk, and the mirrored or zero samples of the start padding, or at ``flush`` of the end
padding), lays them end to end as one signal and runs the front end's op once on it, framed
edge-free with ``hop = width`` (``center=False, pad=0``; Kaldi ``snip_edges=True``): the same
kernels as the offline layer, one launch for the whole batch, and one item of K frames rather
than B items of one frame each (the kernels process blocks of frames per item). The state per
stream is its last ``max(width + 1, min_duration samples)`` samples and two counters, on the
input's device. The stream is for inference: no gradient flows back to the chunks.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from mmfuse._checks import check_lengths, check_tensor
from mmfuse.audio.configs import WAVE_DTYPES
from mmfuse.nn.audio import MFCC, KaldiFbank, LogMelSpectrogram, MelSpectrogram, Spectrogram, WhisperLogMel
from mmfuse.ops import spectrogram_ops as op_level
from mmfuse.reference.spectrogram import kaldi_num_frames, stft_num_frames

# a signal length larger than any stream's: before the end is known, the end padding rules
# never apply and Kaldi's repeated mirror reduces to one reflection
_UNKNOWN_END = 1 << 50


@dataclasses.dataclass(frozen=True)
class _Framing:
    """Where a front end's frames lie and where their samples come from.

    Frame ``f`` reads positions ``f * hop + offset + [0, width)`` of the signal extended by the
    edge rule; ``left_need`` samples must have arrived before the first frame can be computed
    (the start padding mirrors them), ``min_samples`` before any (Kaldi's ``min_duration``)."""

    kind: str  # "stft" (torchaudio: pad zeros then center padding) or "kaldi"
    width: int
    hop: int
    offset: int
    left_need: int
    min_samples: float
    center: bool = False
    pad: int = 0
    pad_mode: str = "constant"
    snip_edges: bool = True

    def ready(self, seen: torch.Tensor) -> torch.Tensor:
        """Frames computable once ``seen`` samples (int64 ``(B,)``) have arrived, the end unknown."""
        count = (torch.div(seen - self.width - self.offset, self.hop, rounding_mode="floor") + 1).clamp(min=0)
        need = max(self.left_need, math.ceil(self.min_samples))
        return torch.where(seen >= need, count, 0) if need > 0 else count

    def total(self, n: torch.Tensor) -> torch.Tensor:
        """Frames of the whole signal of ``n`` samples: the offline op's count, 0 for an empty
        signal and for one the offline op refuses (torchaudio's reflect padding of a signal not
        longer than ``n_fft // 2`` after ``pad``), 0 below Kaldi's ``min_duration``."""
        if self.kind == "kaldi":
            count = kaldi_num_frames(n, self.width, self.hop, self.snip_edges)
            empty = n < self.min_samples
        else:
            count = stft_num_frames(n, self.width, self.hop, pad=self.pad, center=self.center)
            empty = torch.zeros_like(n, dtype=torch.bool)
            if self.center and self.pad_mode == "reflect":
                empty = n + 2 * self.pad <= self.width // 2
        return torch.where(empty | (n == 0), torch.zeros_like(count), count)

    def source(self, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For positions ``p`` (``(B, T)``, relative to the signal's first sample) of signals of
        ``n`` samples (``(B, 1)``): the sample each reads and whether it reads a zero instead."""
        if self.kind == "kaldi":
            if self.snip_edges:
                return p, torch.zeros_like(p, dtype=torch.bool)
            # Kaldi's ExtractWindow: s -> -s - 1 below 0, s -> 2n - 1 - s past the end, repeatedly
            two_n = 2 * n.clamp(min=1)
            s = torch.remainder(p, two_n)
            s = torch.where(s >= n, two_n - 1 - s, s)
            return s, torch.zeros_like(p, dtype=torch.bool)
        q = p + self.pad  # position in the signal with torchaudio's `pad` zeros on each side
        m = n + 2 * self.pad
        if self.center and self.pad_mode == "reflect":  # torch.stft's reflect padding of that signal
            q = torch.where(q < 0, -q, q)
            q = torch.where(q >= m, 2 * m - 2 - q, q)
        elif self.center and self.pad_mode == "replicate":
            q = torch.minimum(q.clamp(min=0), m - 1)
        s = q - self.pad
        return s, (s < 0) | (s >= n)


class FeatureStream(nn.Module):
    """``batch_size`` live audio streams through one front-end layer, chunk by chunk.

    ``front_end``: a ``KaldiFbank``, ``Spectrogram``, ``MelSpectrogram``, ``LogMelSpectrogram``
    or ``MFCC`` layer (its buffers, options and ``backend`` are used as they are at each call).

    - ``feats, frames = stream(chunk, lengths=None)``: ``chunk`` float32/float64
      ``(batch_size, T)`` holds each stream's next samples, ``lengths`` int ``(batch_size,)``
      how many of them are valid (0: nothing new; default all ``T``). Returns the frames that
      became computable, in the front end's layout (``(B, features, frames)``, Kaldi
      ``(B, frames, bins)``) with the frame axis padded with zeros to the longest, and
      ``frames`` int64 ``(B,)``, how many are valid per stream.
    - ``feats, frames = stream.flush(which=None)``: the last frames of every stream (those that
      read the end padding), after which every stream starts anew; with ``which`` (bool
      ``(B,)``) only the chosen streams end, the others give no frames and carry on.
    - ``stream.reset(which=None)``: the chosen streams (bool ``(B,)``; all when None) start anew,
      their pending samples dropped: continuous batching.

    The contract: for every stream, its frames from all calls and the flush, concatenated,
    equal the offline layer applied to the stream's whole signal, for any chunking. A stream
    with no samples, and one the offline op refuses (reflect padding of a signal not longer than
    ``n_fft // 2``), gives no frames. Front ends whose output depends on the whole signal are
    refused at construction (see ``_check_front_end``).

    The stream's dtype and device are those of its first chunk after construction, ``flush``
    or a full ``reset``; the front end's buffers must be on that device. A call with bad input
    raises before it changes anything (no sample is lost).
    """

    def __init__(self, front_end: nn.Module, batch_size: int) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool):
            raise TypeError(f"FeatureStream: batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"FeatureStream: batch_size must be >= 1, got {batch_size}")
        self.framing, self.n_features, self.frames_last = _check_front_end(front_end)
        self.front_end, self.batch_size = front_end, batch_size
        self.capacity = max(self.framing.width + 1, math.ceil(self.framing.min_samples))
        self._state: dict[str, torch.Tensor] | None = None
        self._kaldi_config = None  # the Kaldi options of the packed frames (one frame per window)

    def extra_repr(self) -> str:
        return f"batch_size={self.batch_size}"

    # -----------------------------------------------------------------------------------------
    # public calls

    def forward(self, chunk: torch.Tensor, lengths: torch.Tensor | None = None):
        op = "FeatureStream"
        check_tensor(op, "chunk", chunk, ndim=2, dtypes=WAVE_DTYPES)
        if chunk.shape[0] != self.batch_size:
            raise ValueError(f"{op}: chunk must have shape ({self.batch_size}, T) (batch_size streams), "
                             f"got {tuple(chunk.shape)}")
        state = self._state
        if state is not None:
            buf = state["buf"]
            if chunk.dtype != buf.dtype:
                raise TypeError(f"{op}: chunk must have the stream's dtype {buf.dtype} (that of its first chunk), "
                                f"got {chunk.dtype}")
            if chunk.device != buf.device:
                raise ValueError(f"{op}: chunk must be on the stream's device {buf.device}, got {chunk.device}")
        buffer = next(self.front_end.buffers(), None)
        if buffer is not None and buffer.device != chunk.device:
            raise ValueError(f"{op}: chunk must be on the front end's device {buffer.device} (move the layer "
                             f"with .to()), got {chunk.device}")
        if lengths is not None:
            check_lengths(op, "lengths", lengths, batch=self.batch_size, max_len=chunk.shape[1], device=chunk.device)
            lengths = lengths.to(torch.int64)
        if state is None:
            state = self._fresh(chunk.dtype, chunk.device)
        seen = state["seen"] + (lengths if lengths is not None else chunk.shape[1])
        feats, frames, new_state = self._step(state, chunk.detach(), lengths, seen, self.framing.ready(seen),
                                              end=None)
        self._state = new_state
        return feats, frames

    def flush(self, which: torch.Tensor | None = None):
        """The remaining frames of the streams that end (those that need the signal's end), after
        which they start anew: every stream, or those where ``which`` (bool ``(batch_size,)``)
        is True, the others giving no frames and keeping their state (a caller hanging up in
        continuous batching). Returns ``(feats, frames)`` as a call does."""
        if which is not None:
            check_tensor("FeatureStream.flush", "which", which, dtypes=(torch.bool,), shape=(self.batch_size,))
        state = self._state
        if state is None:
            buffer = next(self.front_end.buffers(), None)
            dtype = buffer.dtype if buffer is not None else torch.get_default_dtype()
            state = self._fresh(dtype, buffer.device if buffer is not None else torch.device("cpu"))
        seen, stop = state["seen"], self.framing.total(state["seen"])
        if which is not None:
            which = which.to(seen.device)
            stop = torch.where(which, stop, state["next"])
        feats, frames, _ = self._step(state, state["buf"][:, :0], None, seen, stop, end=seen)
        if which is None:
            self._state = None
        else:
            self.reset(which)
        return feats, frames

    def reset(self, which: torch.Tensor | None = None) -> None:
        """Start the streams where ``which`` (bool ``(batch_size,)``) is True anew, their pending
        samples and frame counts dropped; all of them when ``which`` is None."""
        if which is None:
            self._state = None
            return
        check_tensor("FeatureStream.reset", "which", which, dtypes=(torch.bool,), shape=(self.batch_size,))
        if self._state is None:
            return
        which = which.to(self._state["buf"].device)
        self._state = {name: torch.where(which.view(-1, *([1] * (t.dim() - 1))), torch.zeros_like(t), t)
                       for name, t in self._state.items()}

    # -----------------------------------------------------------------------------------------
    # the work

    def _fresh(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Empty streams: ``buf`` holds the last ``capacity`` samples of each stream, right-aligned
        (``buf[:, -1]`` is sample ``seen - 1``; zeros before the signal), ``next`` is the first
        frame not yet returned."""
        zeros = torch.zeros(self.batch_size, dtype=torch.int64, device=device)
        return {"buf": torch.zeros(self.batch_size, self.capacity, dtype=dtype, device=device),
                "seen": zeros, "next": zeros}

    def _step(self, state, chunk, lengths, seen, stop, *, end):
        """Frames ``[next, stop)`` of every stream from its kept samples and the first
        ``lengths`` samples of ``chunk`` (None: all), ``seen`` samples in all after it, the
        signal ending at ``end`` (None: not yet known).
        Returns the features, the frame counts and the state after the call.

        Every sample a pending frame reads is among the last ``capacity`` samples: the next
        frame starts less than ``width`` samples before the end of what has arrived, the end
        padding mirrors at most ``width // 2 + 1`` samples, and while the first frame waits (for
        its mirrored samples or Kaldi's ``min_duration``) the stream has fewer than
        ``capacity`` samples."""
        fr, batch = self.framing, self.batch_size
        buf, prev_seen, start = state["buf"], state["seen"], state["next"]
        cap, device = buf.shape[1], buf.device
        pool = torch.cat([buf, chunk], dim=1) if chunk.shape[1] else buf  # pool[:, cap + i]: sample prev_seen + i
        frames = (stop - start).clamp(min=0)
        first = start * fr.hop + fr.offset  # the first sample of each stream's first new frame
        # frames that read padding: at the end all, before it those starting before sample 0
        if end is not None:
            edge = frames
        elif fr.offset < 0:
            edge = torch.minimum(frames, torch.div(fr.hop - 1 - first, fr.hop, rounding_mode="floor").clamp(min=0))
        else:
            edge = None
        # the one host sync of a call: the sizes of what follows
        stats = [frames.max(), frames.sum()] + ([edge.sum()] if edge is not None else [])
        kmax, total, *n_edge = torch.stack(stats).tolist()
        n_edge = n_edge[0] if n_edge else 0
        if total == 0:
            feats = self._empty(pool.dtype, device)
        else:
            # one row per new frame, stream by stream: (stream, k) -> frame next + k
            full = total == batch * kmax
            streams = torch.arange(batch, device=device)
            windows = pool.unfold(1, fr.width, 1)  # every window of every stream, a view
            in_pool = first - prev_seen + cap  # where each stream's first new frame starts in the pool
            if full:  # the steady state: no per-row bookkeeping
                steps = torch.arange(0, kmax * fr.hop, fr.hop, device=device)
                starts = (in_pool.unsqueeze(1) + steps).clamp(0, windows.shape[1] - 1)
                packed = windows[streams.unsqueeze(1), starts].reshape(total, fr.width)
            else:
                stream = torch.repeat_interleave(streams, frames, output_size=total)
                k = torch.arange(total, device=device) - (frames.cumsum(0) - frames)[stream]
                starts = (in_pool[stream] + k * fr.hop).clamp(0, windows.shape[1] - 1)
                packed = windows[stream, starts]  # (total, width)
            if n_edge:  # those frames sample by sample, through the padding rule
                if full:
                    stream = streams.repeat_interleave(kmax)
                    k = torch.arange(kmax, device=device).repeat(batch)
                begin = first[stream] + k * fr.hop  # each frame's first sample in its stream
                row_start = frames.cumsum(0) - frames
                if end is not None:
                    rows = torch.arange(total, device=device)
                else:
                    owner = torch.repeat_interleave(streams, edge, output_size=n_edge)
                    rows = row_start[owner] + torch.arange(n_edge, device=device) - (edge.cumsum(0) - edge)[owner]
                owner = stream[rows]
                n = end[owner] if end is not None else torch.full_like(owner, _UNKNOWN_END)
                s, zero = fr.source(begin[rows].unsqueeze(1) + torch.arange(fr.width, device=device), n.unsqueeze(1))
                index = torch.where(zero, 0, s - prev_seen[owner].unsqueeze(1) + cap)
                values = pool[owner.unsqueeze(1), index]
                packed[rows] = torch.where(zero, torch.zeros((), dtype=values.dtype, device=device), values)
            feats = self._features(packed, None if full else (stream, k), kmax)
        if end is not None:
            return feats, frames, None
        if chunk.shape[1] == 0:
            kept = buf
        elif lengths is None:
            kept = pool[:, pool.shape[1] - cap:]
        else:  # each stream's window moves on by its own length
            kept = pool.unfold(1, cap, 1)[torch.arange(batch, device=device), lengths]
        return feats, frames, {"buf": kept, "seen": seen, "next": torch.maximum(stop, start)}

    def _empty(self, dtype, device) -> torch.Tensor:
        shape = (self.batch_size, 0, self.n_features) if self.frames_last else (self.batch_size, self.n_features, 0)
        fe = self.front_end
        if isinstance(fe, Spectrogram) and fe.power is None:
            dtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        return torch.zeros(shape, dtype=dtype, device=device)

    def _features(self, frames: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor] | None, kmax: int):
        """The front end's op on ``frames`` (``(K, width)``, the new frames of all streams, packed)
        laid end to end as one signal and cut with ``hop = width``: one call, and the kernels
        run one item of K frames rather than B short items. Returns the features of stream b's
        frames at ``[b, :, :frames[b]]`` (Kaldi ``[b, :frames[b]]``), zeros after; ``where``
        (stream, frame) per packed row, None when every stream has ``kmax``."""
        fe, dtype = self.front_end, frames.dtype
        width = frames.shape[1]
        signal = frames.reshape(1, -1)
        if isinstance(fe, KaldiFbank):
            config = self._kaldi_config
            if config is None or config.window_shift != width:
                config = self._kaldi_config = dataclasses.replace(fe.config, window_shift=width, snip_edges=True,
                                                                  min_samples=0.0, channel=-1)
            out = op_level.kaldi_fbank_op(signal, fe.window.to(dtype), fe.mel_fb.to(dtype), config, lengths=None,
                                          backend=fe.backend)  # (K, bins)
        else:
            if isinstance(fe, MFCC):
                m = fe.mel
                out = op_level.mfcc_op(
                    signal, fe.window.to(dtype), fe.mel_fb.to(dtype), fe.dct_mat.to(dtype), n_fft=m["n_fft"],
                    hop_length=width, pad=0, power=m["power"], normalized=m["normalized"], center=False,
                    pad_mode=m["pad_mode"], log_mels=fe.log_mels, top_db=fe.top_db, lengths=None, backend=fe.backend,
                )
            elif isinstance(fe, MelSpectrogram):
                out = op_level.mel_spectrogram_op(
                    signal, fe.window.to(dtype), fe.mel_fb.to(dtype), n_fft=fe.n_fft, hop_length=width, pad=0,
                    power=fe.power, normalized=fe.normalized, center=False, pad_mode=fe.pad_mode, lengths=None,
                    backend=fe.backend,
                )
                if isinstance(fe, LogMelSpectrogram):
                    out = fe.log_of(out, None)
            else:
                out = op_level.spectrogram_op(
                    signal, fe.window.to(dtype), n_fft=fe.n_fft, hop_length=width, pad=0, power=fe.power,
                    normalized=fe.normalized, center=False, pad_mode=fe.pad_mode, onesided=fe.onesided,
                    lengths=None, backend=fe.backend,
                )
            out = out[0]  # (features, K)
            if where is None:
                return out.reshape(out.shape[0], self.batch_size, kmax).permute(1, 0, 2).contiguous()
            feats = out.new_zeros(self.batch_size, out.shape[0], kmax)
            feats[where[0], :, where[1]] = out.t()
            return feats
        if where is None:
            return out.reshape(self.batch_size, kmax, out.shape[1])
        feats = out.new_zeros(self.batch_size, kmax, out.shape[1])
        feats[where] = out
        return feats


def _check_front_end(fe: nn.Module) -> tuple[_Framing, int, bool]:
    """The framing, feature count and layout (frames last or not) of a front end that can
    stream; refuses, with the reason, one whose frames depend on the whole signal."""
    op = "FeatureStream"
    if isinstance(fe, WhisperLogMel):
        raise ValueError(f"{op}: WhisperLogMel cannot stream: Whisper normalises its log-mel by the maximum over the "
                         "whole signal (max - 8 clamp); stream a LogMelSpectrogram with Whisper's filters instead")
    if isinstance(fe, KaldiFbank):
        c = fe.config
        if c.subtract_mean:
            raise ValueError(f"{op}: KaldiFbank with subtract_mean=True cannot stream: it subtracts the mean over the "
                             "whole signal's frames (apply an online mean normalisation after the stream instead)")
        if fe.options.get("dither", 0.0) != 0.0:
            raise ValueError(f"{op}: KaldiFbank dither must be 0.0 to stream (random noise is not reproducible "
                             f"chunk by chunk), got {fe.options['dither']!r}")
        offset = 0 if c.snip_edges else c.window_shift // 2 - c.window_size // 2
        # the mirrored start reads samples up to -offset - 1
        framing = _Framing("kaldi", c.window_size, c.window_shift, offset, left_need=max(-offset, 0),
                           min_samples=c.min_samples, snip_edges=c.snip_edges)
        return framing, fe.mel_fb.shape[1] + int(c.use_energy), True
    if isinstance(fe, MFCC):
        m = fe.mel
        if not fe.log_mels and fe.top_db is not None:
            raise ValueError(f"{op}: MFCC with log_mels=False clamps its dB mel spectrogram at the whole signal's "
                             f"maximum - top_db ({fe.top_db}); stream an MFCC with log_mels=True, or set its top_db "
                             "attribute to None (no clamp)")
        return _stft_framing(m["n_fft"], m["hop_length"], m["pad"], m["center"], m["pad_mode"]), fe.n_mfcc, False
    if isinstance(fe, MelSpectrogram):
        if isinstance(fe, LogMelSpectrogram) and fe.top_db is not None:
            raise ValueError(f"{op}: LogMelSpectrogram with top_db={fe.top_db} clamps at the whole signal's maximum - "
                             "top_db; stream it with top_db=None")
        return _stft_framing(fe.n_fft, fe.hop_length, fe.pad, fe.center, fe.pad_mode), fe.n_mels, False
    if isinstance(fe, Spectrogram):
        n_bins = fe.n_fft // 2 + 1 if fe.onesided else fe.n_fft
        return _stft_framing(fe.n_fft, fe.hop_length, fe.pad, fe.center, fe.pad_mode), n_bins, False
    raise TypeError(f"{op}: front_end must be a KaldiFbank, Spectrogram, MelSpectrogram, LogMelSpectrogram or MFCC "
                    f"layer of mmfuse.nn, got {type(fe).__name__}")


def _stft_framing(n_fft: int, hop: int, pad: int, center: bool, pad_mode: str) -> _Framing:
    """torchaudio's framing: ``pad`` zeros each side, then with ``center`` ``n_fft // 2``
    samples of ``pad_mode`` padding each side (``torch.stft``)."""
    half = n_fft // 2 if center else 0
    left_need = 0
    if center and pad_mode == "reflect":
        left_need = max(half - pad + 1, 0)  # the mirror reads padded sample `half`
    elif center and pad_mode == "replicate" and pad == 0:
        left_need = 1  # repeats sample 0
    return _Framing("stft", n_fft, hop, -half - pad, left_need, 0.0, center=center, pad=pad, pad_mode=pad_mode)
