"""key_ranges (issue #28) on the Triton attention kernels, called through their launchers, against
the float64 reference (``mmfuse.reference.attention`` with the same key_ranges; float16 also
against plain float16 attention with the equivalent dense mask, DESIGN.md's rule): forward,
lse and dq, dk, dv with a lse gradient; padded and varlen, one range per query and per head;
odd sizes (Lq 37, Lk 83, head dim 16 against the interpreter's 16 x 16 tiles), empty and full
ranges and bounds inside tiles, with causal, kv_lens (a 0), key padding, an attention mask and
GQA; the split-KV decode schedule; NaN/inf in keys that no range shows never reaching a result;
and the tiles outside a tile's ranges being skipped, not masked (checked with poison that only a
computed tile could pick up). Sizes are small: the file runs in well under a minute under
TRITON_INTERPRET=1.
"""
import math

import pytest
import torch

from mmfuse.reference.attention import cross_attention as ref_padded
from mmfuse.reference.attention import cross_attention_varlen as ref_varlen
from test_attention_variants_triton import NEG_INF, device, oracle, rand
from test_key_ranges import random_ranges

pytestmark = pytest.mark.triton


def _ops():
    from mmfuse.triton import cross_attention

    return cross_attention


def compare(name, ours, ref, atol):
    """Equal non-finite pattern (lse: -inf rows), finite parts within atol / 1e-4 relative."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours)) and torch.equal(ours[~finite], ref[~finite]), name
    torch.testing.assert_close(ours[finite], ref[finite], atol=atol, rtol=1e-4, msg=name)


def run(fwd, bwd, inputs, rest, gen):
    """Our out, lse and (dq, dk, dv) for random dO and dlse (dlse 0 on rows with lse = -inf)."""
    dev = device()
    inputs = [t.to(dev) for t in inputs]
    rest = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in rest]
    out, lse = fwd(*inputs, *rest, False)
    g_out = rand(*out.shape, gen=gen).to(out.dtype)
    g_lse = rand(*lse.shape, gen=gen)
    dq, dk, dv, _ = bwd(g_out.to(dev), g_lse.to(dev), *inputs, out, lse, *rest, False, False)
    return [out, lse, dq, dk, dv], g_out, g_lse


def reference_grads(fn, leaves, g_out, g_lse):
    """out, lse and the gradients of sum(out * dO) + sum(lse * dlse) over finite lse."""
    leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    loss = (out * g_out.double()).sum() + torch.where(finite, lse, 0.0).mul(g_lse.double()).sum()
    return [out, lse] + list(torch.autograd.grad(loss, leaves))


def check_all(ours, ref, prefix):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), ours, ref):
        compare(f"{prefix} {name}", a, b, 1e-5 if name in ("out", "lse") else 3e-5)


@pytest.mark.parametrize("per_head", [False, True], ids=["per-row", "per-head"])
def test_padded(per_head):
    """Causal; per row with key padding, per head with a float attention mask (-inf entries).
    Sample 1 shows no query a key below 8, nor key 49, which only query 36 sees causally and its
    range ends before: those keys hold NaN/inf, which must not leak (the reference, fed clean
    keys, zeroes them anyway)."""
    gen = torch.Generator().manual_seed(28 + per_head)
    batch, len_q, len_k, heads_q, heads_kv, dim = 2, 37, 83, 4, 2, 16
    q = rand(batch, len_q, heads_q, dim, gen=gen)
    k, v = rand(batch, len_k, heads_kv, dim, gen=gen), rand(batch, len_k, heads_kv, dim, gen=gen)
    kv_lens = torch.tensor([len_k, 50], dtype=torch.int32)
    ranges = random_ranges((batch, heads_q, len_q) if per_head else (batch, len_q), len_k, gen)
    ranges[1] = ranges[1].clamp(8, 50)  # sample 1: within [8, kv_len)
    ranges[1].view(-1, 2)[3] = torch.tensor([8, 50], dtype=torch.int32)  # its full range
    ranges[1, ..., 36, :] = torch.tensor([8, 49], dtype=torch.int32)
    kpm = None if per_head else torch.rand(batch, len_k, generator=gen) < 0.2
    causal = True
    bias = None
    if per_head:
        bias = rand(1, heads_q, len_q, len_k, gen=gen)
        bias[0, 1, 4, :40] = NEG_INF
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[1, :8], poisoned_v[1, 3], poisoned_v[1, 49] = float("nan"), float("inf"), float("nan")
    scale = 1 / math.sqrt(dim)
    ops = _ops()
    ours, g_out, g_lse = run(ops.cross_attention_fwd_triton, ops.cross_attention_bwd_triton, (q, poisoned_k, poisoned_v),
                             [kv_lens, kpm, scale, causal, bias, 0.0, None, 0.0, None, ranges], gen)
    ref = reference_grads(
        lambda q, k, v: ref_padded(q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, key_padding_mask=kpm,
                                   attn_bias=bias, key_ranges=ranges)[:2], (q, k, v), g_out, g_lse)
    check_all(ours, ref, "padded")
    for hidden in (slice(0, 8), 49):  # hidden from every query: exactly 0
        assert (ours[3][1, hidden] == 0).all() and (ours[4][1, hidden] == 0).all()


def varlen_inputs(gen, heads_q=4, heads_kv=2, dim=16, lens_q=(5, 0, 19, 3), lens_k=(13, 7, 40, 0)):
    cu = [torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32) for lens in (lens_q, lens_k)]
    q = rand(sum(lens_q), heads_q, dim, gen=gen)
    k, v = rand(sum(lens_k), heads_kv, dim, gen=gen), rand(sum(lens_k), heads_kv, dim, gen=gen)
    return q, k, v, cu, lens_q, lens_k


@pytest.mark.parametrize("per_head", [False, True], ids=["per-row", "per-head"])
def test_varlen(per_head):
    """Packed sequences with an empty one on each side, local key indices; per row causal, per
    head with an attention mask; max_seqlen given as loose bounds. Sequence 2 shows no query a
    key below 6 (nor, causally, its last key, which only its last query could see): they hold
    NaN."""
    gen = torch.Generator().manual_seed(280 + per_head)
    q, k, v, (cu_q, cu_k), lens_q, lens_k = varlen_inputs(gen)
    rows = [random_ranges((4, n_q) if per_head else (n_q,), n_k, gen) for n_q, n_k in zip(lens_q, lens_k)]
    rows[2] = rows[2].clamp(6, lens_k[2])
    causal = not per_head
    if causal:
        rows[2][-1] = torch.tensor([6, lens_k[2] - 1], dtype=torch.int32)
    ranges = torch.cat(rows, dim=-2)
    bias = None
    if per_head:
        bias = rand(4, q.shape[0], 45, gen=gen)
        bias[:, 7, 10:] = NEG_INF
    poisoned_k, poisoned_v = k.clone(), v.clone()
    first = int(cu_k[2])
    poisoned_k[first:first + 6], poisoned_v[first + 2] = float("nan"), float("-inf")
    hidden = [first + j for j in range(6)] + ([first + lens_k[2] - 1] if causal else [])
    poisoned_v[hidden[-1]] = float("nan")
    ops = _ops()
    bounds = (max(lens_q) + 3, max(lens_k) + 5)
    ours, g_out, g_lse = run(ops.cross_attention_varlen_fwd_triton, ops.cross_attention_varlen_bwd_triton,
                             (q, poisoned_k, poisoned_v),
                             [cu_q, cu_k, *bounds, 0.3, causal, bias, 0.0, None, 0.0, None, ranges], gen)
    ref = reference_grads(
        lambda q, k, v: ref_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), scale=0.3, causal=causal,
                                   attn_bias=bias, key_ranges=ranges), (q, k, v), g_out, g_lse)
    check_all(ours, ref, "varlen")
    assert (ours[3][hidden] == 0).all() and (ours[4][hidden] == 0).all()


def test_float16_rule():
    """Per-head ranges with causal and kv_lens in float16: within 2x (gradients 3x) plain float16
    attention's error, both against float64, with the ranges as a dense -inf mask."""
    gen = torch.Generator().manual_seed(2828)
    batch, len_q, len_k, heads_q, heads_kv, dim = 2, 21, 45, 4, 2, 32
    q = rand(batch, len_q, heads_q, dim, dtype=torch.float16, gen=gen)
    k = rand(batch, len_k, heads_kv, dim, dtype=torch.float16, gen=gen)
    v = rand(batch, len_k, heads_kv, dim, dtype=torch.float16, gen=gen)
    kv_lens = torch.tensor([0, 40], dtype=torch.int32)
    ranges = random_ranges((batch, heads_q, len_q), len_k, gen)
    j = torch.arange(len_k)
    dense = torch.where((j < ranges[..., :1]) | (j >= ranges[..., 1:]), NEG_INF, 0.0)
    scale = 1 / math.sqrt(dim)
    ops = _ops()
    ours, g_out, g_lse = run(ops.cross_attention_fwd_triton, ops.cross_attention_bwd_triton, (q, k, v),
                             [kv_lens, None, scale, True, None, 0.0, None, 0.0, None, ranges], gen)
    results = {}
    for dtype in (torch.float64, torch.float16):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = oracle(*leaves, scale, k_lens=kv_lens, causal=True, bias=dense.to(dtype))
        finite = torch.isfinite(lse)
        loss = (out * g_out.to(dtype)).sum() + (torch.where(finite, lse, 0.0) * g_lse.to(dtype)).sum()
        results[dtype] = [out, lse] + list(torch.autograd.grad(loss, leaves))
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        ref, plain = results[torch.float64][i].detach(), results[torch.float16][i].detach().double()
        mine = ours[i].detach().double().cpu()
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(mine)), name
        torch_err = (plain - ref)[finite].abs().max().item()
        err = (mine - ref)[finite].abs().max().item()
        factor = 2 if name in ("out", "lse") else 3
        assert err <= factor * torch_err + 1e-5, f"fp16 {name}: {err:.3g} > {factor} x {torch_err:.3g} + 1e-5"


