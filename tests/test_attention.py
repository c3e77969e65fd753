"""mmfuse.cross_attention, cross_attention_varlen and nn.CrossModalAttention.

Oracles, both independent of mmfuse: ``attention64``, softmax(q kᵀ · scale) v written per
(sample, head) in float64 over an explicitly built visibility mask, and
``torch.nn.functional.scaled_dot_product_attention`` with the same boolean mask (compared on
rows that have a visible key; SDPA's fully masked rows are not specified).
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mmfuse
import mmfuse.nn

NEG_INF = float("-inf")


def visible_mask(batch, len_q, len_k, *, kv_lens=None, key_padding_mask=None, causal=False):
    """Bool (B, Lq, Lk), one sample and one query row at a time, from the documented rule."""
    visible = torch.zeros(batch, len_q, len_k, dtype=torch.bool)
    for b in range(batch):
        n_k = len_k if kv_lens is None else int(kv_lens[b])
        visible[b, :, :n_k] = True
        if key_padding_mask is not None:
            visible[b] &= ~key_padding_mask[b]
        if causal:
            for i in range(len_q):
                # bottom-right: query i sees key j iff j <= i + n_k - Lq
                visible[b, i, max(i + n_k - len_q + 1, 0):] = False
    return visible


def attention64(q, k, v, visible, scale):
    """(out (B, Lq, Hq, D), lse (B, Hq, Lq)) in float64; rows with no visible key: 0 and -inf."""
    q, k, v = q.double(), k.double(), v.double()
    batch, len_q, heads_q, _ = q.shape
    group = heads_q // k.shape[2]
    outs, lses = [], []
    for b in range(batch):
        rows = visible[b].any(-1)
        out_b, lse_b = [], []
        for h in range(heads_q):
            scores = (q[b, :, h] @ k[b, :, h // group].T * scale).masked_fill(~visible[b], NEG_INF)
            probs = torch.zeros_like(scores)
            lse = torch.full((len_q,), NEG_INF, dtype=torch.float64)
            probs[rows] = torch.softmax(scores[rows], dim=-1)
            lse[rows] = torch.logsumexp(scores[rows], dim=-1)
            out_b.append(probs @ v[b, :, h // group])
            lse_b.append(lse)
        outs.append(torch.stack(out_b, dim=1))
        lses.append(torch.stack(lse_b))
    return torch.stack(outs), torch.stack(lses)


def sdpa(q, k, v, visible, scale):
    """PyTorch's attention in q's dtype, (B, L, H, D) in and out."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=visible[:, None], scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2)


