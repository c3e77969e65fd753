"""Issue #28's key_ranges in the CUDA kernels (csrc/cuda/cross_attention_kernel.cuh) on the host
emulator: per-query [start, end) key windows, per row and per head, padded and varlen, forward
and backward, with causal, kv_lens, a key padding mask, GQA, an attn bias and its gradient, and
the split-KV decode forward; empty, full and mid-tile ranges on ragged tiles (Lq 77, Lk 150); the
tiles no range reaches are skipped: never read (their NaN never leaks), and under the sanitizer's
request counters they cost nothing.

The oracle is mmfuse.reference.attention (float64); the error budget is DESIGN.md's rule against
the same attention computed in the kernel's dtype (test_cross_attention_emulator_variants's
attention_ref, the ranges as a -inf bias): max|ours - ref64| <= 2 max|ref_dtype - ref64| + 1e-5,
gradients 3x. The emulator runs a fiber per CUDA thread, so the cases are chosen, not swept.

NaN is put only in key tiles that no range reaches: a key that no query sees inside a loaded tile
is multiplied by its 0 (P V, dS K), so the launcher (csrc/cuda/cross_attention.cu) zeroes such
rows of K and V before the kernels run, as for key_padding_mask; the emulator runs the kernels
without it.
"""
import math

import pytest
import torch

from mmfuse.reference import attention as ref
from test_attention import visible_mask
from test_cross_attention_emulator import NEG_INF, check_lse, check_rule, cu_seqlens, harness
from test_cross_attention_emulator_variants import grads_of, padded_kw, run_kernels

pytestmark = pytest.mark.emulator


# ----------------------------------------------------------------------------- ranges


