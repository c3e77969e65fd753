"""The fused ``mmfuse::mel_spectrogram`` kernels (C++ CPU, Triton, CUDA) behind mel_spectrogram,
whisper_log_mel, kaldi_fbank and the audio layers.

Oracles and tolerances come from test_spectrogram.py (float64 NumPy STFT, Whisper's formula,
kaldi-native-fbank; DESIGN.md's spectrogram rule relative to the peak). Triton cases stay tiny:
on CPU they run under TRITON_INTERPRET=1.
"""
import numpy as np
import pytest
import torch

import mmfuse
import mmfuse.nn
from backend_params import backend_params, device_for
from mmfuse.audio.filterbanks import melscale_fbanks
from mmfuse.ops import spectrogram_kernels as spec_ops
from mmfuse.ops import spectrogram_ops
from test_spectrogram import (
    MEL_CASES,
    check_mel_tolerance,
    int16_audio,
    knf_fbank,
    mel64,
    whisper64,
)

KERNELS = backend_params("cpu", "triton", "cuda")
pytestmark = pytest.mark.filterwarnings("ignore:mmfuse. at least one mel filter is all zero")


def _case_id(case):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in case.items()) or "defaults"


@pytest.fixture
def poisoned():
    """Uninitialised outputs (torch.empty, at::empty) are filled with NaN: any element a
    kernel leaves unwritten shows up as NaN."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _dtype(backend):
    """The Triton kernel computes in float32; the others are checked in float64 too."""
    return torch.float32 if backend == "triton" else torch.float64


def _small(backend):
    """Signal length per backend: the interpreter runs Triton kernels slowly."""
    return 523 if backend == "triton" else 4001


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", MEL_CASES, ids=_case_id)
def test_mel_spectrogram_kernel_matches_float64_stft(case, dtype, backend, poisoned):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32")
    x = torch.randn(3, _small(backend), dtype=torch.float64)
    out = mmfuse.mel_spectrogram(x.to(device_for(backend), dtype), backend=backend, **case).cpu()
    assert out.dtype == dtype
    for b in range(3):
        check_mel_tolerance(out[b], mel64(x[b].numpy(), **case), dtype)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("n_fft", [2, 49, 254, 257, 2048])
def test_mel_spectrogram_kernel_fft_sizes(n_fft, backend, poisoned):
    """Radix 2 and 4 stages, a 127-point and a 257-point prime butterfly, odd sizes."""
    if backend == "triton" and n_fft > 300:
        pytest.skip("kept small for the interpreter")
    x = torch.randn(2, 3001, dtype=torch.float64)
    kw = dict(n_fft=n_fft, hop_length=max(1, n_fft // 3), n_mels=8, pad_mode="constant")
    for dtype in ([torch.float32] if backend == "triton" else [torch.float32, torch.float64]):
        out = mmfuse.mel_spectrogram(x.to(device_for(backend), dtype), backend=backend, **kw).cpu()
        for b in range(2):
            check_mel_tolerance(out[b], mel64(x[b].numpy(), **kw), dtype)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("n_samples", [1, 2, 401, 1009])
def test_mel_spectrogram_kernel_odd_lengths(n_samples, backend, poisoned):
    x = torch.randn(2, n_samples, dtype=torch.float64)
    kw = dict(n_fft=400, hop_length=160, n_mels=40, pad_mode="constant")
    out = mmfuse.mel_spectrogram(x.to(device_for(backend), torch.float32), backend=backend, **kw).cpu()
    for b in range(2):
        check_mel_tolerance(out[b], mel64(x[b].numpy(), **kw), torch.float32)
    if n_samples < 400:
        with pytest.raises(ValueError, match="n_fft"):
            mmfuse.mel_spectrogram(x.float(), backend=backend, center=False, **kw)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "replicate"])
@pytest.mark.parametrize("center", [True, False])
def test_mel_spectrogram_kernel_lengths_equal_items_alone(pad_mode, center, backend, poisoned):
    n = _small(backend)
    x = torch.randn(3, n, dtype=torch.float64)
    lengths = torch.tensor([n, n // 2 + 1, 389 if backend != "triton" else 241])
    for b, length in enumerate(lengths.tolist()):
        x[b, length:] = 0.0
    kw = dict(n_fft=256, hop_length=101, n_mels=32, pad_mode=pad_mode, center=center, pad=13)
    device, dtype = device_for(backend), _dtype(backend)
    mel, frame_lengths = mmfuse.mel_spectrogram(x.to(device, dtype), lengths=lengths.to(device), backend=backend, **kw)
    reference, ref_lengths = mmfuse.mel_spectrogram(x, lengths=lengths, backend="reference", **kw)
    assert torch.equal(frame_lengths.cpu(), ref_lengths)
    for b, length in enumerate(lengths.tolist()):
        alone = mmfuse.mel_spectrogram(x[b : b + 1, :length].to(device, dtype), backend=backend, **kw)[0].cpu()
        valid = int(ref_lengths[b])
        torch.testing.assert_close(mel[b, :, :valid].cpu(), alone, rtol=1e-12, atol=1e-12)
        check_mel_tolerance(mel[b].cpu(), reference[b], dtype)
        assert (mel[b, :, valid:] == 0).all()


@pytest.mark.parametrize("backend", KERNELS)
def test_mel_spectrogram_kernel_batch_equals_single_items(backend):
    x = torch.randn(2, 3, _small(backend), device=device_for(backend))
    out = mmfuse.mel_spectrogram(x, n_mels=40, backend=backend)
    for i in range(2):
        for j in range(3):
            single = mmfuse.mel_spectrogram(x[i, j], n_mels=40, backend=backend)
            torch.testing.assert_close(out[i, j], single, rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_kernel_matches_formula(n_mels, backend, poisoned):
    n = 1601 if backend == "triton" else 16001
    audio = torch.randn(2, n, dtype=torch.float64) * 0.1
    audio[1, n // 2 :] *= 1e-4  # a quiet half, so the max - 8 clamp bites
    out = mmfuse.whisper_log_mel(audio.to(device_for(backend), torch.float32), n_mels, backend=backend).cpu()
    assert out.shape == (2, n_mels, n // 160)
    for b in range(2):
        torch.testing.assert_close(out[b].double(), torch.from_numpy(whisper64(audio[b].numpy(), n_mels)),
                                   atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", KERNELS)
def test_whisper_log_mel_kernel_lengths_equal_items_alone(backend, poisoned):
    n = 1601 if backend == "triton" else 4801
    audio = torch.randn(3, n, dtype=torch.float64)
    lengths = torch.tensor([n, 1013, 201])
    for b, length in enumerate(lengths.tolist()):
        audio[b, length:] = 0.0
    device, dtype = device_for(backend), _dtype(backend)
    out, frame_lengths = mmfuse.whisper_log_mel(audio.to(device, dtype), lengths=lengths.to(device), backend=backend)
    assert frame_lengths.tolist() == [length // 160 for length in lengths.tolist()]
    atol = 2e-5 if dtype == torch.float32 else 1e-10
    for b, length in enumerate(lengths.tolist()):
        alone = torch.from_numpy(whisper64(audio[b, :length].numpy(), 80))
        torch.testing.assert_close(out[b, :, : length // 160].cpu().double(), alone, atol=atol, rtol=0)
        assert (out[b, :, length // 160 :] == 0).all()


KALDI_KERNEL_CASES = [
    dict(),
    dict(snip_edges=False),
    dict(use_energy=True),
    dict(use_energy=True, raw_energy=False, htk_compat=True, energy_floor=0.0),
    dict(window_type="hamming", num_mel_bins=40, remove_dc_offset=False),
    dict(window_type="rectangular", preemphasis_coefficient=0.0),
    dict(round_to_power_of_two=False, frame_length=20.0, frame_shift=7.0),
    dict(use_power=False),
    dict(use_log_fbank=False),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("case", KALDI_KERNEL_CASES, ids=_case_id)
def test_kaldi_fbank_kernel_matches_kaldi_native_fbank(case, backend, poisoned):
    x = int16_audio(2, 1201 if backend == "triton" else 5003)
    out = mmfuse.kaldi_fbank(x.to(device_for(backend), torch.float32), backend=backend, **case).cpu()
    for b in range(2):
        ref = knf_fbank(x[b].numpy(), **case)
        if case.get("use_log_fbank", True):
            torch.testing.assert_close(out[b].double(), torch.from_numpy(ref).double(), atol=1e-4, rtol=0)
        else:
            assert float((out[b].double() - torch.from_numpy(ref).double()).abs().max()) <= 1e-5 * float(np.abs(ref).max())


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("snip_edges", [True, False])
def test_kaldi_fbank_kernel_lengths_equal_items_alone(snip_edges, backend, poisoned):
    x = int16_audio(4, 1201 if backend == "triton" else 4001)
    lengths = torch.tensor([x.shape[1], 1111, 399, 97])
    for b, length in enumerate(lengths.tolist()):
        x[b, length:] = 0.0
    kw = dict(snip_edges=snip_edges, use_energy=True, subtract_mean=True)
    device = device_for(backend)
    feats, frame_lengths = mmfuse.kaldi_fbank(x.to(device, _dtype(backend)), lengths=lengths.to(device),
                                              backend=backend, **kw)
    reference, ref_lengths = mmfuse.kaldi_fbank(x, lengths=lengths, backend="reference", **kw)
    assert torch.equal(frame_lengths.cpu(), ref_lengths)
    atol = 1e-3 if backend == "triton" else 1e-9
    torch.testing.assert_close(feats.cpu().double(), reference, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Gradients, op contract, compile (C++ backend)


GRAD_CASES = [
    dict(power=2.0),
    dict(power=1.0, normalized=True),
    dict(power=1.5, pad=3, pad_mode="replicate"),
    dict(center=False, win_length=25, mel_scale="slaney", norm="slaney"),
    dict(n_fft=31, hop_length=7, pad_mode="constant"),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=_case_id)
def test_mel_spectrogram_cpu_gradcheck(case):
    kw = dict(n_fft=32, hop_length=11, n_mels=5, sample_rate=8000, backend="cpu") | case
    x = torch.randn(2, 67, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: mmfuse.mel_spectrogram(w, **kw), (x,))
    lengths = torch.tensor([67, 41])
    assert torch.autograd.gradcheck(lambda w: mmfuse.mel_spectrogram(w, lengths=lengths, **kw)[0], (x,))


def test_whisper_log_mel_cpu_gradcheck():
    audio = torch.randn(2, 523, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([523, 401])
    assert torch.autograd.gradcheck(lambda a: mmfuse.whisper_log_mel(a, lengths=lengths, backend="cpu")[0],
                                    (audio,), fast_mode=True)


@pytest.mark.parametrize("case", [dict(), dict(raw_energy=False, snip_edges=False, subtract_mean=True),
                                  dict(use_power=False, energy_floor=0.0)], ids=_case_id)
def test_kaldi_fbank_cpu_gradcheck(case):
    x = (torch.randn(2, 461, dtype=torch.float64) * 1000).requires_grad_()
    kw = dict(num_mel_bins=5, use_energy=True, frame_length=10.0, frame_shift=5.0, backend="cpu") | case
    lengths = torch.tensor([461, 430])
    # fast mode (a random direction): the full Jacobian of 922 inputs took 60 s of CI for three cases
    assert torch.autograd.gradcheck(lambda w: mmfuse.kaldi_fbank(w, lengths=lengths, **kw)[0], (x,), rtol=1e-4,
                                    fast_mode=True)


def _op_args(preset, dtype=torch.float64):
    """Arguments of mmfuse::mel_spectrogram for a small case of each front end."""
    x = torch.randn(2, 301, dtype=dtype)
    lengths = torch.tensor([301, 150])
    if preset == "torchaudio":
        window, fb = torch.hann_window(64, dtype=dtype), torch.rand(33, 7, dtype=dtype)
        frame_lengths = 1 + lengths // 16
        return (x, window, fb, lengths, frame_lengths, 1 + 301 // 16, 64, 16, -32, 0, 1, False, 0.0, 2.0, 0, 0.0,
                0, 0.0, False, False)
    if preset == "whisper":
        window, fb = torch.hann_window(40, dtype=dtype), torch.rand(21, 6, dtype=dtype)
        return (x, window, fb, None, None, 301 // 16, 40, 16, -20, 0, 1, False, 0.0, 2.0, 2, 1e-10, 0, 0.0,
                False, False)
    window, fb = torch.hann_window(50, dtype=dtype), torch.rand(33, 5, dtype=dtype)
    frame_lengths = (lengths + 10) // 20
    return (x * 1000, window, fb, lengths, frame_lengths, (301 + 10) // 20, 64, 20, -15, 0, 3, True, 0.97, 2.0,
            1, 1e-7, 1, 1.0, True, True)


@pytest.mark.parametrize("preset", ["torchaudio", "whisper", "kaldi"])
def test_mel_spectrogram_opcheck(preset):
    args = _op_args(preset)
    torch.library.opcheck(torch.ops.mmfuse.mel_spectrogram.default, args)
    out = torch.ops.mmfuse.mel_spectrogram(*args)
    torch.library.opcheck(torch.ops.mmfuse.mel_spectrogram_backward.default, (torch.randn_like(out),) + args)


class _Frontend(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.proj = torch.nn.Linear(layer.mel_fb.shape[1], 8)

    def forward(self, audio):
        return self.proj(self.layer(audio).transpose(-1, -2))


@pytest.mark.parametrize("layer", [lambda: mmfuse.nn.WhisperLogMel(80, backend="cpu"),
                                   lambda: mmfuse.nn.MelSpectrogram(n_fft=256, n_mels=32, backend="cpu")],
                         ids=["WhisperLogMel", "MelSpectrogram"])
def test_compile_fullgraph_cpu(layer):
    model = _Frontend(layer())
    audio = torch.randn(2, 3203, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(audio), model(audio), rtol=1e-5, atol=1e-5)
    compiled(audio).sum().backward()
    assert audio.grad is not None and torch.isfinite(audio.grad).all()


@pytest.mark.parametrize("layer", [lambda: mmfuse.nn.WhisperLogMel(80, backend="cpu"),
                                   lambda: mmfuse.nn.KaldiFbank(use_energy=True, backend="cpu")],
                         ids=["WhisperLogMel", "KaldiFbank"])
def test_export_cpu(layer):
    module = layer()
    audio = torch.randn(2, 3203) * 1000
    exported = torch.export.export(module, (audio,))
    torch.testing.assert_close(exported.module()(audio), module(audio), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input to the kernels


def test_kernel_backends_refuse_window_gradients():
    window = torch.hann_window(64, dtype=torch.float64, requires_grad=True)
    fb = melscale_fbanks(33, 0.0, 4000.0, 8, 8000, None, "htk")
    x = torch.randn(1, 300, dtype=torch.float64)
    kw = dict(n_fft=64, hop_length=16, pad=0, power=2.0, normalized=False, center=True, pad_mode="reflect", lengths=None)
    with pytest.raises(ValueError, match="window or the filterbank"):
        spectrogram_ops.mel_spectrogram_op(x, window, fb, backend="cpu", **kw)
    out = spectrogram_ops.mel_spectrogram_op(x, window, fb, backend="auto", **kw)  # auto: the reference
    out.sum().backward()
    assert window.grad is not None


@pytest.mark.parametrize("change,match", [
    (dict(index=2, value=torch.rand(30, 7, dtype=torch.float64)), "mel_fb"),
    (dict(index=1, value=torch.hann_window(65, dtype=torch.float64)), "window"),
    (dict(index=0, value=torch.randn(2, 301)), "window"),
    (dict(index=4, value=torch.tensor([20, 99])), "frame_lengths"),
    (dict(index=3, value=torch.tensor([301, 302])), "lengths"),
    (dict(index=10, value=7), "pad_mode"),
    (dict(index=7, value=0), "hop"),
])
def test_op_rejects_bad_arguments(change, match):
    args = list(_op_args("torchaudio"))
    args[change["index"]] = change["value"]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmfuse.mel_spectrogram(*args)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels, forward and waveform gradient (the emulator proves the same kernel bodies
# without a GPU: test_mel_spectrogram_emulator.py)

CUDA_FRONT_ENDS = [
    ("mel_spectrogram", dict(n_fft=100, win_length=61, hop_length=23, n_mels=16, pad_mode="replicate", pad=5)),
    ("mel_spectrogram", dict(n_fft=63, hop_length=17, n_mels=10, power=1.0, normalized=True, pad_mode="constant")),
    ("mel_spectrogram", dict(n_fft=64, hop_length=13, n_mels=8, center=False, power=1.5)),
    ("whisper_log_mel", dict()),
    ("kaldi_fbank", dict(snip_edges=False, use_energy=True, subtract_mean=True)),
    ("kaldi_fbank", dict(use_energy=True, raw_energy=False, htk_compat=True, energy_floor=0.0)),
    ("kaldi_fbank", dict(use_power=False, round_to_power_of_two=False, frame_length=20.0, frame_shift=7.0)),
]


def _cuda_case_input(name, kw):
    """(B=3, T) input of the front end's scale with lengths: full, about half, the shortest allowed."""
    if name == "kaldi_fbank":
        x = int16_audio(3, 4001)
        lengths = torch.tensor([4001, 1111, 0 if kw.get("snip_edges", True) else 97])
    elif name == "whisper_log_mel":
        x = torch.randn(3, 4801, dtype=torch.float64) * 0.1
        x[0, 2400:] *= 1e-6  # the max - 8 clamp bites
        lengths = torch.tensor([4801, 1013, 201])
    else:
        x = torch.randn(3, 2003, dtype=torch.float64)
        short = 0 if kw.get("pad_mode") == "constant" or not kw.get("center", True) else 1
        lengths = torch.tensor([2003, 1001, short])
    for b, length in enumerate(lengths.tolist()):
        x[b, length:] = 0.0
    return x, lengths


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,kw", CUDA_FRONT_ENDS, ids=lambda v: v if isinstance(v, str) else _case_id(v))
def test_cuda_kernels_forward_and_gradient_match_reference(name, kw, dtype):
    fn = getattr(mmfuse, name)
    x64, lengths = _cuda_case_input(name, kw)
    x = x64.to("cuda", dtype).requires_grad_()
    out, frame_lengths = fn(x, lengths=lengths.cuda(), backend="cuda", **kw)
    ref_x = x64.clone().requires_grad_()
    ref, ref_lengths = fn(ref_x, lengths=lengths, backend="reference", **kw)
    assert torch.equal(frame_lengths.cpu(), ref_lengths)
    log_features = name != "mel_spectrogram"
    if log_features:
        atol = 1e-9 if dtype == torch.float64 else (2e-5 if name == "whisper_log_mel" else 1e-4)
        torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=atol, rtol=0)
    else:
        for b in range(3):
            check_mel_tolerance(out[b].detach().cpu(), ref[b].detach(), dtype)
    weights = torch.randn(ref.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights.to("cuda", dtype)).sum(), x)
    (again,) = torch.autograd.grad((fn(x, lengths=lengths.cuda(), backend="cuda", **kw)[0]
                                    * weights.to("cuda", dtype)).sum(), x)
    assert torch.equal(grad, again), "the backward must be deterministic"
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_x)
    grad = grad.cpu().double()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    bound = tol * ref_grad.abs().max() + tol * ref_grad.abs()
    assert ((grad - ref_grad).abs() <= bound).all(), f"max gradient error {(grad - ref_grad).abs().max():.3e}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_kernel_rejects_bad_lengths():
    args = list(_op_args("torchaudio"))
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    args[3] = torch.tensor([301, 302], device="cuda")
    with pytest.raises(RuntimeError, match="lengths"):
        torch.ops.mmfuse.mel_spectrogram(*args)


def test_triton_backend_names_its_mel_bin_limit():
    """More mel bins than the Triton kernel's largest compiled tile go elsewhere, with the reason."""
    wave = torch.randn(2, 4000)
    reason = spec_ops._kernel_limits(wave, torch.hann_window(400), torch.rand(201, 513))("triton")
    assert reason == "the Triton kernel takes at most 512 mel bins, got 513"
    assert spec_ops._kernel_limits(wave, torch.hann_window(400), torch.rand(201, 512))("triton") is None