def plain_attention(q, k, v, visible, scale):
    """Textbook attention computed entirely in q's dtype: the error budget for half inputs."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None], NEG_INF), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def qkv(batch, len_q, len_k, heads_q, heads_kv, head_dim, dtype=torch.float32, requires_grad=False):
    return (
        torch.randn(batch, len_q, heads_q, head_dim, dtype=dtype, requires_grad=requires_grad),
        torch.randn(batch, len_k, heads_kv, head_dim, dtype=dtype, requires_grad=requires_grad),
        torch.randn(batch, len_k, heads_kv, head_dim, dtype=dtype, requires_grad=requires_grad),
    )


def random_kv_lens(len_k):
    """(3,) lengths: an empty sample, a random one, a full one."""
    return torch.tensor([0, int(torch.randint(1, len_k + 1, ())), len_k])


# --------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("len_k", [1, 32, 257, 577])
@pytest.mark.parametrize("len_q", [1, 77, 113])
def test_matches_float64_formula_and_sdpa(len_q, len_k, head_dim):
    batch, heads_q, heads_kv = 3, 8, 2
    q, k, v = qkv(batch, len_q, len_k, heads_q, heads_kv, head_dim)
    scale = 1 / math.sqrt(head_dim)
    kv_lens = random_kv_lens(len_k)
    key_padding_mask = torch.rand(batch, len_k) < 0.3
    for lens, mask, causal in itertools.product([None, kv_lens], [None, key_padding_mask], [False, True]):
        out, lse = mmfuse.cross_attention(
            q, k, v, kv_lens=lens, key_padding_mask=mask, causal=causal, return_lse=True, backend="reference"
        )
        visible = visible_mask(batch, len_q, len_k, kv_lens=lens, key_padding_mask=mask, causal=causal)
        out64, lse64 = attention64(q, k, v, visible, scale)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)

        rows = visible.any(-1)
        torch.testing.assert_close(out[rows], sdpa(q, k, v, visible, scale)[rows], atol=1e-5, rtol=1e-4)
        assert (out[~rows] == 0).all()
        assert (lse.transpose(1, 2)[~rows] == NEG_INF).all()


def test_causal_is_bottom_right_aligned_per_sample():
    # v holds one-hot key indices, so out[b, i, 0] is row i's attention distribution over keys
    len_q, len_k = 3, 5
    q, k, _ = qkv(2, len_q, len_k, 1, 1, len_k)
    v = torch.eye(len_k).expand(2, len_k, len_k)[:, :, None, :].contiguous()
    out = mmfuse.cross_attention(q, k, v, kv_lens=torch.tensor([5, 2]), causal=True)
    expected_visible = torch.tensor([
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]],  # kv_len 5: row i sees j <= i + 2
        [[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],  # kv_len 2: row i sees j <= i - 1
    ], dtype=torch.bool)
    assert torch.equal(out[:, :, 0] > 0, expected_visible)
    torch.testing.assert_close(out[:, 1:, 0].sum(-1), torch.ones(2, 2))


def test_rows_without_keys_give_zero_output_minus_inf_lse_and_zero_gradients():
    batch, len_q, len_k = 3, 7, 4
    q, k, v = qkv(batch, len_q, len_k, 4, 2, 40, requires_grad=True)
    kv_lens = torch.tensor([0, 3, 4])
    key_padding_mask = torch.zeros(batch, len_k, dtype=torch.bool)
    key_padding_mask[2] = True  # sample 2: every key masked
    # causal with Lq > kv_len: sample 1's first rows see nothing too
    out, lse = mmfuse.cross_attention(
        q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask, causal=True, return_lse=True
    )
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=key_padding_mask, causal=True)
    empty = ~visible.any(-1)
    assert empty[1].any() and not empty[1].all()
    assert (out[empty] == 0).all() and (lse.transpose(1, 2)[empty] == NEG_INF).all()

    # a gradient into every lse entry, the -inf ones included, must not produce NaN
    torch.autograd.backward([out, lse], [torch.randn_like(out), torch.randn_like(lse)])
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[empty] == 0).all()
    used_keys = visible.any(1)  # (B, Lk): keys some query sees
    assert (k.grad[~used_keys] == 0).all() and (v.grad[~used_keys] == 0).all()


def test_no_keys_at_all_and_empty_batch():
    q, k, v = qkv(2, 5, 0, 4, 2, 8, requires_grad=True)
    out, lse = mmfuse.cross_attention(q, k, v, return_lse=True)
    assert (out == 0).all() and (lse == NEG_INF).all()
    out.sum().backward()
    assert (q.grad == 0).all()

    q, k, v = qkv(0, 5, 3, 4, 2, 8)
    out, lse = mmfuse.cross_attention(q, k, v, kv_lens=torch.zeros(0, dtype=torch.int64), return_lse=True)
    assert out.shape == (0, 5, 4, 8) and lse.shape == (0, 4, 5)

    empty_cu = torch.zeros(1, dtype=torch.int32)
    q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (0, H, D) packed
    out, lse = mmfuse.cross_attention_varlen(q, k, v, empty_cu, empty_cu, 0, 0, return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_formula(causal):
    batch, len_q, len_k, heads_q, heads_kv, head_dim = 3, 13, 29, 6, 2, 40
    q, k, v = qkv(batch, len_q, len_k, heads_q, heads_kv, head_dim, requires_grad=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kv_lens = random_kv_lens(len_k)
    key_padding_mask = torch.rand(batch, len_k) < 0.3
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=key_padding_mask, causal=causal)

    out, lse = mmfuse.cross_attention(
        q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask, causal=causal, return_lse=True
    )
    out64, lse64 = attention64(q64, k64, v64, visible, 1 / math.sqrt(head_dim))
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward([out, lse], [grad_out, grad_lse])
    torch.autograd.backward([out64, lse64], [grad_out.double(), grad_lse.double()])
    for t, t64 in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    batch, len_q, len_k = 3, 5, 6
    q, k, v = qkv(batch, len_q, len_k, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    kv_lens = torch.tensor([0, 4, 6])
    key_padding_mask = torch.rand(batch, len_k) < 0.3

    def masked_causal(q, k, v):  # has empty rows: their output is constantly 0, their lse -inf
        return mmfuse.cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask, causal=True)

    def with_lse(q, k, v):
        return mmfuse.cross_attention(q, k, v, kv_lens=torch.tensor([1, 4, 6]), scale=0.7, return_lse=True)

    assert torch.autograd.gradcheck(masked_causal, (q, k, v))
    assert torch.autograd.gradcheck(with_lse, (q, k, v))


def test_gradcheck_varlen_float64():
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 2, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(11, 2, 3, dtype=torch.float64, requires_grad=True)

    def varlen(q, k, v):
        return mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, causal=True, return_lse=True)

    assert torch.autograd.gradcheck(varlen, (q, k, v))


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_torchs(dtype):
    batch, len_q, len_k, heads_q, heads_kv, head_dim = 2, 77, 257, 8, 2, 64
    q, k, v = qkv(batch, len_q, len_k, heads_q, heads_kv, head_dim, dtype=dtype, requires_grad=True)
    kv_lens = torch.tensor([101, 257])
    key_padding_mask = torch.rand(batch, len_k) < 0.3
    key_padding_mask[:, 0] = False  # every row keeps a key: plain attention would give NaN
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=key_padding_mask)
    scale = 1 / math.sqrt(head_dim)
    grad_out = torch.randn(batch, len_q, heads_q, head_dim, dtype=dtype)

    def run(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        out.backward(grad_out.to(out.dtype))
        return [out.double()] + [t.grad.double() for t in inputs]

    ours = run(lambda q, k, v: mmfuse.cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask), q, k, v)
    torch_half = run(lambda q, k, v: plain_attention(q, k, v, visible, scale), q, k, v)
    ref64 = run(lambda q, k, v: attention64(q, k, v, visible, scale)[0], q.double(), k.double(), v.double())
    assert all(torch.isfinite(t).all() for t in ours)
    # computed in float32 and rounded once: within one ulp of the exact result
    torch.testing.assert_close(ours[0], ref64[0], atol=1e-6, rtol=torch.finfo(dtype).eps)
    for i, (name, factor) in enumerate([("out", 2), ("dq", 3), ("dk", 3), ("dv", 3)]):
        err = (ours[i] - ref64[i]).abs().max().item()
        budget = factor * (torch_half[i] - ref64[i]).abs().max().item() + 1e-5
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g}"


# --------------------------------------------------------------------------- varlen


def pack(tensors, lengths):
    """Concatenate the first lengths[b] rows of each tensors[b]; int32 prefix sums."""
    packed = torch.cat([t[:n] for t, n in zip(tensors, lengths)])
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    return packed, cu


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_padded(causal):
    q_lens, k_lens = [5, 0, 13, 1, 9], [7, 3, 0, 11, 4]
    batch, heads_q, heads_kv, head_dim = len(q_lens), 4, 2, 40
    q_pad, k_pad, v_pad = qkv(batch, max(q_lens), max(k_lens), heads_q, heads_kv, head_dim)
    q, cu_q = pack(q_pad, q_lens)
    k, cu_k = pack(k_pad, k_lens)
    v, _ = pack(v_pad, k_lens)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # max_seqlen is an upper bound, not necessarily the longest
    out, lse = mmfuse.cross_attention_varlen(
        q, k, v, cu_q, cu_k, max(q_lens) + 2, max(k_lens), causal=causal, return_lse=True
    )
    assert out.shape == q.shape and lse.shape == (heads_q, q.shape[0])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    if not causal:  # padded queries are independent rows: one padded call covers the batch
        out_pad = mmfuse.cross_attention(q_pad, k_pad, v_pad, kv_lens=torch.tensor(k_lens))
        torch.testing.assert_close(out, pack(out_pad, q_lens)[0], atol=1e-6, rtol=1e-5)
    # causal aligns each sample's own lengths: compare with one unpadded call per sample
    for b in range(batch):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        q_b, k_b, v_b = (t[rows][None].detach().requires_grad_() for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        out_b, lse_b = mmfuse.cross_attention(q_b, k_b, v_b, causal=causal, return_lse=True)
        out_b.backward(grad_out[rows_q][None])
        torch.testing.assert_close(out[rows_q], out_b[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse[:, rows_q], lse_b[0], atol=1e-6, rtol=1e-5)
        for packed, single, rows in ((q, q_b, rows_q), (k, k_b, rows_k), (v, v_b, rows_k)):
            torch.testing.assert_close(packed.grad[rows], single.grad[0], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- nn layer


def randomize_(module):
    """MHA starts with zero biases; random ones make the comparison check them."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def padding_mask_keeping_a_key(batch, len_k, p=0.4):
    mask = torch.rand(batch, len_k) < p
    mask[torch.arange(batch), torch.randint(0, len_k, (batch,))] = False
    return mask


