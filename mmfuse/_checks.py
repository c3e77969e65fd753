"""Argument validation shared by every public function.

Every error names the function, the argument, what was expected and what was given, so a
user reads the fix off the message. Type problems raise ``TypeError``; shape, device and
value problems raise ``ValueError``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
MAX_INT64 = 2**63 - 1


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype, device and shape.

    ``shape`` entries that are None match any size. Returns ``t`` unchanged.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {t.device}")
    if shape is not None:
        if t.dim() != len(shape) or any(
            want is not None and got != want for want, got in zip(shape, t.shape)
        ):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    return t


def check_lengths(op: str, name: str, lengths, *, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Check a per-sample length vector: integer ``(batch,)``, each in ``[0, max_len]``.

    Reading the values is a host sync on CUDA; it is skipped while tracing
    (``torch.compile``), where the values are not known.
    """
    check_tensor(op, name, lengths, ndim=1, dtypes=INT_DTYPES, device=device, shape=(batch,))
    if not is_tracing() and lengths.numel() > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > max_len:
            raise ValueError(
                f"{op}: {name} must lie in [0, {max_len}] (the padded size), got values in [{lo}, {hi}]"
            )
    return lengths


def check_stacked_lengths(op: str, name: str, lengths, max_lens: Sequence[int]) -> None:
    """Bounds of M length vectors stacked as ``(M, B)``: row m in ``[0, max_lens[m]]``.

    One reduction and one host sync for all rows; the message names the first bad row as
    ``{name}[m]``. Skipped while tracing.
    """
    if is_tracing() or lengths.numel() == 0:
        return
    if lengths.numel() <= 1024:  # small: one read-back and Python beat three tensor ops
        rows = lengths.tolist()
        lows, highs = [min(r) for r in rows], [max(r) for r in rows]
    else:
        lows, highs = torch.stack(torch.aminmax(lengths, dim=1)).tolist()  # one host sync
    for m, (lo, hi, bound) in enumerate(zip(lows, highs, max_lens)):
        if lo < 0 or hi > bound:
            raise ValueError(
                f"{op}: {name}[{m}] must lie in [0, {bound}] (the padded size), got values in [{lo}, {hi}]"
            )


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


def check_positive(op: str, name: str, value, *, allow_zero: bool = False) -> None:
    """A finite int or float > 0 (>= 0 with ``allow_zero``); inf and NaN are refused."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{op}: {name} must be a finite number {bound}, got {value!r}")


def check_same_device(op: str, named: dict[str, torch.Tensor | None]) -> torch.device:
    """All given tensors on one device; returns it."""
    device = None
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {name} must be on the same device as {first} ({device}), got {t.device}")
    return device


def is_tracing() -> bool:
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def check_bool(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")


def check_int(op: str, name: str, value, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    check_positive(op, name, value, allow_zero=allow_zero)
