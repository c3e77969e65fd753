"""Issue #26's attention variants in the CUDA kernels (csrc/cuda/cross_attention_kernel.cuh) on
the host emulator: the additive attn bias (padded, broadcast, varlen), its gradient (dmask),
Philox dropout (keep masks bit-exact with mmfuse.reference.attention.philox_keep), softcap,
sinks, a value head dim Dv != D, and the split-KV decode forward (FlashDecoding).

Numbers are checked against a float64 formula (``attention_ref`` below) with DESIGN.md's rule:
max|ours - ref64| <= 2 * max|ref_dtype - ref64| + 1e-5 (gradients 3x), ref_dtype the same
formula in the kernel's dtype. Cases are chosen, not swept (the emulator runs a fiber per CUDA
thread): odd lengths with ragged tails, kv_lens with 0, GQA, causal, both half dtypes.
"""
import math

import pytest
import torch

from mmfuse.reference.attention import philox_keep
from test_cross_attention_emulator import (
    NEG_INF, check_lse, check_rule, cu_seqlens, harness, name, pack, sizes)
from test_attention import visible_mask

pytestmark = pytest.mark.emulator


# ----------------------------------------------------------------------------- reference


def attention_ref(q, k, v, scale, visible, *, bias=None, softcap=0.0, sinks=None, keep=None, dropout_p=0.0):
    """(out (B, Lq, Hq, Dv), lse (B, Hq, Lq)) in q's dtype (float64 q: the oracle). visible
    (B, Lq, Lk) bool; bias broadcastable to (B, Hq, Lq, Lk), -inf hides; keep (B, Hq, Lq, Lk) bool.
    Rows with no visible key: out 0, lse -inf (the sink with sinks). Differentiable in q, k, v, bias, sinks."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    vis = visible[:, None].expand(s.shape)
    if bias is not None:
        bias = bias.to(s.dtype)
        s = s + bias
        vis = vis & (bias != NEG_INF)
    s = s.masked_fill(~vis, NEG_INF)
    m = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), NEG_INF)
    sink = None if sinks is None else sinks.to(s.dtype)[None, :, None, None]
    if sink is not None:
        m = torch.maximum(m, sink)
    m = m.detach().masked_fill(m.detach() == NEG_INF, 0.0)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(sink - m)
    lse = (m + torch.log(den)).squeeze(-1)
    probs = e / torch.where(den == 0, torch.ones_like(den), den)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    return (probs @ vh).transpose(1, 2), lse


def grads_of(q, k, v, grad_out, grad_lse, scale, visible, bias_full, **kw):
    """(out, lse, dq, dk, dv, dbias) of attention_ref computed in q's dtype; bias_full is the
    (B, Hq, Lq, Lk) bias (its gradient is dS per element) or None."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = None if bias_full is None else bias_full.detach().clone().requires_grad_()
    out, lse = attention_ref(*leaves, scale, visible, bias=b, **kw)
    loss = (out * grad_out.to(out.dtype)).sum()
    if grad_lse is not None:
        rows = lse != NEG_INF
        loss = loss + (lse[rows] * grad_lse.to(lse.dtype)[rows]).sum()
    wrt = leaves + ([b] if b is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    return (out.detach(), lse.detach(), *grads[:3], grads[3] if b is not None else None)


# ----------------------------------------------------------------------------- kernel calls


def run_kernels(q, k, v, args_kw, *, lse_shape, grad_out=None, grad_lse=None, dbias_shape=None, dbias_strides=None,
                splits=1):
    """Forward (and backward when grad_out is given) through the harness; outputs poisoned with NaN
    (dbias zero-filled, as the launcher does)."""
    lib = harness()
    dv_dim = v.shape[-1]
    q_rows = q.shape[0] * q.shape[1] if q.dim() == 4 else q.shape[0]
    heads_q = q.shape[-2]
    out = torch.full((*q.shape[:-1], dv_dim), float("nan"), dtype=q.dtype)
    lse = torch.full(lse_shape, float("nan"))
    kw = dict(args_kw)
    if splits > 1:
        kw["splits"] = splits
        kw["out_partial"] = torch.full((splits, q_rows, heads_q, dv_dim), float("nan"))
        kw["lse_partial"] = torch.full((splits, q_rows * heads_q), float("nan"))
    getattr(lib, f"attention_forward_{name(q.dtype)}")(q, k, v, out, lse, *sizes(**kw))
    if grad_out is None:
        return out, lse
    kw.pop("splits", None), kw.pop("out_partial", None), kw.pop("lse_partial", None)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    delta = torch.full_like(lse, float("nan"))
    dbias = None
    if dbias_shape is not None:
        dbias = torch.zeros(dbias_shape)
        kw["dbias"], kw["dbias_strides"] = dbias, dbias_strides
    getattr(lib, f"attention_backward_{name(q.dtype)}")(grad_out, grad_lse, q, k, v, out, lse, delta, dq, dk, dv,
                                                        *sizes(**kw))
    return out, lse, dq, dk, dv, dbias


def padded_kw(q, k, v, scale, causal, *, kv_lens=None, mask=None, bias=None, **extra):
    """sizes() keywords for a padded call; bias (B or 1, Hq or 1, Lq, Lk) float32, strides 0 where broadcast."""
    batch, len_q, heads_q, head_dim = q.shape
    kw = dict(batch=batch, heads_q=heads_q, heads_kv=k.shape[2], head_dim=head_dim, scale=scale, causal=causal,
              len_q=len_q, len_k=k.shape[1], lse_len=len_q, q_rows=batch * len_q, head_dim_v=v.shape[-1],
              kv_lens=None if kv_lens is None else kv_lens.to(torch.int32),
              mask=None if mask is None else mask.to(torch.uint8), **extra)
    if bias is not None:
        b = bias.float().contiguous()
        kw["bias"] = b
        kw["bias_strides"] = (0 if b.shape[0] == 1 else b.stride(0), 0 if b.shape[1] == 1 else b.stride(1), b.stride(2))
    return kw


def half_inputs(shape_q, shape_k, shape_v, dtype):
    return (torch.randn(shape_q).to(dtype), torch.randn(shape_k).to(dtype), torch.randn(shape_v).to(dtype))


def random_bias(shape, hide=0.15):
    """A float bias with -inf entries (hidden keys) and unit-scale values elsewhere."""
    bias = torch.randn(shape)
    return bias.masked_fill(torch.rand(shape) < hide, NEG_INF)


def check_all(what, ours, ref_t, ref64, factor):
    for n, o, t, r in zip(what, ours, ref_t, ref64):
        check_rule(n, o, t, r, factor)


def run_padded_case(batch, len_q, len_k, heads_q, heads_kv, head_dim, head_dim_v=None, *, dtype=torch.float16,
                    kv_lens=None, mask=None, causal=False, bias=None, softcap=0.0, sinks=None, dropout_p=0.0,
                    philox=None, grads=True, with_grad_lse=False, mask_grad=False):
    head_dim_v = head_dim_v or head_dim
    q, k, v = half_inputs((batch, len_q, heads_q, head_dim), (batch, len_k, heads_kv, head_dim),
                          (batch, len_k, heads_kv, head_dim_v), dtype)
    scale = 1 / math.sqrt(head_dim)
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=mask, causal=causal)
    keep = philox_keep(philox, dropout_p, batch, heads_q, len_q, len_k, "cpu") if dropout_p > 0 else None
    kw = padded_kw(q, k, v, scale, causal, kv_lens=kv_lens, mask=mask, bias=bias, softcap=softcap,
                   sinks=None if sinks is None else sinks.float(), philox=philox, dropout_p=dropout_p)
    grad_out = torch.randn(batch, len_q, heads_q, head_dim_v).to(dtype) if grads else None
    grad_lse = torch.randn(batch, heads_q, len_q) if with_grad_lse else None
    full = (batch, heads_q, len_q, len_k)
    got = run_kernels(q, k, v, kw, lse_shape=(batch, heads_q, len_q), grad_out=grad_out, grad_lse=grad_lse,
                      dbias_shape=full if mask_grad else None,
                      dbias_strides=(heads_q * len_q * len_k, len_q * len_k, len_k))
    ref_kw = dict(softcap=softcap, sinks=sinks, keep=keep, dropout_p=dropout_p)
    bias_full = None if bias is None else bias.expand(full)
    if not grads:
        out64, lse64 = attention_ref(q.double(), k.double(), v.double(), scale, visible,
                                     bias=None if bias is None else bias.double(), **ref_kw)
        out_t, _ = attention_ref(q, k, v, scale, visible, bias=bias, **ref_kw)
        check_rule("out", got[0], out_t, out64, 2)
        check_lse(got[1], lse64)
        return got
    g64 = grads_of(q.double(), k.double(), v.double(), grad_out, grad_lse, scale, visible,
                   None if bias_full is None else bias_full.double(), **ref_kw)
    g_t = grads_of(q, k, v, grad_out, grad_lse, scale, visible, bias_full, **ref_kw)
    check_rule("out", got[0], g_t[0], g64[0], 2)
    check_lse(got[1], g64[1])
    check_all(("dq", "dk", "dv"), got[2:5], g_t[2:5], g64[2:5], 3)
    if mask_grad:
        check_rule("dmask", got[5], g_t[5].float(), g64[5], 3)
        hidden = (bias_full == NEG_INF) | ~visible[:, None]
        assert (got[5][hidden] == 0).all(), "dmask: exactly 0 where the key is hidden"
    return got