def test_split_kv_decode(monkeypatch):
    """Four queries against 90 keys in 3 splits (the decode schedule), per-head ranges with
    causal, kv_lens and sinks: splits that no range reaches contribute nothing."""
    from mmfuse.triton import attention_decode

    gen = torch.Generator().manual_seed(2829)
    batch, len_q, len_k, heads_q, heads_kv, dim = 2, 4, 90, 4, 2, 16
    q = rand(batch, len_q, heads_q, dim, gen=gen)
    k, v = rand(batch, len_k, heads_kv, dim, gen=gen), rand(batch, len_k, heads_kv, dim, gen=gen)
    kv_lens = torch.tensor([90, 61], dtype=torch.int32)
    ranges = random_ranges((batch, heads_q, len_q), len_k, gen)
    ranges[0, 0] = torch.tensor([[0, 0], [70, 90], [33, 35], [0, 90]], dtype=torch.int32)
    ranges[1] = ranges[1].clamp(max=61)
    sinks = rand(heads_q, gen=gen)
    ops, dev = _ops(), device()
    monkeypatch.setattr(attention_decode, "FORCE_SPLITS", 3)
    out, lse = ops.cross_attention_fwd_triton(q.to(dev), k.to(dev), v.to(dev), kv_lens.to(dev), None, 0.25, True,
                                              None, 0.0, None, 0.0, sinks.to(dev), ranges.to(dev), False)
    ref_out, ref_lse, _ = ref_padded(q.double(), k.double(), v.double(), scale=0.25, causal=True, kv_lens=kv_lens,
                                     sinks=sinks.double(), key_ranges=ranges)
    compare("split out", out, ref_out, 1e-5)
    compare("split lse", lse, ref_lse, 1e-5)
    assert (out[0, 0, 0] == 0).all()  # an empty range: 0, lse = the sink
    assert lse[0, 0, 0].item() == pytest.approx(sinks[0].item())


