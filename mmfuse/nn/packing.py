"""``ModalityPacker``: packs per-modality token sequences into one sequence per sample."""
from __future__ import annotations

import torch
from torch import nn

from mmfuse.masks import causal_with_bidirectional_blocks
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

    def key_ranges(self, packed: PackedModalities, causal_modalities) -> torch.Tensor:
        """``key_ranges`` for self-attention over ``packed`` (this packer's output): the tokens of
        the modalities in ``causal_modalities`` (text) are causal, and each sample's tokens of any
        other modality (an image's patches, an audio clip's frames) form a block that sees itself
        bidirectionally and everything before it (Transfusion's rule; see
        ``mmfuse.masks.causal_with_bidirectional_blocks``). Padded layout: ``(B, max_seqlen, 2)``
        for ``mmfuse.cross_attention``; packed layout: ``(total, 2)`` in each sequence's own key
        indices, for ``mmfuse.cross_attention_varlen``."""
        causal = torch.tensor(sorted({int(m) for m in causal_modalities}), dtype=packed.modality_ids.dtype,
                              device=packed.modality_ids.device)
        ids = packed.modality_ids
        media = (ids >= 0) & ~torch.isin(ids, causal)
        if packed.key_padding_mask is not None:  # padded (B, L): one block per (sample, media modality)
            return causal_with_bidirectional_blocks(torch.where(media, ids + 1, 0))
        # packed (total,): blocks must not run across a sequence boundary, so the sample joins the id
        starts = packed.cu_seqlens[:-1].long()
        sample = torch.searchsorted(packed.cu_seqlens[1:].long(), torch.arange(ids.shape[0], device=ids.device),
                                    right=True)
        block = torch.where(media, 1 + ids + sample * (self.num_modalities + 1), 0)
        ranges = causal_with_bidirectional_blocks(block[None])[0].long()
        return (ranges - starts[sample, None]).clamp(min=0).to(torch.int32)

    def extra_repr(self) -> str:
        return f"num_modalities={self.num_modalities}, dim={self.dim}, type_embedding={self.type_embedding is not None}"
