"""The Triton backward of ``mmfuse::mel_spectrogram`` (mmfuse/triton/mel_backward.py): gradients
w.r.t. the waveform of spectrogram (every power, the complex spectrum), mfcc (dB with the top_db
clamp, log_mels), mel_spectrogram and whisper_log_mel on the Triton backend, against the float64
reference.

Rule (DESIGN.md, fp32 kernels): ``max|g - g64| <= 3 max|g_torch32 - g64| + 1e-5 max|g64|``, with
``g_torch32`` the reference composition run in float32. Tiny, odd sizes: on CPU these run under
TRITON_INTERPRET=1.
"""
import pytest
import torch

import mmfuse
from backend_params import device_for
from mmfuse.ops import spectrogram_kernels as spec_ops

pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:mmfuse. at least one mel filter is all zero")]
DEVICE = device_for("triton")


@pytest.fixture
def poisoned():
    """Uninitialised tensors (torch.empty) are filled with NaN: an intermediate the backward
    leaves unwritten shows up as NaN in the gradient."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _grads(fn, x64, **kw):
    """(triton fp32, reference fp64, reference fp32) gradients of <out, g> for one random g."""
    outs = {}
    for name, dtype, backend in (("triton", torch.float32, "triton"), ("ref64", torch.float64, "reference"),
                                 ("ref32", torch.float32, "reference")):
        x = x64.to(device=DEVICE, dtype=dtype).requires_grad_()
        outs[name] = (x, _first(fn(x, backend=backend, **kw)))
    ref = outs["ref64"][1]
    g = torch.randn(ref.shape, dtype=ref.dtype, device=DEVICE)
    grads = {}
    for name, (x, out) in outs.items():
        (grads[name],) = torch.autograd.grad(out, x, g.to(out.dtype))
    return grads["triton"].double(), grads["ref64"], grads["ref32"].double()


def check_grad(fn, x64, **kw):
    got, ref, ref32 = _grads(fn, x64, **kw)
    assert torch.isfinite(got).all()
    err, err32, scale = (got - ref).abs().max().item(), (ref32 - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 3 * err32 + 1e-5 * scale, f"max |grad - ref64| {err:.3g}, torch fp32 {err32:.3g}, peak {scale:.3g}"
    return got, ref


SPEC_CASES = [
    dict(power=2.0),
    dict(power=1.0, normalized=True),
    dict(power=1.5, pad=3, pad_mode="replicate"),
    dict(power=0.7, pad_mode="constant"),
    dict(power=2.0, center=False, win_length=25),
    dict(power=None),
    dict(power=None, center=False, pad=2),
    dict(power=1.0, onesided=False),
]


def _id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", SPEC_CASES, ids=_id)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_spectrogram_grad(case, with_lengths, poisoned):
    x = torch.randn(3, 211, dtype=torch.float64)
    kw = dict(n_fft=31, hop_length=7) | case
    if with_lengths:
        kw["lengths"] = torch.tensor([211, 97, 40], device=DEVICE)
    check_grad(mmfuse.spectrogram, x, **kw)


MFCC_CASES = [
    dict(),
    dict(log_mels=True),
    dict(norm=None, melkwargs=dict(power=1.0, center=False)),
]


@pytest.mark.parametrize("case", MFCC_CASES, ids=_id)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_mfcc_grad(case, with_lengths, poisoned):
    x = torch.randn(3, 263, dtype=torch.float64)
    x[1, 60:] *= 1e-5  # a quiet stretch: values below max - 80 dB, clamped (zero gradient there)
    melkwargs = dict(n_fft=32, hop_length=9, n_mels=11) | case.get("melkwargs", {})
    kw = dict(n_mfcc=7, sample_rate=8000) | case | dict(melkwargs=melkwargs)
    if with_lengths:
        kw["lengths"] = torch.tensor([263, 150, 71], device=DEVICE)
    check_grad(mmfuse.mfcc, x, **kw)


def test_mfcc_grad_channel_groups():
    """(..., C, T): top_db's max over each item's C channels (top_db_group = C)."""
    x = torch.randn(2, 3, 157, dtype=torch.float64)
    x[0, 1] *= 1e-5
    check_grad(mmfuse.mfcc, x, n_mfcc=5, sample_rate=8000, melkwargs=dict(n_fft=24, hop_length=8, n_mels=9))


def test_mel_spectrogram_grad_lengths():
    x = torch.randn(3, 301, dtype=torch.float64)
    check_grad(mmfuse.mel_spectrogram, x, sample_rate=8000, n_fft=40, hop_length=13, n_mels=10, power=1.5,
               mel_scale="slaney", norm="slaney", lengths=torch.tensor([301, 120, 33], device=DEVICE))


def test_whisper_log_mel_grad():
    x = torch.randn(2, 1283, dtype=torch.float64) * 0.1
    x[1, 700:] *= 1e-4  # below the item's max - 8: clamped
    check_grad(mmfuse.whisper_log_mel, x, lengths=torch.tensor([1283, 1000], device=DEVICE))


@pytest.mark.parametrize("power", [1.0, 0.7, None, 2.0])
def test_silent_frames(power):
    """Frames of exact zeros: |X| = 0, whose |X|^p gradient is taken as 0 for p < 2 (no NaN)."""
    x = torch.randn(2, 200, dtype=torch.float64)
    x[:, 40:160] = 0.0
    got, ref = check_grad(mmfuse.spectrogram, x, n_fft=16, hop_length=8, power=power, center=False)
    if power is not None and power < 2.0:
        assert (got[:, 56:144] == 0).all()


def test_mfcc_silent_frames():
    """mel = 0 < amin: the dB log's clamp passes no gradient; the DCT and top_db still do elsewhere."""
    x = torch.randn(1, 220, dtype=torch.float64)
    x[:, 50:170] = 0.0
    got, _ = check_grad(mmfuse.mfcc, x, n_mfcc=6, sample_rate=8000,
                        melkwargs=dict(n_fft=16, hop_length=8, n_mels=8, center=False))
    assert (got[:, 66:154] == 0).all()