def test_tiles_outside_the_ranges_are_skipped():
    """Queries 0-127 see keys within [0, 16), queries 128-143 keys [258, 270): for any tile sizes
    up to 128, no query tile of one group reaches the other group's keys, in either direction.
    Poison one group with what only a computed tile could pass on to the other (0 · NaN in a
    product): NaN in v of one of its keys and in q and dO of one of its queries. The other
    group's out, dq, dk and dv are bit for bit the clean run's."""
    gen = torch.Generator().manual_seed(2830)
    len_q, len_k, dim = 144, 272, 16
    q, k, v = rand(1, len_q, 1, dim, gen=gen), rand(1, len_k, 1, dim, gen=gen), rand(1, len_k, 1, dim, gen=gen)
    g_out = rand(1, len_q, 1, dim, gen=gen)
    i = torch.arange(len_q)
    low = torch.stack([i % 3, 13 + i % 4], -1)  # starts and ends inside the first key tile
    ranges = torch.where((i < 128)[:, None], low, torch.tensor([258, 270]))[None].to(torch.int32)
    ops, dev = _ops(), device()

    def call(query=None, key=None):
        """out, lse, dq, dk, dv with NaN in q and dO of query ``query`` and in v of key ``key``."""
        q_, v_, g_ = q.clone(), v.clone(), g_out.clone()
        if query is not None:
            q_[0, query], g_[0, query], v_[0, key] = float("nan"), float("nan"), float("nan")
        q_, k_, v_, g_ = (t.to(dev) for t in (q_, k, v_, g_))
        rest = (None, None, 0.25, False, None, 0.0, None, 0.0, None, ranges.to(dev))
        out, lse = ops.cross_attention_fwd_triton(q_, k_, v_, *rest, False)
        grads = ops.cross_attention_bwd_triton(g_, None, q_, k_, v_, out, lse, *rest, False, False)[:3]
        return [t.cpu()[0] for t in (out, lse.mT, *grads)]  # (rows, ...)

    clean = call()
    for query, key, rows, keys in ((130, 265, slice(0, 128), slice(0, 16)), (5, 7, slice(128, None), slice(256, None))):
        poisoned = call(query, key)
        for name, a, b, part in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean, (rows, rows, rows, keys, keys)):
            assert torch.equal(a[part], b[part]), f"{name}: NaN at query {query} / key {key} reached the other group"
        assert poisoned[0][query].isnan().all()  # the poisoned query's own row: NaN, as the reference
    assert torch.isfinite(clean[3]).all() and (clean[3][16:258] == 0).all()  # keys no query sees: 0
    ref = ref_padded(q.double(), k.double(), v.double(), scale=0.25, key_ranges=ranges)[0]
    compare("skip out", clean[0], ref[0], 1e-5)