# ----------------------------------------------------------------------------- attn bias


def test_bias_padded_broadcast_batch_causal_gqa_dmask(dtype=torch.float16):
    """(1, Hq, Lq, Lk) bias with -inf entries, kv_lens with a 0, causal, GQA 4/2: out, lse, dq, dk, dv, dmask."""
    batch, len_q, len_k = 3, 37, 77
    bias = random_bias((1, 4, len_q, len_k))
    run_padded_case(batch, len_q, len_k, 4, 2, 64, dtype=dtype, kv_lens=torch.tensor([0, 50, 77]), causal=True,
                    bias=bias, mask_grad=True, with_grad_lse=True)


def test_bias_padded_broadcast_heads_with_key_padding():
    """(B, 1, Lq, Lk) bias with a key padding mask; a row whose keys the bias hides all."""
    batch, len_q, len_k = 2, 17, 77
    bias = random_bias((batch, 1, len_q, len_k))
    bias[1, 0, 5] = NEG_INF  # row 5 of sample 1: no visible key
    run_padded_case(batch, len_q, len_k, 2, 1, 64, dtype=torch.bfloat16, mask=torch.rand(batch, len_k) < 0.2,
                    bias=bias, mask_grad=True)


def run_varlen_case(lens_q, lens_k, heads_q, heads_kv, head_dim, *, dtype=torch.float16, causal=False,
                    bias_heads=None, width=None, dropout_p=0.0, philox=None, softcap=0.0, sinks=None,
                    mask_grad=False, v_onehot=False):
    """Varlen forward + backward against attention_ref per sample; bias (Hq or 1, total_q, W)."""
    scale = 1 / math.sqrt(head_dim)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, heads_q, head_dim).to(dtype)
    k = torch.randn(total_k, heads_kv, head_dim).to(dtype)
    v = torch.randn(total_k, heads_kv, head_dim).to(dtype)
    if v_onehot:  # out[r, h, j] = P_drop of (r, key j): the forward's keep mask, read back
        v = torch.zeros_like(v)
        for b, n in enumerate(lens_k):
            r0 = sum(lens_k[:b])
            v[r0:r0 + n, :, :] = torch.eye(n, head_dim)[:, None, :].to(dtype)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    longest_q, longest_k = max(lens_q), max(lens_k)
    kw = dict(batch=len(lens_q), heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, scale=scale, causal=causal,
              len_q=longest_q, len_k=longest_k, lse_len=total_q, q_rows=total_q, cu_q=cu_q, cu_k=cu_k,
              philox=philox, dropout_p=dropout_p, softcap=softcap, sinks=None if sinks is None else sinks.float())
    bias = None
    width = width or longest_k
    if bias_heads is not None:
        bias = random_bias((bias_heads, total_q, width)).contiguous()
        kw["bias"] = bias
        kw["bias_strides"] = (0, 0 if bias_heads == 1 else total_q * width, width)
    grad_out = torch.randn_like(q)
    got = run_kernels(q, k, v, kw, lse_shape=(heads_q, total_q), grad_out=grad_out,
                      dbias_shape=(heads_q, total_q, width) if mask_grad else None,
                      dbias_strides=(0, total_q * width, width))
    out, lse, dq, dk, dv, dbias = got
    keep_all = philox_keep(philox, dropout_p, len(lens_q), heads_q, longest_q, longest_k, "cpu") if dropout_p else None
    for b, (n_q, n_k) in enumerate(zip(lens_q, lens_k)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        visible = visible_mask(1, n_q, n_k, causal=causal)
        keep = None if keep_all is None else keep_all[b:b + 1, :, :n_q, :n_k]
        if v_onehot:
            pd = out[rq].float().permute(1, 0, 2)[:, :, :n_k]  # (Hq, n_q, n_k)
            assert torch.equal(pd != 0, keep[0] & visible), f"forward keep mask of sample {b}"
        bias_b = None if bias is None else bias[:, rq, :n_k].expand(heads_q, n_q, n_k)[None]
        ref_kw = dict(softcap=softcap, sinks=sinks, keep=keep, dropout_p=dropout_p)
        args = (q[rq][None], k[rk][None], v[rk][None], grad_out[rq][None], None, scale, visible)
        g64 = grads_of(*(t.double() if t is not None else None for t in args[:5]), *args[5:],
                       None if bias_b is None else bias_b.double(), **ref_kw)
        g_t = grads_of(*args, bias_b, **ref_kw)
        check_rule(f"out[{b}]", out[rq], g_t[0][0], g64[0][0], 2)
        check_lse(lse[:, rq], g64[1][0])
        for what, g, rows, i in (("dq", dq, rq, 2), ("dk", dk, rk, 3), ("dv", dv, rk, 4)):
            check_rule(f"{what}[{b}]", g[rows], g_t[i][0], g64[i][0], 3)
        if mask_grad:
            check_rule(f"dmask[{b}]", dbias[:, rq, :n_k], g_t[5][0].float(), g64[5][0], 3)
            assert (dbias[:, rq, n_k:] == 0).all(), "dmask: 0 past the sequence's keys"
    return got


def test_bias_varlen_dmask():
    """(Hq, total_q, W) bias with W > the longest key sequence, an empty query and key sequence, GQA, causal."""
    run_varlen_case([17, 0, 40, 6], [70, 9, 33, 0], 4, 2, 64, causal=True, bias_heads=4, width=75, mask_grad=True)


def test_bias_varlen_broadcast_heads_bf16():
    run_varlen_case([33, 1], [5, 66], 2, 1, 64, dtype=torch.bfloat16, bias_heads=1)


# ----------------------------------------------------------------------------- dropout


def onehot_padded(batch, len_q, len_k, heads, head_dim, dtype):
    q = torch.randn(batch, len_q, heads, head_dim).to(dtype) * 0.3
    k = torch.randn(batch, len_k, heads, head_dim).to(dtype) * 0.3
    v = torch.eye(len_k, head_dim).to(dtype)[None, :, None, :].expand(batch, len_k, heads, head_dim).contiguous()
    return q, k, v


def test_dropout_keep_masks_bit_exact_padded():
    """v = one-hot keys, so out reveals the forward's P ∘ Z; dO = one-hot queries, so dv reveals the
    dK/dV kernel's (P ∘ Z)ᵀ: both equal philox_keep exactly (ragged Lq 37, Lk 61, 3 heads, causal)."""
    batch, len_q, len_k, heads, dim, p = 2, 37, 61, 3, 64, 0.3
    philox = torch.tensor([0x123456789ABCDEF, 977], dtype=torch.int64)
    q, k, v = onehot_padded(batch, len_q, len_k, heads, dim, torch.float16)
    kv_lens = torch.tensor([61, 40])
    kw = padded_kw(q, k, v, 0.125, True, kv_lens=kv_lens, philox=philox, dropout_p=p)
    grad_out = torch.eye(len_q, dim).to(torch.float16)[None, :, None, :].expand(batch, len_q, heads, dim).contiguous()
    out, lse, dq, dk, dv, _ = run_kernels(q, k, v, kw, lse_shape=(batch, heads, len_q), grad_out=grad_out)
    keep = philox_keep(philox, p, batch, heads, len_q, len_k, "cpu")
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, causal=True)[:, None]
    fwd = out.float().permute(0, 2, 1, 3)[..., :len_k] != 0  # (B, H, Lq, Lk)
    assert torch.equal(fwd, keep & visible), "forward keep mask"
    bwd = dv.float().permute(0, 2, 3, 1)[:, :, :len_q, :] != 0  # dv[b, j, h, i] -> (B, H, Lq, Lk)
    assert torch.equal(bwd, keep & visible), "dK/dV keep mask"
    # the same call's numbers against the reference (P ∘ Z V with the kept mask)
    ref = attention_ref(q.double(), k.double(), v.double(), 0.125, visible[:, 0], keep=keep, dropout_p=p)[0]
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


