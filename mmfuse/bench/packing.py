"""Benchmark cases: pack_modalities against the per-sample ``torch.cat`` loop, forward and backward."""
from __future__ import annotations

import torch

import mmfuse
from mmfuse.bench.case import Case, forward_and_backward


def _cat_loop(features, lengths):
    counts = [n.tolist() for n in lengths]
    return torch.cat([torch.cat([x[b, : c[b]] for x, c in zip(features, counts)]) for b in range(features[0].shape[0])])


def cases(device: torch.device, quick: bool, backends: list[str]):
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = [(8, 64, (64, 32, 48)), (64, 64, (64, 32, 48))]
    if not quick:
        shapes += [(64, 1024, (577, 77, 256))] if device.type == "cuda" else [(64, 256, (256, 77, 128))]
    for batch, dim, sizes in shapes:
        features = [torch.randn(batch, n, dim, device=device, dtype=dtype) for n in sizes]
        lengths = [torch.randint(0, n + 1, (batch,), device=device) for n in sizes]
        total = int(sum(int(n.sum()) for n in lengths))
        # default arguments bind this shape's tensors: the cases are all built before any runs
        peer = forward_and_backward(lambda f, n=lengths: _cat_loop(f, n), features)
        ours = {b: forward_and_backward(lambda f, b=b, n=lengths, total=total, longest=sum(sizes): mmfuse.pack_modalities(
            f, n, total=total, max_seqlen=longest, backend=b).tokens, features) for b in backends}
        moved = 2 * total * dim * features[0].element_size()
        for direction, factor in (("fwd", 1), ("fwd+bwd", 2)):
            yield Case("pack_modalities", f"{direction} B={batch} D={dim} L={sizes}", str(dtype).replace("torch.", ""),
                       {b: ours[b][direction] for b in backends}, {"per-sample torch.cat": peer[direction]},
                       moved * factor, "GB/s")
