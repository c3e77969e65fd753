"""Triton kernels for ``pack_modalities`` / ``unpack_modalities``.

One launch per modality moves that modality's valid rows between its ``(B, L_m, D)`` feature
tensor and their rows in the packed ``(total, D)`` (or padded ``(B*L, D)``) token tensor; the
destination row of each run is precomputed per (modality, sample). The type-embedding add is
done in fp32 and rounded once, as PyTorch does, so the result is bit-identical to
``torch.cat`` + add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.contract.packing import fake_pack_modalities, fake_unpack_modalities, register_pack_autograd
from mmfuse.triton._launch import launch, triton_custom_op

BLOCK_T = 16


@triton.jit
def _move_rows_kernel(
    features_ptr,  # (B, L, D) contiguous: one modality's features (or their gradient)
    tokens_ptr,  # (rows, D) contiguous: packed tokens, or padded tokens seen as (B*L_pad, D)
    ids_ptr,  # (rows,) int64: modality id per token row; written when PACK
    emb_ptr,  # (D,): this modality's type embedding; read when HAS_EMB
    lengths_ptr,  # (B,) int32: valid tokens of this modality per sample
    first_row_ptr,  # (B,) int64: token row of this modality's first token in sample b
    L,
    D,
    modality,
    PACK: tl.constexpr,  # True: features -> tokens; False: tokens -> features
    HAS_EMB: tl.constexpr,
    ADD_DTYPE: tl.constexpr,  # fp32 (fp64 for fp64 data): PyTorch's opmath for the add
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.load(lengths_ptr + b)
    row_ok = t < n
    mask = row_ok[:, None] & (d < D)[None, :]
    first = tl.load(first_row_ptr + b)
    feat = features_ptr + (b.to(tl.int64) * L + t[:, None]) * D + d[None, :]
    tok = tokens_ptr + (first + t[:, None]) * D + d[None, :]
    if PACK:
        x = tl.load(feat, mask=mask)
        if HAS_EMB:
            e = tl.load(emb_ptr + d, mask=d < D)
            total = x.to(ADD_DTYPE) + e.to(ADD_DTYPE)[None, :]
            if x.dtype == tl.bfloat16:
                x = _to_bfloat16_rtne(total)
            else:
                x = total.to(x.dtype)
        tl.store(tok, x, mask=mask)
        if tl.program_id(2) == 0:
            tl.store(ids_ptr + first + t, tl.full([BLOCK_T], modality, tl.int64), mask=row_ok)
    else:
        tl.store(feat, tl.load(tok, mask=mask), mask=mask)


@triton.jit
def _to_bfloat16_rtne(x):
    # fp32 -> bf16 rounding to nearest even, spelled out: the CPU interpreter truncates instead,
    # and packing must be bit-identical to PyTorch's add on every backend
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _first_rows(lengths: torch.Tensor, cu_seqlens: torch.Tensor, padded_len: int | None) -> torch.Tensor:
    """(M, B) int64: token row where modality m's run of sample b starts."""
    batch = lengths.shape[1]
    if padded_len is None:
        sample_start = cu_seqlens[:-1].to(torch.int64)
    else:
        sample_start = torch.arange(batch, device=lengths.device, dtype=torch.int64) * padded_len
    before = torch.cumsum(lengths, 0, dtype=torch.int64) - lengths.to(torch.int64)
    return sample_start[None, :] + before


def _add_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(max(dim, 1)), 256)


@triton_custom_op("mmfuse::pack_modalities_triton", fake=fake_pack_modalities)
def pack_modalities_triton(
    features: list[torch.Tensor],
    lengths: torch.Tensor,
    cu_seqlens: torch.Tensor,
    type_embedding: torch.Tensor | None,
    padded: bool,
    out_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.pack_modalities``; ``out_len`` is required here."""
    batch, dim = features[0].shape[0], features[0].shape[2]
    if padded:
        tokens = features[0].new_zeros(batch, out_len, dim)
        ids = torch.full((batch, out_len), -1, dtype=torch.long, device=features[0].device)
    else:
        tokens = features[0].new_empty(out_len, dim)
        ids = torch.empty(out_len, dtype=torch.long, device=features[0].device)
    first_rows = _first_rows(lengths, cu_seqlens, out_len if padded else None)
    block_d = _block_d(dim)
    for m, x in enumerate(features):
        grid = (batch, triton.cdiv(x.shape[1], BLOCK_T), triton.cdiv(dim, block_d))
        if 0 in grid:
            continue
        emb = type_embedding[m] if type_embedding is not None else x
        launch(_move_rows_kernel)[grid](
            x, tokens, ids, emb, lengths[m], first_rows[m], x.shape[1], dim, m,
            PACK=True, HAS_EMB=type_embedding is not None, ADD_DTYPE=_add_dtype(x.dtype), BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        )
    return tokens, ids


@triton_custom_op("mmfuse::unpack_modalities_triton", fake=fake_unpack_modalities)
def unpack_modalities_triton(
    tokens: torch.Tensor, lengths: torch.Tensor, cu_seqlens: torch.Tensor, sizes: list[int]
) -> list[torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.unpack_modalities``."""
    batch, dim = lengths.shape[1], tokens.shape[-1]
    padded_len = tokens.shape[1] if tokens.dim() == 3 else None
    first_rows = _first_rows(lengths, cu_seqlens, padded_len)
    outs = [tokens.new_zeros(batch, size, dim) for size in sizes]
    block_d = _block_d(dim)
    for m, out in enumerate(outs):
        grid = (batch, triton.cdiv(sizes[m], BLOCK_T), triton.cdiv(dim, block_d))
        if 0 in grid:
            continue
        launch(_move_rows_kernel)[grid](
            out, tokens, lengths, out, lengths[m], first_rows[m], sizes[m], dim, m,
            PACK=False, HAS_EMB=False, ADD_DTYPE=tl.float32, BLOCK_T=BLOCK_T, BLOCK_D=block_d,
        )
    return outs


def aot_cases() -> list:
    """What the launchers above launch on a GPU, for ``mmfuse.triton.aot_check``: per dtype,
    packing with a type embedding (the most code) at every BLOCK_D ``_block_d`` can choose;
    packing without one and unpacking (subsets of it) at the narrowest and widest."""
    from mmfuse.triton._aot import kernel_case

    cases = []
    block_ds = sorted({_block_d(dim) for dim in range(1, 2 * 256 + 1)})
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        pack = dict(features_ptr=dtype, tokens_ptr=dtype, ids_ptr=torch.int64, emb_ptr=dtype,
                    lengths_ptr=torch.int32, first_row_ptr=torch.int64)
        unpack = dict(pack, ids_ptr=torch.int32, emb_ptr=dtype)  # unused ids/emb get lengths and the output
        for block_d in block_ds:
            variants = [(pack, True, True)]
            if block_d in (block_ds[0], block_ds[-1]):
                variants += [(pack, True, False), (unpack, False, False)]
            cases += [kernel_case(_move_rows_kernel, f"{str(dtype)[6:]} {'pack' if is_pack else 'unpack'}"
                                  f"{'+emb' if has_emb else ''}", pointers,
                                  dict(PACK=is_pack, HAS_EMB=has_emb, ADD_DTYPE=_add_dtype(dtype) if has_emb else tl.float32,
                                       BLOCK_T=BLOCK_T, BLOCK_D=block_d))
                      for pointers, is_pack, has_emb in variants]
    return cases


def _register() -> None:
    register_pack_autograd(pack_modalities_triton, unpack_modalities_triton)


_register()