def _mfcc_op_args():
    x = torch.randn(2, 233)
    x[1, 100:] *= 1e-5
    lengths = torch.tensor([233, 170])
    args = (x, torch.hann_window(30), torch.rand(16, 7), lengths, 1 + lengths // 9, 1 + 233 // 9, 30, 9, -15, 0, 1,
            False, 0.0, 1.5, 3, 1e-10, 0, 0.0, False, False, torch.randn(7, 5), 80.0, 1, False)
    return args, (2, 5, 1 + 233 // 9)


def _kaldi_op_args():
    """Kaldi's fused op call: snip_edges, DC removal, pre-emphasis, raw energy first, floored, frames-major."""
    x = torch.randn(2, 301) * 1000
    x[1] *= 1e-4
    lengths = torch.tensor([301, 250])
    frame_lengths = 1 + (lengths - 60) // 31
    args = (x, torch.hann_window(60), torch.rand(33, 6), lengths, frame_lengths, 1 + (301 - 60) // 31, 64, 31, 0, 0,
            0, True, 0.97, 2.0, 1, 1.1920928955078125e-07, 1, 1.0, False, True)
    return args, (2, 1 + (301 - 60) // 31, 7)


@pytest.mark.parametrize("make_args", [_mfcc_op_args, _kaldi_op_args], ids=["mfcc", "kaldi"])
def test_backward_op_matches_cpu_kernel_backward(make_args):
    """The Triton backward op against the C++ one on the same fp32 inputs."""
    if "cpu" not in mmfuse.available_backends() or DEVICE.type != "cpu":
        pytest.skip("needs the C++ kernels and CPU tensors")
    args, out_shape = make_args()
    grad = torch.randn(out_shape)
    want = torch.ops.mmfuse.mel_spectrogram_backward(grad, *args)
    from mmfuse.triton import mel_backward

    got = mel_backward.mel_spectrogram_backward_triton(grad, *args)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(ValueError, match="grad must be float32"):
        mel_backward.mel_spectrogram_backward_triton(grad[:, :-1], *args)


KALDI_CASES = [
    dict(use_energy=True),
    dict(use_energy=True, raw_energy=False, snip_edges=False, subtract_mean=True),
    dict(use_energy=True, use_power=False, energy_floor=0.0, htk_compat=True),
    dict(use_log_fbank=False, remove_dc_offset=False, preemphasis_coefficient=0.0),
]


@pytest.mark.parametrize("case", KALDI_CASES, ids=_id)
def test_kaldi_fbank_grad(case, poisoned):
    x = torch.randn(3, 461, dtype=torch.float64) * 1000
    x[2] *= 1e-4  # log energy below ln(energy_floor = 1): floored, no gradient
    kw = dict(num_mel_bins=5, frame_length=10.0, frame_shift=5.0) | case
    check_grad(mmfuse.kaldi_fbank, x, lengths=torch.tensor([461, 430, 300], device=DEVICE), **kw)


def test_routing_keeps_gradients_on_triton():
    """A waveform that needs a gradient stays on Triton (auto picks it on a GPU without the CUDA
    kernel on the verified list); window or filterbank gradients still go to the reference."""
    x = torch.randn(2, 300, device=DEVICE, requires_grad=True)
    window, fb = torch.hann_window(32, device=DEVICE), torch.rand(17, 5, device=DEVICE)
    assert spec_ops._kernel_limits(x, window, fb)("triton") is None
    assert spec_ops._kernel_limits(x, window, fb, complex_out=True)("triton") is None
    assert spec_ops._kernel_limits(x, window, fb, dct=torch.randn(5, 3, device=DEVICE), top_db=80.0)("triton") is None
    assert "reference" in spec_ops._kernel_limits(x, window, fb.requires_grad_())("triton")