def test_dropout_keep_mask_bit_exact_varlen():
    """Varlen counters use the longest sequences (from cu_seqlens): one-hot v reads the mask back."""
    philox = torch.tensor([-7, 2**40 + 3], dtype=torch.int64)
    run_varlen_case([9, 0, 23], [30, 4, 50], 2, 2, 64, dropout_p=0.25, philox=philox, v_onehot=True)


def test_dropout_with_bias_causal_gqa_grads(dtype=torch.bfloat16):
    philox = torch.tensor([20261203, 12345], dtype=torch.int64)
    run_padded_case(2, 29, 70, 4, 2, 64, dtype=dtype, kv_lens=torch.tensor([70, 3]), causal=True,
                    bias=random_bias((2, 4, 29, 70)), dropout_p=0.2, philox=philox, mask_grad=True,
                    with_grad_lse=True)


def test_dropout_varlen_grads_dmask():
    philox = torch.tensor([99, 1], dtype=torch.int64)
    run_varlen_case([21, 5], [40, 77], 2, 1, 64, dropout_p=0.15, philox=philox, bias_heads=2, mask_grad=True,
                    causal=True)


# ----------------------------------------------------------------------------- softcap, sinks


def test_softcap_window_gqa(dtype=torch.float16):
    """Gemma 2: softcap + a sliding window (as a -inf band bias) + GQA + causal, gradients and dmask."""
    len_q, len_k = 37, 77
    i = torch.arange(len_q)[:, None] + (len_k - len_q)
    j = torch.arange(len_k)[None, :]
    window = torch.zeros(len_q, len_k).masked_fill(i - j >= 20, NEG_INF)[None, None]
    run_padded_case(2, len_q, len_k, 2, 1, 64, dtype=dtype, kv_lens=torch.tensor([77, 60]), causal=True,
                    softcap=1.5, bias=window, mask_grad=True)