def test_bad_key_ranges():
    ops = _ops()
    q, k = torch.zeros(2, 3, 4, 16), torch.zeros(2, 5, 2, 16)
    base = (q, k, k, None, None, 0.25, False, None, 0.0, None, 0.0, None)
    with pytest.raises(ValueError, match="key_ranges must be an int32 tensor"):
        ops.cross_attention_fwd_triton(*base, torch.zeros(2, 3, 2, dtype=torch.int64), False)
    with pytest.raises(ValueError, match=r"of shape \(2, 3, 2\) or \(2, 4, 3, 2\)"):
        ops.cross_attention_fwd_triton(*base, torch.zeros(2, 2, 3, 2, dtype=torch.int32), False)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"of shape \(3, 2\) or \(4, 3, 2\)"):
        ops.cross_attention_varlen_fwd_triton(q[0], k[0], k[0], cu, torch.tensor([0, 2, 5], dtype=torch.int32), 2, 3,
                                              0.25, False, None, 0.0, None, 0.0, None,
                                              torch.zeros(2, 3, 2, dtype=torch.int32), False)


def test_public_functions_take_key_ranges_on_triton():
    """mmfuse.cross_attention / cross_attention_varlen with backend="triton" (the feature table
    lets key_ranges through) equal the reference backend, forward and through autograd."""
    import mmfuse
    from mmfuse.masks import causal_with_bidirectional_blocks

    gen = torch.Generator().manual_seed(28)
    dev = device()
    q = rand(2, 29, 4, 16, gen=gen).to(dev).requires_grad_()
    k, v = (rand(2, 29, 2, 16, gen=gen).to(dev).requires_grad_() for _ in range(2))
    # Transfusion's rule: causal text with one bidirectional block of "image" tokens 5..17
    modality = torch.zeros(2, 29, dtype=torch.long)
    modality[:, 5:17] = 1
    ranges = causal_with_bidirectional_blocks(modality).to(dev)
    results = []
    for backend in ("triton", "reference"):
        out = mmfuse.cross_attention(q, k, v, key_ranges=ranges, kv_lens=torch.tensor([29, 20], device=dev),
                                     backend=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        results.append((out, *grads))
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    cu = torch.tensor([0, 11, 29], dtype=torch.int32, device=dev)
    qv, kv_ = rand(29, 4, 16, gen=gen).to(dev), rand(29, 2, 16, gen=gen).to(dev)
    packed_ranges = torch.cat([torch.tensor([[0, 11]] * 11), torch.tensor([[3, 18]] * 18)]).int().to(dev)
    outs = [mmfuse.cross_attention_varlen(qv, kv_, kv_, cu, cu, 18, 18, key_ranges=packed_ranges, backend=b)
            for b in ("triton", "reference")]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
