"""``mmfuse.nn.FeatureStream``: streams fed chunk by chunk give, per stream, exactly the frames of
the offline layer on the whole signal (DESIGN.md, issue #32), for any chunking.

The oracle is the offline layer itself, on each stream's signal alone (``lengths`` = its
length), on the same backend: the stream runs the same kernel per frame, so float64 results
agree to rounding (asserted: 1e-9 of the peak). A stream with no samples, and one the offline
op refuses (reflect padding of a signal not longer than ``n_fft // 2``), gives no frames.
Kaldi fbank is also compared with kaldi-native-fbank's ``OnlineFbank`` fed the same chunks,
frame counts call by call. Triton runs under the interpreter on CPU (marker ``triton``), the
CUDA kernel on the host emulator (marker ``emulator``, the monkeypatch of
test_mel_spectrogram_emulator.py). Sizes are small (8 kHz, under 0.4 s) for CI's budget.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfuse.nn import (
    MFCC,
    AmplitudeToDB,
    FeatureStream,
    KaldiFbank,
    LogMelSpectrogram,
    MelSpectrogram,
    Spectrogram,
    WhisperLogMel,
)
from mmfuse.nn import streaming
from mmfuse.ops import spectrogram_kernels as spec_ops

pytestmark = pytest.mark.filterwarnings("ignore:mmfuse. at least one mel filter is all zero")

EXAMPLES = int(os.environ.get("MMFUSE_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("MMFUSE_FUZZ_RANDOM", "0") == "1"
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=list(HealthCheck))


def _kaldi(**kw):
    # 8 kHz: 25 ms = 200 samples, 10 ms = 80, FFT 256
    return KaldiFbank(sample_frequency=8000.0, num_mel_bins=15, **kw)


def _mfcc_no_clamp(**melkwargs):
    layer = MFCC(8000, n_mfcc=9, melkwargs=dict(n_mels=16, **melkwargs))
    layer.top_db = None  # no 80 dB clamp: per frame
    return layer


# name -> factory(backend); every edge rule: reflect / replicate / constant centre padding, pad
# zeros, odd n_fft, hop > n_fft, Kaldi's mirror with an odd shift and shift > window, min_duration
FRONT_ENDS = {
    "kaldi": lambda b: _kaldi(use_energy=True, backend=b),
    "kaldi-no-snip": lambda b: _kaldi(snip_edges=False, use_energy=True, raw_energy=False, backend=b),
    "kaldi-no-snip-odd-shift": lambda b: _kaldi(snip_edges=False, frame_length=12.5, frame_shift=3.875,
                                                window_type="hamming", htk_compat=True, use_energy=True, backend=b),
    "kaldi-no-snip-wide-shift": lambda b: _kaldi(snip_edges=False, frame_length=10.0, frame_shift=17.5,
                                                 use_log_fbank=False, backend=b),
    "kaldi-min-duration": lambda b: _kaldi(snip_edges=False, min_duration=0.06, backend=b),
    "spectrogram": lambda b: Spectrogram(n_fft=64, hop_length=24, backend=b),
    "spectrogram-complex": lambda b: Spectrogram(n_fft=64, hop_length=24, power=None, normalized=True, backend=b),
    "spectrogram-two-sided": lambda b: Spectrogram(n_fft=63, win_length=50, hop_length=20, pad=5, center=False,
                                                   onesided=False, power=1.0, backend=b),
    "mel": lambda b: MelSpectrogram(8000, n_fft=128, win_length=100, hop_length=40, n_mels=20, backend=b),
    "mel-pad-replicate": lambda b: MelSpectrogram(8000, n_fft=100, hop_length=30, n_mels=16, pad=7,
                                                  pad_mode="replicate", backend=b),
    "mel-replicate": lambda b: MelSpectrogram(8000, n_fft=50, hop_length=9, n_mels=8, pad_mode="replicate",
                                              backend=b),
    "mel-constant-odd": lambda b: MelSpectrogram(8000, n_fft=127, hop_length=50, n_mels=16, pad_mode="constant",
                                                 power=1.0, normalized="frame_length", backend=b),
    "mel-reflect-pad": lambda b: MelSpectrogram(8000, n_fft=64, hop_length=16, n_mels=12, pad=9, backend=b),
    "mel-no-center": lambda b: MelSpectrogram(8000, n_fft=64, hop_length=13, n_mels=10, pad=3, center=False,
                                              power=1.5, backend=b),
    "mel-wide-hop": lambda b: MelSpectrogram(8000, n_fft=64, hop_length=100, n_mels=10, backend=b),
    "log-mel": lambda b: LogMelSpectrogram(8000, n_fft=128, hop_length=40, n_mels=20, backend=b),
    "log-mel-natural": lambda b: LogMelSpectrogram(8000, n_fft=96, hop_length=32, n_mels=16, log="natural",
                                                   center=False, backend=b),
    "mfcc-log-mels": lambda b: MFCC(8000, n_mfcc=9, log_mels=True,
                                    melkwargs=dict(n_fft=128, hop_length=40, n_mels=16), backend=b),
    "mfcc-no-clamp": lambda b: _mfcc_no_clamp(n_fft=64, hop_length=30, center=False),
}


def _make(name, backend, dtype=torch.float64):
    layer = FRONT_ENDS[name](backend).to(dtype)
    layer.backend = backend
    return layer


def _scale(layer):
    return 3000.0 if isinstance(layer, KaldiFbank) else 1.0


def _frames_axis(layer):
    return 1 if isinstance(layer, KaldiFbank) else 2


def offline(layer, signal):
    """The offline layer's frames of one whole signal, ``(features..., frames)`` with the frame
    axis last... as the layer lays them out for one item (None where the offline op refuses)."""
    n = signal.shape[0]
    if n == 0:
        return None
    try:
        feats, frames = layer(signal.unsqueeze(0), torch.tensor([n]))
    except ValueError:
        return None
    return feats[0].narrow(_frames_axis(layer) - 1, 0, int(frames[0]))


def run_stream(layer, signals, chunkings, *, pad_extra=0, check=True):
    """Feed ``signals`` (one 1-D tensor per stream) through a FeatureStream, call ``c`` giving
    stream b ``chunkings[b][c]`` samples (0 past its list), one more call giving what is left,
    then flush; returns each stream's concatenated frames. Checks each call's output (frame
    counts int64 (B,), frames past a stream's count zero)."""
    batch = len(signals)
    stream = FeatureStream(layer, batch)
    dtype = signals[0].dtype
    axis = _frames_axis(layer)
    pos = [0] * batch
    parts = [[] for _ in range(batch)]
    calls = max(len(c) for c in chunkings)

    def take(feats, frames):
        assert frames.dtype == torch.int64 and frames.shape == (batch,)
        assert feats.shape[0] == batch and feats.shape[axis] == (int(frames.max()) if batch else 0)
        for b in range(batch):
            k = int(frames[b])
            parts[b].append(feats[b].narrow(axis - 1, 0, k))
            if check:
                assert (feats[b].narrow(axis - 1, k, feats.shape[axis] - k) == 0).all()

    for c in range(calls + 1):
        left = [signals[b].shape[0] - pos[b] for b in range(batch)]
        if c == calls:  # the last call: whatever is left
            sizes = left
        else:
            sizes = [min(chunkings[b][c], left[b]) if c < len(chunkings[b]) else 0 for b in range(batch)]
        width = max(sizes) + pad_extra
        chunk = torch.randn(batch, width, dtype=dtype) * 1e3  # garbage past each length: must be ignored
        for b in range(batch):
            chunk[b, :sizes[b]] = signals[b][pos[b]:pos[b] + sizes[b]]
            pos[b] += sizes[b]
        if all(s == width for s in sizes) and c % 2 == 0:
            take(*stream(chunk))
        else:
            take(*stream(chunk, torch.tensor(sizes)))
    assert pos == [s.shape[0] for s in signals]
    take(*stream.flush())
    return [torch.cat(p, dim=axis - 1) for p in parts]


def assert_matches_offline(layer, signals, got, *, rel=1e-9):
    """Each stream's frames equal the offline layer's (to ``rel`` of the peak); no frames where
    the offline op gives none or refuses."""
    errors = []
    for b, signal in enumerate(signals):
        want = offline(layer, signal)
        if want is None or want.shape[-1 if not isinstance(layer, KaldiFbank) else 0] == 0:
            assert got[b].numel() == 0, f"stream {b}: {got[b].shape} frames where the offline op gives none"
            continue
        assert got[b].shape == want.shape, f"stream {b} (length {signal.shape[0]}): {got[b].shape} != {want.shape}"
        err = (got[b] - want).abs().max().item()
        peak = want.abs().max().item()
        assert err <= rel * peak + 1e-12, f"stream {b}: max error {err:.3e}, peak {peak:.3e}"
        errors.append(err)
    return max(errors, default=0.0)


def _signals(layer, lengths, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) * _scale(layer) for n in lengths]