def test_softcap_varlen_head_dim_128():
    run_varlen_case([20, 2], [65, 17], 2, 2, 128, softcap=2.0)


def test_sinks_window_kv_lens(dtype=torch.bfloat16):
    """gpt-oss: sinks + a sliding window; kv_lens 0 gives rows with no visible key: lse = sink, out 0."""
    len_q, len_k = 29, 70
    i = torch.arange(len_q)[:, None] + (len_k - len_q)
    j = torch.arange(len_k)[None, :]
    window = torch.zeros(len_q, len_k).masked_fill(i - j >= 16, NEG_INF)[None, None]
    sinks = torch.randn(4) * 2
    out, lse = run_padded_case(2, len_q, len_k, 4, 2, 64, dtype=dtype, kv_lens=torch.tensor([0, 70]), causal=True,
                               bias=window, sinks=sinks, with_grad_lse=True)[:2]
    assert torch.equal(lse[0], sinks[:, None].expand(4, len_q)), "no visible key: lse is the sink"
    assert (out[0] == 0).all()


def test_sinks_varlen_softcap():
    run_varlen_case([13, 0, 7], [40, 5, 0], 2, 1, 64, sinks=torch.randn(2), softcap=3.0)


# ----------------------------------------------------------------------------- Dv != D


def test_head_dims_128_64():
    """(D, Dv) = (128, 64), forward and backward with a bias and its gradient."""
    run_padded_case(1, 23, 70, 2, 1, 128, 64, dtype=torch.bfloat16, causal=True, bias=random_bias((1, 1, 23, 70)),
                    kv_lens=torch.tensor([66]), mask_grad=True)


