"""The Triton attention launchers' issue-#26 variants (softcap, sinks, Dv != D, the attention
mask's gradient dS, varlen attention mask + dropout) called directly, against a float64 oracle
written here (gradients by autograd through it). Odd sizes, GQA, kv_lens with a 0, causal.
fp32: within 1e-4 relative (atol 1e-5 for outputs, 3e-5 for gradients); float16: DESIGN.md's
rule (2x plain float16 attention's error, gradients 3x).
"""
import math

import pytest
import torch

from mmfuse.reference.attention import philox_keep

pytestmark = pytest.mark.triton

NEG_INF = float("-inf")
MAX_ERR = {}  # feature -> max error seen (printed with -s, for the closing note)


def _ops():
    from mmfuse.triton import cross_attention

    return cross_attention


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def oracle(q, k, v, scale, *, q_lens=None, k_lens=None, kpm=None, causal=False, bias=None, keep=None,
           dropout_p=0.0, softcap=0.0, sinks=None):
    """out (B, Lq, Hq, Dv), lse (B, Hq, Lq) of padded float64 inputs; rows past q_lens are empty."""
    batch, len_q, heads_q, _ = q.shape
    len_k, group = k.shape[1], heads_q // k.shape[2]
    qh = q.transpose(1, 2)
    kh, vh = (t.repeat_interleave(group, 2).transpose(1, 2) for t in (k, v))
    s = scale * qh @ kh.mT
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    ql = torch.full((batch,), len_q) if q_lens is None else q_lens.long().cpu()
    kl = torch.full((batch,), len_k) if k_lens is None else k_lens.long().cpu()
    i, j = torch.arange(len_q)[:, None], torch.arange(len_k)
    vis = (i < ql[:, None, None, None]) & (j < kl[:, None, None, None])
    if kpm is not None:
        vis = vis & ~kpm.cpu()[:, None, None, :]
    if causal:
        vis = vis & (j <= i + (kl - ql)[:, None, None, None])
    if bias is not None:
        s = s + bias
        vis = vis & (bias != NEG_INF)
    vis = vis.expand(s.shape)
    s = torch.where(vis, s, 0.0)
    any_key = vis.any(-1)
    m = torch.where(vis, s, NEG_INF).amax(-1).detach()
    m = torch.where(any_key, m, 0.0)
    total = torch.where(vis, (s - m[..., None]).exp(), 0.0).sum(-1)
    lse = torch.where(any_key, m + torch.where(any_key, total, 1.0).log(), NEG_INF)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks[None, :, None].expand(lse.shape))
    lse_safe = torch.where(torch.isinf(lse), 0.0, lse)
    p = torch.where(vis, (s - lse_safe[..., None]).exp(), 0.0)
    if keep is not None:
        p = torch.where(keep, p / (1 - dropout_p), 0.0)
    return (p @ vh).transpose(1, 2), lse