# ---------------------------------------------------------------------------------------------
# exactness


def _fixed_chunkings(layer, lengths):
    """Stream 0: one sample at a time through the first frames (every start-padding boundary),
    then 37; stream 1: one chunk longer than a window, empties around it; stream 2: a cycle of
    0, 1, hop - 1, hop + 1, 3 windows."""
    fr = FeatureStream(layer, 1).framing
    first = fr.width + max(fr.left_need, 0) + 2 * fr.hop + 3
    cycle = [0, 1, fr.hop - 1, 0, fr.hop + 1, 3 * fr.width + 7]
    return [[1] * first + [37] * (lengths[0] // 37 + 1), [0, lengths[1], 0],
            [cycle[i % len(cycle)] for i in range(40)]]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", sorted(FRONT_ENDS))
def test_fixed_chunkings_match_offline(name, backend):
    layer = _make(name, backend)
    lengths = [611, 1499, 2003]
    signals = _signals(layer, lengths)
    got = run_stream(layer, signals, _fixed_chunkings(layer, lengths), pad_extra=3)
    assert_matches_offline(layer, signals, got)


@pytest.mark.parametrize("name", ["kaldi-no-snip", "mel", "log-mel", "mfcc-log-mels", "spectrogram-complex"])
def test_float32_matches_offline_float32(name):
    layer = _make(name, "cpu", torch.float32)
    lengths = [1000, 333]
    signals = _signals(layer, lengths, torch.float32)
    got = run_stream(layer, signals, [[160] * 7, [1, 50, 0, 200]])
    assert_matches_offline(layer, signals, got, rel=2e-6)


@st.composite
def _cases(draw):
    name = draw(st.sampled_from(sorted(FRONT_ENDS)))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.one_of(st.integers(0, 40), st.integers(41, 300), st.integers(301, 2500)))
               for _ in range(batch)]
    size = st.one_of(st.just(0), st.integers(1, 30), st.integers(31, 300), st.integers(301, 3000))
    chunkings = [draw(st.lists(size, min_size=1, max_size=10)) for _ in range(batch)]
    return name, lengths, chunkings, draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 5))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@PROPERTY
