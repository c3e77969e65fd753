"""The attention variants current models use (issue #26), on every fused backend, against a textbook
formula written here (not ``mmfuse.reference``, which is checked against it too): soft-capping
(Gemma 2), learned sinks (gpt-oss), the gradient of a float attn_mask (ALiBi, T5's position_bias),
a value head dim different from q's (DeepSeek's MLA), and attn_mask + dropout on packed sequences.

Tolerances are DESIGN.md's rule (test_attention_kernels.check_rule): max|ours - ref64| <=
2 * max|textbook_in_dtype - ref64| + 1e-5 for outputs, 3x for gradients; fp32 also within 1e-4
relative. Sizes are odd; kv_lens include an empty sample; heads are grouped (GQA).
"""
import math
import zlib

import pytest
import torch

import mmfuse
import mmfuse.nn
from backend_params import backend_params, device_for
from mmfuse.reference.attention import philox_keep
from test_attention_kernels import check_rule

NEG_INF = float("-inf")
KERNELS = backend_params("cpu", "triton")
PHILOX = (0x1234_5678_9ABC, 77)


def textbook(q, k, v, *, scale, causal=False, kv_lens=None, bias=None, softcap=0.0, sinks=None, keep=None, p=0.0):
    """Attention spelt out in q's dtype: (B, Lq, Hq, D) x (B, Lk, Hkv, D|Dv) -> out (B, Lq, Hq, Dv),
    lse (B, Hq, Lq). ``bias``: float (B or 1, Hq or 1, Lq, Lk); ``keep``: bool (B, Hq, Lq, Lk)."""
    batch, len_q, heads_q, _ = q.shape
    len_k, heads_kv = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    pos_k = torch.arange(len_k)
    lens = torch.full((batch,), len_k) if kv_lens is None else kv_lens.cpu().long()
    visible = (pos_k[None, :] < lens[:, None])[:, None, None, :]
    if causal:
        last = torch.arange(len_q)[None, :] + (lens - len_q)[:, None]
        visible = visible & (pos_k[None, None, :] <= last[:, :, None])[:, None]
    s = s.masked_fill(~visible.to(s.device), NEG_INF)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(batch, heads_q, len_q, 1)], dim=-1)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    probs = torch.where(denom > 0, e / torch.where(denom > 0, denom, 1.0), 0.0)[..., :len_k]
    lse = (m + torch.log(denom)).squeeze(-1)
    if keep is not None:
        probs = probs * keep.to(probs.device, probs.dtype) / (1 - p)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def inputs(batch, len_q, len_k, heads_q, heads_kv, dim, dim_v, dtype, device, gen):
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return rand(batch, len_q, heads_q, dim), rand(batch, len_k, heads_kv, dim), rand(batch, len_k, heads_kv, dim_v)


def window_mask(len_q, len_k, window):
    """bool (Lq, Lk), True hides: a bottom-right aligned sliding window of `window` keys (Mistral,
    Gemma 2's local layers)."""
    i = torch.arange(len_q)[:, None] + (len_k - len_q)
    j = torch.arange(len_k)[None, :]
    return (j <= i - window) | (j > i)


# name -> (causal, kv_lens, mask kind, softcap, sinks, dim_v, dropout_p)
CASES = {
    "softcap": (True, True, None, 2.5, False, None, 0.0),
    "sinks": (False, True, None, 0.0, True, None, 0.0),
    "dv": (True, True, "bias", 0.0, False, 24, 0.0),
    "bias grad (B,1,Lq,Lk)": (False, True, "bias", 0.0, False, None, 0.0),
    "bias grad (Lq,Lk)": (True, False, "bias2d", 0.0, False, None, 0.0),
    "gemma2: softcap + window + GQA": (False, False, "window", 5.0, False, None, 0.0),
    "gpt-oss: sinks + window + GQA": (False, True, "window", 0.0, True, None, 0.0),
    "everything + dropout": (True, True, "bias", 3.0, True, 24, 0.3),
}


