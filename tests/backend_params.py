"""Which backends and devices a test runs on.

Triton cases carry the ``triton`` marker: on a GPU they run on CUDA tensors, on a CPU-only
machine under ``TRITON_INTERPRET=1`` in their own pytest process (see the Makefile). CUDA
cases carry the ``cuda`` marker and skip without a GPU.
"""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def backend_params(*names: str):
    """``pytest.param`` per backend, with the marker that selects its process."""
    params = []
    for name in names:
        if name == "triton":
            params.append(pytest.param(name, marks=pytest.mark.triton))
        elif name == "cuda":
            params.append(
                pytest.param(name, marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")])
            )
        else:
            params.append(name)
    return params


def device_for(backend: str) -> torch.device:
    """CUDA for the GPU backends when a GPU is present (Triton falls back to the interpreter)."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return torch.device("cuda")
    return torch.device("cpu")
