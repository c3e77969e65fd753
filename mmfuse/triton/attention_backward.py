"""Triton kernels for the cross-modal attention backward (FlashAttention-2, Dao 2023).

A preprocessing kernel computes ``delta = rowsum(dO ∘ O) - dlse``, then one kernel owning a key
block of one kv head accumulates dK/dV (and writes dS, the attention mask's gradient, when
MASK_GRAD) over every query of its head group, and one owning a query block accumulates dQ; no
atomics, so results are deterministic. P is recomputed from the forward's lse, with the forward's
score variants, masks and dropout stream (``mmfuse.triton.attention_kernels``, whose tile helpers
these kernels share). With key ranges the dQ kernel skips the key tiles outside its rows' ranges
as the forward does, and the dK/dV kernel runs only over the span of the query tiles whose rows
reach its key tile (``_query_tiles``). This module imports nothing from the launchers.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mmfuse.triton.attention_kernels import (
    _autotune,
    _keep,
    _key_end,
    _load_tile,
    _scores,
    _tile_offsets,
    aot_dtypes,
    aot_label,
    aot_table,
    block_d,
    common_pointers,
    query_program,
    range_blocks,
    row_ranges,
)


@triton.jit
def _probs(q, k_tile, lse, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, bias_si, softcap, lo, hi,
           HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
           SOFTCAP: tl.constexpr, HAS_RANGES: tl.constexpr):
    """P = exp(s - lse) (rows with lse = -inf, no visible key, give 0) and _scores' tanh."""
    s, t = _scores(q, k_tile, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, bias_si, softcap, lo, hi,
                   HAS_MASK, CAUSAL, PRECISION, HAS_BIAS, SOFTCAP, HAS_RANGES)
    lse_ = tl.where(lse == float("-inf"), float("inf"), lse)
    return tl.where(s == float("-inf"), 0.0, tl.exp(s - lse_[:, None])), t


DELTA_BLOCK_M, DELTA_BLOCK_M_INTERPRETED = 64, 16


