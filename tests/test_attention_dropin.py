"""nn.CrossModalAttention as a drop-in for nn.MultiheadAttention: the same call signature,
outputs and weights, every mask kind MHA takes, and which path (fused op or reference) each
takes; swapped into torch's own Transformer layers and a CLIP-style block.

The oracle is ``nn.MultiheadAttention`` itself with the same weights, in eval mode with
dropout 0, on inputs where every query row keeps a visible key (MHA's fully masked rows are NaN).
"""
import copy

import pytest
import torch
from torch import nn

import mmfuse.nn
import mmfuse.nn.attention as nn_attention
import mmfuse.reference.attention as reference_attention

EMBED, HEADS = 40, 4  # head dim 10
BATCH, LEN_Q, LEN_K = 3, 11, 13
TOL = {"atol": 2e-5, "rtol": 1e-4}
# gradients sum over every query and key: the key bias's, exactly 0 in real arithmetic, is fp32 noise
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-4}


def randomize_(module):
    """MHA starts with zero biases; random ones make the comparison check them."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def mha_and_ours(batch_first=True, kdim=None, vdim=None):
    mha = randomize_(nn.MultiheadAttention(EMBED, HEADS, kdim=kdim, vdim=vdim, batch_first=batch_first)).eval()
    ours = mmfuse.nn.CrossModalAttention(EMBED, HEADS, kdim=kdim, vdim=vdim, batch_first=batch_first).eval()
    ours.load_state_dict(mha.state_dict())
    return mha, ours


def inputs(len_q=LEN_Q, len_k=LEN_K, kdim=EMBED, vdim=EMBED, batch_first=True):
    shape = (lambda length, features: (BATCH, length, features)) if batch_first else (
        lambda length, features: (length, BATCH, features))
    return torch.randn(shape(len_q, EMBED)), torch.randn(shape(len_k, kdim)), torch.randn(shape(len_k, vdim))


def padding_keeping_key_0(batch, len_k):
    mask = torch.rand(batch, len_k) < 0.4
    mask[:, 0] = False  # every row keeps a key: MHA gives NaN otherwise
    return mask


def to_float(mask):
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def causal(len_q, len_k=None):
    """Top-left causal, bool (True = hidden): query i sees keys j <= i."""
    return torch.ones(len_q, len_k or len_q, dtype=torch.bool).triu(1)


@pytest.fixture
def routes(monkeypatch):
    """Records ("fused", causal) / ("reference", causal) for each attention the layer runs."""
    calls = []
    fused, reference = nn_attention.cross_attention, reference_attention.cross_attention

    def spy_fused(*args, **kwargs):
        calls.append(("fused", kwargs.get("causal", False)))
        return fused(*args, **kwargs)

    def spy_reference(*args, **kwargs):
        calls.append(("reference", kwargs.get("causal", False)))
        return reference(*args, **kwargs)

    monkeypatch.setattr(nn_attention, "cross_attention", spy_fused)
    monkeypatch.setattr(reference_attention, "cross_attention", spy_reference)
    return calls


# --------------------------------------------------------------------------- plain calls


@pytest.mark.parametrize("kdim, vdim", [(None, None), (20, 28)])
def test_plain_call_matches_multihead_attention(kdim, vdim, routes):
    mha, ours = mha_and_ours(kdim=kdim, vdim=vdim)
    query, key, value = inputs(kdim=kdim or EMBED, vdim=vdim or EMBED)
    with torch.no_grad():
        out, weights = ours(query, key, value)
        out_mha, weights_mha = mha(query, key, value)
        assert routes == [("reference", False)]  # need_weights defaults to True, as in MHA
        routes.clear()
        out_fused, none = ours(query, key, value, need_weights=False)
        assert routes[0] == ("fused", False) and none is None
        per_head, per_head_mha = ours(query, key, value, average_attn_weights=False)[1], mha(
            query, key, value, average_attn_weights=False)[1]
    assert weights.shape == (BATCH, LEN_Q, LEN_K) and per_head.shape == (BATCH, HEADS, LEN_Q, LEN_K)
    torch.testing.assert_close(out, out_mha, **TOL)
    torch.testing.assert_close(weights, weights_mha, **TOL)
    torch.testing.assert_close(out_fused, out_mha, **TOL)
    torch.testing.assert_close(per_head, per_head_mha, **TOL)


@pytest.mark.parametrize("need_weights", [False, True])
def test_sequence_first_matches_multihead_attention(need_weights):
    mha, ours = mha_and_ours(batch_first=False)
    query, key, value = inputs(batch_first=False)
    mask = padding_keeping_key_0(BATCH, LEN_K)
    with torch.no_grad():
        out, weights = ours(query, key, value, key_padding_mask=mask, need_weights=need_weights)
        out_mha, weights_mha = mha(query, key, value, key_padding_mask=mask, need_weights=need_weights)
    assert out.shape == (LEN_Q, BATCH, EMBED)
    torch.testing.assert_close(out, out_mha, **TOL)
    torch.testing.assert_close(weights, weights_mha, **TOL)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_unbatched_matches_multihead_attention(batch_first, need_weights, average):
    mha, ours = mha_and_ours(batch_first=batch_first)
    query, key, value = torch.randn(LEN_Q, EMBED), torch.randn(LEN_K, EMBED), torch.randn(LEN_K, EMBED)
    padding = padding_keeping_key_0(1, LEN_K)[0]
    per_head_mask = torch.randn(HEADS, LEN_Q, LEN_K)
    for kwargs in ({}, {"key_padding_mask": padding}, {"attn_mask": per_head_mask}):
        with torch.no_grad():
            out, weights = ours(query, key, value, need_weights=need_weights, average_attn_weights=average, **kwargs)
            expected, weights_mha = mha(
                query, key, value, need_weights=need_weights, average_attn_weights=average, **kwargs)
        assert out.shape == (LEN_Q, EMBED)
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(weights, weights_mha, **TOL)


# --------------------------------------------------------------------------- masks and routes


def mask_cases():
    """name -> (len_k, kwargs builder, route without weights: (path, causal))."""
    square = LEN_Q

    def random_bool(*shape):
        mask = torch.rand(*shape) < 0.4
        mask[..., 0] = False
        return mask

    return {
        "padding bool": (LEN_K, lambda: {"key_padding_mask": padding_keeping_key_0(BATCH, LEN_K)}, ("fused", False)),
        "padding float 0/-inf": (
            LEN_K, lambda: {"key_padding_mask": to_float(padding_keeping_key_0(BATCH, LEN_K))}, ("fused", False)),
        "padding float bias": (LEN_K, lambda: {"key_padding_mask": torch.randn(BATCH, LEN_K)}, ("fused", False)),
        "attn_mask bool 2-D": (LEN_K, lambda: {"attn_mask": random_bool(LEN_Q, LEN_K)}, ("fused", False)),
        "attn_mask float 2-D": (LEN_K, lambda: {"attn_mask": torch.randn(LEN_Q, LEN_K)}, ("fused", False)),
        "attn_mask bool per head": (
            LEN_K, lambda: {"attn_mask": random_bool(BATCH * HEADS, LEN_Q, LEN_K)}, ("fused", False)),
        "attn_mask float per head": (
            LEN_K, lambda: {"attn_mask": torch.randn(BATCH * HEADS, LEN_Q, LEN_K)}, ("fused", False)),
        "attn_mask float + padding float": (
            LEN_K, lambda: {"attn_mask": torch.randn(LEN_Q, LEN_K),
                            "key_padding_mask": to_float(padding_keeping_key_0(BATCH, LEN_K))}, ("fused", False)),
        "causal generate_square_subsequent_mask": (
            square, lambda: {"attn_mask": nn.Transformer.generate_square_subsequent_mask(square)}, ("fused", True)),
        "causal bool": (square, lambda: {"attn_mask": causal(square)}, ("fused", True)),
        "is_causal + mask": (
            square, lambda: {"attn_mask": nn.Transformer.generate_square_subsequent_mask(square), "is_causal": True},
            ("fused", True)),
        "is_causal + mask + padding": (
            square, lambda: {"attn_mask": causal(square), "is_causal": True,
                             "key_padding_mask": padding_keeping_key_0(BATCH, square)}, ("fused", True)),
        "causal float + padding float": (
            square, lambda: {"attn_mask": to_float(causal(square)),
                             "key_padding_mask": to_float(padding_keeping_key_0(BATCH, square))}, ("fused", True)),
        "causal plus one hidden key": (square, lambda: {"attn_mask": almost_causal(square)}, ("fused", False)),
        "causal mask Lq != Lk": (LEN_K, lambda: {"attn_mask": causal(LEN_Q, LEN_K)}, ("fused", False)),
        "is_causal Lq != Lk": (
            LEN_K, lambda: {"attn_mask": causal(LEN_Q, LEN_K), "is_causal": True}, ("fused", False)),
    }


MASK_CASES = mask_cases()


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mask_matches_multihead_attention_and_takes_its_path(case, need_weights, routes):
    len_k, make_kwargs, route = MASK_CASES[case]
    kwargs = make_kwargs()
    mha, ours = mha_and_ours()
    query, key, value = inputs(len_k=len_k)
    with torch.no_grad():
        out, weights = ours(query, key, value, need_weights=need_weights, **kwargs)
        out_mha, weights_mha = mha(query, key, value, need_weights=need_weights, **kwargs)
    torch.testing.assert_close(out, out_mha, **TOL)
    torch.testing.assert_close(weights, weights_mha, **TOL)
    path, is_fused_causal = route
    if need_weights:  # the probabilities come from the reference
        assert routes[0][0] == "reference"
    else:
        assert routes[0] == (path, is_fused_causal)
        assert path == "fused" or "fused" not in {p for p, _ in routes}


def almost_causal(length):
    """The causal mask with one more key hidden below the diagonal."""
    mask = causal(length)
    mask[5, 2] = True
    return mask


def test_causal_detection():
    mask = almost_causal(7)
    assert not nn_attention._is_top_left_causal(mask)
    assert not nn_attention._is_top_left_causal(to_float(mask))
    assert nn_attention._is_top_left_causal(to_float(causal(7)))
    assert not nn_attention._is_top_left_causal(to_float(causal(7)) - 1.0)


def test_mixed_mask_dtypes_warn_as_multihead_attention_does():
    _, ours = mha_and_ours()
    query, key, value = inputs()
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ours(query, key, value, key_padding_mask=padding_keeping_key_0(BATCH, LEN_K),
             attn_mask=torch.randn(LEN_Q, LEN_K))


# --------------------------------------------------------------------------- inside torch's layers


def assert_same_forward_and_backward(ours_module, torch_module, *args, **kwargs):
    """Outputs and every gradient (inputs and parameters) of two modules on the same inputs."""
    args_ours = [a.clone().requires_grad_() for a in args]
    args_torch = [a.clone().requires_grad_() for a in args]
    out, expected = ours_module(*args_ours, **kwargs), torch_module(*args_torch, **kwargs)
    torch.testing.assert_close(out, expected, **TOL)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    for a, b in zip(args_ours, args_torch):
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL)
    grads_ours = dict(ours_module.named_parameters())
    for name, p in torch_module.named_parameters():
        torch.testing.assert_close(grads_ours[name].grad, p.grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def swapped(layer, *names):
    """A copy of ``layer`` whose MHA submodules ``names`` are CrossModalAttention with their weights."""
    copy_ = copy.deepcopy(layer)
    for name in names:
        mha = getattr(layer, name)
        ours = mmfuse.nn.CrossModalAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
        ours.load_state_dict(mha.state_dict())
        setattr(copy_, name, ours.eval())
    return copy_


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_in_transformer_encoder_layer(batch_first, norm_first, routes):
    layer = randomize_(nn.TransformerEncoderLayer(
        EMBED, HEADS, dim_feedforward=56, dropout=0.0, batch_first=batch_first, norm_first=norm_first)).eval()
    ours = swapped(layer, "self_attn")
    length = 17
    src = torch.randn((BATCH, length, EMBED) if batch_first else (length, BATCH, EMBED))
    padding = padding_keeping_key_0(BATCH, length)
    mask = nn.Transformer.generate_square_subsequent_mask(length)
    # parameters require grad, so torch's inference fast path is off and the swapped layer runs
    assert_same_forward_and_backward(
        ours, layer, src, src_mask=mask, is_causal=True, src_key_padding_mask=to_float(padding))
    assert routes == [("fused", True)]
    routes.clear()
    assert_same_forward_and_backward(ours, layer, src, src_key_padding_mask=padding)
    assert routes == [("fused", False)]
    # without autograd the encoder layer's fast path reads our in_proj_weight/bias and out_proj
    with torch.no_grad():
        torch.testing.assert_close(ours(src, src_key_padding_mask=padding), layer(src, src_key_padding_mask=padding),
                                   **TOL)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_in_transformer_decoder_layer(batch_first, norm_first, routes):
    layer = randomize_(nn.TransformerDecoderLayer(
        EMBED, HEADS, dim_feedforward=56, dropout=0.0, batch_first=batch_first, norm_first=norm_first)).eval()
    ours = swapped(layer, "self_attn", "multihead_attn")
    len_tgt, len_memory = 11, 19
    shape = (lambda length: (BATCH, length, EMBED)) if batch_first else (lambda length: (length, BATCH, EMBED))
    tgt, memory = torch.randn(shape(len_tgt)), torch.randn(shape(len_memory))
    memory_padding = padding_keeping_key_0(BATCH, len_memory)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(len_tgt)
    assert_same_forward_and_backward(
        ours, layer, tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=True, memory_key_padding_mask=memory_padding)
    assert routes == [("fused", True), ("fused", False)]


def test_in_clip_style_residual_block():
    """CLIP's text transformer: sequence-first, x = x + attn(ln(x), ln(x), ln(x), attn_mask=causal)."""

    class ResidualAttentionBlock(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.ln = nn.LayerNorm(EMBED)
            self.attn = attn

        def forward(self, x, attn_mask):
            y = self.ln(x)
            return x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]

    block = randomize_(ResidualAttentionBlock(nn.MultiheadAttention(EMBED, HEADS))).eval()
    block_ours = swapped(block, "attn")
    length = 23
    mask = torch.empty(length, length).fill_(float("-inf")).triu_(1)  # CLIP's build_attention_mask
    assert_same_forward_and_backward(block_ours, block, torch.randn(length, BATCH, EMBED), attn_mask=mask)