def test_unsupported_head_dim_pair_refused():
    q, k, v = half_inputs((1, 3, 2, 192), (1, 5, 1, 192), (1, 5, 1, 128), torch.float16)
    with pytest.raises(Exception, match="invalid attention parameters"):
        run_kernels(q, k, v, padded_kw(q, k, v, 0.1, False), lse_shape=(1, 2, 3))


# ----------------------------------------------------------------------------- split-KV decode


def test_split_kv_decode_matches_one_pass(len_q=5, splits=3, dtype=torch.bfloat16):
    """FlashDecoding: keys split across CTAs, partial (out, lse) merged by log-sum-exp; against the
    one-pass kernel on the same inputs and against the reference: odd Lk, kv_lens with 0, GQA,
    causal, a bias and sinks."""
    batch, len_k, heads_q, heads_kv = 3, 261, 4, 2
    q, k, v = half_inputs((batch, len_q, heads_q, 64), (batch, len_k, heads_kv, 64), (batch, len_k, heads_kv, 64), dtype)
    kv_lens = torch.tensor([0, 200, 261])  # 4 tiles in 3 splits of 2: the last split sees nothing
    sinks = torch.randn(heads_q)
    bias = random_bias((batch, 1, len_q, len_k), hide=0.05)
    kw = padded_kw(q, k, v, 0.125, True, kv_lens=kv_lens, bias=bias, sinks=sinks)
    one = run_kernels(q, k, v, kw, lse_shape=(batch, heads_q, len_q))
    split = run_kernels(q, k, v, kw, lse_shape=(batch, heads_q, len_q), splits=splits)
    torch.testing.assert_close(split[0].float(), one[0].float(), atol=1e-2, rtol=1e-2)  # bf16 rounding
    torch.testing.assert_close(split[1], one[1], atol=1e-5, rtol=1e-5)
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, causal=True)
    out64, lse64 = attention_ref(q.double(), k.double(), v.double(), 0.125, visible, bias=bias.double(), sinks=sinks)
    out_t, _ = attention_ref(q, k, v, 0.125, visible, bias=bias, sinks=sinks)
    check_rule("split out", split[0], out_t, out64, 2)
    check_lse(split[1], lse64)
    assert (split[0][0] == 0).all() and torch.equal(split[1][0], sinks[:, None].expand(heads_q, len_q))


