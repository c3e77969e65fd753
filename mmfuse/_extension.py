"""Loading the compiled ``mmfuse._C`` module.

The package must import, and the reference backend must work, when ``_C`` failed to build
or load. In that case one warning says why, once, and the C++/CUDA backends are absent.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None


def _load() -> None:
    global _C, _LOAD_ERROR
    try:
        _C = importlib.import_module("mmfuse._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"mmfuse: the compiled extension mmfuse._C could not be loaded ({_LOAD_ERROR}); "
            "only the 'reference' (and 'triton', where usable) backends are available. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


_load()


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _HAS_CUDA_KERNELS


_HAS_CUDA_KERNELS = _C is not None and bool(_C.build_info()["cuda"])


def build_info() -> dict:
    """How this mmfuse was built: whether ``_C`` loaded, CUDA kernels, archs, torch versions."""
    info = {
        "extension_loaded": _C is not None,
        "load_error": _LOAD_ERROR,
        "torch_runtime": torch.__version__,
    }
    if _C is not None:
        info.update(_C.build_info())
    else:
        info.update({"cuda": False, "cuda_archs": "", "torch_built_against": None})
    return info
