"""Per-query key ranges (issue #28): ``key_ranges`` against the same visibility as a dense boolean
``attn_mask`` on the reference, forward and backward, on odd sizes with empty, full and mid-tile
ranges, per query and per head, with kv_lens, key padding and causal; varlen; both C++ backward
schedules; the ``mmfuse.masks`` builders against hand-built masks; the layer and the packer."""
import pytest
import torch

import mmfuse
import mmfuse.nn
from mmfuse.masks import (
    causal_with_bidirectional_blocks,
    document_ranges,
    media_ranges,
    sliding_window_ranges,
)

NEG_INF = float("-inf")


def random_ranges(shape, len_k, gen):
    """[start, end) pairs with empty ranges, full ranges and mid-tile bounds among them."""
    a = torch.randint(0, len_k + 1, shape + (2,), generator=gen)
    ranges = torch.stack([a.min(-1).values, a.max(-1).values], -1)
    flat = ranges.view(-1, 2)
    flat[::7] = torch.tensor([len_k // 3, len_k // 3])  # empty
    flat[1::11] = torch.tensor([0, len_k])  # full
    return ranges.to(torch.int32)


def dense_hidden(ranges, len_k):
    """bool (B, Hq or 1, Lq, Lk), True hides: the same visibility as a dense mask."""
    r = ranges if ranges.dim() == 4 else ranges[:, None]
    pos = torch.arange(len_k)
    return (pos < r[..., :1].long()) | (pos >= r[..., 1:].long())


def grads(out, leaves, gen):
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return list(torch.autograd.grad((out * g).sum(), leaves))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_key_ranges_match_the_dense_mask(per_head, causal):
    gen = torch.Generator().manual_seed(10 * per_head + causal)
    batch, len_q, len_k, heads_q, heads_kv, dim = 3, 77, 301, 4, 2, 24  # 301 keys: two 256-key blocks, ragged
    q = torch.randn(batch, len_q, heads_q, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, len_k, heads_kv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, len_k, heads_kv, dim, generator=gen, dtype=torch.float64)
    ranges = random_ranges((batch, heads_q, len_q) if per_head else (batch, len_q), len_k, gen)
    kv_lens = torch.tensor([len_k, 0, 200])
    padding = torch.rand(batch, len_k, generator=gen) < 0.2
    kw = dict(kv_lens=kv_lens, key_padding_mask=padding, causal=causal)
    results = []
    for call in ("ranges", "dense"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if call == "ranges":
            out, lse = mmfuse.cross_attention(*leaves, key_ranges=ranges, return_lse=True, backend="cpu", **kw)
        else:
            out, lse = mmfuse.cross_attention(*leaves, attn_mask=dense_hidden(ranges, len_k), return_lse=True,
                                              backend="reference", **kw)
        results.append([out, lse] + grads(out, leaves, torch.Generator().manual_seed(1)))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *results):
        if name == "lse":
            assert torch.equal(a == NEG_INF, b == NEG_INF)
            a, b = a[b != NEG_INF], b[b != NEG_INF]
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("threads", [1, 2], ids=["one-pass", "two-pass"])
def test_both_backward_schedules_skip_blocks_exactly(threads):
    """Many (sample, kv head) pairs per thread take the one-pass backward, few the two-pass one;
    keys outside every range hold NaN: skipped tiles and hidden keys never reach the result."""
    gen = torch.Generator().manual_seed(threads)
    batch, heads_kv = (5, 4) if threads == 1 else (2, 1)
    len_q, len_k, heads_q, dim = 65, 530, 2 * heads_kv, 16
    q = torch.randn(batch, len_q, heads_q, dim, generator=gen)
    k = torch.randn(batch, len_k, heads_kv, dim, generator=gen)
    v = torch.randn(batch, len_k, heads_kv, dim, generator=gen)
    # every query of a sample sees a window inside [100, 400): keys outside it are hidden from all
    start = torch.randint(100, 250, (batch, len_q), generator=gen)
    ranges = torch.stack([start, start + torch.randint(0, 150, (batch, len_q), generator=gen)], -1).int()
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :100], v_poisoned[:, 400:] = float("nan"), float("inf")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        leaves = [t.clone().requires_grad_() for t in (q, k_poisoned, v_poisoned)]
        out = mmfuse.cross_attention(*leaves, key_ranges=ranges, backend="cpu")
        ours = [out] + grads(out, leaves, torch.Generator().manual_seed(2))
    finally:
        torch.set_num_threads(previous)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = mmfuse.cross_attention(*leaves, attn_mask=dense_hidden(ranges, len_k), backend="reference")
    ref = [out] + grads(out, leaves, torch.Generator().manual_seed(2))
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=name)
    assert (ours[2][:, :100] == 0).all() and (ours[3][:, 400:] == 0).all()


