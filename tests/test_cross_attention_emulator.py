"""The CUDA cross-attention kernels (csrc/cuda/cross_attention_kernel.cuh) on the host emulator.

Launched as the launcher launches them (same launch-shape helpers), forward and backward,
against the float64 formula of test_attention with DESIGN.md's rule: max|out - ref64| <=
2 * max|out_torch - ref64| + 1e-5, out_torch plain attention in the kernel's dtype; gradients 3x;
lse within fp32 rounding and exactly -inf on rows without a visible key. Outputs are poisoned
with NaN and every element is compared. The emulator runs one fiber per CUDA thread, so the
cases are chosen, not swept: every length of {1, 17, 64, 77, 130} for queries and keys, both
head dims, both half dtypes, every mask kind, causal with Lq < Lk and Lq > Lk, GQA 8/2, varlen
with empty sequences, and the lse gradient.
"""
import math

import pytest
import torch

from emulator_build import HARNESS_DIR, load_gpu_harness, load_harness
from test_attention import attention64, plain_attention, visible_mask

pytestmark = pytest.mark.emulator

NEG_INF = float("-inf")


def harness():
    return load_harness("cross_attention", HARNESS_DIR / "cross_attention.cpp")


def name(dtype):
    return str(dtype).removeprefix("torch.")


def check_rule(what, ours, torch_dtype, ref64, factor):
    assert not torch.isnan(ours).any(), f"{what}: NaN"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    budget = factor * (torch_dtype.double() - ref64).abs().max().item() + 1e-5 if ours.numel() else 0.0
    assert err <= budget, f"{what}: error {err:.3g} > budget {budget:.3g}"


def check_lse(lse, lse64):
    empty = lse64 == NEG_INF
    assert torch.equal(lse == NEG_INF, empty), "lse: -inf exactly on the rows without a visible key"
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- kernel calls


def sizes(batch, heads_q, heads_kv, head_dim, scale, causal, *, len_q, len_k, lse_len, q_rows, cu_q=None, cu_k=None,
          kv_lens=None, mask=None, bias=None, bias_strides=(0, 0, 0), dbias=None, dbias_strides=(0, 0, 0),
          philox=None, dropout_p=0.0, softcap=0.0, sinks=None, head_dim_v=None, splits=1, out_partial=None,
          lse_partial=None, key_ranges=None, ranges_strides=(0, 0)):
    """The trailing arguments of every entry point, as the launcher fills AttentionParams: the
    sizes, then the issue-26 variants (tests/test_cross_attention_emulator_variants.py), then
    issue #28's key_ranges (int32) and its (batch, head) strides in int32 elements
    (tests/test_cross_attention_emulator_key_ranges.py)."""
    return (cu_q, cu_k, kv_lens, mask, len_q, len_k, lse_len, q_rows, batch, heads_q, heads_kv, head_dim, scale,
            int(causal), bias, *bias_strides, dbias, *dbias_strides, philox, float(dropout_p), float(softcap), sinks,
            head_dim if head_dim_v is None else head_dim_v, splits, out_partial, lse_partial, key_ranges,
            *ranges_strides)


def padded_sizes(q, k, kv_lens, mask, scale, causal):
    batch, len_q, heads_q, head_dim = q.shape
    return sizes(batch, heads_q, k.shape[2], head_dim, scale, causal, len_q=len_q, len_k=k.shape[1], lse_len=len_q,
                 q_rows=batch * len_q, kv_lens=None if kv_lens is None else kv_lens.to(torch.int32),
                 mask=None if mask is None else mask.to(torch.uint8))


def varlen_sizes(q, k, cu_q, cu_k, scale, causal):
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    return sizes(cu_q.numel() - 1, q.shape[1], k.shape[1], q.shape[2], scale, causal,
                 len_q=int(lens_q.max()), len_k=int(lens_k.max()), lse_len=q.shape[0], q_rows=q.shape[0],
                 cu_q=cu_q, cu_k=cu_k)


def forward(q, k, v, lse_shape, args, lib=None):
    out = torch.full_like(q, float("nan"))
    lse = torch.full(lse_shape, float("nan"), device=q.device)
    getattr(lib or harness(), f"attention_forward_{name(q.dtype)}")(q, k, v, out, lse, *args)
    return out, lse


def backward(grad_out, grad_lse, q, k, v, out, lse, args, lib=None):
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    delta = torch.full_like(lse, float("nan"))
    getattr(lib or harness(), f"attention_backward_{name(q.dtype)}")(grad_out, grad_lse, q, k, v, out, lse, delta, dq,
                                                                     dk, dv, *args)
    return dq, dk, dv


# ----------------------------------------------------------------------------- references


def plain_attention_lse(q, k, v, visible, scale):
    """plain_attention and its log-sum-exp, both computed in q's dtype."""
    group = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, dim=2)) * scale
    return plain_attention(q, k, v, visible, scale), torch.logsumexp(scores.masked_fill(~visible[:, None], NEG_INF), -1)