def test_in_transformer_encoder_inference_fast_path(routes):
    """Without autograd, nn.TransformerEncoder's fast path (nested tensors for the padding) reads
    the swapped layers' weights and runs torch's kernel, as with MHA; with autograd they run."""
    layer = randomize_(nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=56, dropout=0.0, batch_first=True))
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    ours = copy.deepcopy(encoder)
    for i, block in enumerate(ours.layers):
        ours.layers[i] = swapped(block, "self_attn")
    src, padding = torch.randn(BATCH, 17, EMBED), padding_keeping_key_0(BATCH, 17)
    with torch.no_grad():
        out, expected = ours(src, src_key_padding_mask=padding), encoder(src, src_key_padding_mask=padding)
    valid = ~padding[..., None].expand_as(expected)  # the nested path leaves padded rows at 0
    torch.testing.assert_close(out[valid], expected[valid], **TOL)
    assert routes == []
    assert_same_forward_and_backward(ours, encoder, src, src_key_padding_mask=padding)
    assert routes == [("fused", False)] * 2


@pytest.mark.parametrize("attn_mask", ["float bias", "bool per head", "float bias requiring grad"])
def test_attn_mask_gradients_match_multihead_attention(attn_mask, routes):
    """General masks run in-kernel, a mask that requires grad too (the kernel gives its gradient)."""
    mha, ours = mha_and_ours(batch_first=False)
    mask = torch.rand(BATCH * HEADS, LEN_Q, LEN_K) < 0.4 if attn_mask == "bool per head" else torch.randn(LEN_Q, LEN_K)
    if mask.dtype == torch.bool:
        mask[..., 0] = False
    mask.requires_grad_(attn_mask.endswith("requiring grad"))
    query, key, value = inputs(batch_first=False)

    class Attend(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, q, k, v):
            return self.attn(q, k, v, need_weights=False, attn_mask=mask)[0]

    assert_same_forward_and_backward(Attend(ours), Attend(mha), query, key, value)
    assert routes == [("fused", False)]


