"""Benchmark cases: fused_concat_linear against ``torch.cat`` + ``F.linear`` + activation, and the
elementwise fusion modes against their PyTorch compositions; forward and forward+backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmfuse
from mmfuse.bench.case import Case, forward_and_backward



def cases(device: torch.device, quick: bool, backends: list[str]):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dname = str(dtype).replace("torch.", "")
    shapes = [(1024, (768, 512, 256), 1024)] if quick else [(4096, (768, 512, 256), 1024)]
    if device.type == "cuda" and not quick:
        shapes.append((8192, (1024, 768, 512), 1024))
    for n, dims, out in shapes:
        xs = [torch.randn(n, d, device=device, dtype=dtype) for d in dims]
        weight = torch.randn(out, sum(dims), device=device, dtype=dtype) / sum(dims) ** 0.5
        bias = torch.randn(out, device=device, dtype=dtype)
        leaves = [*xs, weight, bias]
        peer = forward_and_backward(lambda t: F.gelu(F.linear(torch.cat(t[:3], -1), t[3], t[4])), leaves)
        ours = {b: forward_and_backward(lambda t, b=b: mmfuse.fused_concat_linear(t[:3], t[3], t[4], "gelu", backend=b), leaves)
                for b in backends}
        for direction, flop_factor in (("fwd", 1), ("fwd+bwd", 3)):
            yield Case("fused_concat_linear", f"{direction} N={n} D={dims} out={out} gelu", dname,
                       {b: ours[b][direction] for b in backends}, {"torch.cat + F.linear + gelu": peer[direction]},
                       2.0 * n * sum(dims) * out * flop_factor, "TFLOP/s")

    rows, width = (4096, 1024) if not quick else (1024, 512)
    ps = [torch.randn(rows, width, device=device, dtype=dtype) for _ in range(3)]
    gates = [torch.randn(rows, width, device=device, dtype=dtype) for _ in range(3)]
    logits = torch.randn(3, device=device)
    compositions = {
        "sum": (ps + [logits], lambda t: F.silu(sum(w * p for w, p in zip(torch.softmax(t[3], 0).to(dtype), t[:3])))),
        "product": (ps, lambda t: F.silu(t[0] * t[1] * t[2])),
        "gated": (ps + gates, lambda t: F.silu(sum(torch.sigmoid(g) * p for g, p in zip(t[3:], t[:3])))),
    }
    for mode, (leaves, composed) in compositions.items():
        def fused(t, b, mode=mode):
            kw = {"sum": {"logits": t[3] if len(t) > 3 else None}, "gated": {"gate_logits": t[3:]}, "product": {}}[mode]
            return mmfuse.combine_modalities(t[:3], mode, activation="silu", backend=b, **kw)
        peer = forward_and_backward(composed, leaves)
        ours = {b: forward_and_backward(lambda t, b=b, fused=fused: fused(t, b), leaves) for b in backends}
        tensor_bytes = rows * width * ps[0].element_size()
        for direction, factor in (("fwd", 1), ("fwd+bwd", 3)):
            moved = tensor_bytes * (len(leaves) + 1) * factor  # inputs read + output written (x3 with backward)
            yield Case("combine_modalities", f"{direction} {mode} 3 x ({rows}, {width}) silu", dname,
                       {b: ours[b][direction] for b in backends}, {"PyTorch composition": peer[direction]},
                       moved, "GB/s")