def mixed_ranges(rows, len_k):
    """int32 (rows, 2): random ranges with every 5th empty (mid-tile), every 7th full, every 3rd
    a narrow window with mid-tile bounds."""
    a, b = torch.randint(0, len_k + 1, (2, rows))
    r = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1)
    for i in range(rows):
        if i % 5 == 0:
            r[i] = torch.tensor([len_k // 3, len_k // 3])
        elif i % 7 == 0:
            r[i] = torch.tensor([0, len_k])
        elif i % 3 == 0:
            lo = int(torch.randint(0, max(len_k - 20, 1), ()))
            r[i] = torch.tensor([lo, min(lo + 1 + int(torch.randint(0, 19, ())), len_k)])
    return r.to(torch.int32)


def window_ranges(len_q, len_k, window):
    """int32 (Lq, 2): sliding windows of `window` keys ending at the bottom-right diagonal."""
    pos = torch.arange(len_q) + (len_k - len_q)
    end = (pos + 1).clamp(0, len_k)
    return torch.stack([(pos - window + 1).clamp(0, len_k).minimum(end), end], -1).to(torch.int32)


def range_bias(ranges, len_k, dtype):
    """(..., Lq, Lk) 0 / -inf: the ranges as an additive mask for attention_ref."""
    pos = torch.arange(len_k)
    inside = (pos >= ranges[..., :1].long()) & (pos < ranges[..., 1:].long())
    return torch.zeros(inside.shape, dtype=dtype).masked_fill(~inside, NEG_INF)


def strides(ranges, per_head, varlen):
    """(batch, head) strides of `ranges` in int32 elements."""
    if varlen:
        return 0, ranges.stride(0) if per_head else 0
    return ranges.stride(0), ranges.stride(1) if per_head else 0


# ----------------------------------------------------------------------------- padded


def run_padded(batch, len_q, len_k, heads_q, heads_kv, head_dim, ranges, *, head_dim_v=None, dtype=torch.float16,
               kv_lens=None, mask=None, causal=False, grads=True, with_grad_lse=False, bias=None, mask_grad=False,
               q=None, k=None, v=None, splits=1):
    """Forward (+ backward) through the harness against the reference; ranges (B, Lq, 2) or
    (B, Hq, Lq, 2). Returns the kernels' outputs."""
    head_dim_v = head_dim_v or head_dim
    q = torch.randn(batch, len_q, heads_q, head_dim).to(dtype) if q is None else q
    k = torch.randn(batch, len_k, heads_kv, head_dim).to(dtype) if k is None else k
    v = torch.randn(batch, len_k, heads_kv, head_dim_v).to(dtype) if v is None else v
    per_head = ranges.dim() == 4
    ranges = ranges.contiguous()
    scale = 1 / math.sqrt(head_dim)
    kw = padded_kw(q, k, v, scale, causal, kv_lens=kv_lens, mask=mask, bias=bias, key_ranges=ranges,
                   ranges_strides=strides(ranges, per_head, False))
    grad_out = torch.randn(batch, len_q, heads_q, head_dim_v).to(dtype) if grads else None
    grad_lse = torch.randn(batch, heads_q, len_q) if with_grad_lse else None
    full = (batch, heads_q, len_q, len_k)
    got = run_kernels(q, k, v, kw, lse_shape=(batch, heads_q, len_q), grad_out=grad_out, grad_lse=grad_lse,
                      dbias_shape=full if mask_grad else None,
                      dbias_strides=(heads_q * len_q * len_k, len_q * len_k, len_k), splits=splits)

    # the oracle, float64 (NaN keys that no query sees are zeroed by it as by the launcher)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    b64 = None if bias is None else bias.double().expand(full).clone().requires_grad_()  # per-head dmask
    out64, lse64, _ = ref.cross_attention(*leaves, scale=scale, causal=causal, kv_lens=kv_lens, key_padding_mask=mask,
                                          attn_bias=b64, key_ranges=ranges)
    # the budget: the same attention in the kernel's dtype, the ranges as a -inf bias
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=mask, causal=causal)
    rb = range_bias(ranges if per_head else ranges[:, None], len_k, torch.float32)
    bias_full = (rb if bias is None else rb + bias.float()).expand(full)
    finite = [t.nan_to_num(0.0) for t in (q, k, v)]
    g_t = grads_of(*finite, grad_out if grads else torch.zeros(batch, len_q, heads_q, head_dim_v).to(dtype), grad_lse,
                   scale, visible, bias_full.to(dtype))
    check_rule("out", got[0], g_t[0], out64.detach(), 2)
    check_lse(got[1], lse64.detach())
    assert (got[0].transpose(1, 2)[lse64 == NEG_INF] == 0).all(), "rows without a visible key: out 0"
    if not grads:
        return got
    loss = (out64 * grad_out.double()).sum()
    if grad_lse is not None:
        rows = lse64 != NEG_INF
        loss = loss + (lse64[rows] * grad_lse.double()[rows]).sum()
    g64 = torch.autograd.grad(loss, leaves + ([b64] if b64 is not None else []))
    for name, ours, ref_t, ref64 in zip(("dq", "dk", "dv"), got[2:5], g_t[2:5], g64[:3]):
        check_rule(name, ours, ref_t, ref64, 3)
    if mask_grad:
        check_rule("dmask", got[5], g_t[5].float(), g64[3], 3)
        hidden = (bias_full == NEG_INF) | ~visible[:, None]
        assert (got[5][hidden] == 0).all(), "dmask: exactly 0 where a range (or a mask) hides the key"
    return got


def test_per_row_mixed_ranges_kv_lens():
    """Random, empty, full and narrow mid-tile ranges per query (shared by the heads), a sample
    whose kv_len is 0, and a kv_len that cuts some ranges short."""
    batch, len_q, len_k = 2, 77, 150
    ranges = torch.stack([mixed_ranges(len_q, len_k) for _ in range(batch)])
    run_padded(batch, len_q, len_k, 2, 1, 64, ranges, kv_lens=torch.tensor([150, 0]), with_grad_lse=True)
    # a kv_len that cuts ranges short (cheaper: one query tile)
    ranges = mixed_ranges(20, len_k)[None]
    run_padded(1, 20, len_k, 2, 1, 64, ranges, kv_lens=torch.tensor([100]))


def test_per_head_causal_gqa_key_padding_bf16():
    """Per-head ranges (a sliding window, a document split and random ones), causal, GQA 4/2, a
    key padding mask."""
    batch, len_q, len_k, heads_q = 1, 77, 150, 4
    ranges = torch.empty(batch, heads_q, len_q, 2, dtype=torch.int32)
    for b in range(batch):
        ranges[b, 0] = window_ranges(len_q, len_k, 40)
        # documents: queries 0-31 see [0, 50), 32-63 see [100, 150), the rest [60, 110): the dK/dV
        # CTA of keys 0..63 skips a query tile between two it runs, and the last query tile's
        # first key tile is the one its smallest start (60) falls in
        ranges[b, 1, :32] = torch.tensor([0, 50])
        ranges[b, 1, 32:64] = torch.tensor([100, 150])
        ranges[b, 1, 64:] = torch.tensor([60, 110])
        ranges[b, 2] = mixed_ranges(len_q, len_k)
        ranges[b, 3] = window_ranges(len_q, len_k, 7)
    run_padded(batch, len_q, len_k, heads_q, 2, 64, ranges, dtype=torch.bfloat16, causal=True,
               mask=torch.rand(batch, len_k) < 0.2, kv_lens=torch.tensor([141]))


def test_empty_and_full_ranges():
    """Every range empty: out 0, lse -inf, gradients 0 and nothing read. Every range full: the
    kernels' results equal those without key_ranges, bit for bit."""
    batch, len_q, len_k = 1, 33, 70
    empty = torch.tensor([17, 17], dtype=torch.int32).expand(batch, len_q, 2)
    out, lse, dq, dk, dv, _ = run_padded(batch, len_q, len_k, 2, 1, 64, empty)
    assert (out == 0).all() and (lse == NEG_INF).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()

    full = torch.tensor([0, len_k], dtype=torch.int32).expand(batch, len_q, 2)
    q, k, v = (torch.randn(batch, n, h, 64).half() for n, h in ((len_q, 2), (len_k, 1), (len_k, 1)))
    grad_out = torch.randn_like(q)
    kw = padded_kw(q, k, v, 0.125, True)
    plain = run_kernels(q, k, v, kw, lse_shape=(batch, 2, len_q), grad_out=grad_out)
    ranged = run_kernels(q, k, v, dict(kw, key_ranges=full.contiguous(), ranges_strides=(len_q * 2, 0)),
                         lse_shape=(batch, 2, len_q), grad_out=grad_out)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), plain[:5], ranged[:5]):
        assert torch.equal(a, b), name


