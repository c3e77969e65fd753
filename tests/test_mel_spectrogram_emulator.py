"""The CUDA mel spectrogram kernels (csrc/cuda/mel_spectrogram_kernel.cuh) on the host emulator.

The harness (tests/emulator/mel_spectrogram.cpp) runs mel_forward / mel_backward, the launch
sequences of the CUDA launcher, and takes mmfuse::mel_spectrogram's arguments. It stands in for
the compiled op inside mmfuse.ops.spectrogram (its "reference" entry of each front end's table is
swapped for the kernel contract ``_spectrogram_kernel`` / ``_whisper_log_mel_kernel`` /
``_kaldi_fbank_kernel`` called with the emulated op), so the public functions' validation and
argument mapping run exactly as for backend="cuda". Forward and waveform gradient are compared
with the float64 reference and its autograd: float32 at DESIGN.md's spectrogram tolerance (log
features and gradients at the tolerances below), float64 to 1e-9 of the peak.
"""
import functools

import pytest
import torch

import mmfuse
from emulator_build import HARNESS_DIR, load_harness
from mmfuse.ops import spectrogram_kernels as spec_ops

pytestmark = [pytest.mark.emulator, pytest.mark.filterwarnings("ignore:mmfuse. at least one mel filter is all zero")]


def assert_close_to_peak(out, ref, *, atol, rtol):
    """|out - ref| <= atol * max|ref| + rtol * |ref| everywhere (test_spectrogram.py's rule; that
    module needs librosa and kaldi_native_fbank, which these tests do not)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = (out - ref).abs()
    bound = atol * ref.abs().max() + rtol * ref.abs()
    assert (err <= bound).all(), f"max error {err.max():.3e}, max error/peak {(err.max() / ref.abs().max()):.3e}"


def check_mel_tolerance(out, ref, dtype):
    """DESIGN.md's spectrogram rule: mel power atol 5e-4 of the peak, rtol 1e-5 (1e-9 in float64)."""
    tol = 1e-9 if dtype == torch.float64 else None
    assert_close_to_peak(out, ref, atol=tol or 5e-4, rtol=tol or 1e-5)


def int16_audio(*shape):
    """Kaldi's input scale: integer samples in the int16 range."""
    return torch.randint(-20000, 20000, shape).to(torch.float64)


def harness():
    return load_harness("mel_spectrogram", HARNESS_DIR / "mel_spectrogram.cpp")


def _suffix(dtype):
    return str(dtype).removeprefix("torch.")


def _harness_args(waveform, window, mel_fb, lengths, frame_lengths, numbers):
    (num_frames, n_fft, hop, frame_offset, pad, pad_mode, remove_dc, preemphasis, power, log_mode, log_floor,
     energy_mode, energy_floor, energy_last, frames_major) = numbers
    return (waveform, window, mel_fb, lengths, frame_lengths, waveform.shape[0], waveform.shape[1], window.shape[0],
            mel_fb.shape[1], int(num_frames), int(n_fft), int(hop), int(frame_offset), int(pad), int(pad_mode),
            int(remove_dc), float(preemphasis), float(power), int(log_mode), float(log_floor), int(energy_mode),
            float(energy_floor), int(energy_last), int(frames_major))


