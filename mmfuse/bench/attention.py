"""Benchmark cases: cross_attention against ``F.scaled_dot_product_attention`` (each SDPA backend),
and a training step of ``mmfuse.nn.CrossModalAttention`` with attention dropout against
``nn.MultiheadAttention``.

Inputs are in mmfuse's ``(B, L, H, D)`` layout; SDPA gets the ``transpose(1, 2)`` views a
user would pass, and the boolean mask equivalent to ``kv_lens`` / ``key_padding_mask``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import mmfuse
import mmfuse.nn
from mmfuse.bench.case import Case, forward_and_backward


def _sdpa_backends(device: torch.device):
    """(name, context) per SDPA backend to try; on CPU, PyTorch's own choice."""
    if device.type != "cuda":
        return [("sdpa", contextlib.nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    named = [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
             ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-math", SDPBackend.MATH)]
    return [(name, lambda b=b: sdpa_kernel([b])) for name, b in named]


def cases(device: torch.device, quick: bool, backends: list[str]):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    yield _training_step_case(device, backends, dtype)
    yield from _decode_cases(device, quick, backends, dtype)
    batch, heads, dim = 8, 8, 64
    grid = [(256, 577)] if quick else [(lq, lk) for lq in (77, 256, 1024) for lk in (32, 257, 577)]
    for lq, lk in grid:
        q = torch.randn(batch, lq, heads, dim, device=device, dtype=dtype)
        k = torch.randn(batch, lk, heads, dim, device=device, dtype=dtype)
        v = torch.randn(batch, lk, heads, dim, device=device, dtype=dtype)
        kv_lens = torch.randint(lk // 4, lk + 1, (batch,), device=device)
        random_mask = torch.rand(batch, lk, device=device) < 0.3  # True = ignore
        random_mask[:, 0] = False
        variants = {
            "unmasked": ({}, None),
            "kv_lens": ({"kv_lens": kv_lens}, torch.arange(lk, device=device)[None, :] < kv_lens[:, None]),
            "key_padding_mask": ({"key_padding_mask": random_mask}, ~random_mask),
        }
        for variant, (kwargs, keep) in variants.items():
            sdpa_mask = None if keep is None else keep[:, None, None, :]
            ours = {b: forward_and_backward(lambda t, b=b, kw=kwargs: mmfuse.cross_attention(*t, backend=b, **kw),
                                            [q, k, v]) for b in backends}
            peers = {}
            for name, ctx in _sdpa_backends(device):
                try:
                    peers[name] = forward_and_backward(_sdpa(ctx, sdpa_mask), [q, k, v])
                except RuntimeError:  # this SDPA backend rejects the case (e.g. flash with a mask)
                    continue
            for direction in ("fwd", "fwd+bwd"):
                flops = 4.0 * batch * heads * lq * lk * dim * (1 if direction == "fwd" else 3.5)
                yield Case("cross_attention", f"{direction} {variant} Lq={lq} Lk={lk} B={batch} H={heads} D={dim}",
                           str(dtype).replace("torch.", ""), {b: run[direction] for b, run in ours.items()},
                           {name: run[direction] for name, run in peers.items()}, flops, "TFLOP/s")


def _sdpa(ctx, mask=None, enable_gqa=False):
    """SDPA on (B, L, H, D) tensors under ``ctx`` (one SDPA backend)."""
    def run(t):
        with ctx():
            return F.scaled_dot_product_attention(t[0].transpose(1, 2), t[1].transpose(1, 2), t[2].transpose(1, 2),
                                                  attn_mask=mask, enable_gqa=enable_gqa).transpose(1, 2)

    return run


def _decode_cases(device: torch.device, quick: bool, backends: list[str], dtype: torch.dtype):
    """Decoding: one new query per sample (Lq = 1) against a long key/value cache, B = 8, 8 query
    heads over 2 kv heads (GQA, as served decoders), forward only: the shape where batch x heads x
    query tiles leaves most of a GPU idle and the split-KV schedule (FlashDecoding) matters."""
    batch, heads_q, heads_kv = 8, 8, 2
    grid = [(577, 64)] if quick else [(lk, dim) for dim in (64, 128) for lk in (577, 1500, 4096)]
    for len_k, dim in grid:
        q = torch.randn(batch, 1, heads_q, dim, device=device, dtype=dtype)
        k = torch.randn(batch, len_k, heads_kv, dim, device=device, dtype=dtype)
        v = torch.randn(batch, len_k, heads_kv, dim, device=device, dtype=dtype)
        ours = {b: (lambda b=b: mmfuse.cross_attention(q, k, v, backend=b)) for b in backends}
        peers = {}
        for name, ctx in _sdpa_backends(device):
            run = _sdpa(ctx, enable_gqa=True)
            try:
                run([q, k, v])
            except RuntimeError:  # this SDPA backend rejects the case
                continue
            peers[name] = lambda run=run: run([q, k, v])
        flops = 4.0 * batch * heads_q * len_k * dim
        yield Case("cross_attention", f"decode fwd Lq=1 Lk={len_k} B={batch} Hq={heads_q} Hkv={heads_kv} D={dim}",
                   str(dtype).replace("torch.", ""), ours, peers, flops, "TFLOP/s")


def _training_step_case(device: torch.device, backends: list[str], dtype: torch.dtype, dropout: float = 0.1):
    """Forward + backward of the attention layer in train mode with attention dropout: text
    queries over image patches (B=8, 256 queries over 577 keys, embed 512, 8 heads, a key
    padding mask), ``CrossModalAttention`` (fused kernel, Philox dropout regenerated in the
    backward) against ``nn.MultiheadAttention`` with the same weights (which materialises and
    stores the dropped (B, H, Lq, Lk) probabilities)."""
    batch, len_q, len_k, embed, heads = 8, 256, 577, 512, 8
    mha = nn.MultiheadAttention(embed, heads, dropout=dropout, batch_first=True, device=device, dtype=dtype).train()
    query = torch.randn(batch, len_q, embed, device=device, dtype=dtype)
    memory = torch.randn(batch, len_k, embed, device=device, dtype=dtype)
    padding = torch.rand(batch, len_k, device=device) < 0.2
    padding[:, 0] = False

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            out, _ = module(query, memory, memory, key_padding_mask=padding, need_weights=False)
            out.sum().backward()

        return run

    ours = {}
    for backend in backends:
        if backend == "reference":
            continue
        layer = mmfuse.nn.CrossModalAttention(embed, heads, dropout=dropout, backend=backend, device=device,
                                              dtype=dtype).train()
        layer.load_state_dict(mha.state_dict())
        ours[backend] = step(layer)
    # attention: 4 B H Lq Lk D flops forward, 2.5x that backward; the q, k, v and out projections:
    # 2 E^2 per token each forward, 2x that backward
    attention = 4.0 * batch * heads * len_q * len_k * (embed // heads) * 3.5
    projections = 2.0 * embed * embed * (2 * batch * len_q + 2 * batch * len_k) * 3
    flops = attention + projections
    return Case("cross_attention", f"CrossModalAttention training step, dropout {dropout} Lq={len_q} Lk={len_k} "
                f"B={batch} E={embed} H={heads}", str(dtype).replace("torch.", ""), ours,
                {"nn.MultiheadAttention": step(mha)}, flops, "TFLOP/s")