def test_ranges_with_bias_and_its_gradient_head_dims_128_64():
    """Ranges under an attn bias with -inf entries: dmask is exactly 0 where either hides; D 128, Dv 64."""
    batch, len_q, len_k = 1, 37, 100
    bias = torch.randn(batch, 1, len_q, len_k).masked_fill(torch.rand(batch, 1, len_q, len_k) < 0.1, NEG_INF)
    ranges = window_ranges(len_q, len_k, 30)[None]
    run_padded(batch, len_q, len_k, 2, 1, 128, ranges, head_dim_v=64, bias=bias, mask_grad=True,
               kv_lens=torch.tensor([90]))


def test_nan_in_key_tiles_no_range_reaches():
    """NaN and inf in K and V of the key tiles that no range reaches (the kernels never load
    them): every output is finite and matches the reference; the hidden keys' gradients are 0."""
    batch, len_q, len_k = 1, 40, 200
    ranges = torch.empty(len_q, 2, dtype=torch.int32)
    ranges[:20] = torch.tensor([70, 90])    # keys 64..127: tile 1 loaded, 64..69 and 90..127 hidden
    ranges[20:] = torch.tensor([100, 120])
    q, k, v = torch.randn(batch, len_q, 2, 64).half(), torch.randn(batch, len_k, 1, 64).half(), \
        torch.randn(batch, len_k, 1, 64).half()
    k[:, :64] = float("nan")    # tile 0: never loaded
    v[:, :64] = float("nan")
    k[:, 128:] = float("inf")   # tiles 2 and 3: never loaded
    v[:, 128:] = float("nan")
    out, lse, dq, dk, dv, _ = run_padded(batch, len_q, len_k, 2, 1, 64, ranges[None], q=q, k=k, v=v)
    hidden = torch.ones(len_k, dtype=torch.bool)
    hidden[70:90] = hidden[100:120] = False
    assert (dk[:, hidden] == 0).all() and (dv[:, hidden] == 0).all()