@triton.jit
def _delta_kernel(
    Out, dOut,  # (rows_q, Hq, Dv)
    dLse, Delta,  # fp32 in lse's layout; dLse read when HAS_DLSE
    QStart, QLen, LseStart,  # (B,) int32
    heads_q, lse_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Backward preprocessing: delta = rowsum(dO ∘ O) - dlse, in fp32 (HEAD_DIM: v's head dim)."""
    pid_m = tl.program_id(0)
    b, h, q_len, _, q_row, _ = query_program(QStart, QLen, QStart, QLen, heads_q)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off, ok = _tile_offsets(q_row, offs_m, q_len, h, heads_q * HEAD_DIM, offs_d, HEAD_DIM)
    o = tl.load(Out + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dOut + off, mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m
    if HAS_DLSE:
        delta -= tl.load(dLse + row, mask=offs_m < q_len, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < q_len)


@triton.jit
def _query_tiles(Ranges, ranges_sb, ranges_sh, b, h, q_row, q_len, first_m, start_n, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """[start, end) of the query tiles from first_m on (a multiple of BLOCK_M) of which some row's
    key range meets keys [start_n, start_n + BLOCK_N); empty when none does. A prepass over the
    ranges alone (8 bytes a row), so that the dK/dV loop keeps fixed bounds, as the causal one,
    and Triton still software-pipelines it: a per-tile ``if`` around the loop body stops that
    (``mmfuse.triton.aot_check``, float16 dK/dV at BLOCK_D 64, 128 x 64 tiles, sm_80: shared
    memory 100 -> 49 KiB, single-buffered, spills 100 -> 732 B; this form: 102 KiB, 80 B). The
    span is exact when the rows that see a key tile are contiguous, as with every ``mmfuse.masks``
    builder (starts and ends nondecreasing); a tile inside it that sees nothing is computed, its
    P being 0."""
    start = q_len
    end = q_len * 0
    for start_m in range(first_m, q_len, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        lo, hi = row_ranges(Ranges, ranges_sb, ranges_sh, b, h, q_row, offs_m, q_len, True)
        meets = tl.max(((lo < hi) & (lo < start_n + BLOCK_N) & (hi > start_n)).to(tl.int32), 0) > 0
        start = tl.where(meets, tl.minimum(start, start_m), start)
        end = tl.where(meets, start_m + BLOCK_M, end)
    return start, end


@_autotune("MASK_GRAD")
@triton.jit
def _dkdv_kernel(
    Q, K, V, dOut,  # like the forward's Q, K, V, Out
    Lse, Delta,  # fp32, the forward's lse layout
    dK, dV,  # like K, V
    Mask, QStart, QLen, KStart, KLen, LseStart,
    scale, heads_q, group, lse_head, mask_stride,
    Bias, Philox, SeqLens, bias_sb, bias_sh, bias_si, keep_thr, drop_scale, softcap, Sinks,
    Ranges, ranges_sb, ranges_sh,  # int32 key_ranges (attention_kernels.row_ranges); read when HAS_RANGES
    DMask,  # fp32 dS, addressed like Bias with dm_sb, dm_sh, dm_si; written when MASK_GRAD
    dm_sb, dm_sh, dm_si,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, MASK_GRAD: tl.constexpr,
    HAS_RANGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    heads_kv = heads_q // group
    b = tl.program_id(1) // heads_kv
    hk = tl.program_id(1) % heads_kv
    k_len = tl.load(KLen + b)
    if pid_n * BLOCK_N >= k_len:
        return
    q_len = tl.load(QLen + b)
    q_row = tl.load(QStart + b).to(tl.int64)
    k_row = tl.load(KStart + b).to(tl.int64)
    lse_start = tl.load(LseStart + b).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_off, k_ok = _tile_offsets(k_row, offs_n, k_len, hk, heads_kv * HEAD_DIM, offs_d, HEAD_DIM)
    v_off, v_ok = _tile_offsets(k_row, offs_n, k_len, hk, heads_kv * HEAD_DV, offs_dv, HEAD_DV)
    k_tile = _load_tile(K + k_off, k_ok, UPCAST)
    v_tile = _load_tile(V + v_off, v_ok, UPCAST)
    mask_row = Mask + b.to(tl.int64) * mask_stride
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first_m = 0
    if CAUSAL:  # queries before kb - (k_len - q_len) see no key of this block
        first_m = (tl.maximum(pid_n * BLOCK_N - (k_len - q_len), 0) // BLOCK_M) * BLOCK_M
    for h in range(hk * group, hk * group + group):
        h64 = q_row * 0 + h  # int64 (the interpreter's loop variable is a Python int)
        bias_head = Bias + b.to(tl.int64) * bias_sb + h64 * bias_sh + q_row * bias_si
        start_m0 = first_m
        end_m = q_len
        if HAS_RANGES:  # only the query tiles whose rows' ranges reach this key tile
            start_m0, end_m = _query_tiles(Ranges, ranges_sb, ranges_sh, b, h64, q_row, q_len, first_m,
                                           pid_n * BLOCK_N, BLOCK_M, BLOCK_N)
        for start_m in range(start_m0, end_m, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            lo, hi = row_ranges(Ranges, ranges_sb, ranges_sh, b, h64, q_row, offs_m, q_len, HAS_RANGES)
            q_off, q_ok = _tile_offsets(q_row, offs_m, q_len, h, heads_q * HEAD_DIM, offs_d, HEAD_DIM)
            o_off, o_ok = _tile_offsets(q_row, offs_m, q_len, h, heads_q * HEAD_DV, offs_dv, HEAD_DV)
            q = _load_tile(Q + q_off, q_ok, UPCAST)
            do = _load_tile(dOut + o_off, o_ok, UPCAST)
            row = lse_start + h * lse_head + offs_m
            lse = tl.load(Lse + row, mask=offs_m < q_len, other=float("-inf"))
            delta = tl.load(Delta + row, mask=offs_m < q_len, other=0.0)
            p, t = _probs(q, k_tile, lse, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, bias_si,
                          softcap, lo, hi, HAS_MASK, CAUSAL, PRECISION, HAS_BIAS, SOFTCAP, HAS_RANGES)
            dp = tl.dot(do, tl.trans(v_tile), input_precision=PRECISION)
            if DROPOUT:  # dV takes P ∘ keep / (1 - p); dP gets the same mask
                keep = _keep(Philox, SeqLens, b * heads_q + h, offs_m, pid_n * BLOCK_N, keep_thr, BLOCK_M, BLOCK_N)
                dv += tl.dot(tl.trans(tl.where(keep, p * drop_scale, 0.0).to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))  # hidden: exactly 0
            if MASK_GRAD:  # dS at the final score is the attention mask's gradient
                dm = DMask + b.to(tl.int64) * dm_sb + h64 * dm_sh + (q_row + offs_m)[:, None] * dm_si + offs_n[None, :]
                tl.store(dm, ds, mask=(offs_m < q_len)[:, None] & (offs_n < k_len)[None, :])
            if SOFTCAP:  # through the cap: d(softcap tanh(x / softcap))/dx = 1 - tanh²
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(dK + k_off, (dk * scale).to(dK.dtype.element_ty), mask=k_ok)
    tl.store(dV + v_off, dv.to(dV.dtype.element_ty), mask=v_ok)


@_autotune()
@triton.jit
def _dq_kernel(
    Q, K, V, dOut, Lse, Delta,
    dQ,  # like Q
    Mask, QStart, QLen, KStart, KLen, LseStart,
    scale, heads_q, group, lse_head, mask_stride,
    Bias, Philox, SeqLens, bias_sb, bias_sh, bias_si, keep_thr, drop_scale, softcap, Sinks,
    Ranges, ranges_sb, ranges_sh,
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_RANGES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, q_len, k_len, q_row, k_row = query_program(QStart, QLen, KStart, KLen, heads_q)
    if pid_m * BLOCK_M >= q_len:
        return
    hk = h // group
    heads_kv = heads_q // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_off, q_ok = _tile_offsets(q_row, offs_m, q_len, h, heads_q * HEAD_DIM, offs_d, HEAD_DIM)
    o_off, o_ok = _tile_offsets(q_row, offs_m, q_len, h, heads_q * HEAD_DV, offs_dv, HEAD_DV)
    q = _load_tile(Q + q_off, q_ok, UPCAST)
    do = _load_tile(dOut + o_off, o_ok, UPCAST)
    row = tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m
    lse = tl.load(Lse + row, mask=offs_m < q_len, other=float("-inf"))
    delta = tl.load(Delta + row, mask=offs_m < q_len, other=0.0)
    mask_row = Mask + b.to(tl.int64) * mask_stride
    bias_head = Bias + b.to(tl.int64) * bias_sb + h.to(tl.int64) * bias_sh + q_row * bias_si
    lo, hi = row_ranges(Ranges, ranges_sb, ranges_sh, b, h, q_row, offs_m, q_len, HAS_RANGES)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = 0
    end = _key_end(pid_m, q_len, k_len, BLOCK_M, CAUSAL)
    if HAS_RANGES:  # only the key tiles some row's range reaches
        start, end = range_blocks(lo, hi, start, end, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_off, k_ok = _tile_offsets(k_row, offs_n, k_len, hk, heads_kv * HEAD_DIM, offs_d, HEAD_DIM)
        v_off, v_ok = _tile_offsets(k_row, offs_n, k_len, hk, heads_kv * HEAD_DV, offs_dv, HEAD_DV)
        k_tile = _load_tile(K + k_off, k_ok, UPCAST)
        v_tile = _load_tile(V + v_off, v_ok, UPCAST)
        p, t = _probs(q, k_tile, lse, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, bias_si, softcap,
                      lo, hi, HAS_MASK, CAUSAL, PRECISION, HAS_BIAS, SOFTCAP, HAS_RANGES)
        dp = tl.dot(do, tl.trans(v_tile), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(Philox, SeqLens, b * heads_q + h, offs_m, start_n, keep_thr, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))  # hidden: exactly 0
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=PRECISION)
    tl.store(dQ + q_off, (dq * scale).to(dQ.dtype.element_ty), mask=q_ok)


# --------------------------------------------------------------------------- ahead-of-time cases


def aot_cases() -> list:
    """The dK/dV and dQ kernels over ``attention_kernels.aot_table`` (the forward's table; dK/dV
    with dS when the attention mask is on), and the delta kernel (no tl.dot) per dtype and
    BLOCK_D with and without dlse."""
    import torch

    from mmfuse.contract.attention import TRITON_MAX_HEAD_DIM
    from mmfuse.triton._aot import kernel_case

    cases = aot_table(attention_pointers, lambda kernel, sinks, mask_grad:
                      {"MASK_GRAD": mask_grad} if kernel is _dkdv_kernel else {})
    widths = sorted({block_d(dim) for dim in range(1, TRITON_MAX_HEAD_DIM + 1)})
    for dtype, allow_tf32 in aot_dtypes():
        if allow_tf32:  # the delta kernel has no tl.dot
            continue
        pointers = dict(Out=dtype, dOut=dtype, dLse=torch.float32, Delta=torch.float32,
                        QStart=torch.int32, QLen=torch.int32, LseStart=torch.int32)
        cases += [kernel_case(_delta_kernel, aot_label(dtype, allow_tf32), pointers,
                              dict(HEAD_DIM=width, BLOCK_D=width, HAS_DLSE=has_dlse, BLOCK_M=DELTA_BLOCK_M))
                  for width in widths for has_dlse in (True, False)]
    return cases


def attention_pointers(dtype, has_mask, extra=False) -> dict:
    """The dK/dV and dQ kernels -> their tensor arguments' dtypes (``attention_kernels.common_pointers``
    plus their own; dS is a dummy int32 vector without ``extra``)."""
    import torch

    common = dict(common_pointers(dtype, has_mask, extra), dOut=dtype, Delta=torch.float32)
    return {
        _dkdv_kernel: dict(common, dK=dtype, dV=dtype, DMask=torch.float32 if extra else torch.int32),
        _dq_kernel: dict(common, dQ=dtype),
    }
