"""Loading the compiled ``mmfuse._C`` module.

The package must import, and the reference backend must work, when ``_C`` failed to build
or load. In that case one warning says why, once, and the C++/CUDA backends are absent.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch

_C = None
_LOAD_ERROR: str | None = None
# written by setup.py: the torch (and CUDA) the compiled kernels were built against
BUILD_RECORD = Path(__file__).with_name("_build.json")


def _release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def build_mismatch(record: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why ``_C`` built as ``record`` says cannot load in this torch, or None. The ops link against
    torch's C++ symbols, so a build serves one torch release (major.minor) and, for a CUDA build,
    one CUDA major version; loading it anyway would fail on an undefined symbol."""
    built = f"torch {record['torch']}" + (f" with CUDA {record['cuda']}" if record.get("cuda") else " (CPU)")
    running = f"torch {torch_version}" + (f" with CUDA {torch_cuda}" if torch_cuda else " (CPU)")
    if _release(record["torch"]) != _release(torch_version):
        why = f"it was built for torch {record['torch_release']}"
    elif record.get("cuda") and not torch_cuda:
        why = "it is a CUDA build and this torch has no CUDA"
    elif record.get("cuda") and torch_cuda and record["cuda"].split(".")[0] != torch_cuda.split(".")[0]:
        why = f"it was built for CUDA {record['cuda']}"
    else:
        return None
    return (f"this mmfuse build's kernels were built against {built}, and this is {running}: {why}. "
            f"Install the mmfuse wheel made for torch {_release(torch_version)} (its version ends in "
            f"+torch{_release(torch_version)}...), or build from source against this torch: "
            "pip install --no-build-isolation mmfuse")


def _load() -> None:
    global _C, _LOAD_ERROR
    try:
        record = json.loads(BUILD_RECORD.read_text()) if BUILD_RECORD.exists() else None
        _LOAD_ERROR = record and build_mismatch(record, torch.__version__, torch.version.cuda)
        if _LOAD_ERROR is None:
            _C = importlib.import_module("mmfuse._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    if _LOAD_ERROR is not None:
        warnings.warn(
            f"mmfuse: the compiled extension mmfuse._C was not loaded ({_LOAD_ERROR}); "
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