@given(case=_cases())
def test_any_chunking_matches_offline(backend, case):
    name, lengths, chunkings, seed, pad_extra = case
    layer = _make(name, backend)
    signals = _signals(layer, lengths, seed=seed)
    got = run_stream(layer, signals, chunkings, pad_extra=pad_extra)
    assert_matches_offline(layer, signals, got)


def test_one_op_call_per_call(monkeypatch):
    """One op call for the whole batch when any frame is ready, none otherwise."""
    calls = []
    for fn in ("kaldi_fbank_op", "mel_spectrogram_op"):
        real = getattr(streaming.op_level, fn)
        monkeypatch.setattr(streaming.op_level, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    for name, chunk in (("kaldi-no-snip", 80), ("mel", 40)):
        layer = _make(name, "cpu")
        stream = FeatureStream(layer, 5)
        calls.clear()
        _, frames = stream(torch.randn(5, 10, dtype=torch.float64))
        assert frames.sum() == 0 and not calls
        for _ in range(4):
            _, frames = stream(torch.randn(5, 3 * chunk, dtype=torch.float64) * _scale(layer))
        assert (frames > 1).all() and len(calls) == 4
        stream.flush()
        assert len(calls) == 5


# ---------------------------------------------------------------------------------------------
# kaldi-native-fbank's OnlineFbank, fed the same chunks


@pytest.mark.parametrize("snip_edges", [True, False])
def test_kaldi_matches_online_fbank(snip_edges):
    knf = pytest.importorskip("kaldi_native_fbank")
    import numpy as np

    layer = KaldiFbank(snip_edges=snip_edges, num_mel_bins=40, use_energy=True, energy_floor=1.0).float()
    signals = [torch.randint(-20000, 20000, (n,)).float() for n in (5003, 2011)]
    chunkings = [[160, 0, 1, 399, 2000, 7, 7, 800], [3, 0, 0, 1200, 1, 160, 320]]
    stream = FeatureStream(layer, 2)
    online = []
    for _ in signals:
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.snip_edges = snip_edges
        opts.mel_opts.num_bins = 40
        opts.use_energy, opts.energy_floor = True, 1.0
        online.append(knf.OnlineFbank(opts))
    pos, got, want = [0, 0], [[], []], [[], []]

    def compare(feats, frames, finished):
        for b in range(2):
            f = online[b]
            if finished:
                f.input_finished()
            done = sum(x.shape[0] for x in want[b])
            new = np.stack([f.get_frame(i) for i in range(done, f.num_frames_ready)]) if f.num_frames_ready > done \
                else np.zeros((0, 41), np.float32)
            want[b].append(new)
            assert int(frames[b]) == new.shape[0], f"stream {b}: {int(frames[b])} frames, OnlineFbank {new.shape[0]}"
            got[b].append(feats[b, :int(frames[b])])

    for c in range(max(map(len, chunkings)) + 1):
        sizes = [min(chunkings[b][c], signals[b].shape[0] - pos[b]) if c < len(chunkings[b])
                 else signals[b].shape[0] - pos[b] for b in range(2)]
        chunk = torch.zeros(2, max(sizes))
        for b in range(2):
            piece = signals[b][pos[b]:pos[b] + sizes[b]]
            chunk[b, :sizes[b]] = piece
            online[b].accept_waveform(16000.0, piece.numpy())
            pos[b] += sizes[b]
        compare(*stream(chunk, torch.tensor(sizes)), finished=False)
    compare(*stream.flush(), finished=True)
    for b in range(2):
        ours = torch.cat(got[b]).double()
        theirs = torch.from_numpy(np.concatenate(want[b])).double()
        assert ours.shape == theirs.shape
        # kaldi-native-fbank computes in float32: log features agree to ~2e-5 (test_spectrogram.py)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# flush, reset, continuous batching


def test_flush_starts_every_stream_anew():
    layer = _make("mel", "cpu")
    stream = FeatureStream(layer, 2)
    first = _signals(layer, [700, 500], seed=1)
    second = _signals(layer, [300, 900], seed=2)
    for signals in (first, second):
        out = [[], []]
        chunk = torch.zeros(2, 900, dtype=torch.float64)
        for b, s in enumerate(signals):
            chunk[b, :s.shape[0]] = s
        for feats, frames in (stream(chunk, torch.tensor([s.shape[0] for s in signals])), stream.flush()):
            for b in range(2):
                out[b].append(feats[b, :, :int(frames[b])])
        assert_matches_offline(layer, signals, [torch.cat(o, -1) for o in out])
    feats, frames = stream.flush()  # nothing pending
    assert feats.shape == (2, 20, 0) and frames.tolist() == [0, 0]
    feats, frames = FeatureStream(_make("kaldi", "cpu"), 3).flush()  # never fed
    assert feats.shape == (3, 0, 16) and frames.tolist() == [0, 0, 0]


def test_flush_allows_another_dtype():
    layer = _make("mel", "cpu")
    stream = FeatureStream(layer, 1)
    stream(torch.randn(1, 100, dtype=torch.float64))
    stream.flush()
    feats, _ = stream(torch.randn(1, 300))
    assert feats.dtype == torch.float32


@pytest.mark.parametrize("name", ["kaldi-no-snip", "mel-reflect-pad"])
def test_reset_some_streams_continuous_batching(name):
    """Stream slots are reused: a reset slot starts a new signal, the others carry on."""
    layer = _make(name, "cpu")
    a = _signals(layer, [1500, 1500, 1500], seed=3)
    b = _signals(layer, [0, 640, 0], seed=4)  # new signal of slot 1 after the reset
    stream = FeatureStream(layer, 3)
    axis = _frames_axis(layer)
    outs = {key: [] for key in ("a0", "a1", "a2", "b1")}

    def take(feats, frames, keys):
        for slot, key in keys.items():
            outs[key].append(feats[slot].narrow(axis - 1, 0, int(frames[slot])))

    x = torch.stack(a)
    take(*stream(x[:, :500]), {0: "a0", 1: "a1", 2: "a2"})
    # slot 1's caller hangs up: its tail frames are abandoned, a new caller takes the slot
    stream.reset(torch.tensor([False, True, False]))
    chunk = torch.zeros(3, 1000, dtype=torch.float64)
    chunk[0], chunk[2] = x[0, 500:], x[2, 500:]
    chunk[1, :640] = b[1]
    take(*stream(chunk, torch.tensor([1000, 640, 1000])), {0: "a0", 1: "b1", 2: "a2"})
    take(*stream.flush(), {0: "a0", 1: "b1", 2: "a2"})
    cat = {k: torch.cat(v, axis - 1) for k, v in outs.items()}
    assert_matches_offline(layer, [a[0], b[1], a[2]], [cat["a0"], cat["b1"], cat["a2"]])
    # what slot 1 gave before the reset is a prefix of its first signal's frames
    want = offline(layer, a[1])
    n = cat["a1"].shape[axis - 1]
    torch.testing.assert_close(cat["a1"], want.narrow(axis - 1, 0, n), atol=1e-9 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("name", ["kaldi-no-snip", "mel-pad-replicate", "mfcc-log-mels"])
def test_flush_some_streams_continuous_batching(name):
    """One caller ends (its last frames, then its slot takes a new caller) while the others
    carry on undisturbed."""
    layer = _make(name, "cpu")
    a = _signals(layer, [1700, 900, 1700], seed=6)
    new = _signals(layer, [700], seed=7)[0]
    stream = FeatureStream(layer, 3)
    axis = _frames_axis(layer)
    outs = {key: [] for key in ("a0", "a1", "a2", "new")}

    def take(feats, frames, keys):
        for slot in range(3):
            if slot not in keys:
                assert int(frames[slot]) == 0
                continue
            outs[keys[slot]].append(feats[slot].narrow(axis - 1, 0, int(frames[slot])))

    x = torch.zeros(3, 1700, dtype=torch.float64)
    for b, sig in enumerate(a):
        x[b, :sig.shape[0]] = sig
    take(*stream(x[:, :900], torch.tensor([900, 900, 900])), {0: "a0", 1: "a1", 2: "a2"})
    take(*stream.flush(torch.tensor([False, True, False])), {1: "a1"})
    chunk = torch.zeros(3, 800, dtype=torch.float64)
    chunk[0], chunk[2] = x[0, 900:], x[2, 900:]
    chunk[1, :700] = new
    take(*stream(chunk, torch.tensor([800, 700, 800])), {0: "a0", 1: "new", 2: "a2"})
    take(*stream.flush(), {0: "a0", 1: "new", 2: "a2"})
    cat = [torch.cat(outs[k], axis - 1) for k in ("a0", "a1", "a2", "new")]
    assert_matches_offline(layer, [a[0], a[1], a[2], new], cat)


# ---------------------------------------------------------------------------------------------
# refusals and bad input


@pytest.mark.parametrize("layer, words", [
    (lambda: WhisperLogMel(), "maximum"),
    (lambda: KaldiFbank(subtract_mean=True), "subtract_mean"),
    (lambda: MFCC(8000, n_mfcc=13, melkwargs=dict(n_fft=64, n_mels=16)), "top_db"),
    (lambda: LogMelSpectrogram(8000, n_fft=64, n_mels=16, top_db=80.0), "top_db"),
])
def test_whole_signal_front_ends_are_refused(layer, words):
    with pytest.raises(ValueError, match=words):
        FeatureStream(layer(), 2)


def test_other_refusals():
    with pytest.raises(ValueError, match="dither"):
        KaldiFbank(dither=1.0)  # refused by the layer already: noise is not reproducible chunk by chunk
    with pytest.raises(TypeError, match="front_end"):
        FeatureStream(AmplitudeToDB(), 2)
    with pytest.raises(TypeError, match="front_end"):
        FeatureStream(torch.nn.Linear(2, 2), 2)
    for bad, error in ((0, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="batch_size"):
            FeatureStream(_make("mel", "cpu"), bad)
    FeatureStream(_make("mfcc-no-clamp", "cpu"), 1)  # top_db=None streams


def _state(stream):
    return None if stream._state is None else {k: v.clone() for k, v in stream._state.items()}


@pytest.mark.parametrize("name", ["kaldi-no-snip", "mel"])
def test_bad_input_leaves_the_state_untouched(name):
    layer = _make(name, "cpu")
    signals = _signals(layer, [900, 900, 900], seed=5)
    x = torch.stack(signals)
    stream = FeatureStream(layer, 3)
    axis = _frames_axis(layer)
    parts = [[], [], []]

    def take(feats, frames):
        for b in range(3):
            parts[b].append(feats[b].narrow(axis - 1, 0, int(frames[b])))

    take(*stream(x[:, :250]))
    good = x[:, 250:600]
    bad_calls = [
        ((good[:2],), ValueError, "chunk"),  # batch size
        ((good[0],), ValueError, "chunk"),  # 1-D
        ((good.float(),), TypeError, "dtype"),  # the stream's dtype is float64
        ((good.to(torch.int32),), TypeError, "chunk"),
        ((good.to("meta"),), ValueError, "device"),
        ((good, torch.tensor([350, 351, 0])), ValueError, "lengths"),  # > T
        ((good, torch.tensor([350, -1, 0])), ValueError, "lengths"),
        ((good, torch.tensor([[350, 350, 350]])), ValueError, "lengths"),  # not 1-D
        ((good, torch.tensor([350.0, 350.0, 350.0])), TypeError, "lengths"),
        ((good, torch.tensor([350, 350])), ValueError, "lengths"),
        (("not a tensor",), TypeError, "chunk"),
    ]
    for args, error, words in bad_calls:
        before = _state(stream)
        with pytest.raises(error, match=words):
            stream(*args)
        after = _state(stream)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for which, error in ((torch.tensor([True, False]), ValueError), (torch.tensor([1, 0, 1]), TypeError)):
        for method in (stream.reset, stream.flush):
            before = _state(stream)
            with pytest.raises(error, match="which"):
                method(which)
            after = _state(stream)
            assert all(torch.equal(before[k], after[k]) for k in before)
    take(*stream(good))
    take(*stream(x[:, 600:]))
    take(*stream.flush())
    assert_matches_offline(layer, signals, [torch.cat(p, axis - 1) for p in parts])


# ---------------------------------------------------------------------------------------------
# Triton (interpreter on CPU) and the CUDA kernel (host emulator)


@pytest.mark.triton
@pytest.mark.parametrize("name", ["kaldi-no-snip", "mel"])
def test_triton_matches_offline(name):
    from backend_params import device_for

    device = device_for("triton")
    layer = _make(name, "triton", torch.float32).to(device)
    signals = [s.to(device) for s in _signals(layer, [700, 260], torch.float32)]
    got = run_stream(layer, signals, [[150, 0, 333], [1, 120, 0]])
    assert_matches_offline(layer, signals, got, rel=2e-6)


@pytest.mark.emulator
@pytest.mark.parametrize("name", ["kaldi-no-snip", "mel-reflect-pad", "spectrogram"])
def test_cuda_kernel_on_the_emulator_matches_offline(name, monkeypatch):
    """The stream's op calls go to the CUDA kernel body on the host emulator; the oracle is the
    offline reference (unpatched), float64."""
    from test_mel_spectrogram_emulator import _emulated_op

    layer = _make(name, "reference")
    signals = _signals(layer, [520, 230])
    want = [offline(layer, s) for s in signals]
    with monkeypatch.context() as m:
        m.setitem(spec_ops._MEL_SPECTROGRAM, "reference", functools.partial(spec_ops._spectrogram_kernel, _emulated_op))
        m.setitem(spec_ops._SPECTROGRAM, "reference", functools.partial(spec_ops._spectrogram_kernel, _emulated_op))
        m.setitem(spec_ops._KALDI_FBANK, "reference", functools.partial(spec_ops._kaldi_fbank_kernel, _emulated_op))
        got = run_stream(layer, signals, [[130, 0, 1, 200], [77, 0]])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (g - w).abs().max() <= 1e-9 * w.abs().max()