# ----------------------------------------------------------------------------- varlen


def run_varlen(lens_q, lens_k, heads_q, heads_kv, head_dim, ranges, *, dtype=torch.float16, causal=False):
    """Varlen forward + backward against the reference; ranges (total_q, 2) or (Hq, total_q, 2),
    key indices local to each row's sequence."""
    scale = 1 / math.sqrt(head_dim)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, heads_q, head_dim).to(dtype)
    k, v = (torch.randn(total_k, heads_kv, head_dim).to(dtype) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    per_head = ranges.dim() == 3
    ranges = ranges.contiguous()
    kw = dict(batch=len(lens_q), heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, scale=scale, causal=causal,
              len_q=max(lens_q), len_k=max(lens_k), lse_len=total_q, q_rows=total_q, cu_q=cu_q, cu_k=cu_k,
              key_ranges=ranges, ranges_strides=strides(ranges, per_head, True))
    grad_out = torch.randn_like(q)
    out, lse, dq, dk, dv, _ = run_kernels(q, k, v, kw, lse_shape=(heads_q, total_q), grad_out=grad_out)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = ref.cross_attention_varlen(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), scale=scale,
                                              causal=causal, key_ranges=ranges)
    g64 = torch.autograd.grad((out64 * grad_out.double()).sum(), leaves)
    check_lse(lse, lse64.detach())
    for b, (n_q, n_k) in enumerate(zip(lens_q, lens_k)):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        r = ranges[..., rq, :]
        rb = range_bias(r if per_head else r[None], n_k, torch.float32)[None].expand(1, heads_q, n_q, n_k)
        g_t = grads_of(q[rq][None], k[rk][None], v[rk][None], grad_out[rq][None], None, scale,
                       visible_mask(1, n_q, n_k, causal=causal), rb.to(dtype))
        check_rule(f"out[{b}]", out[rq], g_t[0][0], out64.detach()[rq], 2)
        for name, ours, rows, i, ref64 in (("dq", dq, rq, 2, g64[0]), ("dk", dk, rk, 3, g64[1]),
                                           ("dv", dv, rk, 4, g64[2])):
            check_rule(f"{name}[{b}]", ours[rows], g_t[i][0], ref64[rows], 3)
    assert (out[lse.transpose(0, 1) == NEG_INF] == 0).all()


def test_varlen_per_row():
    """Ranges local to each sequence; an empty query sequence and a sequence of 9 keys."""
    lens_q, lens_k = [50, 0, 20], [150, 9, 70]
    ranges = torch.cat([mixed_ranges(n_q, n_k) for n_q, n_k in zip(lens_q, lens_k)])
    run_varlen(lens_q, lens_k, 2, 1, 64, ranges)


def test_varlen_per_head_causal_gqa():
    """Per-head windows of 3, 20 and 64 keys and random ranges, causal, GQA 4/2; a sequence
    without keys."""
    lens_q, lens_k = [37, 5], [130, 0]
    heads_q = 4
    per_seq = []
    for n_q, n_k in zip(lens_q, lens_k):
        r = torch.stack([window_ranges(n_q, n_k, w) for w in (3, 20, 64)] + [mixed_ranges(n_q, n_k)])
        per_seq.append(r)
    run_varlen(lens_q, lens_k, heads_q, 2, 64, torch.cat(per_seq, dim=1), causal=True)


