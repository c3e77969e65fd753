"""Pure-PyTorch packing: the oracle for the packing kernels and the last fallback.

Per sample, a ``torch.cat`` of each modality's valid tokens. Plain autograd.
"""
from __future__ import annotations

import torch


def pack_modalities(
    features: list[torch.Tensor],
    lengths: torch.Tensor,
    type_embedding: torch.Tensor | None,
    padded: bool,
    out_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``features[m]`` ``(B, L_m, D)``, ``lengths`` ``(M, B)`` → tokens and modality ids.

    Packed: tokens ``(total, D)``, ids ``(total,)``. Padded: tokens ``(B, out_len, D)`` zero
    past each sample's end, ids ``(B, out_len)`` with -1 there.
    """
    batch, dim = features[0].shape[0], features[0].shape[2]
    counts = lengths.tolist()
    samples, sample_ids = [], []
    for b in range(batch):
        pieces, ids = [], []
        for m, x in enumerate(features):
            n = counts[m][b]
            piece = x[b, :n]
            pieces.append(piece if type_embedding is None else piece + type_embedding[m])
            ids.append(torch.full((n,), m, dtype=torch.long, device=x.device))
        samples.append(torch.cat(pieces))
        sample_ids.append(torch.cat(ids))
    total = sum(s.shape[0] for s in samples)
    longest = max((s.shape[0] for s in samples), default=0)
    # the same refusals as the kernels: a wrong total or a too-short padded length is an error,
    # never a silently truncated or extended result
    if not padded and out_len is not None and out_len != total:
        raise ValueError(f"pack_modalities: total must equal the number of valid tokens, sum(lengths) = {total}, "
                         f"got {out_len}")
    if padded and out_len is not None and out_len < longest:
        raise ValueError(f"pack_modalities: max_seqlen must be at least the longest packed sample ({longest}), "
                         f"got {out_len}")
    if not padded:
        if batch == 0:
            return features[0].new_empty(0, dim), torch.empty(0, dtype=torch.long, device=features[0].device)
        return torch.cat(samples), torch.cat(sample_ids)
    out_len = longest if out_len is None else out_len
    tokens = features[0].new_zeros(batch, out_len, dim)
    ids = torch.full((batch, out_len), -1, dtype=torch.long, device=features[0].device)
    for b, (s, i) in enumerate(zip(samples, sample_ids)):
        tokens[b, : s.shape[0]] = s
        ids[b, : i.shape[0]] = i
    return tokens, ids


def unpack_modalities(tokens: torch.Tensor, lengths: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_modalities`: ``(B, sizes[m], D)`` per modality, zero past lengths."""
    counts = lengths.tolist()
    batch = lengths.shape[1]
    padded = tokens.dim() == 3
    seqlens = [sum(c[b] for c in counts) for b in range(batch)]
    if padded and max(seqlens, default=0) > tokens.shape[1]:
        raise ValueError(f"unpack_modalities: padded tokens must have at least the longest sample's "
                         f"{max(seqlens)} rows per sample, got shape {tuple(tokens.shape)}")
    if not padded and sum(seqlens) != tokens.shape[0]:
        raise ValueError(f"unpack_modalities: packed tokens must have sum(lengths) = {sum(seqlens)} rows, "
                         f"got shape {tuple(tokens.shape)}")
    outs = [tokens.new_zeros(batch, size, tokens.shape[-1]) for size in sizes]
    row = 0
    for b in range(batch):
        start = 0 if padded else row
        sample = tokens[b] if padded else tokens
        for m, out in enumerate(outs):
            n = counts[m][b]
            out[b, :n] = sample[start : start + n]
            start += n
        row = start
    return outs
