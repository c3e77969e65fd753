"""Benchmark cases: fused_concat_linear against ``torch.cat`` + ``F.linear`` + activation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmfuse
from mmfuse.bench.case import Case


def cases(device: torch.device, quick: bool, backends: list[str]):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = [(1024, (768, 512, 256), 1024)] if quick else [(4096, (768, 512, 256), 1024)]
    if device.type == "cuda" and not quick:
        shapes.append((8192, (1024, 768, 512), 1024))
    for n, dims, out in shapes:
        xs = [torch.randn(n, d, device=device, dtype=dtype) for d in dims]
        weight = torch.randn(out, sum(dims), device=device, dtype=dtype) / sum(dims) ** 0.5
        bias = torch.randn(out, device=device, dtype=dtype)
        ours = {b: (lambda b=b: mmfuse.fused_concat_linear(xs, weight, bias, "gelu", backend=b)) for b in backends}
        peer = {"torch.cat + F.linear + gelu": lambda: F.gelu(F.linear(torch.cat(xs, -1), weight, bias))}
        yield Case("fused_concat_linear", f"N={n} D={dims} out={out}", str(dtype).replace("torch.", ""), ours, peer,
                   2.0 * n * sum(dims) * out, "TFLOP/s")
