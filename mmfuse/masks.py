"""Builders of ``key_ranges``: the per-query ``[start, end)`` key windows that
``mmfuse.cross_attention(key_ranges=...)`` applies in-kernel, for the masks multimodal models use.

Every rule below gives each query one contiguous range of visible keys, so it needs O(Lq)
memory instead of a dense (Lq, Lk) mask, and the kernels skip the key tiles outside every range
of a query tile instead of masking them. All builders return int32 tensors ``(B, Lq, 2)`` on the
input's device, without a host sync (they are torch ops, traceable by ``torch.compile``).

- ``sliding_window_ranges``: the last ``window`` keys up to the query's position (Mistral,
  Gemma 2's local layers; Beltagy et al., "Longformer", 2020, one-sided).
- ``document_ranges``: packed documents attend within themselves, optionally causally (the
  block-diagonal masks of sequence packing; Krell et al., "Efficient Sequence Packing without
  Cross-contamination", 2021).
- ``causal_with_bidirectional_blocks``: causal text in which the tokens of one media block (an
  image's patches) see each other in both directions and everything before the block (Zhou et
  al., "Transfusion", 2024; Chameleon, 2024).
- ``media_ranges``: text queries over a separate sequence of media tokens (gated cross-attention),
  each text token seeing only the latest preceding image or all preceding images (Alayrac et al.,
  "Flamingo", 2022; IDEFICS; OpenFlamingo).
"""
from __future__ import annotations

import torch

from mmfuse._checks import check_int, check_tensor, INT_DTYPES


def sliding_window_ranges(len_q: int, len_k: int, window: int, *, batch: int = 1,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, len_q, 2): query i (bottom-right aligned at key position p = i + len_k - len_q, as
    mmfuse's causal) sees keys ``[max(0, p - window + 1), p + 1)`` clipped to ``[0, len_k]``: the
    ``window`` most recent keys including its own position. ``window >= 1``."""
    op = "sliding_window_ranges"
    check_int(op, "len_q", len_q, allow_zero=True)
    check_int(op, "len_k", len_k, allow_zero=True)
    check_int(op, "window", window)
    pos = torch.arange(len_q, device=device) + (len_k - len_q)
    end = (pos + 1).clamp(0, len_k)
    start = (pos - window + 1).clamp(0, len_k).minimum(end)
    return torch.stack([start, end], dim=-1).to(torch.int32).expand(batch, len_q, 2).contiguous()


def _runs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of the run of equal consecutive ``ids`` (B, L) each position belongs to."""
    length = ids.shape[1]
    pos = torch.arange(length, device=ids.device).expand_as(ids)
    new_run = torch.ones_like(ids, dtype=torch.bool)
    new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # a run's start: the last run start at or before the position
    start = torch.where(new_run, pos, torch.zeros_like(pos)).cummax(dim=1).values
    # a run's end: the next run start after the position (length at the end), scanned from the right
    ends_here = torch.ones_like(new_run)
    ends_here[:, :-1] = new_run[:, 1:]
    nxt = torch.where(ends_here, pos + 1, torch.full_like(pos, length))
    end = nxt.flip(1).cummin(dim=1).values.flip(1)
    return start, end


def _check_ids(op: str, name: str, ids) -> None:
    check_tensor(op, name, ids, ndim=2, dtypes=INT_DTYPES + (torch.bool,))


def document_ranges(doc_ids: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """(B, L, 2) for packed documents: ``doc_ids`` (B, L) integer, equal consecutive ids form one
    document. A token sees its whole document, or with ``causal`` the document up to itself."""
    _check_ids("document_ranges", "doc_ids", doc_ids)
    start, end = _runs(doc_ids)
    if causal:
        end = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids) + 1
    return torch.stack([start, end], dim=-1).to(torch.int32)


def causal_with_bidirectional_blocks(block_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, 2) for an interleaved sequence: ``block_ids`` (B, L) integer, 0 for a text token,
    and for the tokens of a media block a nonzero id shared by that block's consecutive tokens.
    A text token sees every key up to itself (causal); a media token sees every key up to the end
    of its block (its block bidirectionally, and what precedes it)."""
    _check_ids("causal_with_bidirectional_blocks", "block_ids", block_ids)
    _, end = _runs(block_ids)
    pos = torch.arange(block_ids.shape[1], device=block_ids.device).expand_as(block_ids)
    end = torch.where(block_ids != 0, end, pos + 1)
    return torch.stack([torch.zeros_like(end), end], dim=-1).to(torch.int32)


def media_ranges(media_before: torch.Tensor, media_lengths: torch.Tensor, *, only_latest: bool = True) -> torch.Tensor:
    """(B, Lq, 2) for text queries over media keys (cross-attention). ``media_before`` (B, Lq)
    integer: how many media items precede each text token in the interleaved document (Flamingo's
    cumulative count of ``<image>`` tokens); ``media_lengths`` (B, M) integer: the number of key
    tokens of each media item, laid out one after another in the key sequence (e.g. 64 perceiver
    latents each). A text token sees the keys of the latest preceding item (``only_latest``, as
    Flamingo) or of all preceding items; with none before it, nothing (its output is 0)."""
    op = "media_ranges"
    _check_ids(op, "media_before", media_before)
    _check_ids(op, "media_lengths", media_lengths)
    if media_lengths.shape[0] != media_before.shape[0]:
        raise ValueError(f"{op}: media_lengths must have media_before's batch size {media_before.shape[0]}, "
                         f"got shape {tuple(media_lengths.shape)}")
    offsets = torch.nn.functional.pad(media_lengths.long().cumsum(1), (1, 0))  # (B, M + 1)
    count = media_before.long().clamp(0, media_lengths.shape[1])
    end = offsets.gather(1, count)
    start = offsets.gather(1, (count - 1).clamp(min=0)) if only_latest else torch.zeros_like(end)
    start = torch.where(count > 0, start, end)
    return torch.stack([start, end], dim=-1).to(torch.int32)