def check(name, ours, ref, atol, factor=None, torch_err=None):
    ours, ref = ours.double().cpu(), ref.double().cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours)) and torch.equal(ours[~finite], ref[~finite]), name
    err = (ours[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
    if factor is None:
        torch.testing.assert_close(ours[finite], ref[finite], atol=atol, rtol=1e-4, msg=name)
    else:
        assert err <= factor * torch_err + 1e-5, f"{name}: {err:.3g} > {factor} x {torch_err:.3g} + 1e-5"


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def padded_case(*, dim=24, dim_v=24, softcap=0.0, sinks=False, bias_kind=None, dropout_p=0.0, causal=True,
                kpm=False, dtype=torch.float32, seed=0, batch=3, len_q=7, len_k=19, heads_q=4, heads_kv=2):
    gen = torch.Generator().manual_seed(seed)
    q = rand(batch, len_q, heads_q, dim, dtype=dtype, gen=gen)
    k = rand(batch, len_k, heads_kv, dim, dtype=dtype, gen=gen)
    v = rand(batch, len_k, heads_kv, dim_v, dtype=dtype, gen=gen)
    kv_lens = torch.tensor([0, 11] + [len_k] * (batch - 2), dtype=torch.int32)
    mask = torch.rand(batch, len_k, generator=gen) < 0.2 if kpm else None
    sink = rand(heads_q, gen=gen) if sinks else None
    attn = None
    if bias_kind == "float":
        attn = rand(1, heads_q, len_q, len_k, gen=gen)
        attn[0, 1, 2, :5] = NEG_INF
    elif bias_kind == "bool":
        attn = torch.rand(batch, 1, len_q, len_k, generator=gen) < 0.25
    philox = torch.tensor([1234567 + seed, 89], dtype=torch.int64) if dropout_p else None
    scale = 1 / math.sqrt(dim)
    return dict(q=q, k=k, v=v, kv_lens=kv_lens, kpm=mask, sinks=sink, attn=attn, philox=philox, scale=scale,
                causal=causal, softcap=softcap, dropout_p=dropout_p)


def reference(c, dtype, g_out, g_lse, mask_grad):
    """The oracle in ``dtype`` (float64: the reference; float16: plain float16 attention) with
    the gradients of sum(out * g_out) + sum(lse * g_lse) (rows with lse = -inf excluded)."""
    q, k, v = (c[n].to(dtype).requires_grad_(True) for n in "qkv")
    bias = None
    if c["attn"] is not None:
        a = c["attn"]
        bias = torch.zeros(a.shape, dtype=dtype).masked_fill(a, NEG_INF) if a.dtype == torch.bool else a.to(dtype)
        bias = bias.expand(q.shape[0], q.shape[2], *bias.shape[-2:]).clone().requires_grad_(mask_grad)
    keep = None
    if c["dropout_p"]:
        b, lq, h, _ = c["q"].shape
        keep = philox_keep(c["philox"], c["dropout_p"], b, h, lq, c["k"].shape[1], torch.device("cpu"))
    sinks = None if c["sinks"] is None else c["sinks"].to(dtype)
    out, lse = oracle(q, k, v, c["scale"], k_lens=c["kv_lens"], kpm=c["kpm"], causal=c["causal"], bias=bias,
                      keep=keep, dropout_p=c["dropout_p"], softcap=c["softcap"], sinks=sinks)
    res = dict(out=out.detach(), lse=lse.detach())
    if g_out is not None:
        finite = torch.isfinite(lse)
        (out * g_out.to(dtype)).sum().add((torch.where(finite, lse, 0.0) * g_lse.to(dtype)).sum()).backward()
        res.update(dq=q.grad, dk=k.grad, dv=v.grad)
        if mask_grad:
            res["dmask"] = bias.grad
    return res


def run_padded(c, grads=True, mask_grad=False):
    """{name: (ours, float64 reference)} and the plain-dtype oracle's results."""
    ops, dev = _ops(), device()
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    args = (to(c["q"]), to(c["k"]), to(c["v"]), to(c["kv_lens"]), to(c["kpm"]), c["scale"], c["causal"], to(c["attn"]),
            c["dropout_p"], to(c["philox"]), c["softcap"], to(c["sinks"]))
    out, lse = ops.cross_attention_fwd_triton(*args, None, False)
    ours = dict(out=out, lse=lse)
    g_out = g_lse = None
    if grads:
        gen = torch.Generator().manual_seed(7)
        g_out, g_lse = rand(*out.shape, gen=gen).to(out.dtype), rand(*lse.shape, gen=gen)
        dq, dk, dv, dmask = ops.cross_attention_bwd_triton(to(g_out), to(g_lse), *args[:3], out, lse, *args[3:],
                                                           None, mask_grad, False)
        ours.update(dq=dq, dk=dk, dv=dv)
        if mask_grad:
            ours["dmask"] = dmask
        else:
            assert dmask.numel() == 0
    ref = reference(c, torch.float64, g_out, g_lse, mask_grad)
    plain = reference(c, c["q"].dtype, g_out, g_lse, mask_grad) if c["q"].dtype != torch.float32 else None
    return {name: (ours[name], ref[name]) for name in ours}, plain


def assert_fp32(feature, res):
    res = res[0]
    for name, (ours, ref) in res.items():
        assert ours.dtype == torch.float32
        check(f"{feature} {name}", ours, ref, atol=1e-5 if name in ("out", "lse") else 3e-5)


@pytest.mark.parametrize("feature, kw", [
    ("softcap", dict(softcap=2.5, kpm=True)),
    ("sinks", dict(sinks=True, kpm=True)),
    ("dv", dict(dim=24, dim_v=40, causal=False)),
    ("dv-narrow", dict(dim=40, dim_v=8)),
    ("softcap+sinks+bias", dict(softcap=3.0, sinks=True, bias_kind="bool")),
    ("dropout+softcap", dict(dropout_p=0.3, softcap=4.0, kpm=True)),
])
def test_padded_variants(feature, kw):
    assert_fp32(feature, run_padded(padded_case(**kw)))


@pytest.mark.parametrize("causal", [True, False])
def test_mask_grad(causal):
    """dS is the float mask's gradient, 0 where hidden (-inf, kv_lens 0, causal)."""
    res = run_padded(padded_case(bias_kind="float", softcap=2.0, causal=causal, dropout_p=0.2 if causal else 0.0),
                     mask_grad=True)
    assert res[0]["dmask"][0].shape == (3, 4, 7, 19)
    assert (res[0]["dmask"][0][0] == 0).all()  # kv_lens 0: nothing visible
    assert_fp32("dmask", res)


def test_float16_rule():
    c = padded_case(dim=24, dim_v=40, softcap=3.0, sinks=True, bias_kind="float", dtype=torch.float16, seed=3)
    res, plain = run_padded(c, mask_grad=True)
    for name, (ours, ref) in res.items():
        assert ours.dtype == (torch.float16 if name in ("out", "dq", "dk", "dv") else torch.float32)
        torch_err = (plain[name].double() - ref).nan_to_num(0.0, 0.0, 0.0).abs().max().item()
        factor = 2 if name in ("out", "lse") else 3
        check(f"fp16 {name}", ours, ref, 0, factor=factor, torch_err=torch_err)


def varlen_case(*, dropout_p=0.0, softcap=0.0, sinks=False, heads_mask=4, causal=True, seed=1, dim_v=24):
    gen = torch.Generator().manual_seed(seed)
    q_lens, k_lens = torch.tensor([5, 0, 9, 3]), torch.tensor([13, 7, 11, 0])
    cu_q = torch.cat((torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0))).to(torch.int32)
    cu_k = torch.cat((torch.zeros(1, dtype=torch.int64), k_lens.cumsum(0))).to(torch.int32)
    tq, tk, width = int(q_lens.sum()), int(k_lens.sum()), 15
    q, k, v = rand(tq, 4, 24, gen=gen), rand(tk, 2, 24, gen=gen), rand(tk, 2, dim_v, gen=gen)
    attn = rand(heads_mask, tq, width, gen=gen)
    attn[0, 0, :3] = NEG_INF
    attn[:, 5:, 4] = NEG_INF  # a key of sequence 2 hidden from all its queries
    philox = torch.tensor([98765 + seed, 3], dtype=torch.int64) if dropout_p else None
    sink = rand(4, gen=gen) if sinks else None
    return dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, q_lens=q_lens, k_lens=k_lens, attn=attn, philox=philox,
                sinks=sink, softcap=softcap, dropout_p=dropout_p, causal=causal, scale=0.3)