def run_variant(backend, case, dtype, *, batch=3, len_q=13, len_k=37, heads_q=4, heads_kv=2, dim=16):
    causal, with_lens, mask_kind, softcap, with_sinks, dim_v, p = CASES[case]
    device = device_for(backend)
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))  # fixed per case (str hash is salted)
    q, k, v = inputs(batch, len_q, len_k, heads_q, heads_kv, dim, dim_v or dim, dtype, device, gen)
    kv_lens = torch.tensor([0, 19, len_k])[:batch] if with_lens else None
    mask = bias = None
    if mask_kind in ("bias", "bias2d"):
        shape = (batch, 1, len_q, len_k) if mask_kind == "bias" else (len_q, len_k)
        mask = torch.randn(*shape, generator=gen).to(device)
        bias = mask if mask.dim() == 4 else mask[None, None]
    elif mask_kind == "window":
        mask = window_mask(len_q, len_k, 9).to(device)
        bias = torch.zeros(len_q, len_k, device=device).masked_fill(mask, NEG_INF)[None, None]
    sinks = torch.randn(heads_q, generator=gen).to(device) if with_sinks else None
    keep = philox_keep(torch.tensor(PHILOX), p, batch, heads_q, len_q, len_k, torch.device("cpu")) if p else None
    grad_out = torch.randn(batch, len_q, heads_q, dim_v or dim, generator=gen).to(device, dtype)
    grad_lse = torch.randn(batch, heads_q, len_q, generator=gen).to(device)
    scale = 1 / math.sqrt(dim)
    learn = [x for x in (sinks, mask if mask is not None and mask.is_floating_point() else None) if x is not None]

    def grads(out, lse, leaves):
        # lse takes a gradient only where finite (rows without keys and sinks have -inf)
        loss = (out.float() * grad_out.float()).sum() + (lse.float().nan_to_num(0, 0, 0) * grad_lse).sum()
        return torch.autograd.grad(loss, leaves)

    def ours():
        leaves = [t.detach().requires_grad_() for t in (q, k, v, *learn)]
        mq, mk, mv, *extra = leaves
        ms = extra.pop(0) if sinks is not None else None
        mm = extra.pop(0) if learn and mask is not None and mask.is_floating_point() else mask
        torch.manual_seed(0)
        if p:  # the draw of mmfuse.ops.attention.draw_philox, pinned to PHILOX
            import mmfuse.ops.attention as ops_attention

            real = ops_attention.draw_philox
            ops_attention.draw_philox = lambda device: torch.tensor(PHILOX, device=device)
        try:
            out, lse = mmfuse.cross_attention(mq, mk, mv, kv_lens=kv_lens, causal=causal, attn_mask=mm, dropout_p=p,
                                              softcap=softcap, sinks=ms, return_lse=True, backend=backend)
        finally:
            if p:
                ops_attention.draw_philox = real
        return [out, lse, *grads(out, lse, leaves)]

    def formula(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, *learn)]
        fq, fk, fv, *extra = leaves
        fs = extra.pop(0) if sinks is not None else None
        fb = bias
        if learn and mask is not None and mask.is_floating_point():
            fm = extra.pop(0)
            fb = fm if fm.dim() == 4 else fm[None, None]
        out, lse = textbook(fq, fk, fv, scale=scale, causal=causal, kv_lens=kv_lens, bias=fb, softcap=softcap,
                            sinks=fs, keep=keep, p=p)
        return [out, lse, *grads(out, lse, leaves)]

    got = ours()
    ref64 = [t.detach().cpu().double() for t in formula(torch.float64)]
    in_dtype = [t.detach().cpu().double() for t in formula(dtype)] if dtype != torch.float32 else ref64
    names = ["out", "lse", "dq", "dk", "dv"] + (["dsinks"] if sinks is not None else [])
    names += ["dmask"] if len(learn) > (sinks is not None) else []
    assert len(got) == len(names)
    assert got[0].shape == (batch, len_q, heads_q, dim_v or dim) and got[0].dtype == dtype
    lse, lse64 = got[1].detach().cpu().double(), ref64[1]
    assert torch.equal(lse == NEG_INF, lse64 == NEG_INF), "lse: -inf exactly on the rows without a visible key"
    finite = lse64 != NEG_INF
    torch.testing.assert_close(lse[finite], lse64[finite], atol=2e-5, rtol=2e-5)
    errors = {"lse": (lse[finite] - lse64[finite]).abs().max().item() if finite.any() else 0.0}
    for i, name in enumerate(names):
        if name == "lse":
            continue
        factor = 2 if name == "out" else 3
        ours = got[i].detach().cpu()
        # the fp32 sinks and mask of a half call: the half rule alone (check_rule is stricter on fp32)
        check_rule(f"{case} {name}", ours if dtype == torch.float32 else ours.double(), in_dtype[i], ref64[i], factor)
        errors[name] = (ours.double() - ref64[i]).abs().max().item()
    return errors  # max |ours - ref64| per output, for the evidence table


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", KERNELS)
def test_variant_matches_the_textbook_formula_fp32(backend, case):
    run_variant(backend, case, torch.float32)


