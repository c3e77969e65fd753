"""``FeatureFusion``: fuse several modalities' features into one vector per token or sample."""
from __future__ import annotations

import math

import torch
from torch import nn

from mmfuse.ops.fusion import ACTIVATIONS, combine_modalities, fused_concat_linear

MODES = ("concat", "sum", "product", "gated")


class FeatureFusion(nn.Module):
    """Fuse M modalities' features ``(..., D_i)`` into ``(..., out_dim)``.

    Modes:
        "concat": ``act(W · cat(x_1..x_M) + b)`` through :func:`mmfuse.fused_concat_linear`
            (early fusion; no concatenated copy in the fused kernels). Parameters ``weight``
            ``(out_dim, Σ D_i)`` and ``bias``, laid out as ``nn.Linear`` on the concatenation.
        "sum": ``act(Σ_m softmax(w)_m · P_m x_m)`` with learned modality weights ``w``
            (initialised equal).
        "product": ``act(Π_m P_m x_m)`` (multiplicative fusion).
        "gated": ``act(Σ_m σ(G_m x_m) ⊙ P_m x_m)``, per-modality sigmoid gates, after the Gated
            Multimodal Unit (Arevalo et al., 2017) extended to M modalities with one gate each.
    ``P_m`` and ``G_m`` are per-modality ``nn.Linear(D_i, out_dim)`` in ``projections`` and
    ``gates``.

    Args:
        in_dims: the M input widths D_i.
        out_dim: the fused width.
        mode: one of "concat", "sum", "product", "gated".
        activation: None, "relu", "gelu", "silu", "tanh", "sigmoid".
        backend: passed to the mmfuse ops.
    """

    def __init__(self, in_dims, out_dim: int, mode: str = "concat", activation: str | None = "relu", backend: str = "auto"):
        super().__init__()
        if not isinstance(in_dims, (list, tuple)) or not in_dims or not all(isinstance(d, int) and d > 0 for d in in_dims):
            raise ValueError(f"FeatureFusion: in_dims must be a non-empty list of positive ints, got {in_dims!r}")
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"FeatureFusion: out_dim must be a positive int, got {out_dim!r}")
        if mode not in MODES:
            raise ValueError(f"FeatureFusion: mode must be one of {list(MODES)}, got {mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"FeatureFusion: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.in_dims, self.out_dim, self.mode, self.activation, self.backend = list(in_dims), out_dim, mode, activation, backend
        if mode == "concat":
            # nn.Linear's initialisation, for the concatenated input width
            self.weight = nn.Parameter(torch.empty(out_dim, sum(in_dims)))
            self.bias = nn.Parameter(torch.empty(out_dim))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(sum(in_dims))
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.projections = nn.ModuleList(nn.Linear(d, out_dim) for d in in_dims)
        if mode == "sum":
            self.modality_logits = nn.Parameter(torch.zeros(len(in_dims)))
        if mode == "gated":
            self.gates = nn.ModuleList(nn.Linear(d, out_dim) for d in in_dims)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: M tensors ``(..., D_i)`` with one leading shape → ``(..., out_dim)``."""
        if not isinstance(features, (list, tuple)) or len(features) != len(self.in_dims):
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"FeatureFusion: features must be a list of {len(self.in_dims)} tensors, got {got}")
        for m, (x, d) in enumerate(zip(features, self.in_dims)):
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != d:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"FeatureFusion: features[{m}] must end in width {d}, got {got}")
        if self.mode == "concat":
            return fused_concat_linear(features, self.weight, self.bias, self.activation, backend=self.backend)
        projected = [proj(x) for proj, x in zip(self.projections, features)]
        gate_logits = [gate(x) for gate, x in zip(self.gates, features)] if self.mode == "gated" else None
        logits = self.modality_logits if self.mode == "sum" else None
        return combine_modalities(
            projected, self.mode, logits=logits, gate_logits=gate_logits, activation=self.activation, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"in_dims={self.in_dims}, out_dim={self.out_dim}, mode={self.mode!r}, activation={self.activation!r}"