def references(q, k, v, visible, scale, grad_out=None, grad_lse=None):
    """(out, lse, grads) in float64 and (out, grads) of plain attention in q's dtype."""
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out64, lse64 = attention64(*leaves64, visible, scale)
    out_t, lse_t = plain_attention_lse(*leaves, visible, scale)
    if grad_out is None:
        return (out64.detach(), lse64.detach(), None), (out_t.detach().nan_to_num(0.0), None)
    loss64 = (out64 * grad_out.double()).sum()
    loss_t = (out_t.nan_to_num(0.0) * grad_out).sum()
    if grad_lse is not None:
        rows = lse64 != NEG_INF
        loss64 = loss64 + (lse64[rows] * grad_lse.double()[rows]).sum()
        loss_t = loss_t + (lse_t[rows] * grad_lse.to(q.dtype)[rows]).sum()
    grads64 = torch.autograd.grad(loss64, leaves64)
    grads_t = [g.nan_to_num(0.0) for g in torch.autograd.grad(loss_t, leaves)]
    return (out64.detach(), lse64.detach(), grads64), (out_t.detach().nan_to_num(0.0), grads_t)


# ----------------------------------------------------------------------------- padded


def run_padded(batch, len_q, len_k, heads_q, heads_kv, head_dim, *, dtype=torch.float16, kv_lens=None, mask=None,
               causal=False, grads=False, with_grad_lse=False):
    q = torch.randn(batch, len_q, heads_q, head_dim).to(dtype)
    k, v = (torch.randn(batch, len_k, heads_kv, head_dim).to(dtype) for _ in range(2))
    scale = 1 / math.sqrt(head_dim)
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=mask, causal=causal)
    args = padded_sizes(q, k, kv_lens, mask, scale, causal)
    out, lse = forward(q, k, v, (batch, heads_q, len_q), args)
    grad_out = torch.randn_like(q) if grads else None
    grad_lse = torch.randn(batch, heads_q, len_q) if with_grad_lse else None
    (out64, lse64, grads64), (out_t, grads_t) = references(q, k, v, visible, scale, grad_out, grad_lse)
    check_rule("out", out, out_t, out64, 2)
    assert (out.transpose(1, 2)[lse64 == NEG_INF] == 0).all()
    check_lse(lse, lse64)
    if grads:
        ours = backward(grad_out, grad_lse, q, k, v, out, lse, args)
        for what, g, g_t, g64 in zip(("dq", "dk", "dv"), ours, grads_t, grads64):
            check_rule(what, g, g_t, g64, 3)


@pytest.mark.parametrize("len_q, len_k, head_dim, dtype", [
    (1, 17, 64, torch.float16),
    (17, 1, 128, torch.bfloat16),
    (64, 64, 64, torch.bfloat16),
    (77, 130, 64, torch.float16),
    (130, 77, 128, torch.float16),
], ids=str)
def test_attention_forward_lengths(len_q, len_k, head_dim, dtype):
    run_padded(2, len_q, len_k, 2, 1, head_dim, dtype=dtype)