@pytest.mark.parametrize("case", ["gemma2: softcap + window + GQA", "everything + dropout"])
@pytest.mark.parametrize("backend", KERNELS)
def test_variant_half_precision_within_the_rule(backend, case):
    run_variant(backend, case, torch.bfloat16)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_the_textbook_formula(case):
    run_variant("reference", case, torch.float64)


def test_gradcheck_float64_cpu_kernel():
    """Every input's gradient, softcap + sinks + float mask + Dv + causal + kv_lens, by finite differences."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (t.requires_grad_() for t in inputs(2, 5, 7, 2, 1, 3, 4, torch.float64, "cpu", gen))
    sinks = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.randn(1, 2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(q, k, v, sinks, mask):
        return mmfuse.cross_attention(q, k, v, kv_lens=torch.tensor([7, 4]), causal=True, attn_mask=mask, softcap=1.5,
                                      sinks=sinks, return_lse=True, backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks, mask))


@pytest.mark.parametrize("shape", [(13, 37), (1, 4, 13, 37), (3, 1, 13, 37), (3, 4, 13, 37), (1, 1, 13, 37)])
def test_mask_gradient_is_summed_over_its_broadcast_dimensions(shape):
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[0])
    q, k, v = inputs(3, 13, 37, 4, 2, 8, 8, torch.float64, "cpu", gen)
    mask = torch.randn(*shape, dtype=torch.float64, generator=gen)
    grads = []
    for backend in ("cpu", "reference"):
        m = mask.clone().requires_grad_()
        out = mmfuse.cross_attention(q, k, v, kv_lens=torch.tensor([0, 20, 37]), attn_mask=m, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), m)[0])
    assert grads[0].shape == mask.shape and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-9)


# --------------------------------------------------------------------------- varlen


def pack(x, lengths):
    return torch.cat([x[b, :n] for b, n in enumerate(lengths)])


def cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)


@pytest.mark.parametrize("heads_in_mask", [False, True])
@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_mask_dropout_softcap_sinks_match_the_padded_call(backend, heads_in_mask):
    """Packed sequences with a per-row mask, dropout, softcap and sinks give the padded op's result
    on the same data padded (dropout included: the stream is the padded one at the longest lengths),
    gradients of every input included."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(11 + heads_in_mask)
    lens_q, lens_k = [5, 0, 9], [11, 6, 1]
    batch, len_q, len_k, heads_q, heads_kv, dim, dim_v = 3, max(lens_q), max(lens_k), 4, 2, 16, 8
    q, k, v = inputs(batch, len_q, len_k, heads_q, heads_kv, dim, dim_v, torch.float32, device, gen)
    bias = torch.randn(batch, heads_q if heads_in_mask else 1, len_q, len_k, generator=gen).to(device)
    bias = bias.masked_fill(torch.rand(bias.shape, generator=gen).to(device) < 0.2, NEG_INF)
    sinks = torch.randn(heads_q, generator=gen).to(device)
    width = len_k + 3  # wider than the longest key sequence: the extra columns are not read
    packed_bias = torch.randn(bias.shape[1], sum(lens_q), width, generator=gen).to(device)
    row = 0
    for b, n in enumerate(lens_q):
        packed_bias[:, row:row + n, :len_k] = bias[b, :, :n]
        row += n
    if not heads_in_mask:
        packed_bias = packed_bias[0]
    grad = torch.randn(sum(lens_q), heads_q, dim_v, generator=gen).to(device)
    results = []
    for layout in ("varlen", "padded"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
        mq, mk, mv, ms = leaves
        torch.manual_seed(5)
        # (not causal: the padded op aligns every sample's causal mask at the padded query count)
        kw = dict(dropout_p=0.25, softcap=4.0, sinks=ms, backend=backend)
        if layout == "varlen":
            mask = packed_bias.detach().requires_grad_()
            out = mmfuse.cross_attention_varlen(pack(mq, lens_q), pack(mk, lens_k), pack(mv, lens_k), cu(lens_q).to(device),
                                                cu(lens_k).to(device), torch.tensor(len_q), torch.tensor(len_k),
                                                attn_mask=mask, **kw)
        else:
            mask = bias.detach().requires_grad_()
            out = pack(mmfuse.cross_attention(mq, mk, mv, kv_lens=torch.tensor(lens_k, device=device),
                                              attn_mask=mask, **kw), lens_q)
        dq, dk, dv, ds, dm = torch.autograd.grad((out * grad).sum(), leaves + [mask])
        if layout == "varlen":  # the packed mask gradient, unpacked; columns past the sequences get 0
            assert (dm[..., len_k:] == 0).all()
            full = torch.zeros_like(bias)
            row = 0
            dm3 = dm if heads_in_mask else dm[None]
            for b, n in enumerate(lens_q):
                full[b, :, :n] = dm3[:, row:row + n, :len_k]
                row += n
            dm = full
        # queries past a sample's length and keys past a sample's kv length get no gradient in either layout
        results.append([out, pack(dq, lens_q), pack(dk, lens_k), pack(dv, lens_k), ds, dm])
    for name, a, b in zip(["out", "dq", "dk", "dv", "dsinks", "dmask"], *results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_varlen_max_seqlen_tensors_compile_without_a_graph_break():
    """transformers passes max_length_q/k as 0-dim tensors: accepted, and under torch.compile
    (fullgraph) not read on the host; dropout's stream still uses the longest lengths."""
    gen = torch.Generator().manual_seed(2)
    lens = [3, 7, 5]
    q = torch.randn(sum(lens), 4, 8, generator=gen)
    k = torch.randn(sum(lens), 2, 8, generator=gen)
    v = torch.randn(sum(lens), 2, 8, generator=gen)
    cu_seqlens = cu(lens)
    mask = torch.rand(sum(lens), 9, generator=gen) < 0.2

    def fn(q, k, v, cu_seqlens, max_len):
        return mmfuse.cross_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, attn_mask=mask,
                                             dropout_p=0.2, causal=True, backend="cpu")

    torch._dynamo.reset()
    torch.manual_seed(9)
    # fallback_random: the compiled graph draws the dropout seed with eager's generator
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(fn, fullgraph=True)(q, k, v, cu_seqlens, torch.tensor(9))  # an upper bound
    torch.manual_seed(9)
    eager = fn(q, k, v, cu_seqlens, torch.tensor(7))
    torch.testing.assert_close(compiled, eager)


# --------------------------------------------------------------------------- the layer


def test_layer_softcap_and_learned_sinks():
    """CrossModalAttention(softcap=, sinks=True) on the fused path matches its reference path, and
    the sinks parameter learns."""
    torch.manual_seed(4)
    layer = mmfuse.nn.CrossModalAttention(32, 4, num_kv_heads=2, softcap=3.0, sinks=True, backend="cpu")
    with torch.no_grad():
        layer.sinks.normal_()
    query, memory = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    padding = torch.rand(3, 11) < 0.3
    fused = layer(query, memory, memory, key_padding_mask=padding, need_weights=False)[0]
    (g_fused,) = torch.autograd.grad(fused.square().sum(), layer.sinks)
    ref = layer(query, memory, memory, key_padding_mask=padding, need_weights=True)[0]  # the reference path
    (g_ref,) = torch.autograd.grad(ref.square().sum(), layer.sinks)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_fused, g_ref, atol=1e-5, rtol=1e-4)
    assert g_fused.abs().sum() > 0
    assert "sinks" in dict(layer.named_parameters())