@pytest.mark.parametrize("per_head", [False, True])
def test_varlen_key_ranges_match_the_padded_call(per_head):
    gen = torch.Generator().manual_seed(7 + per_head)
    lens_q, lens_k = [5, 0, 9, 3], [11, 6, 300, 0]
    heads_q, heads_kv, dim = 4, 2, 16
    cu = [torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32) for lens in (lens_q, lens_k)]
    q = torch.randn(sum(lens_q), heads_q, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(sum(lens_k), heads_kv, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(sum(lens_k), heads_kv, dim, generator=gen, dtype=torch.float64)
    rows = []
    for n_q, n_k in zip(lens_q, lens_k):
        rows.append(random_ranges((heads_q, n_q) if per_head else (n_q,), n_k, gen))
    ranges = torch.cat(rows, dim=-2)
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mmfuse.cross_attention_varlen(*leaves, *cu, max(lens_q), max(lens_k), causal=True, key_ranges=ranges,
                                            backend=backend)
        results.append([out] + grads(out, leaves, torch.Generator().manual_seed(3)))
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def test_builders_against_hand_built_masks():
    assert sliding_window_ranges(5, 8, 3)[0].tolist() == [[1, 4], [2, 5], [3, 6], [4, 7], [5, 8]]
    assert sliding_window_ranges(3, 2, 4, batch=2).shape == (2, 3, 2)
    assert sliding_window_ranges(3, 2, 4)[0].tolist() == [[0, 0], [0, 1], [0, 2]]  # causal: the first query sees none
    docs = torch.tensor([[1, 1, 2, 2, 2, 3]])
    assert document_ranges(docs)[0].tolist() == [[0, 2], [0, 2], [2, 5], [2, 5], [2, 5], [5, 6]]
    assert document_ranges(docs, causal=True)[0].tolist() == [[0, 1], [0, 2], [2, 3], [2, 4], [2, 5], [5, 6]]
    blocks = torch.tensor([[0, 0, 5, 5, 5, 0, 7, 7, 0]])
    assert causal_with_bidirectional_blocks(blocks)[0].tolist() == [
        [0, 1], [0, 2], [0, 5], [0, 5], [0, 5], [0, 6], [0, 8], [0, 8], [0, 9]]
    before, lengths = torch.tensor([[0, 1, 1, 2, 2]]), torch.tensor([[3, 4]])
    assert media_ranges(before, lengths)[0].tolist() == [[0, 0], [0, 3], [0, 3], [3, 7], [3, 7]]
    assert media_ranges(before, lengths, only_latest=False)[0].tolist() == [[0, 0], [0, 3], [0, 3], [0, 7], [0, 7]]


def test_sliding_window_ranges_equal_the_window_mask_in_attention():
    """Mistral's window (query i sees keys i - w < j <= i) as ranges gives the dense mask's result."""
    gen = torch.Generator().manual_seed(5)
    len_q = len_k = 41
    q, k, v = (torch.randn(2, len_q, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ranges = sliding_window_ranges(len_q, len_k, 6, batch=2)
    i, j = torch.arange(len_q)[:, None], torch.arange(len_k)[None, :]
    window = (j <= i - 6) | (j > i)
    torch.testing.assert_close(mmfuse.cross_attention(q, k, v, key_ranges=ranges, backend="cpu"),
                               mmfuse.cross_attention(q, k, v, attn_mask=window, backend="reference"))


def test_layer_and_packer_emit_and_take_key_ranges():
    """ModalityPacker.key_ranges (an image block, causal text) in the padded and packed layouts,
    CrossModalAttention(key_ranges=...) fused against its reference path."""
    torch.manual_seed(8)
    packer = mmfuse.nn.ModalityPacker(2, 16, type_embedding=False)
    image, text = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    lengths = [torch.tensor([5, 3]), torch.tensor([7, 2])]
    padded = packer([image, text], lengths, padded=True)
    packed = packer([image, text], lengths)
    ranges_padded = packer.key_ranges(padded, causal_modalities=[1])
    ranges_packed = packer.key_ranges(packed, causal_modalities=[1])
    assert ranges_padded[1, :5].tolist() == [[0, 3], [0, 3], [0, 3], [0, 4], [0, 5]]
    layer = mmfuse.nn.CrossModalAttention(16, 4, backend="cpu")
    x = padded.tokens
    fused = layer(x, x, x, key_padding_mask=padded.key_padding_mask, need_weights=False, key_ranges=ranges_padded)[0]
    ref = layer(x, x, x, key_padding_mask=padded.key_padding_mask, need_weights=True, key_ranges=ranges_padded)[0]
    valid = ~padded.key_padding_mask
    torch.testing.assert_close(fused[valid], ref[valid], atol=1e-5, rtol=1e-4)
    # the packed layout's ranges give each sequence the same attention
    q = k = v = packed.tokens.view(-1, 4, 4)
    out = mmfuse.cross_attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                        packed.max_seqlen, key_ranges=ranges_packed, backend="cpu")
    qp = x.view(2, -1, 4, 4)
    out_padded = mmfuse.cross_attention(qp, qp, qp, key_padding_mask=padded.key_padding_mask, key_ranges=ranges_padded,
                                        backend="cpu")
    torch.testing.assert_close(out, out_padded[valid], atol=1e-6, rtol=1e-5)


Q, K = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8)


def ranges_call(ranges, **kw):
    return lambda: mmfuse.cross_attention(Q, K, K, key_ranges=ranges, **kw)


BAD = {
    "int64": (ranges_call(torch.zeros(2, 3, 2, dtype=torch.long)), TypeError, "key_ranges must have dtype"),
    "shape": (ranges_call(torch.zeros(2, 3, 3, dtype=torch.int32)), ValueError, "key_ranges must have shape"),
    "heads": (ranges_call(torch.zeros(2, 2, 3, 2, dtype=torch.int32)), ValueError, "key_ranges must have shape"),
    "end past Lk": (ranges_call(torch.tensor([[[0, 5], [0, 6], [0, 1]]] * 2, dtype=torch.int32)), ValueError,
                    "0 <= start <= end <= 5 .*got \\[0, 6\\) at index \\(0, 1\\)"),
    "start after end": (ranges_call(torch.tensor([[[0, 5], [0, 5], [3, 1]]] * 2, dtype=torch.int32)), ValueError,
                        "got \\[3, 1\\) at index \\(0, 2\\)"),
    "negative": (ranges_call(torch.full((2, 3, 2), -1, dtype=torch.int32)), ValueError, "0 <= start"),
    "varlen end past its sequence": (
        lambda: mmfuse.cross_attention_varlen(Q[0], K[0], K[0], torch.tensor([0, 1, 3], dtype=torch.int32),
                                              torch.tensor([0, 2, 5], dtype=torch.int32), 2, 3,
                                              key_ranges=torch.tensor([[0, 2], [0, 3], [0, 4]], dtype=torch.int32)),
        ValueError, "<= 3 .*at index \\(2,\\)"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_key_ranges_raise_naming_the_argument(case):
    call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_raw_op_checks_key_ranges():
    fwd = torch.ops.mmfuse.cross_attention_fwd
    with pytest.raises(RuntimeError, match="key_ranges must satisfy 0 <= start <= end <= 5 .*sample 1, query 2"):
        bad = torch.zeros(2, 3, 2, dtype=torch.int32)
        bad[1, 2] = torch.tensor([4, 9])
        fwd(Q, K, K, None, None, 0.3, False, None, 0.0, None, 0.0, None, bad)
    with pytest.raises(RuntimeError, match="key_ranges must be a CPU int32"):
        fwd(Q, K, K, None, None, 0.3, False, None, 0.0, None, 0.0, None, torch.zeros(2, 3, 2))


def test_bench_skip_fractions_by_hand():
    from mmfuse.bench.masks import skipped_fraction, skipped_key_columns

    ranges = torch.zeros(1, 128, 2, dtype=torch.int32)
    ranges[0, :64] = torch.tensor([0, 64])
    ranges[0, 64:] = torch.tensor([130, 200])  # starts at 128 after rounding down to 4 keys: 72 computed
    assert skipped_key_columns(ranges, 256) == (192 * 64 + 184 * 64) / (256 * 128)
    assert skipped_fraction(ranges, 256) == 0.0  # one 256-key tile per query block, each partly seen
