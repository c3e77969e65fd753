"""Benchmark cases: per-query ``key_ranges`` (the multimodal masks of ``mmfuse.masks``) against
SDPA with the equivalent dense boolean mask and against FlexAttention (compiled, its block mask
built once outside the timed region), forward and forward + backward.

Each case name states the fraction of (64-query, 256-key) tiles the C++ kernel skips: tiles no
query row of the block can see (its forward and backward work skips them; SDPA reads them all).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmfuse
from mmfuse.bench.case import Case, forward_and_backward
from mmfuse.masks import causal_with_bidirectional_blocks, document_ranges, media_ranges, sliding_window_ranges

_BLOCK_Q, _BLOCK_K = 64, 256  # the C++ kernel's backward tile (its forward's query block is 32-256)


def _block_spans(ranges: torch.Tensor, len_k: int):
    """Per (sample, 64-query block): (rows, smallest start, largest end) over its non-empty ranges
    ((len_k, 0) when every range is empty)."""
    batch, len_q, _ = ranges.shape
    for b in range(batch):
        for i0 in range(0, len_q, _BLOCK_Q):
            r = ranges[b, i0:i0 + _BLOCK_Q]
            live = r[:, 0] < r[:, 1]
            if live.any():
                yield r.shape[0], int(r[live, 0].min()), int(r[live, 1].max())
            else:
                yield r.shape[0], len_k, 0


def skipped_fraction(ranges: torch.Tensor, len_k: int) -> float:
    """Share of (64-query, 256-key) tiles outside every range of the tile's rows, over (B, Lq) ranges."""
    skipped = total = 0
    for _, lo, hi in _block_spans(ranges, len_k):
        for k0 in range(0, len_k, _BLOCK_K):
            total += 1
            skipped += not (k0 < hi and k0 + _BLOCK_K > lo)
    return skipped / max(total, 1)


def skipped_key_columns(ranges: torch.Tensor, len_k: int) -> float:
    """Share of (query, key) columns the C++ forward skips: per 64-query block, the keys outside
    [its rows' smallest start rounded down to 4 keys (a Philox group), their largest end)."""
    skipped = total = 0
    for rows, lo, hi in _block_spans(ranges, len_k):
        span = max(hi - lo // 4 * 4, 0)
        total += len_k * rows
        skipped += (len_k - span) * rows
    return skipped / max(total, 1)


def _flex(q, k, v, ranges, backward: bool):
    """Compiled FlexAttention over (B, H, L, D) tensors with the ranges as its mask_mod (forward,
    or forward + backward), or None where this torch cannot run it on the device (torch 2.13's
    FlexAttention has no backward on the CPU)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    starts, ends = ranges[..., 0].contiguous(), ranges[..., 1].contiguous()

    def in_range(b, h, qi, kj):
        return (kj >= starts[b, qi]) & (kj < ends[b, qi])

    try:
        block_mask = create_block_mask(in_range, ranges.shape[0], None, q.shape[1], k.shape[1], device=str(q.device))
        compiled = torch.compile(flex_attention, dynamic=False)

        def run(t):
            return compiled(t[0].transpose(1, 2), t[1].transpose(1, 2), t[2].transpose(1, 2),
                            block_mask=block_mask).transpose(1, 2)

        # the forward alone on leaves without grad (FlexAttention refuses grad-requiring CPU inputs)
        timed = forward_and_backward(run, [q, k, v])["fwd+bwd"] if backward else (lambda: run([q, k, v]))
        timed()  # compile outside the timed region
        return timed
    except Exception:  # noqa: BLE001 — a backend that cannot compile it is not a peer on this machine
        return None


def _case_set(device: torch.device, quick: bool):
    """(name, len_q, len_k, ranges (B, Lq, 2)) of each rule at realistic sizes."""
    batch = 2
    # Transfusion-style interleaved sequence: 4 images x 257 patches between 5 text runs, 512 text tokens
    text = [103, 102, 102, 102, 103]
    blocks = []
    for i, n in enumerate(text):
        blocks.append(torch.zeros(n, dtype=torch.long))
        if i < 4:
            blocks.append(torch.full((257,), i + 1))
    ids = torch.cat(blocks)[None].expand(batch, -1).to(device)
    length = ids.shape[1]
    yield "interleaved 4 images x 257 + 512 text (causal text, bidirectional images)", length, length, \
        causal_with_bidirectional_blocks(ids)
    if quick:
        return
    # Flamingo gated cross-attention: 512 text queries over 4 x 64 media latents, the latest image each
    before = torch.div(torch.arange(512, device=device) + 64, 128, rounding_mode="floor").clamp(max=4)
    yield "Flamingo 512 text over 4 x 64 latents (latest image)", 512, 256, \
        media_ranges(before[None].expand(batch, -1), torch.full((batch, 4), 64, device=device))
    yield "sliding window 256 of 2048 (causal)", 2048, 2048, sliding_window_ranges(2048, 2048, 256, batch=batch,
                                                                                   device=device)
    docs = torch.repeat_interleave(torch.arange(4, device=device), torch.tensor([700, 300, 800, 248], device=device))
    yield "4 packed documents in 2048 (causal)", 2048, 2048, document_ranges(docs[None].expand(batch, -1), causal=True)


def cases(device: torch.device, quick: bool, backends: list[str]):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    heads, dim = 8, 64
    for name, len_q, len_k, ranges in _case_set(device, quick):
        batch = ranges.shape[0]
        q = torch.randn(batch, len_q, heads, dim, device=device, dtype=dtype)
        k = torch.randn(batch, len_k, heads, dim, device=device, dtype=dtype)
        v = torch.randn(batch, len_k, heads, dim, device=device, dtype=dtype)
        pos = torch.arange(len_k, device=device)
        keep = (pos >= ranges[..., :1]) & (pos < ranges[..., 1:])  # (B, Lq, Lk), SDPA's True = attend
        # SDPA gives NaN on a row without keys: such rows are compared nowhere, but keep it finite
        keep[..., 0] |= ~keep.any(-1)
        ours = {b: forward_and_backward(
            lambda t, b=b, r=ranges: mmfuse.cross_attention(*t, key_ranges=r, backend=b), [q, k, v])
            for b in backends if b != "reference"}
        peers = {"sdpa (dense mask)": forward_and_backward(
            lambda t, m=keep[:, None]: F.scaled_dot_product_attention(
                t[0].transpose(1, 2), t[1].transpose(1, 2), t[2].transpose(1, 2), attn_mask=m).transpose(1, 2),
            [q, k, v])}
        flex = {direction: _flex(q, k, v, ranges, direction == "fwd+bwd") for direction in ("fwd", "fwd+bwd")}
        visible = float(keep.sum())  # visible (query, key) pairs: the work a mask-aware kernel does
        skip = skipped_fraction(ranges.cpu(), len_k)
        columns = skipped_key_columns(ranges.cpu(), len_k)
        for direction in ("fwd", "fwd+bwd"):
            flops = 4.0 * heads * visible * dim * (1 if direction == "fwd" else 3.5)
            timed_peers = {n: run[direction] for n, run in peers.items()}
            if flex[direction] is not None:
                timed_peers["flex_attention (compiled)"] = flex[direction]
            yield Case("key_ranges", f"{direction} {name} B={batch} H={heads} D={dim}, {skip:.0%} tiles, "
                       f"{columns:.0%} key columns skipped",
                       str(dtype).replace("torch.", ""), {b: run[direction] for b, run in ours.items()}, timed_peers,
                       flops, "TFLOP/s")
