"""mmfuse.mfcc and nn.MFCC: torchaudio's ``MFCC`` with the log, the 80 dB clamp and the DCT
fused in the kernel; nn.MelSpectrogram's full torchaudio constructor.

Oracle: ``mfcc64``, torchaudio's MFCC definition in float64 NumPy/SciPy, independent of mmfuse:
``mel64`` (NumPy STFT, librosa's mel triangles; test_spectrogram.py), then
``10 log10(max(mel, 1e-10))`` clamped at the max over the clip's ``(channel, n_mels, frames)``
minus 80 (torchaudio's ``amplitude_to_DB`` on a 3-D spectrogram), or ``ln(mel + 1e-6)`` for
``log_mels``, then ``scipy.fft.dct(type=2, norm=...)`` over the mel axis, first ``n_mfcc`` rows.

Tolerance: MFCC values are dB-scale (hundreds at coefficient 0); float64 matches to 1e-9 of the
peak; float32 to 1e-5 of the peak (the dB of a float32 mel power carries ~1e-6 relative error
per mel value and the DCT sums 128 of them).
"""
import numpy as np
import pytest
import scipy.fft
import torch

import mmfuse
import mmfuse.nn
from backend_params import backend_params
from test_spectrogram_kernels import poisoned  # noqa: F401  (fixture: outputs start as NaN)
from mmfuse.audio.filterbanks import create_dct
from mmfuse.ops import spectrogram_kernels as spec_ops
from test_spectrogram import assert_close_to_peak, mel64
from test_spectrogram_plain import speech

BACKENDS = backend_params("reference", "cpu", "triton")
pytestmark = pytest.mark.filterwarnings("ignore:mmfuse. at least one mel filter is all zero")


def mfcc64(x, *, sample_rate=16000, n_mfcc=40, norm="ortho", log_mels=False, melkwargs=None):
    """torchaudio MFCC's definition on a ``(T,)`` or ``(C, T)`` float64 NumPy clip (one clip:
    the 80 dB clamp's max spans its channels): ``(n_mfcc, frames)`` or ``(C, n_mfcc, frames)``."""
    x = np.asarray(x, dtype=np.float64)
    single = x.ndim == 1
    x = x[None] if single else x
    mel = np.stack([mel64(c, sample_rate=sample_rate, **(melkwargs or {})) for c in x])
    if log_mels:
        logs = np.log(mel + 1e-6)
    else:
        logs = 10.0 * np.log10(np.maximum(mel, 1e-10))
        logs = np.maximum(logs, logs.max() - 80.0)
    out = scipy.fft.dct(logs, type=2, norm=norm, axis=-2)[:, :n_mfcc]
    return out[0] if single else out


def check_mfcc(out, ref, dtype):
    if dtype == torch.float64:
        assert_close_to_peak(out, ref, atol=1e-9, rtol=1e-9)
    else:
        assert_close_to_peak(out, ref, atol=1e-5, rtol=1e-5)


CASES = [
    dict(),
    dict(log_mels=True),
    dict(norm=None, n_mfcc=13),
    dict(n_mfcc=20, melkwargs=dict(n_fft=512, hop_length=160, n_mels=40, mel_scale="slaney", norm="slaney")),
    dict(n_mfcc=23, melkwargs=dict(n_fft=257, win_length=200, hop_length=101, n_mels=31, f_min=50.0, f_max=7000.0,
                                  power=1.0, center=False)),
    dict(n_mfcc=37, melkwargs=dict(n_fft=512, hop_length=256, n_mels=150)),  # Triton: 256-mel tile, DCT in 16s
    dict(log_mels=True, n_mfcc=7, melkwargs=dict(n_fft=128, hop_length=48, n_mels=11, pad=5, pad_mode="constant",
                                                 normalized=True, window_fn=torch.hamming_window)),
]


def _id(case):
    # a function by its name, not its repr (an address, which differs between pytest-xdist workers)
    def show(v):
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}={show(x)}" for k, x in v.items()) + "}"
        return getattr(v, "__name__", None) or str(v)
    return ",".join(f"{k}={show(v)}" for k, v in case.items()) or "defaults"


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