# ----------------------------------------------------------------------------- split-KV decode


def test_split_kv_decode_with_ranges(dtype=torch.bfloat16):
    """Decode rows (Lq 5) against 261 keys split three ways: each query's window lies in a
    different part of the keys, one sees none; in sample 1 the windows reach tiles 2 and 3 only,
    which the splits share (the third gets none). Equal to one pass and to the reference."""
    batch, len_q, len_k, heads_q = 2, 5, 261, 2
    ranges = torch.tensor([[[3, 40], [64, 70], [200, 261], [17, 17], [0, 261]],
                           [[130, 140], [150, 200], [17, 17], [140, 145], [200, 230]]], dtype=torch.int32)
    kv_lens = torch.tensor([261, 230])
    q = torch.randn(batch, len_q, heads_q, 64).to(dtype)
    k, v = (torch.randn(batch, len_k, 1, 64).to(dtype) for _ in range(2))
    one = run_padded(batch, len_q, len_k, heads_q, 1, 64, ranges, dtype=dtype, kv_lens=kv_lens, causal=True,
                     grads=False, q=q, k=k, v=v)
    split = run_padded(batch, len_q, len_k, heads_q, 1, 64, ranges, dtype=dtype, kv_lens=kv_lens, causal=True,
                       grads=False, q=q, k=k, v=v, splits=3)
    torch.testing.assert_close(split[0].float(), one[0].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(split[1], one[1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- tile skipping


def request_counts(len_k, ranges, grads=True):
    lib = harness()
    lib.count_requests(True)
    len_q = ranges.shape[1]
    q = torch.randn(1, len_q, 1, 64).half()
    k, v = (torch.randn(1, len_k, 1, 64).half() for _ in range(2))
    kw = padded_kw(q, k, v, 0.125, False, key_ranges=ranges.contiguous(), ranges_strides=(len_q * 2, 0))
    run_kernels(q, k, v, kw, lse_shape=(1, 1, len_q), grad_out=torch.randn_like(q) if grads else None)
    counts = lib.request_counts()
    lib.count_requests(False)
    return counts


@pytest.mark.sanitize
def test_tiles_outside_every_range_cost_nothing():
    """Ranges inside keys [64, 128) of 256: the forward, dQ and dK/dV kernels issue exactly the
    shared-memory requests (and the forward and dQ the global ones) of the same problem cut to
    those 64 keys, ranges shifted by 64: the other three key tiles are never loaded nor computed.
    (The dK/dV CTAs of those tiles still read the ranges to find no query tile, and write their
    zero dK, dV rows.)"""
    if not harness().sanitized:
        pytest.skip("request counts need the sanitizer build (make cuda-sanitize)")
    ranges = torch.stack([torch.tensor([64 + i % 50, 64 + min(i % 50 + 13, 64)]) for i in range(45)])[None]
    wide = request_counts(256, ranges.to(torch.int32))
    cut = request_counts(64, (ranges - 64).to(torch.int32))

    def per_kernel(counts):
        totals = {}
        for c in counts:
            key = (c.kernel.split("<")[0], c.space)
            totals[key] = totals.get(key, 0) + c.requests
        return totals

    got, want = per_kernel(wide), per_kernel(cut)
    for kernel, spaces in (("attention_forward_kernel", ("shared", "global")),
                           ("attention_backward_dq_kernel", ("shared", "global")),
                           ("attention_backward_dkdv_kernel", ("shared",))):
        assert want.get((kernel, "shared"), 0) > 0, kernel
        for space in spaces:
            assert got.get((kernel, space), 0) == want.get((kernel, space), 0), (kernel, space)