@pytest.mark.parametrize("kdim, vdim", [(None, None), (20, 28)])
def test_layer_matches_multihead_attention(kdim, vdim):
    embed_dim, num_heads, batch, len_q, len_k = 48, 6, 3, 11, 19
    mha = randomize_(nn.MultiheadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim, batch_first=True)).eval()
    layer = mmfuse.nn.CrossModalAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim).eval()
    layer.load_state_dict(mha.state_dict())
    query = torch.randn(batch, len_q, embed_dim)
    key = torch.randn(batch, len_k, kdim or embed_dim)
    value = torch.randn(batch, len_k, vdim or embed_dim)
    mask = padding_mask_keeping_a_key(batch, len_k)

    with torch.no_grad():
        out_mha, weights_mha = mha(query, key, value, key_padding_mask=mask, need_weights=True)
        out, weights = layer(query, key, value, key_padding_mask=mask, need_weights=True)
        out_fused, no_weights = layer(query, key, value, key_padding_mask=mask, need_weights=False)
        kv_lens = torch.tensor([19, 7, 1])
        suffix_mask = torch.arange(len_k) >= kv_lens[:, None]
        out_lens, _ = layer(query, key, value, kv_lens=kv_lens, need_weights=False)
        out_mha_lens, _ = mha(query, key, value, key_padding_mask=suffix_mask, need_weights=False)
    torch.testing.assert_close(out, out_mha, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(weights, weights_mha, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_fused, out_mha, atol=2e-6, rtol=1e-5)
    assert no_weights is None
    torch.testing.assert_close(out_lens, out_mha_lens, atol=2e-6, rtol=1e-5)
    if kdim is None:  # value=None means value = key
        torch.testing.assert_close(layer(query, key)[0], mha(query, key, key)[0], atol=2e-6, rtol=1e-5)


def test_layer_grouped_query_heads():
    embed_dim, num_heads, num_kv_heads, batch, len_q, len_k = 48, 6, 2, 2, 9, 14
    layer = randomize_(mmfuse.nn.CrossModalAttention(embed_dim, num_heads, kdim=20, num_kv_heads=num_kv_heads))
    assert layer.k_proj_weight.shape == (16, 20) and layer.v_proj_weight.shape == (16, embed_dim)
    query, key, value = torch.randn(batch, len_q, embed_dim), torch.randn(batch, len_k, 20), torch.randn(batch, len_k, embed_dim)
    kv_lens = torch.tensor([14, 5])
    out, _ = layer(query, key, value, kv_lens=kv_lens, need_weights=False)

    b_q, b_k, b_v = layer.in_proj_bias.split([48, 16, 16])
    q = F.linear(query, layer.q_proj_weight, b_q).unflatten(-1, (num_heads, 8))
    k = F.linear(key, layer.k_proj_weight, b_k).unflatten(-1, (num_kv_heads, 8))
    v = F.linear(value, layer.v_proj_weight, b_v).unflatten(-1, (num_kv_heads, 8))
    attended, _ = attention64(q, k, v, visible_mask(batch, len_q, len_k, kv_lens=kv_lens), 1 / math.sqrt(8))
    expected = layer.out_proj(attended.float().flatten(2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)

    with pytest.raises(RuntimeError, match="num_kv_heads=2 < num_heads=6"):
        layer.load_state_dict(nn.MultiheadAttention(embed_dim, num_heads, kdim=20, batch_first=True).state_dict())


def test_layer_dropout_acts_on_attention_probabilities():
    p = 0.3
    layer = randomize_(mmfuse.nn.CrossModalAttention(16, 1, dropout=p))
    query, key = torch.randn(2, 7, 16), torch.randn(2, 23, 16)
    with torch.no_grad():
        _, weights_eval = layer.eval()(query, key, need_weights=True)
        torch.manual_seed(1)
        out_train, weights_train = layer.train()(query, key, need_weights=True)
        torch.manual_seed(1)
        out_again, _ = layer(query, key)
    kept = weights_train != 0
    assert 0.2 < 1 - kept.float().mean() < 0.4
    torch.testing.assert_close(weights_train[kept], weights_eval[kept] / (1 - p))
    assert torch.isfinite(out_train).all()
    torch.testing.assert_close(out_again, out_train)  # the same path with or without need_weights


def test_layer_compiles_fullgraph():
    # aot_eager traces forward and backward with fake tensors (what fullgraph needs)
    # without spending the time of inductor's C++ code generation
    torch._dynamo.reset()

    class TextToImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mmfuse.nn.CrossModalAttention(24, 4, kdim=20, vdim=20, num_kv_heads=2, backend="reference")
            self.norm = nn.LayerNorm(24)

        def forward(self, text, image, kv_lens):
            return self.norm(text + self.attn(text, image, kv_lens=kv_lens, need_weights=False)[0])

    model = TextToImage()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    text, image, kv_lens = torch.randn(3, 7, 24), torch.randn(3, 13, 20), torch.tensor([13, 0, 6])
    expected = model(text, image, kv_lens)
    got = compiled(text, image, kv_lens)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    def varlen(q, k, v, cu_q, cu_k):
        return mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, 4, 6, causal=True, backend="reference")

    q, k, v = torch.randn(7, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3, 3, 7], dtype=torch.int32), torch.tensor([0, 5, 6, 11], dtype=torch.int32)
    torch.testing.assert_close(
        torch.compile(varlen, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k), varlen(q, k, v, cu_q, cu_k)
    )

    def varlen_unknown_max(q, k, v, cu_q, cu_k):  # max_seqlen from cu_seqlens: a traced SymInt, no graph break
        return mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, None, None, causal=True, backend="reference")

    torch.testing.assert_close(
        torch.compile(varlen_unknown_max, fullgraph=True, backend="aot_eager")(q, k, v, cu_q, cu_k),
        varlen(q, k, v, cu_q, cu_k),
    )
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bad input

