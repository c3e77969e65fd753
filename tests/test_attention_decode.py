"""The Triton split-KV decode schedule (mmfuse.triton.attention_decode) against the one-pass
schedule and the float64 oracle of test_attention_variants_triton: query lengths 1-8 against
longer keys (scaled down for the interpreter), kv_lens with 0, GQA, causal, key padding,
attention masks, dropout, softcap and sinks, padded and varlen; and how it decides.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from mmfuse.reference.attention import philox_keep
from test_attention_variants_triton import NEG_INF, check, device, oracle, rand, to_padded

pytestmark = pytest.mark.triton


def _modules():
    from mmfuse.triton import attention_decode, cross_attention

    return attention_decode, cross_attention


def both_schedules(monkeypatch, call, splits):
    """call() under the one-pass schedule and under ``splits`` splits."""
    decode, _ = _modules()
    monkeypatch.setattr(decode, "FORCE_SPLITS", 1)
    one = call()
    monkeypatch.setattr(decode, "FORCE_SPLITS", splits)
    return one, call()


@pytest.mark.parametrize("len_q, len_k, heads, splits, kw", [
    (1, 77, (6, 2), 3, dict(causal=False)),
    (3, 61, (4, 4), 2, dict(causal=True, kpm=True, sinks=True)),
    (8, 150, (6, 3), 5, dict(causal=True, softcap=2.5, bias="float")),
    (5, 93, (4, 2), 4, dict(causal=False, bias="bool", dropout_p=0.3, sinks=True, dim_v=40)),
    (2, 37, (2, 1), 7, dict(causal=True, softcap=4.0, sinks=True)),  # more splits than key chunks
])
def test_padded_split_matches_one_pass(monkeypatch, len_q, len_k, heads, splits, kw):
    gen = torch.Generator().manual_seed(len_q * 100 + len_k)
    heads_q, heads_kv = heads
    batch, dim, dim_v = 3, 24, kw.get("dim_v", 24)
    q, k = rand(batch, len_q, heads_q, dim, gen=gen), rand(batch, len_k, heads_kv, dim, gen=gen)
    v = rand(batch, len_k, heads_kv, dim_v, gen=gen)
    kv_lens = torch.tensor([0, len_k // 2 + 1, len_k], dtype=torch.int32)
    kpm = torch.rand(batch, len_k, generator=gen) < 0.2 if kw.get("kpm") else None
    bias = None
    if kw.get("bias") == "float":
        bias = rand(batch, 1, len_q, len_k, gen=gen)
        bias[1, 0, 0, :9] = NEG_INF
    elif kw.get("bias") == "bool":
        bias = torch.rand(1, heads_q, len_q, len_k, generator=gen) < 0.3
    p = kw.get("dropout_p", 0.0)
    philox = torch.tensor([4242, 17], dtype=torch.int64) if p else None
    sinks = rand(heads_q, gen=gen) if kw.get("sinks") else None
    softcap, causal, scale = kw.get("softcap", 0.0), kw["causal"], 1 / math.sqrt(dim)
    _, ops = _modules()
    dev = device()
    to = lambda t: None if t is None else t.to(dev)  # noqa: E731
    args = (to(q), to(k), to(v), to(kv_lens), to(kpm), scale, causal, to(bias), p, to(philox), softcap, to(sinks),
            None, False)
    (out1, lse1), (out_s, lse_s) = both_schedules(monkeypatch, lambda: ops.cross_attention_fwd_triton(*args), splits)
    bias64 = None
    if bias is not None:
        bias64 = torch.zeros(bias.shape, dtype=torch.float64).masked_fill(bias, NEG_INF) if bias.dtype == torch.bool \
            else bias.double()
    keep = philox_keep(philox, p, batch, heads_q, len_q, len_k, torch.device("cpu")) if p else None
    out64, lse64 = oracle(q.double(), k.double(), v.double(), scale, k_lens=kv_lens, kpm=kpm, causal=causal,
                          bias=bias64, keep=keep, dropout_p=p, softcap=softcap, sinks=sinks)
    for name, ours, ref in (("split out", out_s, out64), ("split lse", lse_s, lse64),
                            ("one-pass out", out1, out64), ("one-pass lse", lse1, lse64)):
        check(name, ours, ref, 1e-5)
    check("split vs one-pass out", out_s, out1.double(), 2e-6)
    check("split vs one-pass lse", lse_s, lse1.double(), 2e-6)


def test_varlen_split_matches_one_pass(monkeypatch):
    """Packed sequences (one with no query, one with no key), GQA, causal, a packed attention
    mask, dropout on the longest-sequence stream, sinks."""
    gen = torch.Generator().manual_seed(11)
    q_lens, k_lens = torch.tensor([1, 3, 0, 2, 4]), torch.tensor([77, 0, 41, 150, 29])
    cu_q = torch.cat((torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0))).to(torch.int32)
    cu_k = torch.cat((torch.zeros(1, dtype=torch.int64), k_lens.cumsum(0))).to(torch.int32)
    tq, tk, lq, lk = int(q_lens.sum()), int(k_lens.sum()), 4, 150
    q, k, v = rand(tq, 6, 24, gen=gen), rand(tk, 2, 24, gen=gen), rand(tk, 2, 24, gen=gen)
    attn = rand(tq, 151, gen=gen)
    attn[:, 3] = NEG_INF
    philox, sinks, p = torch.tensor([777, 5], dtype=torch.int64), rand(6, gen=gen), 0.2
    _, ops = _modules()
    dev = device()
    args = [t.to(dev) for t in (q, k, v, cu_q, cu_k)] + [lq, lk + 9, 0.2, True, attn.to(dev), p, philox.to(dev), 0.0,
                                                          sinks.to(dev), None, False]
    (out1, lse1), (out_s, lse_s) = both_schedules(monkeypatch, lambda: ops.cross_attention_varlen_fwd_triton(*args), 6)
    q64, k64, v64 = (to_padded(x.double(), cu, ln, n) for x, cu, ln, n in ((q, cu_q, q_lens, lq), (k, cu_k, k_lens, lk),
                                                                            (v, cu_k, k_lens, lk)))
    bias = to_padded(attn.double(), cu_q, q_lens, lq)[:, None, :, :lk]
    keep = philox_keep(philox, p, 5, 6, lq, lk, torch.device("cpu"))
    out64, lse64 = oracle(q64, k64, v64, 0.2, q_lens=q_lens, k_lens=k_lens, causal=True, bias=bias, keep=keep,
                          dropout_p=p, sinks=sinks)
    rows = [(b, i) for b in range(5) for i in range(int(q_lens[b]))]
    ref_out = torch.stack([out64[b, i] for b, i in rows])
    ref_lse = torch.stack([lse64[b, :, i] for b, i in rows]).T
    for name, ours, ref in (("varlen split out", out_s, ref_out), ("varlen split lse", lse_s, ref_lse),
                            ("varlen one-pass out", out1, ref_out), ("varlen one-pass lse", lse1, ref_lse)):
        check(name, ours, ref, 1e-5)
    check("varlen split vs one-pass out", out_s, out1.double(), 2e-6)


def test_split_then_backward(monkeypatch):
    """The backward takes the split schedule's (out, lse) like the one-pass ones."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = rand(2, 3, 4, 16, gen=gen), rand(2, 53, 2, 16, gen=gen), rand(2, 53, 2, 16, gen=gen)
    sinks = rand(4, gen=gen)
    _, ops = _modules()
    dev = device()
    args = (q.to(dev), k.to(dev), v.to(dev), None, None, 0.25, True, None, 0.0, None, 1.5, sinks.to(dev))
    (out1, lse1), (out_s, lse_s) = both_schedules(monkeypatch, lambda: ops.cross_attention_fwd_triton(*args, None, False), 3)
    g_out = rand(*out1.shape, gen=gen).to(dev)
    grads1 = ops.cross_attention_bwd_triton(g_out, None, *args[:3], out1, lse1, *args[3:], None, False, False)
    grads_s = ops.cross_attention_bwd_triton(g_out, None, *args[:3], out_s, lse_s, *args[3:], None, False, False)
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    out64, _ = oracle(q64, k64, v64, 0.25, causal=True, softcap=1.5, sinks=sinks)
    (out64 * g_out.cpu().double()).sum().backward()
    for name, g1, gs, ref in zip(("dq", "dk", "dv"), grads1, grads_s, (q64.grad, k64.grad, v64.grad)):
        check(f"split {name}", gs, ref, 3e-5)
        check(f"one-pass {name}", g1, ref, 3e-5)


