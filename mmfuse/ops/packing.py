"""``pack_modalities`` / ``unpack_modalities``: the pilot of the op contract (DESIGN.md).

Packing concatenates, per sample, the valid tokens of modality 0, 1, ... into one sequence
(optionally adding a learned per-modality type embedding), in the packed varlen layout
``(total, D)`` + ``cu_seqlens`` that FlashAttention-style kernels take, or zero-padded
``(B, L_max, D)`` with a key padding mask. ``unpack_modalities`` is its inverse, and each is
the other's backward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mmfuse._checks import FLOAT_DTYPES, INT_DTYPES, check_bool, check_lengths, check_stacked_lengths, check_tensor
from mmfuse.backends import choose_backend
from mmfuse.contract import packing as _contract  # noqa: F401  (registers the compiled ops' fake kernels and autograd)
from mmfuse.contract.seqlens import cu_seqlens_from_lengths, max_seqlen as _max_seqlen_op
from mmfuse.reference import packing as reference

IMPLEMENTED = ("cuda", "cpu", "triton", "reference")
CUDA_MAX_MODALITIES = 8  # kMaxModalities in csrc/cuda/storage.cuh: one launch reads them all


def _cuda_limits(num_modalities: int):
    def reason(backend: str) -> str | None:
        if backend == "cuda" and num_modalities > CUDA_MAX_MODALITIES:
            return f"the CUDA kernel moves at most {CUDA_MAX_MODALITIES} modalities per launch, got {num_modalities}"
        return None

    return reason


class PackedModalities(NamedTuple):
    """Result of :func:`pack_modalities`.

    tokens: ``(total, D)`` packed, or ``(B, max_seqlen, D)`` zero-padded.
    cu_seqlens: int32 ``(B+1,)`` prefix sum of the per-sample sequence lengths.
    modality_ids: int64 ``(total,)`` or ``(B, max_seqlen)``: the modality of each token
        (-1 on padding).
    key_padding_mask: bool ``(B, max_seqlen)``, True on padding (``nn.MultiheadAttention``'s
        convention); None for the packed layout.
    max_seqlen: the longest per-sample sequence (a Python int; a SymInt under ``torch.compile``).
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    modality_ids: torch.Tensor
    key_padding_mask: torch.Tensor | None
    max_seqlen: int