def test_split_kv_decode_propagates_nan_like_one_pass():
    """A NaN in a visible key (seen by one split only) and a NaN query row: the split schedule's merge
    gives those rows NaN out and lse, as the one-pass kernel and the CPU kernel do; other rows agree."""
    batch, len_q, len_k, heads_q, heads_kv = 2, 1, 261, 2, 1
    q, k, v = half_inputs((batch, len_q, heads_q, 64), (batch, len_k, heads_kv, 64), (batch, len_k, heads_kv, 64),
                          torch.float16)
    k[0, 5] = float("nan")  # sample 0: every row sees key 5 (first split) -> NaN rows
    q[1, 0, 1] = float("nan")  # sample 1, head 1: a NaN query row
    kw = padded_kw(q, k, v, 0.125, False, sinks=torch.randn(heads_q))
    one = run_kernels(q, k, v, kw, lse_shape=(batch, heads_q, len_q))
    split = run_kernels(q, k, v, kw, lse_shape=(batch, heads_q, len_q), splits=3)
    for name, a, b in (("out", split[0].float(), one[0].float()), ("lse", split[1], one[1])):
        assert torch.equal(a.isnan(), b.isnan()), name
    assert one[1][0].isnan().all() and one[1][1, 1].isnan().all() and not one[1][1, 0].isnan().any()
    torch.testing.assert_close(split[0][1, :, 0].float(), one[0][1, :, 0].float(), atol=1e-2, rtol=1e-2)