def test_choose_splits(monkeypatch):
    """Split only short queries whose batch x heads leaves SMs idle; about two waves; >= 256 keys
    per split; chunks aligned to every tile width, no empty trailing split."""
    decode, _ = _modules()
    monkeypatch.setattr(decode, "FORCE_SPLITS", None)
    assert decode.choose_splits(8, 8, 1, 4096, torch.device("cpu")) == 1
    monkeypatch.setattr(decode, "triton_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert decode.choose_splits(8, 8, 1, 4096, cuda) == 5  # 64 programs: ceil(264 / 64)
    assert decode.choose_splits(8, 8, 1, 577, cuda) == 2  # 577 keys: 2 splits of >= 256
    assert decode.choose_splits(8, 32, 1, 4096, cuda) == 1  # 256 programs fill 132 SMs
    assert decode.choose_splits(8, 8, 17, 4096, cuda) == 1  # not decode
    assert decode.choose_splits(1, 1, 1, 100_000, cuda) == decode.MAX_SPLITS
    monkeypatch.setattr(decode, "split_align", lambda: 128)
    assert decode.split_keys(1500, 5) == (4, 384)  # 300 keys rounded up to 384
    assert decode.split_keys(577, 64) == (5, 128)
    assert decode.split_keys(0, 3) == (1, 128)
