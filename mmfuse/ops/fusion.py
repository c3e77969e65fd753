"""Multimodal feature fusion: ``fused_concat_linear`` and the elementwise combination modes.

Early fusion is usually written ``act(Linear(cat([x_img, x_txt, x_audio], -1)))``, which
materialises the concatenation; the fused kernels read each modality through its own pointer.
"""
from __future__ import annotations

import math

import torch

from mmfuse._checks import FLOAT_DTYPES, check_choice, check_tensor
from mmfuse.backends import choose_backend
from mmfuse.contract import fusion as _contract  # noqa: F401  (registers the compiled ops' fake kernels and autograd)
from mmfuse.reference import fusion as reference

ACTIVATIONS = (None, "relu", "gelu", "silu", "tanh", "sigmoid")
MODES = ("sum", "product", "gated")
IMPLEMENTED = ("cuda", "cpu", "triton", "reference")
TRITON_MAX_SOURCES = 4  # inputs/modalities one Triton launch reads through their own pointers
CUDA_MAX_MODALITIES = 8  # projected tensors one CUDA combine launch reads (kMaxModalities, csrc/cuda/storage.cuh)


def fused_concat_linear(
    xs: list[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
    *,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``activation(cat(xs, -1) @ weight.T + bias)`` without materialising the concatenation.

    Args:
        xs: M tensors ``(..., D_i)`` with the same leading shape, dtype and device.
        weight: ``(out, sum D_i)``, as ``nn.Linear.weight`` of the concatenated input.
        bias: ``(out,)`` or None.
        activation: None, "relu", "gelu" (exact erf form), "silu", "tanh" or "sigmoid".
        backend: "auto", "cpu" (blocked GEMMs + fused epilogue), "cuda" (one cuBLAS GEMM per
            input block + a fused epilogue kernel), "triton" (one multi-source GEMM, at most four
            inputs, no float64) or "reference" (``torch.cat`` + ``F.linear``).
        allow_tf32: let the Triton kernel use tf32 products for float32 inputs (faster, ~1e-3
            relative error); the default is exact fp32. The "cuda" backend's GEMMs are cuBLAS's
            and follow torch's own setting (``torch.backends.cuda.matmul.allow_tf32``).

    Returns:
        ``(..., out)`` in the inputs' dtype. Differentiable w.r.t. every input.
    """
    op = "fused_concat_linear"
    xs = _check_modalities(op, "xs", xs)
    lead = xs[0].shape[:-1]
    total = sum(x.shape[-1] for x in xs)
    check_tensor(op, "weight", weight, ndim=2, device=xs[0].device)
    if weight.shape[1] != total:
        raise ValueError(
            f"{op}: weight must have shape (out, {total}) (sum of the inputs' widths "
            f"{[x.shape[-1] for x in xs]}), got {tuple(weight.shape)}"
        )
    _check_dtype(op, "weight", weight, xs[0].dtype)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(weight.shape[0],), device=xs[0].device)
        _check_dtype(op, "bias", bias, xs[0].dtype)
    check_choice(op, "activation", activation, ACTIVATIONS)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"{op}: allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    backend = choose_backend(op, backend, xs[0].device, IMPLEMENTED, lambda b: _limits(b, xs, combine=False))
    rows = math.prod(lead)  # not reshape(-1, D): a zero-width input (D = 0) leaves -1 ambiguous
    flat = [x.reshape(rows, x.shape[-1]) for x in xs]
    if backend == "reference":
        out = reference.fused_concat_linear(flat, weight, bias, activation)
    else:
        flat, weight = [x.contiguous() for x in flat], weight.contiguous()
        act = activation or "none"
        if backend == "triton":
            out, _ = _triton().fused_concat_linear_triton(flat, weight, bias, act, allow_tf32)
        else:
            out, _ = torch.ops.mmfuse.fused_concat_linear(flat, weight, bias, act)
    return out.reshape(*lead, weight.shape[0])


def combine_modalities(
    projected: list[torch.Tensor],
    mode: str,
    *,
    logits: torch.Tensor | None = None,
    gate_logits: list[torch.Tensor] | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Combine per-modality projections elementwise (the non-concat ``FeatureFusion`` modes).

    Args:
        projected: M tensors ``(..., E)``, each modality already projected to width E.
        mode: "sum" (``Σ softmax(logits)[m] · p_m``), "product" (``Π p_m``) or "gated"
            (``Σ sigmoid(gate_logits[m]) ⊙ p_m``).
        logits: ``(M,)`` modality weights before the softmax ("sum" only).
        gate_logits: M tensors shaped like ``projected`` ("gated" only).
        activation: applied to the combination; as in :func:`fused_concat_linear`.
        backend: "auto", "cpu", "cuda" (at most eight modalities), "triton" (at most four, no
            float64) or "reference".

    Returns:
        ``(..., E)``. Differentiable w.r.t. every tensor argument.
    """
    op = "combine_modalities"
    check_choice(op, "mode", mode, MODES)
    projected = _check_modalities(op, "projected", projected)
    shape = tuple(projected[0].shape)
    for m, p in enumerate(projected):
        check_tensor(op, f"projected[{m}]", p, shape=shape)
    if mode == "sum":
        check_tensor(op, "logits", logits, shape=(len(projected),), dtypes=FLOAT_DTYPES, device=projected[0].device)
    elif logits is not None:
        raise ValueError(f"{op}: logits is only used by mode='sum', got it with mode={mode!r}")
    if mode == "gated":
        if not isinstance(gate_logits, (list, tuple)) or len(gate_logits) != len(projected):
            raise ValueError(f"{op}: gate_logits must be a list of {len(projected)} tensors for mode='gated', got {gate_logits!r}")
        for m, g in enumerate(gate_logits):
            check_tensor(op, f"gate_logits[{m}]", g, shape=shape, device=projected[0].device)
            _check_dtype(op, f"gate_logits[{m}]", g, projected[0].dtype)
    elif gate_logits is not None:
        raise ValueError(f"{op}: gate_logits is only used by mode='gated', got it with mode={mode!r}")
    check_choice(op, "activation", activation, ACTIVATIONS)
    backend = choose_backend(
        op, backend, projected[0].device, IMPLEMENTED, lambda b: _limits(b, projected, combine=True)
    )
    if backend == "reference":
        return reference.combine_modalities(list(projected), mode, logits, gate_logits, activation)
    # softmax of M logits: tiny, left to autograd; the kernels take the normalised weights
    weights = reference.modality_weights(logits, projected[0].dtype) if mode == "sum" else None
    projected = [p.contiguous() for p in projected]
    gates = [g.contiguous() for g in gate_logits] if mode == "gated" else []
    fn = _triton().combine_modalities_triton if backend == "triton" else torch.ops.mmfuse.combine_modalities
    return fn(projected, mode, weights, gates, activation or "none")


def _limits(backend: str, xs: list[torch.Tensor], combine: bool) -> str | None:
    """Why ``backend``'s kernel cannot take this case, or None."""
    if backend == "cuda" and combine and len(xs) > CUDA_MAX_MODALITIES:
        return f"the CUDA combine kernel reads at most {CUDA_MAX_MODALITIES} projected tensors, got {len(xs)}"
    if backend != "triton":
        return None
    if len(xs) > TRITON_MAX_SOURCES:
        return f"the Triton kernels read at most {TRITON_MAX_SOURCES} inputs, got {len(xs)}"
    if xs[0].dtype == torch.float64:
        return "the Triton kernels take float16, bfloat16 and float32, got float64"
    return None


def _triton():
    from mmfuse.triton import fusion

    return fusion


def _check_modalities(op: str, name: str, xs) -> list[torch.Tensor]:
    if not isinstance(xs, (list, tuple)) or len(xs) == 0:
        raise ValueError(f"{op}: {name} must be a non-empty list of tensors, got {type(xs).__name__}")
    first = check_tensor(op, f"{name}[0]", xs[0], dtypes=FLOAT_DTYPES)
    if first.dim() < 1:
        raise ValueError(f"{op}: {name}[0] must have at least 1 dimension, got a scalar")
    for i, x in enumerate(xs[1:], start=1):
        check_tensor(op, f"{name}[{i}]", x, device=first.device)
        if x.shape[:-1] != first.shape[:-1]:
            raise ValueError(
                f"{op}: {name}[{i}] must have leading shape {tuple(first.shape[:-1])} like {name}[0], "
                f"got {tuple(x.shape)}"
            )
        _check_dtype(op, f"{name}[{i}]", x, first.dtype)
    return list(xs)


def _check_dtype(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} like the inputs, got {t.dtype}")
