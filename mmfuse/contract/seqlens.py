"""Sequence-length statistics of a ``cu_seqlens`` prefix sum, as ints that ``torch.compile`` traces.

A varlen API needs ``max_seqlen`` and ``total`` as Python ints, and computing them with
``.item()`` breaks a ``fullgraph=True`` graph (FlashAttention's varlen API is the known
trap). These two tiny ops return a SymInt instead: a plain int in eager mode (a host sync on
CUDA), an unbacked SymInt while tracing. Callers that know the value should pass it and skip
the op. Defined from Python so that they exist even when the op library is absent.
"""
from __future__ import annotations

import torch

_lib = torch.library.Library("mmfuse", "FRAGMENT")
# longest sequence: max(cu_seqlens[i + 1] - cu_seqlens[i]), 0 for an empty batch
_lib.define("max_seqlen(Tensor cu_seqlens) -> SymInt")
# total tokens: cu_seqlens[-1]
_lib.define("total_seqlen(Tensor cu_seqlens) -> SymInt")


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _total_seqlen(cu_seqlens: torch.Tensor) -> int:
    return int(cu_seqlens[-1])


def _dynamic_size(cu_seqlens: torch.Tensor):
    return torch.library.get_ctx().new_dynamic_size()


for _name, _fn in (("max_seqlen", _max_seqlen), ("total_seqlen", _total_seqlen)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"mmfuse::{_name}", _dynamic_size, lib=_lib)


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest sequence described by the int32 prefix sum ``cu_seqlens`` ``(B+1,)``."""
    if torch.compiler.is_exporting():
        return _exported_size(_max_seqlen(cu_seqlens) if cu_seqlens.numel() < 2 else
                              (cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return torch.ops.mmfuse.max_seqlen(cu_seqlens)


def total_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Total token count ``cu_seqlens[-1]`` of the int32 prefix sum ``cu_seqlens`` ``(B+1,)``."""
    if torch.compiler.is_exporting():
        return _exported_size(cu_seqlens[-1])
    return torch.ops.mmfuse.total_seqlen(cu_seqlens)


def _exported_size(value) -> int:
    """Under ``torch.export``, ``.item()`` (an unbacked SymInt from ``aten._local_scalar_dense``)
    in place of the ops above: AOTInductor cannot run a custom op that returns a SymInt
    ("Unsupported return type SymIntType"), and export, unlike Dynamo, has no graph break to
    avoid."""
    if isinstance(value, int):
        return value
    size = value.item()
    torch._check(size >= 0)
    return size


def cu_seqlens_from_lengths(seqlens: torch.Tensor) -> torch.Tensor:
    """``(B,)`` lengths → int32 ``(B+1,)`` prefix sum starting at 0 (FlashAttention's layout)."""
    return torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