def to_padded(x, cu, lens, length):
    out = x.new_zeros((len(lens), length) + tuple(x.shape[1:]))
    for b, n in enumerate(lens.tolist()):
        out[b, :n] = x[int(cu[b]):int(cu[b]) + n]
    return out


def test_varlen_mask_dropout():
    """The packed mask (Hq, total_q, W) and dropout on the padded stream of the longest sequences
    (max_seqlen passed as loose upper bounds), softcap and sinks; dS in the packed layout."""
    c = varlen_case(dropout_p=0.25, softcap=3.0, sinks=True, dim_v=40)
    ops, dev = _ops(), device()
    lq, lk = 9, 13
    args = [c[n].to(dev) for n in ("q", "k", "v", "cu_q", "cu_k")]
    rest = (c["scale"], c["causal"], c["attn"].to(dev), c["dropout_p"], c["philox"].to(dev), c["softcap"],
            c["sinks"].to(dev))
    out, lse = ops.cross_attention_varlen_fwd_triton(*args, lq + 6, lk + 20, *rest, None, False)
    q64, k64, v64 = (to_padded(c[n].double(), c[cu], c[ln], L).requires_grad_(True)
                     for n, cu, ln, L in (("q", "cu_q", "q_lens", lq), ("k", "cu_k", "k_lens", lk),
                                          ("v", "cu_k", "k_lens", lk)))
    bias = to_padded(c["attn"].double().transpose(0, 1), c["cu_q"], c["q_lens"], lq).permute(0, 2, 1, 3)[..., :lk]
    bias = bias.clone().requires_grad_(True)
    keep = philox_keep(c["philox"], c["dropout_p"], 4, 4, lq, lk, torch.device("cpu"))
    out64, lse64 = oracle(q64, k64, v64, c["scale"], q_lens=c["q_lens"], k_lens=c["k_lens"], causal=True, bias=bias,
                          keep=keep, dropout_p=c["dropout_p"], softcap=c["softcap"], sinks=c["sinks"])
    rows = [(b, i) for b in range(4) for i in range(int(c["q_lens"][b]))]
    pick = lambda t: torch.stack([t[b, i] for b, i in rows])  # noqa: E731  (padded -> packed rows)
    check("varlen out", out, pick(out64.detach()), 1e-5)
    check("varlen lse", lse.T, pick(lse64.detach().transpose(1, 2)), 1e-5)
    gen = torch.Generator().manual_seed(5)
    g_out, g_lse = rand(*out.shape, gen=gen), rand(*lse.shape, gen=gen)
    loss = (pick(out64) * g_out.double()).sum() + (pick(lse64.transpose(1, 2)) * g_lse.T.double()).sum()
    loss.backward()
    dq, dk, dv, dmask = ops.cross_attention_varlen_bwd_triton(g_out.to(dev), g_lse.to(dev), *args[:3], out, lse,
                                                              *args[3:], lq + 6, lk + 20, *rest, None, True, False)
    check("varlen dq", dq, pick(q64.grad), 3e-5)
    krows = [(b, j) for b in range(4) for j in range(int(c["k_lens"][b]))]
    kpick = lambda t: torch.stack([t[b, j] for b, j in krows])  # noqa: E731
    check("varlen dk", dk, kpick(k64.grad), 3e-5)
    check("varlen dv", dv, kpick(v64.grad), 3e-5)
    assert dmask.shape == (4, int(c["q_lens"].sum()), 15)
    ref_dm = torch.zeros(4, int(c["q_lens"].sum()), 15, dtype=torch.float64)
    for r, (b, i) in enumerate(rows):
        ref_dm[:, r, :lk] = bias.grad[b, :, i]
    for r, (b, i) in enumerate(rows):  # keys past the sequence: exactly 0
        ref_dm[:, r, int(c["k_lens"][b]):] = 0
    check("varlen dmask", dmask, ref_dm, 3e-5)


