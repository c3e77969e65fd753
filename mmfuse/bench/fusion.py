"""Benchmark cases: fused_concat_linear against ``torch.cat`` + ``F.linear`` + activation, and the
elementwise fusion modes against their PyTorch compositions, each eager and ``torch.compile``d
(compiled once, before timing: Inductor fuses the composition into one vectorised loop, the peer
a user would reach for); forward and forward+backward. ``combine_modalities`` rows report the
bytes moved (inputs read once, outputs written once) as GB/s, and a ``copy`` row gives this
machine's ``Tensor.copy_`` bandwidth on the same bytes for scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmfuse
from mmfuse.bench.case import Case, forward_and_backward


def _compiled(fn):
    """``torch.compile(fn)``, or None where Inductor cannot build here (no C++ compiler, etc.)."""
    try:
        compiled = torch.compile(fn)
        return compiled
    except Exception:  # noqa: BLE001 - a missing toolchain must not stop the other peers
        return None


def _peers(name: str, composed, leaves) -> dict:
    """Eager and compiled peers of one composition, each {"fwd", "fwd+bwd"}; the compiled one is
    called once per direction here so that compilation happens outside the timing."""
    peers = {name: forward_and_backward(composed, leaves)}
    compiled = _compiled(composed)
    if compiled is not None:
        runs = forward_and_backward(compiled, leaves)
        try:
            for run in runs.values():
                run()
            peers[f"torch.compile({name})"] = runs
        except Exception as exc:  # noqa: BLE001
            import sys

            print(f"  skip torch.compile peer of {name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return peers


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
        peers = _peers("torch.cat + F.linear + gelu", lambda t: F.gelu(F.linear(torch.cat(t[:3], -1), t[3], t[4])), leaves)
        ours = {b: forward_and_backward(lambda t, b=b: mmfuse.fused_concat_linear(t[:3], t[3], t[4], "gelu", backend=b), leaves)
                for b in backends}
        for direction, flop_factor in (("fwd", 1), ("fwd+bwd", 3)):
            yield Case("fused_concat_linear", f"{direction} N={n} D={dims} out={out} gelu", dname,
                       {b: ours[b][direction] for b in backends}, {p: run[direction] for p, run in peers.items()},
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
        peers = _peers("PyTorch composition", composed, leaves)
        ours = {b: forward_and_backward(lambda t, b=b, fused=fused: fused(t, b), leaves) for b in backends}
        tensor_bytes = rows * width * ps[0].element_size()
        inputs = len(leaves) - (1 if mode == "sum" else 0)  # the M logits are not a tensor pass
        # the least traffic each direction can have: the forward reads the inputs and writes the
        # output; the backward reads grad_out and the inputs and writes a gradient per input
        moved = {"fwd": tensor_bytes * (inputs + 1), "fwd+bwd": tensor_bytes * ((inputs + 1) + (1 + inputs + inputs))}
        for direction in ("fwd", "fwd+bwd"):
            # a copy_ that reads half the bytes and writes the other half: the machine's copy bandwidth
            copy_src = torch.empty(moved[direction] // 2 // ps[0].element_size(), device=device, dtype=dtype)
            copy_dst = torch.empty_like(copy_src)
            yield Case("combine_modalities", f"{direction} {mode} 3 x ({rows}, {width}) silu", dname,
                       {b: ours[b][direction] for b in backends}, {p: run[direction] for p, run in peers.items()},
                       moved[direction], "GB/s", copy=lambda s=copy_src, d=copy_dst: d.copy_(s))