class EmulatedMelSpectrogram(torch.autograd.Function):
    """``torch.ops.mmfuse.mel_spectrogram`` (same arguments) on the emulator, its gradient
    w.r.t. the waveform from the emulated ``mel_spectrogram_backward``."""

    @staticmethod
    def forward(ctx, waveform, window, mel_fb, lengths, frame_lengths, *all_numbers):
        # the schema's trailing (dct, top_db, top_db_group, complex_out) are MFCC's and the complex
        # spectrum's, which the CUDA kernel does not have: they must be at their defaults here
        numbers, extra = all_numbers[:15], tuple(all_numbers[15:])
        assert extra in ((), (None, -1.0, 1, False)), f"the CUDA kernel takes no dct/top_db/complex_out, got {extra}"
        ctx.extra = len(extra)
        num_frames, frames_major = numbers[0], numbers[-1]
        n_feats = mel_fb.shape[1] + int(numbers[11] != 0)
        shape = (waveform.shape[0], num_frames, n_feats) if frames_major else (waveform.shape[0], n_feats, num_frames)
        out = torch.full(shape, float("nan"), dtype=waveform.dtype)  # poison: every element must be written
        getattr(harness(), f"mel_forward_{_suffix(waveform.dtype)}")(
            out, *_harness_args(waveform, window, mel_fb, lengths, frame_lengths, numbers))
        ctx.save_for_backward(waveform, window, mel_fb, lengths, frame_lengths)
        ctx.numbers = numbers
        return out

    @staticmethod
    def backward(ctx, grad):
        waveform, window, mel_fb, lengths, frame_lengths = ctx.saved_tensors
        grad_wave = torch.full_like(waveform, float("nan"))
        getattr(harness(), f"mel_backward_{_suffix(waveform.dtype)}")(
            grad_wave, grad.contiguous(), *_harness_args(waveform, window, mel_fb, lengths, frame_lengths, ctx.numbers))
        return (grad_wave,) + (None,) * (4 + len(ctx.numbers) + ctx.extra)


def _emulated_op():
    return EmulatedMelSpectrogram.apply