def test_layer_learned_bias_inside_transformer_decoder_layer():
    """A learned (T5/ALiBi-style) float attn_mask passed the way nn.TransformerDecoderLayer passes
    masks (tgt_mask) runs fused and gets its gradient, equal to nn.MultiheadAttention's."""
    torch.manual_seed(6)
    reference = torch.nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ours = torch.nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    ours.load_state_dict(reference.state_dict())
    for name in ("self_attn", "multihead_attn"):
        mha = getattr(reference, name)
        layer = mmfuse.nn.CrossModalAttention(32, 4, batch_first=True, backend="cpu")
        layer.load_state_dict(mha.state_dict())
        setattr(ours, name, layer)
    tgt, memory = torch.randn(2, 9, 32), torch.randn(2, 13, 32)
    grads = []
    for model in (ours, reference):
        bias = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs().float().neg().mul(0.3).requires_grad_()
        out = model(tgt, memory, tgt_mask=bias)
        grads.append((out, torch.autograd.grad(out.square().sum(), bias)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- bad input

Q, K, V = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
PQ, PK, PV = torch.randn(6, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
CQ, CK = torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)


def dense(**kw):
    return lambda: mmfuse.cross_attention(**({"q": Q, "k": K, "v": V} | kw))


def varlen(**kw):
    args = {"q": PQ, "k": PK, "v": PV, "cu_seqlens_q": CQ, "cu_seqlens_k": CK, "max_seqlen_q": 4, "max_seqlen_k": 5}
    return lambda: mmfuse.cross_attention_varlen(**(args | kw))


BAD = {
    "softcap negative": (dense(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    "softcap nan": (dense(softcap=float("nan")), ValueError, "softcap must be a finite float"),
    "softcap bool": (dense(softcap=True), TypeError, "softcap must be a float"),
    "sinks shape": (dense(sinks=torch.zeros(2)), ValueError, "sinks must have shape \\(4\\)"),
    "sinks int": (dense(sinks=torch.zeros(4, dtype=torch.long)), TypeError, "sinks must have dtype"),
    "sinks list": (dense(sinks=[0.0] * 4), TypeError, "sinks must be a torch.Tensor"),
    "v length differs": (dense(v=V[:, :4, :, :3]), ValueError, "v must have k's shape"),
    "varlen mask rows": (varlen(attn_mask=torch.zeros(5, 5)), ValueError, "attn_mask must have shape"),
    "varlen mask too narrow": (varlen(attn_mask=torch.zeros(6, 4)), ValueError, "W >= the longest key sequence \\(5\\)"),
    "varlen mask heads": (varlen(attn_mask=torch.zeros(3, 6, 5)), ValueError, "attn_mask must have shape"),
    "varlen mask int": (varlen(attn_mask=torch.zeros(6, 5, dtype=torch.long)), TypeError, "attn_mask must have dtype"),
    "varlen dropout": (varlen(dropout_p=1.0), ValueError, "dropout_p must lie in"),
    "max_seqlen float tensor": (varlen(max_seqlen_q=torch.tensor(4.0)), TypeError, "max_seqlen_q must be an int"),
    "max_seqlen 1-d tensor": (varlen(max_seqlen_k=torch.tensor([5])), TypeError, "max_seqlen_k must be an int"),
    "max_seqlen tensor too small": (varlen(max_seqlen_k=torch.tensor(4)), ValueError, "max_seqlen_k must be >="),
    "layer softcap": (lambda: mmfuse.nn.CrossModalAttention(16, 4, softcap=-2.0), ValueError, "softcap must be"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_variant_input_raises_naming_the_argument(case):
    call, error, message = case
    with pytest.raises(error, match=message):
        call()


def test_raw_ops_refuse_bad_variant_arguments():
    """Called directly, the C++ ops check what the Python API checks: no out-of-bounds read."""
    fwd, bwd = torch.ops.mmfuse.cross_attention_fwd, torch.ops.mmfuse.cross_attention_bwd
    out, lse = fwd(Q, K, V, None, None, 0.3, False)
    with pytest.raises(RuntimeError, match="sinks must be a CPU float \\(Hq,\\)"):
        fwd(Q, K, V, None, None, 0.3, False, None, 0.0, None, 0.0, torch.zeros(1))
    with pytest.raises(RuntimeError, match="softcap must be a finite float >= 0"):
        fwd(Q, K, V, None, None, 0.3, False, None, 0.0, None, -1.0, None)
    with pytest.raises(RuntimeError, match="mask_grad needs attn_mask"):
        bwd(out, None, Q, K, V, out, lse, None, None, 0.3, False, None, 0.0, None, 0.0, None, None, True)
    with pytest.raises(RuntimeError, match="grad_out must be a CPU float tensor of shape"):
        bwd(out[..., :3], None, Q, K, V, out, lse, None, None, 0.3, False)
    vfwd = torch.ops.mmfuse.cross_attention_varlen_fwd
    with pytest.raises(RuntimeError, match="attn_mask must be a bool or float \\(total_q, W\\)"):
        vfwd(PQ, PK, PV, CQ, CK, 4, 5, 0.3, False, torch.zeros(6, 4))
    with pytest.raises(RuntimeError, match="k must have q's head dim"):
        fwd(Q, K[..., :3], V, None, None, 0.3, False)