def test_autograd_through_the_op():
    """The registered Triton op's autograd: q, k, v, a broadcast float mask (dS summed over its
    broadcast dims) and sinks (from lse, in the contract's wrapper) against the oracle's."""
    c = padded_case(softcap=2.0, sinks=True, bias_kind="float", kpm=True, seed=4)
    dev = device()
    leaves = [c[n].clone().requires_grad_(True) for n in ("q", "k", "v", "attn", "sinks")]
    q, k, v, attn, sinks = (t.to(dev) for t in leaves)
    _ops()  # registers the op
    out, lse = torch.ops.mmfuse.cross_attention_fwd_triton(q, k, v, c["kv_lens"].to(dev), c["kpm"].to(dev), c["scale"],
                                                           True, attn, 0.0, None, 2.0, sinks, None, False)
    gen = torch.Generator().manual_seed(9)
    g_out, g_lse = rand(*out.shape, gen=gen), rand(*lse.shape, gen=gen)
    ((out.cpu() * g_out).sum() + (lse.cpu() * g_lse).sum()).backward()
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    out64, lse64 = oracle(*ref[:3], c["scale"], k_lens=c["kv_lens"], kpm=c["kpm"], causal=True, bias=ref[3],
                          softcap=2.0, sinks=ref[4])
    ((out64 * g_out.double()).sum() + (lse64 * g_lse.double()).sum()).backward()
    check("op out", out, out64.detach(), 1e-5)
    for name, ours, theirs in zip(("dq", "dk", "dv", "dmask (broadcast)", "dsinks"), leaves, ref):
        check(f"op {name}", ours.grad, theirs.grad, 3e-5)


