"""mmfuse.spectrogram and nn.Spectrogram: torchaudio's ``Spectrogram`` (power and complex).

Oracle: ``stft64``, torchaudio's ``functional.spectrogram`` definition in float64 NumPy
(explicit padding, framing, ``np.fft.fft``), independent of mmfuse and of torch.stft. Speech-like
input (a gliding harmonic voice, syllable envelope, noise). Tolerances as test_spectrogram.py:
float64 1e-9 of the peak; float32 atol 5e-4 of the peak, rtol 1e-5 (DESIGN.md).
"""
import numpy as np
import pytest
import torch

import mmfuse
import mmfuse.nn
from backend_params import backend_params
from test_spectrogram_kernels import poisoned  # noqa: F401  (fixture: outputs start as NaN)
from mmfuse.ops import spectrogram_kernels as spec_ops
from test_spectrogram import NP_PAD_MODES, assert_close_to_peak

BACKENDS = backend_params("reference", "cpu", "triton")


def speech(batch, n, sample_rate=16000, seed=0):
    """Speech-like float64 ``(batch, n)``: a voice gliding 110 -> 230 Hz with 12 harmonics
    (1/k amplitudes), a 4 Hz syllable envelope, a quiet stretch, and noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    out = []
    for b in range(batch):
        f0 = 110.0 + 120.0 * t / max(t[-1].item(), 1e-9) + 7.0 * b
        phase = 2 * np.pi * torch.cumsum(f0, 0) / sample_rate
        voice = sum(torch.sin(k * phase + k * b) / k for k in range(1, 13))
        envelope = 0.5 * (1 - torch.cos(2 * np.pi * 4.0 * t)) ** 2
        noise = torch.randn(n, generator=g, dtype=torch.float64)
        out.append(0.3 * voice * envelope + 0.01 * noise)
    return torch.stack(out)


def stft64(x, *, n_fft=400, win_length=None, hop_length=None, pad=0, window_fn=torch.hann_window, power=2.0,
           normalized=False, center=True, pad_mode="reflect", onesided=True, wkwargs=None):
    """torchaudio.functional.spectrogram's definition in float64 NumPy on a 1-D signal:
    (freq, frames), complex for power=None."""
    x = np.asarray(x, dtype=np.float64)
    win_length = win_length or n_fft
    hop_length = hop_length or win_length // 2
    window = window_fn(win_length, dtype=torch.float64, **(wkwargs or {})).numpy()
    left = (n_fft - win_length) // 2
    window = np.pad(window, (left, n_fft - win_length - left))
    x = np.pad(x, pad)
    if center:
        x = np.pad(x, n_fft // 2, mode=NP_PAD_MODES[pad_mode])
    n_frames = 1 + (len(x) - n_fft) // hop_length
    frames = np.stack([x[i * hop_length : i * hop_length + n_fft] for i in range(n_frames)])
    spec = np.fft.fft(frames * window, axis=-1).T  # (n_fft, frames)
    if onesided:
        spec = spec[: n_fft // 2 + 1]
    if normalized in (True, "window"):
        spec = spec / np.sqrt((window**2).sum())
    elif normalized == "frame_length":
        spec = spec / np.sqrt(n_fft)
    return spec if power is None else np.abs(spec) ** power


def check_close(out, ref, dtype):
    if torch.is_complex(out):
        out = torch.view_as_real(out)
        ref = torch.view_as_real(torch.as_tensor(ref))
    if dtype == torch.float64:
        assert_close_to_peak(out, ref, atol=1e-9, rtol=1e-9)
    else:
        assert_close_to_peak(out, ref, atol=5e-4, rtol=1e-5)


CASES = [
    dict(),
    dict(power=None),
    dict(power=1.0, normalized=True),
    dict(power=None, normalized="frame_length", onesided=False),
    dict(power=1.5, n_fft=257, win_length=200, hop_length=97, pad=3, pad_mode="replicate"),
    dict(power=None, center=False, n_fft=128, hop_length=41, window_fn=torch.hamming_window),
    dict(n_fft=255, hop_length=64, pad_mode="constant", onesided=False, wkwargs={"periodic": False}),
    dict(power=None, n_fft=64, win_length=37, hop_length=13, normalized="window", pad_mode="replicate"),
]


def _id(case):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in case.items()) or "defaults"


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_spectrogram_matches_float64_oracle(case, backend, poisoned):
    n = 1201 if backend == "triton" else 8009
    x64 = speech(3, n)
    ref = np.stack([stft64(x64[b].numpy(), **case) for b in range(3)])
    for dtype in _dtypes(backend):
        out = mmfuse.spectrogram(x64.to(dtype), backend=backend, **case)
        if case.get("power", 2.0) is None:
            assert out.dtype == (torch.complex64 if dtype == torch.float32 else torch.complex128)
        else:
            assert out.dtype == dtype
        assert out.shape == ref.shape
        check_close(out, ref, dtype)
        if backend == "cpu" and case.get("power", 2.0) is None:
            # without lengths the CPU backend takes ATen's FFT for the complex spectrum; with
            # them (all full here) the C++ kernel's complex_out path runs: test it on every case
            out_kernel, _ = mmfuse.spectrogram(x64.to(dtype), lengths=torch.full((3,), n), backend=backend, **case)
            check_close(out_kernel, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("power", [2.0, None])
def test_spectrogram_leading_dims_and_1d(power, backend):
    x = speech(4, 601).to(torch.float32).reshape(2, 2, 601)
    out = mmfuse.spectrogram(x, n_fft=64, hop_length=16, power=power, backend=backend)
    ref = mmfuse.spectrogram(x.double(), n_fft=64, hop_length=16, power=power, backend="reference")
    assert out.shape == (2, 2, 33, 1 + 601 // 16)
    check_close(out, ref, torch.float32)
    single = mmfuse.spectrogram(x[1, 0], n_fft=64, hop_length=16, power=power, backend=backend)
    check_close(single, ref[1, 0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("power", [2.0, None])
@pytest.mark.parametrize("center", [True, False])
def test_spectrogram_lengths_equal_items_alone(center, power, backend, poisoned):
    torch.manual_seed(1)
    x = speech(3, 997)
    lengths = torch.tensor([997, 613, 101])
    padded = x.clone()
    for b, n in enumerate(lengths.tolist()):
        padded[b, n:] = 0.0
    kw = dict(n_fft=96, hop_length=31, power=power, center=center, pad_mode="constant")
    dtype = torch.float32 if backend == "triton" else torch.float64
    out, frame_lengths = mmfuse.spectrogram(padded.to(dtype), lengths=lengths, backend=backend, **kw)
    for b, n in enumerate(lengths.tolist()):
        alone = stft64(x[b, :n].numpy(), **kw)
        assert frame_lengths[b] == alone.shape[-1]
        check_close(out[b, :, : alone.shape[-1]], alone, dtype)
        assert (out[b, :, alone.shape[-1]:] == 0).all()


@pytest.mark.parametrize("case", [dict(), dict(power=None), dict(power=1.0, onesided=False),
                                  dict(power=None, onesided=False, center=False)], ids=_id)
def test_spectrogram_cpu_gradcheck(case):
    kw = dict(n_fft=32, hop_length=11, backend="cpu") | case
    x = torch.randn(2, 67, dtype=torch.float64, requires_grad=True)

    def real(out):
        return torch.view_as_real(out) if out.is_complex() else out

    assert torch.autograd.gradcheck(lambda w: real(mmfuse.spectrogram(w, **kw)), (x,))
    lengths = torch.tensor([67, 41])
    assert torch.autograd.gradcheck(lambda w: real(mmfuse.spectrogram(w, lengths=lengths, **kw)[0]), (x,))


@pytest.mark.parametrize("power", [2.0, None])
def test_spectrogram_cpu_backward_matches_reference_autograd(power):
    x = speech(3, 1013)
    weights = None
    grads = {}
    for backend in ("cpu", "reference"):
        w = x.clone().requires_grad_()
        out = mmfuse.spectrogram(w, n_fft=120, hop_length=37, power=power, backend=backend)
        out = torch.view_as_real(out) if out.is_complex() else out
        if weights is None:
            weights = torch.randn_like(out)
        (out * weights).sum().backward()
        grads[backend] = w.grad
    torch.testing.assert_close(grads["cpu"], grads["reference"], rtol=1e-9, atol=1e-9)


def test_spectrogram_complex_opcheck():
    x = torch.randn(2, 301, dtype=torch.float64)
    window = torch.hann_window(64, dtype=torch.float64)
    args = (x, window, x.new_zeros(33, 0), torch.tensor([301, 150]), torch.tensor([19, 10]), 19, 64, 16, -32, 0, 1,
            False, 0.0, 2.0, 0, 0.0, 0, 0.0, False, False, None, -1.0, 1, True)
    torch.library.opcheck(torch.ops.mmfuse.mel_spectrogram.default, args)
    out = torch.ops.mmfuse.mel_spectrogram(*args)
    assert out.shape == (2, 33, 19, 2)
    torch.library.opcheck(torch.ops.mmfuse.mel_spectrogram_backward.default, (torch.randn_like(out),) + args)


@pytest.mark.parametrize("power", [2.0, None])
def test_spectrogram_compile_fullgraph_cpu(power):
    layer = mmfuse.nn.Spectrogram(n_fft=128, hop_length=40, power=power, backend="cpu")
    audio = torch.randn(2, 1601, requires_grad=True)

    def f(a):
        out = layer(a)
        return out.abs() if out.is_complex() else out

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(audio), f(audio), rtol=1e-5, atol=1e-5)
    compiled(audio).sum().backward()
    assert torch.isfinite(audio.grad).all()


def test_nn_spectrogram_equals_function():
    x = speech(2, 1601).float()
    layer = mmfuse.nn.Spectrogram(n_fft=100, win_length=80, hop_length=25, power=None, normalized=True,
                                  wkwargs={"periodic": False}, onesided=False, backend="cpu")
    out = layer(x)
    ref = mmfuse.spectrogram(x, n_fft=100, win_length=80, hop_length=25, power=None, normalized=True,
                             wkwargs={"periodic": False}, onesided=False, backend="reference")
    check_close(out, ref.to(torch.complex128), torch.float32)


def test_nn_spectrogram_return_complex():
    with pytest.warns(DeprecationWarning):
        mmfuse.nn.Spectrogram(power=None, return_complex=True)
    with pytest.raises(ValueError, match="return_complex"):
        mmfuse.nn.Spectrogram(power=None, return_complex=False)
    with pytest.raises(ValueError, match="return_complex"):
        mmfuse.nn.Spectrogram(power=2.0, return_complex=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(power=-1.0), "power"),
    (dict(power=0.0), "power"),
    (dict(onesided=1), "onesided"),
    (dict(normalized="frame"), "normalized"),
    (dict(win_length=500), "win_length"),
    (dict(hop_length=0), "hop_length"),
    (dict(pad_mode="circular"), "pad_mode"),
    (dict(center="yes"), "center"),
    (dict(window_fn=3), "window_fn"),
])
def test_spectrogram_rejects_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mmfuse.spectrogram(torch.randn(2, 1000), **kwargs)


def test_spectrogram_rejects_bad_waveform():
    with pytest.raises(TypeError, match="waveform.*float32"):
        mmfuse.spectrogram(torch.randn(2, 1000, dtype=torch.float64).to(torch.int32))
    with pytest.raises(ValueError, match="waveform"):
        mmfuse.spectrogram(torch.randn(2, 0))
    with pytest.raises(ValueError, match="lengths"):
        mmfuse.spectrogram(torch.randn(2, 1000), lengths=torch.tensor([1000, 1001]))


def test_cuda_backend_is_routed_away_from_complex_spectrum():
    x = torch.randn(2, 500)
    window = torch.hann_window(64)
    reason = spec_ops._kernel_limits(x, window, x.new_zeros(33, 0), complex_out=True)("cuda")
    assert reason is not None and "complex" in reason
    assert spec_ops._kernel_limits(x, window, torch.eye(33))("cuda") is None


@pytest.mark.parametrize("backend", backend_params("cuda"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrogram_cuda_power_and_refusals(dtype, backend):
    """On a GPU: the power spectrogram runs on the CUDA mel kernel (identity filterbank); the
    complex spectrum and MFCC are refused by name with the reason, and the C++ launcher's
    TORCH_CHECK refuses them if called directly."""
    x64 = speech(3, 4001)
    kw = dict(n_fft=400, hop_length=160, power=2.0)
    ref = np.stack([stft64(x64[b].numpy(), **kw) for b in range(3)])
    out = mmfuse.spectrogram(x64.to(dtype).cuda(), backend=backend, **kw)
    check_close(out.cpu(), ref, dtype)
    with pytest.raises(ValueError, match="complex"):
        mmfuse.spectrogram(x64.to(dtype).cuda(), power=None, backend=backend)
    with pytest.raises(ValueError, match="MFCC"):
        mmfuse.mfcc(x64.to(dtype).cuda(), backend=backend)
    x = x64.to(dtype).cuda()
    window = torch.hann_window(400, dtype=dtype, device="cuda")
    args = (x, window, x.new_zeros(201, 0), None, None, 26, 400, 160, -200, 0, 1, False, 0.0, 2.0, 0, 0.0, 0, 0.0,
            False, False, None, -1.0, 1, True)
    with pytest.raises(RuntimeError, match="complex"):
        torch.ops.mmfuse.mel_spectrogram(*args)
