"""``ModalityPacker``: packs per-modality token sequences into one sequence per sample."""
from __future__ import annotations

import torch
from torch import nn

from mmfuse.ops.packing import PackedModalities, pack_modalities


class ModalityPacker(nn.Module):
    """Concatenate each sample's valid tokens of every modality, adding a learned type embedding.

    Args:
        num_modalities: M, the number of feature tensors ``forward`` takes.
        dim: D, the token width shared by all modalities.
        type_embedding: learn an ``(M, D)`` embedding added to modality m's tokens
            (initialised N(0, 0.02), as BERT's token-type embedding).
        backend: passed to :func:`mmfuse.pack_modalities`.
    """

    def __init__(self, num_modalities: int, dim: int, type_embedding: bool = True, backend: str = "auto"):
        super().__init__()
        if not isinstance(num_modalities, int) or num_modalities < 1:
            raise ValueError(f"ModalityPacker: num_modalities must be an int >= 1, got {num_modalities!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"ModalityPacker: dim must be an int >= 1, got {dim!r}")
        self.num_modalities, self.dim, self.backend = num_modalities, dim, backend
        self.type_embedding = nn.Parameter(torch.randn(num_modalities, dim) * 0.02) if type_embedding else None

    def forward(
        self,
        features: list[torch.Tensor],
        lengths: list[torch.Tensor] | None = None,
        *,
        padded: bool = False,
        max_seqlen: int | None = None,
        total: int | None = None,
    ) -> PackedModalities:
        """``features``: M tensors ``(B, L_m, D)``; ``lengths``: M ``(B,)`` ints (None: all valid).

        See :func:`mmfuse.pack_modalities` for the result.
        """
        if not isinstance(features, (list, tuple)) or len(features) != self.num_modalities:
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"ModalityPacker: features must be a list of {self.num_modalities} tensors, got {got}")
        embedding = None if self.type_embedding is None else self.type_embedding.to(features[0].dtype)
        return pack_modalities(
            features, lengths, type_embedding=embedding, padded=padded, max_seqlen=max_seqlen, total=total,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"num_modalities={self.num_modalities}, dim={self.dim}, type_embedding={self.type_embedding is not None}"