# --------------------------------------------------------------------------- training with attention dropout


def train_copy(layer, backend, *names):
    """``swapped(layer, names)`` in train mode, its CrossModalAttention layers on ``backend``."""
    copy_ = swapped(layer, *names).train()
    for name in names:
        getattr(copy_, name).backend = backend
    return copy_


def run_seeded(module, seed, *args, **kwargs):
    torch.manual_seed(seed)
    args = [a.clone().requires_grad_() for a in args]
    out = module(*args, **kwargs)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [a.grad for a in args] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_layers_train_with_attention_dropout_on_the_fused_path(kind, routes):
    """In train mode with dropout 0.1 the swapped attention runs the fused C++ kernel (the routes
    spy sees no reference call) and drops exactly the elements the reference drops under the
    same seed (both implement the Philox stream), so outputs and gradients match the layer whose
    attention runs on the reference; another seed gives another result."""
    if kind == "encoder":
        layer = randomize_(nn.TransformerEncoderLayer(EMBED, HEADS, dim_feedforward=56, dropout=0.1, batch_first=True))
        names, length = ("self_attn",), 17
        args = (torch.randn(BATCH, length, EMBED),)
        kwargs = dict(src_key_padding_mask=padding_keeping_key_0(BATCH, length))
        expected_routes = [("fused", False)]
    else:
        layer = randomize_(nn.TransformerDecoderLayer(EMBED, HEADS, dim_feedforward=56, dropout=0.1, batch_first=True))
        names = ("self_attn", "multihead_attn")
        args = (torch.randn(BATCH, 11, EMBED), torch.randn(BATCH, 19, EMBED))
        kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(11), tgt_is_causal=True,
                      memory_key_padding_mask=padding_keeping_key_0(BATCH, 19))
        expected_routes = [("fused", True), ("fused", False)]
    fused = train_copy(layer, "cpu", *names)
    got = run_seeded(fused, 5, *args, **kwargs)
    assert routes == expected_routes
    routes.clear()
    on_reference = train_copy(layer, "reference", *names)
    expected = run_seeded(on_reference, 5, *args, **kwargs)
    assert ("reference", False) in routes or ("reference", True) in routes
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **GRAD_TOL)
    other = run_seeded(fused, 6, *args, **kwargs)
    assert not torch.allclose(got[0], other[0])


def test_training_output_averages_to_multihead_attention_in_eval():
    """E[attention with dropout] = attention without: the mean of N training-mode outputs of the
    fused layer approaches MHA's eval output, elementwise within 5 standard errors."""
    mha, ours = mha_and_ours()
    ours.dropout = 0.2
    ours.train()
    query, key, value = inputs()
    draws = 300
    with torch.no_grad():
        outs = torch.stack([ours(query, key, value, need_weights=False)[0] for _ in range(draws)])
        expected, _ = mha(query, key, value, need_weights=False)
    stderr = outs.std(0) / draws**0.5
    z = (outs.mean(0) - expected) / stderr
    assert z.abs().max().item() < 5.0
    assert not torch.allclose(outs[0], outs[1])  # dropout is on
