"""Loading the compiled kernels: the op library ``mmfuse/_ops.abi3.so`` and ``mmfuse._C``.

The op library holds every kernel and op schema on the LibTorch stable ABI (csrc/stable.h): it
calls torch only through the stable C shims, so one build loads, through
``torch.ops.load_library``, in every torch from its target release on (``torch_target`` in
``_build.json``, 2.11), whichever torch compiled it. ``_C`` is a pybind11 module with the build
information only. Before loading, the running torch is checked against the build record: older
than the target, or a CUDA build under a torch without CUDA (or another CUDA major version), gives
one clear message instead of an undefined-symbol traceback.

The package must import, and the reference backend must work, when the kernels failed to build
or load. In that case one warning says why, once, and the C++/CUDA backends are absent.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch

_C = None
_OPS_LIBRARY: Path | None = None
_LOAD_ERROR: str | None = None
# written by setup.py: the torch (and CUDA) the compiled kernels were built against, and the oldest torch they serve
BUILD_RECORD = Path(__file__).with_name("_build.json")


def _release_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _release(version: str) -> str:
    return ".".join(map(str, _release_tuple(version)))


def build_mismatch(record: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why kernels built as ``record`` says cannot load in this torch, or None. The op library is on
    the stable ABI, so it serves every torch from ``record["torch_target"]`` on; a CUDA build also
    needs a CUDA torch of the same CUDA major version (it links that CUDA runtime). A record with
    ``legacy_sources`` (kernels still on torch's C++ API, in ``_C``) serves its own release only."""
    built = f"torch {record['torch']}" + (f" with CUDA {record['cuda']}" if record.get("cuda") else " (CPU)")
    running = f"torch {torch_version}" + (f" with CUDA {torch_cuda}" if torch_cuda else " (CPU)")
    target = record.get("torch_target")
    if record.get("legacy_sources") or not target:
        if _release(record["torch"]) != _release(torch_version):
            return (f"this mmfuse build's kernels were built against {built}, and this is {running}: it was built for "
                    f"torch {record['torch_release']}. Rebuild against this torch: pip install --no-build-isolation mmfuse")
    elif _release_tuple(torch_version) < _release_tuple(target):
        return (f"mmfuse's compiled kernels need torch >= {target}, and this is torch {torch_version}. "
                f"Upgrade torch (pip install 'torch>={target}'), or use backend='reference'")
    if record.get("cuda") and not torch_cuda:
        why = "it is a CUDA build and this torch has no CUDA"
    elif record.get("cuda") and torch_cuda and record["cuda"].split(".")[0] != torch_cuda.split(".")[0]:
        why = f"it was built for CUDA {record['cuda']}"
    else:
        return None
    return (f"this mmfuse build's kernels were built against {built}, and this is {running}: {why}. "
            f"Install the mmfuse wheel made for this torch's flavour (its version ends in +cpu or +cu"
            f"{(torch_cuda or '').replace('.', '')}), or build from source against this torch: "
            "pip install --no-build-isolation mmfuse")


def ops_library_path() -> Path | None:
    """The op library file beside this module (``_ops.abi3.so``), or None when it was not built."""
    found = sorted(Path(__file__).parent.glob("_ops*.so")) + sorted(Path(__file__).parent.glob("_ops*.pyd"))
    return found[0] if found else None


_RECORD: dict | None = None
_C_ERROR: str | None = None


def _load() -> None:
    global _C, _OPS_LIBRARY, _LOAD_ERROR, _RECORD, _C_ERROR
    try:
        _RECORD = json.loads(BUILD_RECORD.read_text()) if BUILD_RECORD.exists() else None
        _LOAD_ERROR = _RECORD and build_mismatch(_RECORD, torch.__version__, torch.version.cuda)
        if _LOAD_ERROR is None:
            library = ops_library_path()
            if library is None:
                raise ImportError("the op library mmfuse/_ops*.so was not built")
            torch.ops.load_library(str(library))
            _OPS_LIBRARY = library
    except Exception as exc:  # ImportError, OSError from dlopen
        _OPS_LIBRARY = None
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    if _LOAD_ERROR is not None:
        warnings.warn(
            f"mmfuse: the compiled kernels (the op library mmfuse/_ops*.so) were not loaded ({_LOAD_ERROR}); "
            "only the 'reference' (and 'triton', where usable) backends are available. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    # _C, the build information, is Python-version specific; the ops do not need it (a carried op
    # library runs under another Python), so without it build_info() reads the build record
    try:
        _C = importlib.import_module("mmfuse._C")
    except ImportError as exc:
        _C_ERROR = f"{type(exc).__name__}: {exc}"


_load()


def has_cpu_kernels() -> bool:
    return _OPS_LIBRARY is not None


def has_cuda_kernels() -> bool:
    return _HAS_CUDA_KERNELS


def _compiled_info() -> dict:
    if _C is not None:
        return dict(_C.build_info())
    record = _RECORD or {}
    return {"cuda": bool(record.get("cuda")), "cuda_archs": record.get("cuda_archs", ""),
            "torch_built_against": (record.get("torch") or "").split("+")[0] or None,
            "torch_target": record.get("torch_target"), "info_module": f"not loaded ({_C_ERROR})"}


_HAS_CUDA_KERNELS = _OPS_LIBRARY is not None and bool(_compiled_info()["cuda"])


def build_info() -> dict:
    """How this mmfuse was built: whether the op library loaded, CUDA kernels, archs, torch versions
    (the torch whose headers compiled it, the oldest torch it serves)."""
    info = {
        "extension_loaded": _OPS_LIBRARY is not None,
        "load_error": _LOAD_ERROR,
        "torch_runtime": torch.__version__,
        "ops_library": str(_OPS_LIBRARY) if _OPS_LIBRARY else None,
    }
    if _OPS_LIBRARY is not None:
        info.update(_compiled_info())
    else:
        info.update({"cuda": False, "cuda_archs": "", "torch_built_against": None, "torch_target": None})
    return info