def pack_modalities(
    features: list[torch.Tensor],
    lengths: list[torch.Tensor] | None = None,
    *,
    type_embedding: torch.Tensor | None = None,
    padded: bool = False,
    max_seqlen: int | None = None,
    total: int | None = None,
    backend: str = "auto",
) -> PackedModalities:
    """Pack the valid tokens of several modalities into one sequence per sample.

    Args:
        features: M tensors ``(B, L_m, D)``, one per modality, same B, D, dtype and device.
        lengths: M integer tensors ``(B,)``: valid (leading) tokens of each modality per
            sample, each in ``[0, L_m]``. None: every token is valid.
        type_embedding: ``(M, D)``, added to modality m's tokens. Differentiable.
        padded: False → tokens ``(total, D)``; True → ``(B, max_seqlen, D)`` zero-padded,
            with ``key_padding_mask``.
        max_seqlen: the padded length when known (padded: at least the longest sample);
            passing it (or ``total`` for the packed layout) saves a device-to-host sync.
        total: the packed token count ``sum(lengths)``, when known.
        backend: "auto", "cuda" (emulator-tested; "auto" takes it only once verified on a GPU;
            at most 8 modalities; it validates the lengths on the device, one host sync per
            call), "cpu", "triton", "reference".

    Returns:
        :class:`PackedModalities`. Differentiable w.r.t. ``features`` and ``type_embedding``.
    """
    op = "pack_modalities"
    check_bool(op, "padded", padded)
    features, lengths_mb, type_embedding = _check_pack(op, features, lengths, type_embedding)
    batch = features[0].shape[0]
    sizes = [x.shape[1] for x in features]
    cu_seqlens = cu_seqlens_from_lengths(lengths_mb.sum(0, dtype=torch.int32))
    for name, value in (("max_seqlen", max_seqlen), ("total", total)):
        if value is not None and (not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{op}: {name} must be a non-negative int or None, got {value!r}")
    if lengths is None:  # every token valid: the sizes are static
        max_seqlen = sum(sizes) if max_seqlen is None else max_seqlen
        total = batch * sum(sizes) if total is None else total
    out_len = max_seqlen if padded else total

    backend = choose_backend(op, backend, features[0].device, IMPLEMENTED, _cuda_limits(len(features)))
    if backend == "reference":
        tokens, ids = reference.pack_modalities(features, lengths_mb, type_embedding, padded, out_len)
    elif backend == "triton":
        if out_len is None:
            out_len = _max_seqlen_op(cu_seqlens) if padded else int(cu_seqlens[-1])
        tokens, ids = _triton().pack_modalities_triton(features, lengths_mb, cu_seqlens, type_embedding, padded, out_len)
    else:
        tokens, ids = torch.ops.mmfuse.pack_modalities.default(features, lengths_mb, cu_seqlens, type_embedding, padded, out_len)

    if padded:
        max_seqlen = tokens.shape[1]
        key_padding_mask = ids < 0
    else:
        key_padding_mask = None
        if max_seqlen is None:
            max_seqlen = _max_seqlen_op(cu_seqlens)
    return PackedModalities(tokens, cu_seqlens, ids, key_padding_mask, max_seqlen)


def unpack_modalities(
    tokens: torch.Tensor,
    lengths: list[torch.Tensor],
    sizes: list[int],
    *,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Split packed (or padded) tokens back into per-modality ``(B, sizes[m], D)`` tensors.

    Args:
        tokens: ``(total, D)`` packed or ``(B, L, D)`` padded, as :func:`pack_modalities` made
            them (after any per-token processing).
        lengths: the M integer ``(B,)`` tensors given to :func:`pack_modalities`.
        sizes: the M padded sizes ``L_m`` of the original features.
        backend: "auto", "cuda", "cpu", "triton", "reference".

    Returns:
        M tensors ``(B, sizes[m], D)``, zero past each sample's length. Differentiable.
    """
    op = "unpack_modalities"
    check_tensor(op, "tokens", tokens, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    if not isinstance(sizes, (list, tuple)) or not all(isinstance(s, (int, torch.SymInt)) and s >= 0 for s in sizes):
        raise ValueError(f"{op}: sizes must be a list of non-negative ints (one L_m per modality), got {sizes!r}")
    if not isinstance(lengths, (list, tuple)) or len(lengths) != len(sizes) or len(sizes) == 0:
        raise ValueError(
            f"{op}: lengths must be a list of {len(sizes)} (B,) tensors, one per entry of sizes, got {lengths!r}"
        )
    batch = lengths[0].shape[0] if isinstance(lengths[0], torch.Tensor) else -1
    for m, (n, size) in enumerate(zip(lengths, sizes)):
        check_lengths(op, f"lengths[{m}]", n, batch=batch, max_len=size, device=tokens.device)
    lengths_mb = torch.stack([n.to(torch.int32) for n in lengths])
    seqlens = lengths_mb.sum(0, dtype=torch.int32)
    if tokens.dim() == 3 and tokens.shape[0] != batch:
        raise ValueError(f"{op}: padded tokens must have batch size {batch} like lengths, got {tuple(tokens.shape)}")
    cu_seqlens = cu_seqlens_from_lengths(seqlens)
    tokens = tokens.contiguous()
    sizes = list(sizes)

    backend = choose_backend(op, backend, tokens.device, IMPLEMENTED, _cuda_limits(len(sizes)))
    if backend == "reference":
        return reference.unpack_modalities(tokens, lengths_mb, sizes)
    if backend == "triton":
        return _triton().unpack_modalities_triton(tokens, lengths_mb, cu_seqlens, sizes)
    return torch.ops.mmfuse.unpack_modalities.default(tokens, lengths_mb, cu_seqlens, sizes)


def _check_pack(op, features, lengths, type_embedding):
    """Validate; return contiguous features, lengths as int32 ``(M, B)``, contiguous embedding."""
    if not isinstance(features, (list, tuple)) or len(features) == 0:
        raise ValueError(f"{op}: features must be a non-empty list of (B, L_m, D) tensors, got {features!r}")
    first = check_tensor(op, "features[0]", features[0], ndim=3, dtypes=FLOAT_DTYPES)
    batch, dim = first.shape[0], first.shape[2]
    for m, x in enumerate(features[1:], start=1):
        check_tensor(op, f"features[{m}]", x, ndim=3, shape=(batch, None, dim), device=first.device)
        if x.dtype != first.dtype:
            raise TypeError(f"{op}: features[{m}] must have dtype {first.dtype} like features[0], got {x.dtype}")
    if lengths is None:
        lengths_mb = torch.tensor([[x.shape[1]] for x in features], dtype=torch.int32, device=first.device)
        lengths_mb = lengths_mb.expand(len(features), batch).contiguous()
    else:
        if not isinstance(lengths, (list, tuple)) or len(lengths) != len(features):
            raise ValueError(
                f"{op}: lengths must be None or a list of {len(features)} (B,) integer tensors, one per modality, "
                f"got {type(lengths).__name__} of length {len(lengths) if isinstance(lengths, (list, tuple)) else '-'}"
            )
        for m, n in enumerate(lengths):
            check_tensor(op, f"lengths[{m}]", n, ndim=1, dtypes=INT_DTYPES, device=first.device, shape=(batch,))
        # one stack and one cast (the per-call overhead is most of a small batch's cost); the
        # range check runs on the given dtype, before the narrowing to int32
        stacked = torch.stack(list(lengths))
        check_stacked_lengths(op, "lengths", stacked, [x.shape[1] for x in features])
        lengths_mb = stacked.to(torch.int32)
    if type_embedding is not None:
        check_tensor(op, "type_embedding", type_embedding, ndim=2, shape=(len(features), dim), device=first.device)
        if type_embedding.dtype != first.dtype:
            raise TypeError(f"{op}: type_embedding must have dtype {first.dtype} like features, got {type_embedding.dtype}")
        type_embedding = type_embedding.contiguous()
    return [x.contiguous() for x in features], lengths_mb, type_embedding


def _triton():
    from mmfuse.triton import packing

    return packing