def test_varlen_key_hidden_by_the_mask_never_influences():
    """A packed key the mask hides from every query of its sequence: NaN in its k and v rows
    changes nothing, and its dk, dv are exactly 0 (the hidden-key rule)."""
    c = varlen_case(causal=False, sinks=True)
    ops = _ops()
    hidden_row = int(c["cu_k"][2]) + 4  # sequence 2's key 4 (attn[:, 5:, 4] = -inf)

    def run(k, v):
        args = (c["q"], k, v, c["cu_q"], c["cu_k"], 9, 13, 0.3, False, c["attn"], 0.0, None, 0.0, c["sinks"])
        out, lse = ops.cross_attention_varlen_fwd_triton(*args, None, False)
        grads = ops.cross_attention_varlen_bwd_triton(torch.ones_like(out), None, *args[:3], out, lse, *args[3:], None,
                                                      True, False)
        return (out, lse) + grads

    clean = run(c["k"], c["v"])
    k, v = c["k"].clone(), c["v"].clone()
    k[hidden_row], v[hidden_row] = float("nan"), float("inf")
    poisoned = run(k, v)
    for a, b in zip(clean, poisoned):
        assert torch.equal(a, b)
    assert (clean[3][hidden_row] == 0).all() and (clean[4][hidden_row] == 0).all()


def test_bad_inputs():
    ops, c = _ops(), padded_case()
    base = (c["q"], c["k"], c["v"], c["kv_lens"], None, c["scale"], True)
    with pytest.raises(ValueError, match="sinks"):
        ops.cross_attention_fwd_triton(*base, None, 0.0, None, 0.0, torch.zeros(3), None, False)
    with pytest.raises(ValueError, match="attn_mask"):
        ops.cross_attention_fwd_triton(*base, torch.zeros(7, 18), 0.0, None, 0.0, None, None, False)
    with pytest.raises(ValueError, match="philox"):
        ops.cross_attention_fwd_triton(*base, None, 0.5, torch.zeros(3, dtype=torch.int64), 0.0, None, None, False)
    g = torch.zeros(3, 7, 4, 24)
    with pytest.raises(ValueError, match="mask_grad"):
        ops.cross_attention_bwd_triton(g, None, *base[:3], g, torch.zeros(3, 4, 7), *base[3:],
                                       torch.zeros(7, 19, dtype=torch.bool), 0.0, None, 0.0, None, None, True, False)
    v = varlen_case()
    packed = (v["q"], v["k"], v["v"], v["cu_q"], v["cu_k"])
    with pytest.raises(ValueError, match="attn_mask"):  # W = 12 < the longest key sequence (13)
        ops.cross_attention_varlen_fwd_triton(*packed, 9, 20, 0.3, True, v["attn"][..., :12], 0.0, None, 0.0, None,
                                              None, False)
    with pytest.raises(ValueError, match="attn_mask"):  # a head count that is neither 1 nor Hq
        ops.cross_attention_varlen_fwd_triton(*packed, 9, 13, 0.3, True, v["attn"][:2], 0.0, None, 0.0, None, None,
                                              False)
    with pytest.raises(ValueError, match="sinks"):
        ops.cross_attention_varlen_fwd_triton(*packed, 9, 13, 0.3, True, None, 0.0, None, 0.0, torch.zeros(4, 1), None,
                                              False)


def teardown_module():
    for name, err in sorted(MAX_ERR.items()):
        print(f"max error {name}: {err:.3g}")
