"""What a benchmark case is: mmfuse callables per backend, peer callables, and the work done."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One benchmarked shape of one op.

    ``ours`` maps an mmfuse backend name to a zero-argument callable; ``peers`` maps a peer's
    name (e.g. "sdpa-math", "torch.stft path") to one. ``work`` is the FLOPs (``unit`` =
    "TFLOP/s"), bytes moved (``unit`` = "GB/s") or seconds of audio consumed, summed over the
    streams (``unit`` = "stream-s/s", the streaming cases) of one call, for the rate column; ``copy``
    (GB/s cases) a copy of as many bytes, for the share of copy bandwidth.
    """

    op: str
    case: str
    dtype: str
    ours: dict[str, Callable[[], object]]
    peers: dict[str, Callable[[], object]] = field(default_factory=dict)
    work: float = 0.0
    unit: str = "GB/s"
    # memory-bound cases: a Tensor.copy_ moving the same bytes (``work``), timed in the same run,
    # so that each row can state its share of this machine's copy bandwidth
    copy: Callable[[], object] | None = None


def forward_and_backward(fn: Callable[[list[torch.Tensor]], torch.Tensor], leaves: list[torch.Tensor]) -> dict:
    """``{"fwd": ..., "fwd+bwd": ...}``: zero-argument callables running ``fn(leaves)``, and
    ``fn`` then its backward with a fixed upstream gradient on fresh leaf copies."""
    grad_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    grad = torch.randn_like(fn(grad_leaves).detach())

    def step():
        for t in grad_leaves:
            t.grad = None
        fn(grad_leaves).backward(grad)

    return {"fwd": lambda: fn(leaves), "fwd+bwd": step}