def _quiet_item(x):
    """Item 1 of the batch 60 dB quieter, so torchaudio's shared 80 dB clamp engages on it."""
    x = x.clone()
    x[1] *= 1e-3
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_mfcc_matches_float64_oracle(case, backend, poisoned):
    n = 1601 if backend == "triton" else 8009
    x64 = _quiet_item(speech(3, n))
    ref = mfcc64(x64.numpy(), **case)  # a (C, T) batch is one clip for torchaudio
    for dtype in _dtypes(backend):
        out = mmfuse.mfcc(x64.to(dtype), backend=backend, **case)
        assert out.dtype == dtype and out.shape == ref.shape
        check_mfcc(out, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mfcc_top_db_max_is_torchaudios(backend, poisoned):
    """(T,): its own max; (C, T): one max over the channels; (B, C, T): one per leading index.
    The quiet item's coefficients differ between a shared and its own max, so this can fail."""
    x64 = _quiet_item(speech(4, 1201))
    kw = dict(n_mfcc=13, melkwargs=dict(n_fft=200, hop_length=80, n_mels=40))
    dtype = torch.float32 if backend == "triton" else torch.float64
    shared = mfcc64(x64[:2].numpy(), **kw)
    alone = mfcc64(x64[1].numpy(), **kw)
    assert np.abs(shared[1] - alone).max() > 1.0  # the clamp engages differently
    check_mfcc(mmfuse.mfcc(x64[1].to(dtype), backend=backend, **kw), alone, dtype)
    check_mfcc(mmfuse.mfcc(x64[:2].to(dtype), backend=backend, **kw), shared, dtype)
    out4 = mmfuse.mfcc(x64.reshape(2, 2, -1).to(dtype), backend=backend, **kw)
    ref4 = np.stack([mfcc64(x64[0:2].numpy(), **kw), mfcc64(x64[2:4].numpy(), **kw)])
    check_mfcc(out4, ref4, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_mels", [False, True])
@pytest.mark.parametrize("center", [True, False])
def test_mfcc_lengths_equal_items_alone(center, log_mels, backend, poisoned):
    x = _quiet_item(speech(3, 1499))
    lengths = torch.tensor([1499, 811, 97])
    padded = x.clone()
    for b, n in enumerate(lengths.tolist()):
        padded[b, n:] = 0.0
    melkwargs = dict(n_fft=160, hop_length=53, n_mels=23, center=center, pad_mode="reflect")
    kw = dict(n_mfcc=17, log_mels=log_mels, melkwargs=melkwargs)
    dtype = torch.float32 if backend == "triton" else torch.float64
    out, frame_lengths = mmfuse.mfcc(padded.to(dtype), lengths=lengths, backend=backend, **kw)
    for b, n in enumerate(lengths.tolist()):
        if not center and n < 160:  # shorter than one frame: no frames, all zero
            assert frame_lengths[b] == 0 and (out[b] == 0).all()
            continue
        alone = mfcc64(x[b, :n].numpy(), **kw)
        assert frame_lengths[b] == alone.shape[-1]
        check_mfcc(out[b, :, : alone.shape[-1]], alone, dtype)
        assert (out[b, :, alone.shape[-1]:] == 0).all()


GRAD_CASES = [
    dict(),
    dict(log_mels=True),
    dict(norm=None, melkwargs=dict(n_fft=32, hop_length=11, n_mels=9, power=1.0, center=False)),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_id)
def test_mfcc_cpu_gradcheck(case):
    kw = dict(sample_rate=8000, n_mfcc=5, melkwargs=dict(n_fft=32, hop_length=11, n_mels=9), backend="cpu") | case
    x = _quiet_item(torch.randn(2, 67, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: mmfuse.mfcc(w, **kw), (x,))
    lengths = torch.tensor([67, 41])
    assert torch.autograd.gradcheck(lambda w: mmfuse.mfcc(w, lengths=lengths, **kw)[0], (x,))


@pytest.mark.parametrize("log_mels", [False, True])
def test_mfcc_cpu_backward_matches_reference_autograd(log_mels):
    """The fused backward (DCT^T, the clamp's gradient incl. the max's, the dB log's) against
    autograd through the reference, with the clamp engaged on the quiet item."""
    x = _quiet_item(speech(3, 1601))
    x[2, :700] *= 1e-4  # a near-silent stretch: values below the 80 dB floor
    kw = dict(n_mfcc=19, log_mels=log_mels, melkwargs=dict(n_fft=200, hop_length=80, n_mels=41))
    ref_out = mmfuse.mfcc(x, backend="reference", **kw)
    if not log_mels:
        floor = ref_out.new_tensor(0)  # the clamp engages: some dB values equal the floor
        logs = 10 * torch.log10(torch.clamp(mmfuse.mel_spectrogram(x, n_fft=200, hop_length=80, n_mels=41,
                                                                  backend="reference"), min=1e-10))
        assert (logs < logs.max() - 80).any(), floor
    weights = torch.randn_like(ref_out)
    grads = {}
    for backend in ("cpu", "reference"):
        w = x.clone().requires_grad_()
        (mmfuse.mfcc(w, backend=backend, **kw) * weights).sum().backward()
        grads[backend] = w.grad
    torch.testing.assert_close(grads["cpu"], grads["reference"], rtol=1e-8, atol=1e-9 * grads["reference"].abs().max())


def _mfcc_op_args(top_db):
    x = torch.randn(2, 301, dtype=torch.float64)
    window = torch.hann_window(64, dtype=torch.float64)
    fb = torch.rand(33, 7, dtype=torch.float64)
    dct = create_dct(5, 7, "ortho")
    log_mode, floor = (3, 1e-10) if top_db >= 0 else (4, 1e-6)
    return (x, window, fb, torch.tensor([301, 150]), torch.tensor([19, 10]), 19, 64, 16, -32, 0, 1, False, 0.0, 2.0,
            log_mode, floor, 0, 0.0, False, False, dct, top_db, 1, False)


@pytest.mark.parametrize("top_db", [80.0, -1.0])
def test_mfcc_opcheck(top_db):
    args = _mfcc_op_args(top_db)
    torch.library.opcheck(torch.ops.mmfuse.mel_spectrogram.default, args)
    out = torch.ops.mmfuse.mel_spectrogram(*args)
    assert out.shape == (2, 5, 19)
    torch.library.opcheck(torch.ops.mmfuse.mel_spectrogram_backward.default, (torch.randn_like(out),) + args)


def test_mfcc_compile_fullgraph_cpu():
    layer = mmfuse.nn.MFCC(n_mfcc=13, melkwargs=dict(n_fft=256, hop_length=100, n_mels=32), backend="cpu")
    audio = torch.randn(2, 3203, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(audio), layer(audio), rtol=1e-5, atol=1e-4)
    compiled(audio).sum().backward()
    assert torch.isfinite(audio.grad).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nn_mfcc_equals_function(backend):
    x = speech(3, 2001).float()
    kw = dict(n_mfcc=20, norm=None, log_mels=False, melkwargs=dict(n_fft=300, n_mels=50, wkwargs={"periodic": False}))
    layer = mmfuse.nn.MFCC(16000, **kw, backend=backend)
    assert layer.dct_mat.shape == (50, 20)
    torch.testing.assert_close(layer(x), mmfuse.mfcc(x, 16000, **kw, backend=backend), rtol=0, atol=0)
    lengths = torch.tensor([2001, 1500, 400])
    out, frame_lengths = layer(x, lengths)
    ref, ref_lengths = mmfuse.mfcc(x, 16000, **kw, lengths=lengths, backend="reference")
    assert torch.equal(frame_lengths, ref_lengths)
    check_mfcc(out, ref.double(), torch.float32)


def test_create_dct_is_scipy():
    eye = np.eye(31)
    for norm in ("ortho", None):
        expected = scipy.fft.dct(eye, type=2, norm=norm, axis=0)[:17].T  # (n_mels, n_mfcc)
        np.testing.assert_allclose(create_dct(17, 31, norm).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dct_type=3), "dct_type"),
    (dict(norm="backward"), "norm"),
    (dict(n_mfcc=129), "n_mfcc"),
    (dict(n_mfcc=0), "n_mfcc"),
    (dict(log_mels=1), "log_mels"),
    (dict(melkwargs=dict(sample_rate=8000)), "melkwargs"),
    (dict(melkwargs=dict(n_ffts=400)), "melkwargs"),
    (dict(melkwargs=dict(onesided=True)), "onesided"),
    (dict(melkwargs=dict(n_mels=20)), "n_mfcc"),
    (dict(melkwargs=dict(power=-2.0)), "power"),
    (dict(melkwargs=[("n_fft", 400)]), "melkwargs"),
    (dict(sample_rate=-1), "sample_rate"),
])
def test_mfcc_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mmfuse.mfcc(torch.randn(2, 1000), **kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        mmfuse.nn.MFCC(**kwargs)


def test_mfcc_routing_reasons():
    x = torch.randn(2, 500)
    window, fb, dct = torch.hann_window(64), torch.rand(33, 8), create_dct(5, 8, "ortho").float()
    limits = spec_ops._kernel_limits(x, window, fb, dct=dct, top_db=80.0)
    assert "MFCC" in limits("cuda")
    assert limits("cpu") is None and limits("triton") is None
    assert "DCT" in spec_ops._kernel_limits(x, window, fb, dct=dct.requires_grad_())("cpu")
    if torch.cuda.is_available():  # asked for by name, the CUDA backend refuses MFCC with the reason
        with pytest.raises(ValueError, match="MFCC"):
            mmfuse.mfcc(x.cuda(), backend="cuda")


# ---------------------------------------------------------------------------------------------
# nn.MelSpectrogram: every torchaudio argument


def test_nn_mel_spectrogram_takes_every_torchaudio_argument():
    kw = dict(sample_rate=22050, n_fft=512, win_length=400, hop_length=128, f_min=30.0, f_max=8000.0, pad=2,
              n_mels=40, window_fn=torch.hamming_window, power=1.0, normalized=True, wkwargs={"periodic": False},
              center=True, pad_mode="replicate", onesided=None, norm="slaney", mel_scale="slaney")
    layer = mmfuse.nn.MelSpectrogram(**kw, backend="cpu")
    x = speech(2, 4001, sample_rate=22050)
    oracle_kw = {k: v for k, v in kw.items() if k not in ("onesided", "wkwargs")}
    window_fn = kw["window_fn"]
    oracle_kw["window_fn"] = lambda n, dtype: window_fn(n, dtype=dtype, periodic=False)
    ref = np.stack([mel64(x[b].numpy(), **oracle_kw) for b in range(2)])
    # the layer keeps its window and filterbank in the default dtype (float32)
    assert_close_to_peak(layer(x.float()), ref, atol=5e-4, rtol=1e-5)
    assert_close_to_peak(mmfuse.mel_spectrogram(x, **{k: v for k, v in kw.items() if k != "onesided"},
                                                backend="cpu"), ref, atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="onesided"):
        mmfuse.nn.MelSpectrogram(onesided=True)