Q, K, V = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
PQ, PK, PV = torch.randn(6, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
CU_Q, CU_K = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)
META = torch.device("meta")


def dense(**kwargs):
    args = {"q": Q, "k": K, "v": V} | kwargs
    return lambda: mmfuse.cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def varlen(**kwargs):
    args = {"q": PQ, "k": PK, "v": PV, "cu_seqlens_q": CU_Q, "cu_seqlens_k": CU_K, "max_seqlen_q": 4, "max_seqlen_k": 5} | kwargs
    return lambda: mmfuse.cross_attention_varlen(**args)


def layer(*args, **kwargs):
    return lambda: mmfuse.nn.CrossModalAttention(*args, **kwargs)


def layer_call(**kwargs):
    args = {"query": torch.randn(2, 3, 16), "key": torch.randn(2, 5, 16)} | kwargs
    return lambda: mmfuse.nn.CrossModalAttention(16, 4)(**args)


BAD_INPUTS = {
    "q not a tensor": (dense(q=Q.tolist()), TypeError, "q must be a torch.Tensor"),
    "q rank": (dense(q=Q[0]), ValueError, "q must have 4 dimensions"),
    "q integer": (dense(q=Q.long()), TypeError, "q must have dtype"),
    "k dtype differs": (dense(k=K.double()), TypeError, "k must have q's dtype"),
    "k on another device": (dense(k=K.to(META), v=V.to(META)), ValueError, "k must be on the same device as q"),
    "headdim differs": (dense(k=K[..., :6], v=V[..., :6]), ValueError, "k must have q's headdim 8"),
    "v heads differ": (dense(v=V[:, :, :1]), ValueError, "v must have k's shape"),
    "v length differs": (dense(v=V[:, :4]), ValueError, "v must have k's shape"),
    "batch differs": (dense(k=K[:1], v=V[:1]), ValueError, "k must have q's batch_size"),
    "heads not a multiple": (dense(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8)), ValueError, "nheads_k"),
    "zero headdim": (dense(q=Q[..., :0], k=K[..., :0], v=V[..., :0]), ValueError, "q must have at least one head"),
    "kv_lens negative": (dense(kv_lens=torch.tensor([3, -1])), ValueError, "kv_lens must lie in"),
    "kv_lens too long": (dense(kv_lens=torch.tensor([6, 1])), ValueError, "kv_lens must lie in \\[0, 5\\]"),
    "kv_lens float": (dense(kv_lens=torch.tensor([1.0, 2.0])), TypeError, "kv_lens must have dtype"),
    "kv_lens shape": (dense(kv_lens=torch.tensor([1, 2, 3])), ValueError, "kv_lens must have shape"),
    "kv_lens device": (dense(kv_lens=torch.tensor([1, 2], device=META)), ValueError, "kv_lens must be on"),
    "mask float": (dense(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must have dtype"),
    "mask shape": (dense(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    "scale zero": (dense(scale=0.0), ValueError, "scale must be a finite number > 0"),
    "scale string": (dense(scale="1"), ValueError, "scale"),
    "causal not bool": (dense(causal=1), TypeError, "causal must be a bool"),
    "return_lse not bool": (dense(return_lse=None), TypeError, "return_lse must be a bool"),
    "unknown backend": (dense(backend="gpu"), ValueError, "backend must be one of"),
    "cuda backend on CPU tensors": (dense(backend="cuda"), ValueError, "backend 'cuda' cannot run this case: the 'cuda' backend takes CUDA tensors"),
    "varlen q rank": (varlen(q=PQ[None]), ValueError, "q must have 3 dimensions"),
    "varlen heads": (varlen(k=torch.randn(9, 3, 8), v=torch.randn(9, 3, 8)), ValueError, "nheads_k"),
    "cu_seqlens int64": (varlen(cu_seqlens_q=CU_Q.long()), TypeError, "cu_seqlens_q must have dtype in \\(int32\\)"),
    "cu_seqlens rank": (varlen(cu_seqlens_q=CU_Q[None]), ValueError, "cu_seqlens_q must have 1 dimensions"),
    "cu_seqlens empty": (varlen(cu_seqlens_q=CU_Q[:0]), ValueError, "cu_seqlens_q must have shape \\(batch_size \\+ 1,\\)"),
    "cu_seqlens not from 0": (varlen(cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    "cu_seqlens decreasing": (varlen(cu_seqlens_k=torch.tensor([0, 5, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0 and be non-decreasing"),
    "cu_seqlens last != total": (varlen(cu_seqlens_k=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "cu_seqlens_k must end at k's number of rows \\(9\\)"),
    "cu_seqlens lengths differ": (varlen(cu_seqlens_k=torch.tensor([0, 4, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens_k must have shape \\(batch_size \\+ 1,\\) = \\(3,\\)"),
    "cu_seqlens device": (varlen(cu_seqlens_k=CU_K.to(META)), ValueError, "cu_seqlens_k must be on the same device"),
    "max_seqlen too small": (varlen(max_seqlen_q=3), ValueError, "max_seqlen_q must be >= the longest sequence in cu_seqlens_q \\(4\\)"),
    "max_seqlen float": (varlen(max_seqlen_k=5.0), TypeError, "max_seqlen_k must be an int"),
    "max_seqlen negative": (varlen(max_seqlen_k=-1), ValueError, "max_seqlen_k must lie in \\[0, 2\\*\\*63 - 1\\]"),
    "layer heads": (layer(16, 5), ValueError, "num_heads must be > 0 and divide embed_dim"),
    "layer kv heads": (layer(16, 4, num_kv_heads=3), ValueError, "num_kv_heads must be > 0 and divide num_heads"),
    "layer dropout": (layer(16, 4, dropout=1.0), ValueError, "dropout must lie in"),
    "layer integer mask": (layer_call(key_padding_mask=torch.zeros(2, 5, dtype=torch.long)), TypeError, "key_padding_mask must be bool .* or floating point"),
    "layer attn_mask shape": (layer_call(attn_mask=torch.zeros(3, 4)), ValueError, "a 2-D attn_mask must have shape \\(3, 5\\)"),
    "layer is_causal without mask": (layer_call(is_causal=True), RuntimeError, "is_causal=True is a hint and needs attn_mask"),
    "layer query size": (layer_call(query=torch.randn(2, 3, 12)), ValueError, "query must have shape \\(batch, seq, 16\\)"),
    "layer value length": (layer_call(value=torch.randn(2, 4, 16)), ValueError, "value must have key's batch and length"),
    "layer kv_lens": (layer_call(kv_lens=torch.tensor([6, 1])), ValueError, "kv_lens must lie in"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_naming_the_argument(case):
    call, error, message = case
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------- fuzz


# "cpu": lengths past the C++ kernel's 64-query and 256-key blocks, head dims past its vector width
@pytest.mark.parametrize("backend, max_q, max_k, max_dim", [("reference", 9, 11, 9), ("cpu", 80, 300, 72)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 3),
    len_q=st.integers(1, 80),
    len_k=st.integers(0, 300),
    heads_kv=st.integers(1, 2),
    group=st.integers(1, 3),
    head_dim=st.integers(1, 72),
    use_lens=st.booleans(),
    use_mask=st.booleans(),
    causal=st.booleans(),
    scale=st.one_of(st.none(), st.floats(0.05, 3.0)),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_float64_formula(
    backend, max_q, max_k, max_dim, batch, len_q, len_k, heads_kv, group, head_dim, use_lens, use_mask, causal, scale, seed
):
    len_q, len_k, head_dim = min(len_q, max_q), min(len_k, max_k), min(head_dim, max_dim)
    gen = torch.Generator().manual_seed(seed)
    heads_q = heads_kv * group
    q = torch.randn(batch, len_q, heads_q, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, len_k, heads_kv, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, len_k, heads_kv, head_dim, generator=gen, dtype=torch.float64)
    kv_lens = torch.randint(0, len_k + 1, (batch,), generator=gen) if use_lens else None
    mask = torch.rand(batch, len_k, generator=gen) < 0.4 if use_mask else None
    out, lse = mmfuse.cross_attention(
        q, k, v, kv_lens=kv_lens, key_padding_mask=mask, scale=scale, causal=causal, return_lse=True, backend=backend
    )
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=mask, causal=causal)
    out64, lse64 = attention64(q, k, v, visible, 1 / math.sqrt(head_dim) if scale is None else scale)
    torch.testing.assert_close(out, out64, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, lse64, atol=1e-12, rtol=1e-10)
