"""Backend selection, the same rule for every op (DESIGN.md, "Backends").

``backend="auto"``: CUDA tensors go to the hand-written CUDA kernel when built, the case is
supported and the op is on the verified list (``VERIFIED_CUDA_OPS``), else Triton, else the
reference; CPU tensors go to the C++ kernel, else the reference. ``MMFUSE_BACKEND`` in the environment replaces ``auto`` with a named backend.
A named backend that cannot run the case raises with the reason; ``auto`` only ever picks
a backend that computes the same function.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Collection

import torch

from mmfuse import _extension

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

# The ops whose CUDA kernel has run on a GPU, with its test log and benchmark JSON committed under
# benchmarks/results/ (DESIGN.md, "Backends"). Only these does ``auto`` take; a CUDA kernel that
# has been tested on the host emulator alone runs only when asked for by name (backend="cuda").
# Keys are the public op names passed to ``choose_backend``.
VERIFIED_CUDA_OPS: frozenset[str] = frozenset()


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_config_pinned() -> bool:
    """True when ``MMFUSE_TRITON_PIN_CONFIG=1``: every autotuned Triton kernel launches with the
    first config that fits its case, untimed (the staged device run's correctness stage and
    headline suite: one compile per kernel variant instead of one per candidate tile)."""
    return os.environ.get("MMFUSE_TRITON_PIN_CONFIG") == "1"


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _unavailable(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` in this build, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, got {device.type} tensors"
        if not _extension.has_cpu_kernels():
            return f"mmfuse's op library is not loaded ({_extension.build_info()['load_error']})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, got {device.type} tensors"
        if not _extension.has_cuda_kernels():
            return "this mmfuse build has no CUDA kernels (built without nvcc or a CUDA torch)"
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type} tensors"
    raise AssertionError(backend)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends this build can run: on ``device`` if given, else on any device present."""
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS[1:] if any(_unavailable(b, d) is None for d in devices)]


def choose_backend(
    op: str,
    requested: str,
    device: torch.device,
    implemented: Collection[str],
    unsupported: Callable[[str], str | None] = lambda backend: None,
) -> str:
    """Pick the backend that runs ``op`` on tensors of ``device``.

    ``implemented``: the backends that have a kernel for this op. ``unsupported(b)``: why
    backend ``b``'s kernel cannot take this particular case (a dtype, a head dim), or None.
    """
    if not isinstance(requested, str) or requested not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {list(BACKENDS)}, got {requested!r}")
    if requested == "auto":
        env = os.environ.get("MMFUSE_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"{op}: the environment variable MMFUSE_BACKEND must be one of {list(BACKENDS)}, got {env!r}")
        requested = env
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for backend in order:
            if backend == "cuda" and op not in VERIFIED_CUDA_OPS:
                continue
            if backend in implemented and _unavailable(backend, device) is None and unsupported(backend) is None:
                return backend
        return "reference"
    if requested not in implemented:
        raise NotImplementedError(
            f"{op}: backend {requested!r} has no kernel for this op yet; it has {sorted(implemented)}"
        )
    reason = _unavailable(requested, device) or unsupported(requested)
    if reason is not None:
        raise ValueError(f"{op}: backend {requested!r} cannot run this case: {reason}")
    return requested