@pytest.fixture
def emulated(monkeypatch):
    """Calls ``fn(backend="reference")`` with each front end's "reference" entry replaced by the
    fused-op contract on the emulated kernel."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setitem(spec_ops._MEL_SPECTROGRAM, "reference",
                      functools.partial(spec_ops._spectrogram_kernel, _emulated_op))
            m.setitem(spec_ops._WHISPER_LOG_MEL, "reference",
                      functools.partial(spec_ops._whisper_log_mel_kernel, _emulated_op))
            m.setitem(spec_ops._KALDI_FBANK, "reference", functools.partial(spec_ops._kaldi_fbank_kernel, _emulated_op))
            return fn(*args, backend="reference", **kwargs)

    return run


def _features(result):
    return result[0] if isinstance(result, tuple) else result


def _compare(fn, x64, lengths, dtype, emulated, check_forward, grad_atol, **kwargs):
    """Forward and waveform gradient of ``fn`` on the emulator in ``dtype`` against the float64
    reference: the gradient of sum(out * weights) for random weights."""
    x = x64.to(dtype).requires_grad_()
    extra = {} if lengths is None else {"lengths": lengths}
    out = emulated(fn, x, **extra, **kwargs)
    ref_x = x64.clone().requires_grad_()
    ref = fn(ref_x, backend="reference", **extra, **kwargs)
    if lengths is not None:
        assert torch.equal(out[1], ref[1])
    out, ref = _features(out), _features(ref)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    check_forward(out.detach(), ref.detach())
    weights = torch.randn(ref.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights.to(dtype)).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_x)
    assert torch.isfinite(grad).all()
    if lengths is not None:  # samples past an item's length get no gradient
        for b, length in enumerate(lengths.tolist()):
            assert (grad[b, length:] == 0).all()
    assert_close_to_peak(grad, ref_grad, atol=1e-9 if dtype == torch.float64 else grad_atol,
                         rtol=1e-9 if dtype == torch.float64 else 1e-4)


def _power_check(dtype):
    def check(out, ref):
        for b in range(ref.shape[0]):
            check_mel_tolerance(out[b], ref[b], dtype)
    return check


def _log_check(dtype, atol):
    def check(out, ref):
        torch.testing.assert_close(out.double(), ref, atol=1e-9 if dtype == torch.float64 else atol, rtol=0)
    return check


DTYPES = [torch.float32, torch.float64]

MEL_CASES = [
    dict(n_fft=64, hop_length=16, n_mels=12, sample_rate=8000),
    dict(n_fft=63, hop_length=17, n_mels=10, pad_mode="constant", power=1.0, normalized=True),
    dict(n_fft=100, win_length=61, hop_length=23, n_mels=16, pad_mode="replicate", pad=5),
    dict(n_fft=64, hop_length=13, n_mels=8, center=False, power=1.5, normalized="frame_length"),
    dict(n_fft=48, hop_length=11, n_mels=9, pad=3, mel_scale="slaney", norm="slaney", sample_rate=8000),
    dict(n_fft=50, hop_length=9, n_mels=8, pad_mode="replicate", sample_rate=8000),
]


def _mel_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


def _min_length(case):
    """The shortest item mel_spectrogram accepts for the case (0 where the padding allows)."""
    if not case.get("center", True) or case.get("pad_mode", "reflect") == "constant":
        return 0
    pad = case.get("pad", 0)
    need = case["n_fft"] // 2 + 1 - 2 * pad if case.get("pad_mode", "reflect") == "reflect" else 1 - 2 * pad
    return max(need, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MEL_CASES, ids=_mel_id)
@pytest.mark.parametrize("batch", [1, 3])
def test_mel_spectrogram_matches_reference(batch, case, dtype, emulated):
    n = 401
    x = torch.randn(batch, n, dtype=torch.float64)
    lengths = None
    if batch == 3:
        lengths = torch.tensor([n, 173, _min_length(case)])
        for b, length in enumerate(lengths.tolist()):
            x[b, length:] = 0.0
    _compare(mmfuse.mel_spectrogram, x, lengths, dtype, emulated, _power_check(dtype), grad_atol=2e-5, **case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_whisper_log_mel_matches_reference(batch, dtype, emulated):
    n = 3200  # 0.2 s
    audio = torch.randn(batch, n, dtype=torch.float64) * 0.1
    audio[0, n // 2:] *= 1e-6  # a quiet half: the clamp at the max - 8 bites, and its gradient flows
    lengths = None
    if batch == 3:
        lengths = torch.tensor([n, 1601, 201])  # 201: the shortest item reflect padding allows
        for b, length in enumerate(lengths.tolist()):
            audio[b, length:] = 0.0
    _compare(mmfuse.whisper_log_mel, audio, lengths, dtype, emulated, _log_check(dtype, 2e-5), grad_atol=1e-4)


KALDI_CASES = [
    dict(),
    dict(snip_edges=False, use_energy=True),
    dict(use_energy=True, raw_energy=False, htk_compat=True, energy_floor=0.0),
    dict(use_power=False, round_to_power_of_two=False, frame_length=20.0, frame_shift=7.0, use_energy=True),
    dict(snip_edges=False, subtract_mean=True, window_type="hamming", remove_dc_offset=False),
    dict(preemphasis_coefficient=0.0, window_type="rectangular", use_log_fbank=False, num_mel_bins=13),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KALDI_CASES, ids=lambda c: _mel_id(c) or "defaults")
@pytest.mark.parametrize("batch", [1, 3])
def test_kaldi_fbank_matches_reference(batch, case, dtype, emulated):
    n = 1601
    x = int16_audio(batch, n)
    lengths = None
    if batch == 3:
        lengths = torch.tensor([n, 97 if not case.get("snip_edges", True) else 719, 0])
        for b, length in enumerate(lengths.tolist()):
            x[b, length:] = 0.0
    kw = dict(num_mel_bins=17) | case
    if kw.get("use_log_fbank", True):
        check = _log_check(dtype, 1e-4)
    else:
        check = _power_check(dtype)
    _compare(mmfuse.kaldi_fbank, x, lengths, dtype, emulated, check, grad_atol=1e-4, **kw)


@pytest.mark.parametrize("n_fft", [2, 257, 2048])
def test_fft_sizes(n_fft, emulated):
    """A 2-point DFT, a prime size and the largest documented size (a tile of fewer frames)."""
    x = torch.randn(1, 2 * n_fft + 37, dtype=torch.float64)
    kw = dict(n_fft=n_fft, hop_length=max(1, n_fft // 2 + 1), n_mels=6, pad_mode="constant")
    _compare(mmfuse.mel_spectrogram, x, None, torch.float32, emulated, _power_check(torch.float32), grad_atol=2e-5, **kw)


def test_kaldi_short_item_reflects_repeatedly(emulated):
    """snip_edges=False on an item shorter than half a window: Kaldi's reflection wraps many
    times, so a sample is read by many padded positions of one frame."""
    x = int16_audio(2, 900)
    lengths = torch.tensor([900, 23])
    x[1, 23:] = 0.0
    _compare(mmfuse.kaldi_fbank, x, lengths, torch.float64, emulated, _log_check(torch.float64, 0.0),
             grad_atol=0.0, snip_edges=False, use_energy=True, num_mel_bins=7)