def every_mask_kind(len_k):
    """(3,) kv_lens with a 0, a partial and a full length; a random (3, len_k) key padding mask
    whose sample 2 hides every key."""
    mask = torch.rand(3, len_k) < 0.3
    mask[2] = True
    return torch.tensor([0, len_k // 2 + 1, len_k]), mask


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=name)
def test_attention_forward_masks(dtype, causal):
    len_k = 77
    kv_lens, mask = every_mask_kind(len_k)
    run_padded(3, 17, len_k, 2, 1, 64, dtype=dtype, kv_lens=kv_lens, causal=causal)
    run_padded(3, 17, len_k, 2, 1, 64, dtype=dtype, mask=mask, causal=causal)
    mask[2, 50] = False
    run_padded(3, 17, len_k, 2, 1, 64, dtype=dtype, kv_lens=kv_lens, mask=mask, causal=causal)


@pytest.mark.parametrize("len_q, len_k", [(17, 130), (130, 17), (77, 64)], ids=str)
def test_attention_forward_causal_bottom_right(len_q, len_k):
    """Lq < Lk (the last query sees every key) and Lq > Lk (the first Lq - Lk rows see none)."""
    run_padded(1, len_q, len_k, 2, 2, 64, causal=True, kv_lens=torch.tensor([len_k - 5]))


def test_attention_forward_gqa_8_2_head_dim_128():
    run_padded(1, 17, 77, 8, 2, 128, dtype=torch.bfloat16, causal=True, mask=torch.rand(1, 77) < 0.3)


@pytest.mark.parametrize("len_q, len_k, head_dim, dtype", [
    (17, 77, 64, torch.float16),
    (77, 17, 128, torch.bfloat16),
    (1, 130, 64, torch.bfloat16),
    (130, 1, 64, torch.float16),
], ids=str)
def test_attention_backward_lengths(len_q, len_k, head_dim, dtype):
    run_padded(1, len_q, len_k, 2, 1, head_dim, dtype=dtype, grads=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=name)
def test_attention_backward_masks_causal_gqa(dtype):
    len_k = 77
    kv_lens, mask = every_mask_kind(len_k)
    run_padded(3, 17, len_k, 4, 2, 64, dtype=dtype, kv_lens=kv_lens, mask=mask, causal=True, grads=True)


@pytest.mark.parametrize("len_q, len_k", [(17, 130), (77, 17)], ids=str)
def test_attention_backward_causal_and_lse_gradient(len_q, len_k):
    run_padded(2, len_q, len_k, 2, 1, 64, causal=True, kv_lens=torch.tensor([len_k, len_k - 3]), grads=True,
               with_grad_lse=True)


def test_attention_backward_gqa_8_2():
    run_padded(1, 17, 33, 8, 2, 64, dtype=torch.bfloat16, mask=torch.rand(1, 33) < 0.3, grads=True)


# ----------------------------------------------------------------------------- varlen


def pack(tensors, lengths):
    return torch.cat([t[:n] for t, n in zip(tensors, lengths)])


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_varlen(causal):
    """Sequences of 17/77 queries and 130/1 keys, an empty query sequence and an empty key one."""
    lens_q, lens_k = [17, 0, 77, 5], [130, 9, 1, 0]
    heads_q, heads_kv, head_dim, dtype = 2, 1, 64, torch.float16
    scale = 1 / math.sqrt(head_dim)
    qs = [torch.randn(n, heads_q, head_dim).to(dtype) for n in lens_q]
    ks = [torch.randn(n, heads_kv, head_dim).to(dtype) for n in lens_k]
    vs = [torch.randn(n, heads_kv, head_dim).to(dtype) for n in lens_k]
    q, k, v = pack(qs, lens_q), pack(ks, lens_k), pack(vs, lens_k)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    args = varlen_sizes(q, k, cu_q, cu_k, scale, causal)
    out, lse = forward(q, k, v, (heads_q, q.shape[0]), args)
    grad_out = torch.randn_like(q)
    dq, dk, dv = backward(grad_out, None, q, k, v, out, lse, args)
    for b, (n_q, n_k) in enumerate(zip(lens_q, lens_k)):
        rows_q, rows_k = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        visible = visible_mask(1, n_q, n_k, causal=causal)
        (out64, lse64, g64), (out_t, g_t) = references(qs[b][None], ks[b][None], vs[b][None], visible, scale,
                                                       grad_out[rows_q][None])
        check_rule(f"out[{b}]", out[rows_q], out_t[0], out64[0], 2)
        check_lse(lse[:, rows_q], lse64[0])
        for what, g, rows, ref_t, ref64 in zip(("dq", "dk", "dv"), (dq, dk, dv), (rows_q, rows_k, rows_k), g_t, g64):
            check_rule(f"{what}[{b}]", g[rows], ref_t[0], ref64[0], 3)


def test_attention_launch_shapes_refuse_other_head_dims():
    q, k = torch.randn(1, 3, 2, 40).half(), torch.randn(1, 5, 1, 40).half()
    with pytest.raises(Exception, match="invalid attention parameters"):
        forward(q, k, k, (1, 2, 3), padded_sizes(q, k, None, None, 0.1, False))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_gpu_matches_emulator(head_dim):
    """The same harness built by nvcc runs on the GPU: the first GPU run checks the emulator's verdict.
    Differences come only from the tensor cores' fp32 accumulation order (and exp2f's last bits)."""
    gpu = load_gpu_harness("cross_attention", HARNESS_DIR / "cross_attention.cpp")
    len_q, len_k = 77, 130
    kv_lens, mask = every_mask_kind(len_k)
    q = torch.randn(3, len_q, 4, head_dim).half()
    k, v = (torch.randn(3, len_k, 2, head_dim).half() for _ in range(2))
    grad_out, grad_lse = torch.randn_like(q), torch.randn(3, 4, len_q)
    args = padded_sizes(q, k, kv_lens, mask, 1 / math.sqrt(head_dim), True)
    emulated = forward(q, k, v, (3, 4, len_q), args)
    emulated += backward(grad_out, grad_lse, q, k, v, *emulated, args)
    cuda = [t.cuda() if isinstance(t, torch.Tensor) else t for t in (q, k, v, grad_out, grad_lse)]
    cuda_args = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in args)
    on_gpu = forward(*cuda[:3], (3, 4, len_q), cuda_args, gpu)
    on_gpu += backward(cuda[3], cuda[4], *cuda[:3], *on_gpu, cuda_args, gpu)
    for what, ours, theirs in zip(("out", "lse", "dq", "dk", "dv"), on_gpu, emulated):
        assert torch.equal(ours.isnan().cpu(), theirs.isnan()), what
        torch.testing.assert_close(ours.cpu(), theirs, atol=1e-2, rtol=1e-2, equal_nan=True, msg=what)
