"""Bank conflicts and coalescing of the CUDA kernels, counted by the emulator per warp-wide request.

The sanitizer build of a harness (csrc/emu/cuda_emu.h) groups each instruction's accesses by
warp: shared memory in passes through the 32 four-byte banks (ideal: one per 128 bytes), global
memory in 32-byte sectors (ideal: the bytes / 32). These tests hold the layouts to what they were
designed for: the attention tiles' ldmatrix and cp.async conflict-free and their global loads
coalesced; the mel DFT's twiddles at most a quarter of a pass per step (they were 2.6-3.3 per
read); no work for key tiles without a valid key in the dK/dV kernel. tools/emu_report.py prints
the full table per kernel.
"""
import functools
import math

import pytest
import torch

import mmfuse
import test_mel_spectrogram_emulator as mel_tests
from emulator_build import HARNESS_DIR, load_harness
from mmfuse.ops import spectrogram_kernels as spec_ops
from test_cross_attention_emulator import backward, forward, padded_sizes

pytestmark = [pytest.mark.emulator, pytest.mark.sanitize]

TWIDDLE_RESYNC = 17  # mel::kTwiddleResync


def attention_counts(len_q, len_k, head_dim, *, kv_lens=None, grads=True, dtype=torch.float16):
    lib = load_harness("cross_attention", HARNESS_DIR / "cross_attention.cpp", sanitize=True)
    lib.count_requests(True)
    q = torch.randn(1, len_q, 2, head_dim).to(dtype)
    k, v = (torch.randn(1, len_k, 1, head_dim).to(dtype) for _ in range(2))
    args = padded_sizes(q, k, kv_lens, None, 1 / math.sqrt(head_dim), False)
    out, lse = forward(q, k, v, (1, 2, len_q), args, lib)
    if grads:
        backward(torch.randn_like(q), None, q, k, v, out, lse, args, lib)
    counts = lib.request_counts()
    lib.count_requests(False)
    return counts


@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_tiles_are_conflict_free_and_loads_coalesced(head_dim):
    counts = attention_counts(77, 130, head_dim)
    ldmatrix = [c for c in counts if c.space == "shared" and "(ldmatrix_x4" in c.site]
    cp_async_shared = [c for c in counts if c.space == "shared" and "(cp_async_16)" in c.site]
    cp_async_global = [c for c in counts if c.space == "global" and "(cp_async_16)" in c.site]
    # every kernel with tiles: forward, dK/dV, dQ; A, B (K) and B (V, .trans) operands
    assert {c.kernel.split("<")[0] for c in ldmatrix} == {
        "attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"}
    assert len(ldmatrix) >= 9 and all(c.requests > 0 for c in ldmatrix)
    for c in ldmatrix + cp_async_shared:
        assert c.passes == c.ideal, f"{c.kernel} {c.site}: {c.passes} bank passes for {c.ideal}"
    for c in cp_async_global:
        assert c.passes == c.ideal, f"{c.kernel} {c.site}: {c.passes} sectors for {c.ideal}"


def test_dkdv_does_no_work_for_key_tiles_without_a_valid_key():
    """q_len % 32 != 0 and keys 70.. hidden by kv_lens: the key tiles past 70 must run no query
    tile (they did one per q head, all zeros); their ldmatrix requests are counted."""
    kv_lens = torch.tensor([70])
    with_empty_tiles = attention_counts(77, 256, 64, kv_lens=kv_lens)
    without = attention_counts(77, 128, 64, kv_lens=kv_lens)

    def dkdv_requests(counts):
        return sum(c.requests for c in counts if "dkdv" in c.kernel and "(ldmatrix" in c.site)

    assert dkdv_requests(without) > 0
    assert dkdv_requests(with_empty_tiles) == dkdv_requests(without)


@pytest.fixture
def mel_counts(monkeypatch):
    lib = load_harness("mel_spectrogram", HARNESS_DIR / "mel_spectrogram.cpp", sanitize=True)
    monkeypatch.setattr(mel_tests, "harness", lambda: lib)
    monkeypatch.setitem(spec_ops._MEL_SPECTROGRAM, "reference",
                        functools.partial(spec_ops._spectrogram_kernel, mel_tests._emulated_op))

    def run(n_fft):
        lib.count_requests(True)
        x = torch.randn(1, 3 * n_fft, requires_grad=True)
        y = mmfuse.mel_spectrogram(x, n_fft=n_fft, hop_length=n_fft, n_mels=8, backend="reference")
        y.sum().backward()
        counts = lib.request_counts()
        lib.count_requests(False)
        return counts

    return run


@pytest.mark.parametrize("n_fft", [400, 512, 2048])
def test_mel_dft_twiddles_cost_under_a_quarter_pass_per_step(n_fft, mel_counts):
    counts = mel_counts(n_fft)
    for kernel in ("mel_forward_kernel", "mel_backward_frames_kernel"):
        walks = [c for c in counts if c.kernel.startswith(kernel) and "(TwiddleWalk" in c.site and c.space == "shared"]
        resyncs = [c for c in walks if "TwiddleWalk<float>::at" in c.site]
        # cos and sin of each walk (the backward kernel also recomputes the forward DFT)
        assert len(resyncs) in (2, 4), f"{kernel}: the walk's reads, got {[c.site for c in walks]}"
        for c in resyncs:
            steps = c.requests * TWIDDLE_RESYNC  # one table read per kTwiddleResync steps of a warp
            assert c.passes / steps <= 0.25, f"{kernel} {c.site}: {c.passes / steps:.2f} passes per step"
        starts = [c for c in walks if c not in resyncs]
        assert starts and all(c.passes == c.ideal for c in starts)  # the rotation step: consecutive lanes
