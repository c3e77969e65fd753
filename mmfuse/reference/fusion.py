"""Pure-PyTorch multimodal fusion: the oracle for the fusion kernels and the last fallback."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    None: lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, PyTorch's default
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    return _ACTIVATIONS[activation](x)


def fused_concat_linear(
    xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """``activation(cat(xs, -1) @ weight.T + bias)`` for ``xs[i]`` ``(N, D_i)``: the literal composition."""
    return activate(F.linear(torch.cat(xs, dim=-1), weight, bias), activation)


def modality_weights(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax of the ``(M,)`` modality logits, in at least fp32, cast to the features' dtype."""
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=0).to(dtype)


def combine_modalities(
    projected: list[torch.Tensor],
    mode: str,
    logits: torch.Tensor | None,
    gate_logits: list[torch.Tensor] | None,
    activation: str | None,
) -> torch.Tensor:
    """Combine per-modality projections ``projected[m]`` ``(N, E)`` into one ``(N, E)``.

    "sum": ``Σ softmax(logits)[m] · p_m``; "product": ``Π p_m``; "gated":
    ``Σ sigmoid(gate_logits[m]) ⊙ p_m``; then ``activation``.
    """
    if mode == "sum":
        weights = modality_weights(logits, projected[0].dtype)
        out = sum(w * p for w, p in zip(weights, projected))
    elif mode == "product":
        out = projected[0]
        for p in projected[1:]:
            out = out * p
    elif mode == "gated":
        out = sum(torch.sigmoid(g) * p for g, p in zip(gate_logits, projected))
    else:
        raise AssertionError(mode)
    return activate(out, activation)