def test_split_kv_decode_varlen_dropout():
    """Split decode (query lengths 1 and 3) on packed sequences, one without keys, with dropout: the
    merged out equals one pass."""
    lens_q, lens_k = [1, 3, 1], [200, 0, 333]
    q = torch.randn(sum(lens_q), 2, 64).half()
    k, v = torch.randn(sum(lens_k), 1, 64).half(), torch.randn(sum(lens_k), 1, 64).half()
    kw = dict(batch=3, heads_q=2, heads_kv=1, head_dim=64, scale=0.125, causal=True, len_q=3, len_k=333,
              lse_len=q.shape[0], q_rows=q.shape[0], cu_q=cu_seqlens(lens_q), cu_k=cu_seqlens(lens_k),
              philox=torch.tensor([5, 6]), dropout_p=0.1)
    one = run_kernels(q, k, v, kw, lse_shape=(2, q.shape[0]))
    split = run_kernels(q, k, v, kw, lse_shape=(2, q.shape[0]), splits=3)
    torch.testing.assert_close(split[0].float(), one[0].float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(split[1], one[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(split[1][:, 1:4] == NEG_INF, torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("len_q, len_k, batch, heads, sms, want", [
    (1, 4096, 1, 8, 132, 32),   # 8 CTAs: ceil(2 * 132 / 8) = 33, capped by 64 key tiles / 2
    (1, 1500, 8, 8, 132, 5),    # 64 CTAs: ceil(264 / 64) = 5 (24 tiles allow 12)
    (8, 577, 2, 4, 108, 5),     # 8 CTAs want 27, 10 key tiles allow 5
    (9, 4096, 1, 1, 132, 1),    # more than 8 queries: one pass
    (1, 4096, 16, 16, 132, 1),  # 256 CTAs fill the GPU: one pass
    (1, 64, 1, 1, 132, 1),      # one key tile: nothing to split
], ids=str)
def test_decode_splits_heuristic(len_q, len_k, batch, heads, sms, want):
    """The launcher's split count (csrc/cuda/cross_attention_kernel.cuh decode_splits)."""
    got = torch.zeros(1, dtype=torch.int64)
    harness().attention_decode_splits(got, len_q, len_k, batch, heads, sms)
    assert int(got) == want
