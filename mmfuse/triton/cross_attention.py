"""Triton kernels for cross-modal attention, forward and backward (FlashAttention-2, Dao 2023).

Forward: one program per (query block, sample, head) streams K/V tiles through an online
softmax; the sample's key count bounds the loop, so padded keys are never read, and the key
padding mask and the bottom-right causal mask are applied per tile. Backward: a preprocessing
kernel computes ``delta = rowsum(dO ∘ O) - dlse``, then one kernel owning a key block of one kv head accumulates dK/dV
over every query of its head group, and one owning a query block accumulates dQ; no atomics,
so results are deterministic.

Padded inputs also take an in-kernel attention mask (a (B or 1, Hq or 1, Lq, Lk) float32 bias
tile added to the scores; bool masks arrive as 0/-inf) and attention dropout: each program
regenerates the keep mask of its tile from Philox4x32-10 (Triton's ``philox_impl``, the stream
of ``mmfuse.contract.attention``), in the forward and in both backward kernels; it is never stored.

Padded ``(B, L, H, D)`` and packed ``(total, H, D)`` tensors are both token rows; per-sample
int32 vectors give each sample's first query/key row, its lengths, and where its lse starts.
fp32 inputs use ``tl.dot(input_precision="ieee")`` unless ``allow_tf32``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.fx.experimental.symbolic_shapes import guard_or_true

from mmfuse.backends import triton_interpreted
from mmfuse.contract.attention import (
    TRITON_MAX_HEAD_DIM,
    fake_bwd,
    fake_fwd,
    fake_varlen_fwd,
    keep_threshold,
    register_attention_autograd,
)
from mmfuse.triton._launch import launch, triton_custom_op
from triton.language.random import philox_impl


# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries on a GPU. Exact fp32 (no tf32)
# takes _SMALL_TILE alone: Triton multiplies it on the FMA units with every operand in registers,
# and `make triton-check` measured 64 x 64 tiles spilling 1-28 KB per thread in all three kernels
# where 32 x 32 on 8 warps spills nothing but dK/dV at head dim 128 (1.9 KB on sm_80). It is also
# the fallback when no tensor-core tile fits (tf32 at head dim 128: 64 x 64 needs 177-193 KiB of
# shared memory, over sm_80's 163 KiB).
_TENSOR_CORE_TILES = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2))
_SMALL_TILE = (32, 32, 8, 2)


def _configs(block_names):
    if triton_interpreted():  # the interpreter is slow: one small tile
        return [triton.Config({name: 16 for name in block_names}, num_warps=1)]
    return [
        triton.Config({block_names[0]: m, block_names[1]: n}, num_warps=w, num_stages=s)
        for m, n, w, s in _TENSOR_CORE_TILES + (_SMALL_TILE,)
    ]


def _autotune(block_names):
    def wrap(kernel):
        if triton_interpreted():
            return kernel
        return triton.autotune(configs=_configs(block_names),
                               key=["HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_BIAS", "DROPOUT"],
                               prune_configs_by={"early_config_prune": _fitting_configs})(kernel)

    return wrap


# Largest (BLOCK_M or BLOCK_N) x BLOCK_D tile, in bytes, that a tensor-core config may stream.
# Measured by `make triton-check` (sm_80/sm_90): past it the K/V pipeline overflows shared memory
# (sm_80: 163 KiB) or the accumulators spill.
_TILE_BYTES = 16 * 1024


def _fitting_configs(configs, named_args, **meta):
    """The autotune configs for this head dim and dtype (``early_config_prune``): the small tile
    for fp32 without tf32; otherwise the tensor-core tiles that fit, or else the small tile."""
    elem = named_args["Q"].element_size()

    def tile(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    small = [c for c in configs if tile(c) == _SMALL_TILE]
    if meta["PRECISION"] == "ieee" and elem == 4:
        return small
    kept = [c for c in configs if tile(c) != _SMALL_TILE
            and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * meta["BLOCK_D"] * elem <= _TILE_BYTES]
    if meta.get("DROPOUT") or meta.get("HAS_BIAS"):
        # the attention mask tile and the Philox state on top: `make triton-check` measured the
        # 128 x 128 forward over shared memory and 128-row tiles spilling 0.9-1.7 KB in dK/dV
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or small


def _tile_meta():
    """Block sizes passed explicitly where autotuning is off (the interpreter)."""
    return _configs(["BLOCK_M", "BLOCK_N"])[0].kwargs if triton_interpreted() else {}


@triton.jit
def _load_tile(ptr, mask, UPCAST: tl.constexpr):
    """A q/k/v/dO tile; UPCAST (bfloat16 under the interpreter, whose tl.dot mishandles it) reads it as fp32."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _query_program(QStart, QLen, KStart, KLen, heads_q):
    """Sample b and head h of a program on the (query block, sample * head) grid; their
    query and key counts and first rows."""
    b = tl.program_id(1) // heads_q
    h = tl.program_id(1) % heads_q
    q_row = tl.load(QStart + b).to(tl.int64)
    k_row = tl.load(KStart + b).to(tl.int64)
    return b, h, tl.load(QLen + b), tl.load(KLen + b), q_row, k_row


@triton.jit
def _tile_offsets(first_row, offs, length, head, stride, offs_d, HEAD_DIM: tl.constexpr):
    """(offsets, in-bounds mask) of a (len(offs), BLOCK_D) tile: rows first_row + offs of head
    ``head`` in a (rows, heads, HEAD_DIM) tensor with row stride ``stride``, for queries or keys."""
    offsets = (first_row + offs)[:, None] * stride + head * HEAD_DIM + offs_d[None, :]
    return offsets, (offs < length)[:, None] & (offs_d < HEAD_DIM)[None, :]


@triton.jit
def _key_end(pid_m, q_len, k_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [0, end) that query block pid_m can see: causally, its last query sees j <= i + k_len - q_len."""
    end = k_len
    if CAUSAL:
        end = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + k_len - q_len, 0))
    return end


@triton.jit
def _scores(q, k_tile, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, seq_k,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scaled scores (+ the attention mask tile), -inf where the key is hidden."""
    s = tl.dot(q, tl.trans(k_tile), input_precision=PRECISION) * scale
    visible = (offs_n < k_len)[None, :] & (offs_m < q_len)[:, None]
    if HAS_BIAS:  # bias_head: this (sample, head)'s (Lq, Lk) float32 mask; -inf hides whatever q·k gave
        bias = tl.load(bias_head + offs_m[:, None].to(tl.int64) * seq_k + offs_n[None, :], mask=visible, other=0.0)
        s += bias
        visible = visible & (bias != float("-inf"))
    if HAS_MASK:
        ignored = tl.load(mask_row + offs_n, mask=offs_n < k_len, other=1)
        visible = visible & (ignored == 0)[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (k_len - q_len))
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _keep(Philox, row0, offs_m, start_n, seq_k, keep_thr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep mask of the (BLOCK_M, BLOCK_N) tile of keys start_n.. (a multiple of 4)
    whose query i is probability row row0 + i of the (B * Hq * Lq, Lk) matrix: key j draws word
    j % 4 of Philox4x32-10 at counter (g, offset), g = row * ceil(Lk / 4) + j // 4, key seed
    (mmfuse.contract.attention). Philox runs once per counter, on a (BLOCK_M, BLOCK_N / 4) grid,
    and its 4 words are interleaved into the tile (join + reshape: column 4c + w is word w of
    counter c). keep_thr is floor(p * 2^32) - 2^31, compared with the word's top bit flipped
    (both int32)."""
    seed = tl.load(Philox).to(tl.uint64, bitcast=True)
    offset = tl.load(Philox + 1).to(tl.uint64, bitcast=True)
    offs_c = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    g = (row0 + offs_m.to(tl.int64))[:, None] * ((seq_k + 3) // 4) + offs_c[None, :]
    g = g.to(tl.uint64, bitcast=True)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (offset >> 32).to(tl.uint32)
    r0, r1, r2, r3 = philox_impl(c0, c1, c2, c3, (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32), 10)
    # join(join(r0, r2), join(r1, r3))[..., a, b] is word 2a + b: reshaped, column 4c + w holds word w
    u = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return (u.to(tl.int32, bitcast=True) ^ -2147483648) >= keep_thr


@_autotune(["BLOCK_M", "BLOCK_N"])
@triton.jit
def _forward_kernel(
    Q,  # (rows_q, Hq, D), contiguous
    K, V,  # (rows_k, Hkv, D), contiguous
    Out,  # (rows_q, Hq, D)
    Lse,  # fp32: query i of head h of sample b at lse_start[b] + h * lse_head + i
    Mask,  # (B, Lk) uint8, 1 = ignore; read when HAS_MASK
    QStart, QLen, KStart, KLen, LseStart,  # (B,) int32
    scale, heads_q, group, lse_head, mask_stride,
    Bias,  # float32 (B or 1, Hq or 1, Lq, Lk) attention mask; read when HAS_BIAS
    Philox,  # int64 (seed, offset); read when DROPOUT
    bias_sb, bias_sh, seq_q, seq_k, keep_thr, drop_scale,  # Bias strides, padded Lq/Lk, dropout's
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, q_len, k_len, q_row, k_row = _query_program(QStart, QLen, KStart, KLen, heads_q)
    if pid_m * BLOCK_M >= q_len:
        return
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_stride = heads_q * HEAD_DIM
    k_stride = (heads_q // group) * HEAD_DIM
    q_off, q_ok = _tile_offsets(q_row, offs_m, q_len, h, q_stride, offs_d, HEAD_DIM)
    q = _load_tile(Q + q_off, q_ok, UPCAST)
    mask_row = Mask + b.to(tl.int64) * mask_stride
    bias_head = Bias + b.to(tl.int64) * bias_sb + h.to(tl.int64) * bias_sh
    prob_row0 = (b.to(tl.int64) * heads_q + h) * seq_q

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _key_end(pid_m, q_len, k_len, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_off, kv_ok = _tile_offsets(k_row, offs_n, k_len, hk, k_stride, offs_d, HEAD_DIM)
        k_tile = _load_tile(K + kv_off, kv_ok, UPCAST)
        v_tile = _load_tile(V + kv_off, kv_ok, UPCAST)
        s = _scores(q, k_tile, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, seq_k,
                    HAS_MASK, CAUSAL, PRECISION, HAS_BIAS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing visible yet shift by 0 so that exp(-inf - shift) is 0, not NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - shift[:, None]))  # 0 for hidden keys, also in a NaN row
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the row sums use the undropped P, the PV product P ∘ keep / (1 - p)
            p = tl.where(_keep(Philox, prob_row0, offs_m, start_n, seq_k, keep_thr, BLOCK_M, BLOCK_N), p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
        m_i = m_new
    has_key = (l_i > 0.0) | (l_i != l_i)  # a NaN sum (a NaN visible score) keeps its NaN
    out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
    tl.store(Out + q_off, out.to(Out.dtype.element_ty), mask=q_ok)
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    tl.store(Lse + tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _probs(q, k_tile, lse, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, seq_k,
           HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """P = exp(s - lse); rows with lse = -inf (no visible key) give 0."""
    s = _scores(q, k_tile, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, seq_k,
                HAS_MASK, CAUSAL, PRECISION, HAS_BIAS)
    return tl.where(s == float("-inf"), 0.0, tl.exp(s - tl.where(lse == float("-inf"), float("inf"), lse)[:, None]))


_DELTA_BLOCK_M, _DELTA_BLOCK_M_INTERPRETED = 64, 16


@triton.jit
def _delta_kernel(
    Out, dOut,  # (rows_q, Hq, D)
    dLse, Delta,  # fp32 in lse's layout; dLse read when HAS_DLSE
    QStart, QLen, LseStart,  # (B,) int32
    heads_q, lse_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Backward preprocessing: delta = rowsum(dO ∘ O) - dlse, in fp32."""
    pid_m = tl.program_id(0)
    b, h, q_len, _, q_row, _ = _query_program(QStart, QLen, QStart, QLen, heads_q)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off = (q_row + offs_m)[:, None] * (heads_q * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    ok = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dOut + off, mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m
    if HAS_DLSE:
        delta -= tl.load(dLse + row, mask=offs_m < q_len, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < q_len)


@_autotune(["BLOCK_M", "BLOCK_N"])
@triton.jit
def _dkdv_kernel(
    Q, K, V, dOut,  # like the forward's Q, K, V, Out
    Lse, Delta,  # fp32, the forward's lse layout
    dK, dV,  # (rows_k, Hkv, D)
    Mask, QStart, QLen, KStart, KLen, LseStart,
    scale, heads_q, group, lse_head, mask_stride,
    Bias, Philox, bias_sb, bias_sh, seq_q, seq_k, keep_thr, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q_stride = heads_q * HEAD_DIM
    k_stride = heads_kv * HEAD_DIM
    kv_off, kv_ok = _tile_offsets(k_row, offs_n, k_len, hk, k_stride, offs_d, HEAD_DIM)
    k_tile = _load_tile(K + kv_off, kv_ok, UPCAST)
    v_tile = _load_tile(V + kv_off, kv_ok, UPCAST)
    mask_row = Mask + b.to(tl.int64) * mask_stride
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_m = 0
    if CAUSAL:  # queries before kb - (k_len - q_len) see no key of this block
        first_m = (tl.maximum(pid_n * BLOCK_N - (k_len - q_len), 0) // BLOCK_M) * BLOCK_M
    for h in range(hk * group, hk * group + group):
        for start_m in range(first_m, q_len, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_off, q_ok = _tile_offsets(q_row, offs_m, q_len, h, q_stride, offs_d, HEAD_DIM)
            q = _load_tile(Q + q_off, q_ok, UPCAST)
            do = _load_tile(dOut + q_off, q_ok, UPCAST)
            row = lse_start + h * lse_head + offs_m
            lse = tl.load(Lse + row, mask=offs_m < q_len, other=float("-inf"))
            delta = tl.load(Delta + row, mask=offs_m < q_len, other=0.0)
            bias_head = Bias + b.to(tl.int64) * bias_sb + h * bias_sh
            p = _probs(q, k_tile, lse, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, seq_k,
                       HAS_MASK, CAUSAL, PRECISION, HAS_BIAS)
            dp = tl.dot(do, tl.trans(v_tile), input_precision=PRECISION)
            if DROPOUT:  # dV takes P ∘ keep / (1 - p); dP gets the same mask
                keep = _keep(Philox, (b.to(tl.int64) * heads_q + h) * seq_q, offs_m, pid_n * BLOCK_N, seq_k, keep_thr,
                             BLOCK_M, BLOCK_N)
                dv += tl.dot(tl.trans(tl.where(keep, p * drop_scale, 0.0).to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))  # hidden: exactly 0
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(dK + kv_off, (dk * scale).to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dV + kv_off, dv.to(dV.dtype.element_ty), mask=kv_ok)


@_autotune(["BLOCK_M", "BLOCK_N"])
@triton.jit
def _dq_kernel(
    Q, K, V, dOut, Lse, Delta,
    dQ,  # (rows_q, Hq, D)
    Mask, QStart, QLen, KStart, KLen, LseStart,
    scale, heads_q, group, lse_head, mask_stride,
    Bias, Philox, bias_sb, bias_sh, seq_q, seq_k, keep_thr, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, h, q_len, k_len, q_row, k_row = _query_program(QStart, QLen, KStart, KLen, heads_q)
    if pid_m * BLOCK_M >= q_len:
        return
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_stride = heads_q * HEAD_DIM
    k_stride = (heads_q // group) * HEAD_DIM
    q_off, q_ok = _tile_offsets(q_row, offs_m, q_len, h, q_stride, offs_d, HEAD_DIM)
    q = _load_tile(Q + q_off, q_ok, UPCAST)
    do = _load_tile(dOut + q_off, q_ok, UPCAST)
    row = tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m
    lse = tl.load(Lse + row, mask=offs_m < q_len, other=float("-inf"))
    delta = tl.load(Delta + row, mask=offs_m < q_len, other=0.0)
    mask_row = Mask + b.to(tl.int64) * mask_stride
    bias_head = Bias + b.to(tl.int64) * bias_sb + h.to(tl.int64) * bias_sh
    prob_row0 = (b.to(tl.int64) * heads_q + h) * seq_q
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _key_end(pid_m, q_len, k_len, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_off, kv_ok = _tile_offsets(k_row, offs_n, k_len, hk, k_stride, offs_d, HEAD_DIM)
        k_tile = _load_tile(K + kv_off, kv_ok, UPCAST)
        v_tile = _load_tile(V + kv_off, kv_ok, UPCAST)
        p = _probs(q, k_tile, lse, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, seq_k,
                   HAS_MASK, CAUSAL, PRECISION, HAS_BIAS)
        dp = tl.dot(do, tl.trans(v_tile), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_keep(Philox, prob_row0, offs_m, start_n, seq_k, keep_thr, BLOCK_M, BLOCK_N), dp * drop_scale, 0.0)
        ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]))  # hidden: exactly 0
        dq += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=PRECISION)
    tl.store(dQ + q_off, (dq * scale).to(dQ.dtype.element_ty), mask=q_ok)


# --------------------------------------------------------------------------- launchers


class _Samples:
    """Per-sample int32 vectors (first query row, query count, first key row, key count, lse
    start), the lse row stride per head, and the bound on query and key counts for the grid."""

    def __init__(self, q_start, q_len, k_start, k_len, lse_start, lse_head, max_q, max_k):
        self.vectors = tuple(t.to(torch.int32).contiguous() for t in (q_start, q_len, k_start, k_len, lse_start))
        self.lse_head, self.max_q, self.max_k = lse_head, max_q, max_k
        self.batch = q_len.shape[0]


def _has_work(t: torch.Tensor, max_len) -> bool:
    # max_len may be an unbacked SymInt under torch.compile (varlen max_seqlen=None): assume
    # work then; the kernels skip the blocks past each sample's length
    return guard_or_true(t.numel() > 0) and guard_or_true(max_len > 0)


def _padded_samples(q, k, kv_lens):
    batch, len_q, heads_q, _ = q.shape
    len_k = k.shape[1]
    index = torch.arange(batch, device=q.device, dtype=torch.int32)
    q_len = torch.full_like(index, len_q)
    k_len = torch.full_like(index, len_k) if kv_lens is None else kv_lens
    return _Samples(index * len_q, q_len, index * len_k, k_len, index * (heads_q * len_q), len_q, len_q, len_k)


def _varlen_samples(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return _Samples(cu_seqlens_q[:-1], cu_seqlens_q.diff(), cu_seqlens_k[:-1], cu_seqlens_k.diff(),
                    cu_seqlens_q[:-1], q.shape[0], max_seqlen_q, max_seqlen_k)


class _Extras:
    """The padded ops' in-kernel attention mask (float32 (B or 1, Hq or 1, Lq, Lk)) and dropout
    (philox (seed, offset), p)."""

    def __init__(self, q=None, k=None, attn_mask=None, dropout_p=0.0, philox=None):
        self.bias = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 4 else attn_mask[None, None]
            if mask.dtype == torch.bool:
                bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask, float("-inf"))
            else:
                bias = mask.to(torch.float32).contiguous()
            self.bias = bias
        self.dropout_p = float(dropout_p) if philox is not None else 0.0
        self.philox = philox
        self.seq_q = q.shape[1] if q is not None else 0
        self.seq_k = k.shape[1] if k is not None else 0

    def args(self, dummy):
        bias = self.bias if self.bias is not None else dummy
        sb = sh = 0
        if self.bias is not None:
            _, heads, len_q, len_k = self.bias.shape
            sb = 0 if self.bias.shape[0] == 1 else heads * len_q * len_k
            sh = 0 if heads == 1 else len_q * len_k
        philox = self.philox if self.dropout_p > 0 else dummy
        keep_thr = keep_threshold(self.dropout_p) - 2**31  # int32: compared with the draw's top bit flipped
        scale = 1.0 / (1.0 - self.dropout_p)
        return (bias, philox, sb, sh, self.seq_q, self.seq_k, keep_thr, scale)

    def meta(self):
        return dict(HAS_BIAS=self.bias is not None, DROPOUT=self.dropout_p > 0)


def _zero_rows(hidden, *tensors):
    """The (B, Lk, H, D) tensors with the rows of hidden keys zeroed (unchanged when None): a tile
    product multiplies every key of the tile, and 0 · NaN would let a hidden key's NaN or inf
    through (the C++ kernel's ``key_rows``)."""
    if hidden is None:
        return tensors
    return tuple(t.masked_fill(hidden, 0) for t in tensors)


def _hidden_keys(k, key_padding_mask, extras, causal, samples):
    """Bool (B, Lk, 1, 1): keys no query sees (the padding mask, or an attention mask that hides
    them from every query the causal rule lets see them), or None."""
    hidden = key_padding_mask
    if extras.bias is not None:
        masked = extras.bias == float("-inf")
        if causal:  # keys the mask hides from every query that causally sees them
            len_q, len_k = masked.shape[-2:]
            i, j = torch.arange(len_q, device=k.device)[:, None], torch.arange(len_k, device=k.device)
            kv_len = samples.vectors[3].long()[:, None, None, None]
            masked = masked | (j > i + kv_len - len_q)
        all_hidden = masked.flatten(1, 2).all(1)
        hidden = all_hidden if hidden is None else hidden | all_hidden
    return None if hidden is None else hidden.expand(k.shape[0], k.shape[1])[:, :, None, None]


def _common_args(q, k, samples, key_padding_mask, scale, causal, allow_tf32, extras=None):
    extras = extras or _Extras()
    heads_q, heads_kv, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    has_mask = key_padding_mask is not None
    # a dummy pointer when there is no mask: HAS_MASK=False never reads it
    mask = key_padding_mask.contiguous().view(torch.uint8) if has_mask else samples.vectors[0]
    args = (mask, *samples.vectors, scale, heads_q, heads_q // heads_kv, samples.lse_head,
            mask.shape[-1] if has_mask else 0, *extras.args(samples.vectors[0]))
    meta = dict(HEAD_DIM=dim, BLOCK_D=_block_d(dim), HAS_MASK=has_mask, CAUSAL=causal,
                PRECISION=_precision(q.dtype, allow_tf32), UPCAST=triton_interpreted() and q.dtype == torch.bfloat16,
                **extras.meta(), **_tile_meta())
    return args, meta


def _block_d(head_dim: int) -> int:
    """Columns of a q/k/v tile: the head dim rounded up to a power of two, tl.dot's minimum 16."""
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def _forward(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32, lse_shape, extras=None):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    if _has_work(q, samples.max_q):
        args, meta = _common_args(q, k, samples, key_padding_mask, scale, causal, allow_tf32, extras)
        grid = lambda m: (triton.cdiv(samples.max_q, m["BLOCK_M"]), samples.batch * q.shape[-2])  # noqa: E731
        launch(_forward_kernel)[grid](q, k, v, out, lse, *args, **meta)
    return out, lse


def _backward(grad_out, grad_lse, q, k, v, out, lse, samples, key_padding_mask, scale, causal, allow_tf32,
              extras=None):
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # keys past a sample's length get 0
    if _has_work(q, samples.max_q) and _has_work(k, samples.max_k):
        args, meta = _common_args(q, k, samples, key_padding_mask, scale, causal, allow_tf32, extras)
        heads_q, heads_kv = q.shape[-2], k.shape[-2]
        delta = torch.empty_like(lse)
        block_m = _DELTA_BLOCK_M_INTERPRETED if triton_interpreted() else _DELTA_BLOCK_M
        launch(_delta_kernel)[(triton.cdiv(samples.max_q, block_m), samples.batch * heads_q)](
            out.contiguous(), grad_out, grad_lse if grad_lse is not None else lse, delta,
            samples.vectors[0], samples.vectors[1], samples.vectors[4], heads_q, samples.lse_head,
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], HAS_DLSE=grad_lse is not None, BLOCK_M=block_m,
        )
        grid_kv = lambda m: (triton.cdiv(samples.max_k, m["BLOCK_N"]), samples.batch * heads_kv)  # noqa: E731
        launch(_dkdv_kernel)[grid_kv](q, k, v, grad_out, lse, delta, dk, dv, *args, **meta)
        grid_q = lambda m: (triton.cdiv(samples.max_q, m["BLOCK_M"]), samples.batch * heads_q)  # noqa: E731
        launch(_dq_kernel)[grid_q](q, k, v, grad_out, lse, delta, dq, *args, **meta)
    return dq, dk, dv


# --------------------------------------------------------------------------- ahead-of-time cases

# (dtype, allow_tf32) the launchers take, for head dims up to TRITON_MAX_HEAD_DIM
_DTYPES = ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True))


def aot_cases() -> list:
    """What the launchers above launch on a GPU, for ``mmfuse.triton.aot_check``: per dtype and
    tile width BLOCK_D 64 and 128 (one head dim per width: smaller ones only mask columns), every
    autotune config with both the key padding mask and the causal mask on (the most code), with and
    without the attention mask and dropout (whose autotuner keeps only tiles up to 64 x 64; each
    kernel regenerates its dropout mask with Philox in registers); BLOCK_D
    16 and 32, the same program on narrower tiles, at one config; the other mask/causal
    combinations, which change elementwise code only, at one config; bfloat16, whose tiles, MMA
    shapes and shared memory are float16's, at one config per BLOCK_D."""
    from mmfuse.triton._aot import kernel_case, tuned_configs

    cases = []
    block_ds = sorted({_block_d(dim) for dim in range(1, TRITON_MAX_HEAD_DIM + 1)})
    for dtype, allow_tf32 in _DTYPES:
        label = f"{str(dtype)[6:]}{'-tf32' if allow_tf32 else ''}"
        for block_d in block_ds:
            for has_mask, causal, extra in ((True, True, True), (True, True, False), (False, False, False),
                                            (True, False, False), (False, True, False)):
                meta = dict(HEAD_DIM=block_d, BLOCK_D=block_d, HAS_MASK=has_mask, CAUSAL=causal,
                            PRECISION=_precision(dtype, allow_tf32), UPCAST=False, HAS_BIAS=extra, DROPOUT=extra)
                for kernel, pointers in _attention_pointers(dtype, has_mask, extra).items():
                    configs = tuned_configs(kernel, pointers, meta)
                    if not (has_mask and causal):
                        configs = configs[:1] if block_d == 64 else []
                    elif dtype == torch.bfloat16:  # fp16's tiles, instructions and shared memory
                        configs = configs[:1]
                    elif block_d < 64:  # narrower tiles of BLOCK_D=64's program: its sweep bounds their resources
                        configs = configs[:1]
                    cases += [kernel_case(kernel, label, pointers, meta, floats=("scale", "drop_scale"), config=c)
                              for c in configs]
            if not allow_tf32:  # the delta kernel has no tl.dot
                pointers = dict(Out=dtype, dOut=dtype, dLse=torch.float32, Delta=torch.float32,
                                QStart=torch.int32, QLen=torch.int32, LseStart=torch.int32)
                cases += [kernel_case(_delta_kernel, label, pointers,
                                      dict(HEAD_DIM=block_d, BLOCK_D=block_d, HAS_DLSE=has_dlse, BLOCK_M=_DELTA_BLOCK_M))
                          for has_dlse in (True, False)]
    return cases


def _attention_pointers(dtype, has_mask, extra=False) -> dict:
    """Kernel -> its tensor arguments' dtypes (the mask, bias and philox arguments are a dummy int32
    vector when absent); ``extra``: with the attention mask and dropout."""
    vectors = dict.fromkeys(("QStart", "QLen", "KStart", "KLen", "LseStart"), torch.int32)
    common = dict(Q=dtype, K=dtype, V=dtype, Lse=torch.float32, Mask=torch.uint8 if has_mask else torch.int32,
                  Bias=torch.float32 if extra else torch.int32, Philox=torch.int64 if extra else torch.int32,
                  **vectors)
    return {
        _forward_kernel: dict(common, Out=dtype),
        _dkdv_kernel: dict(common, dOut=dtype, Delta=torch.float32, dK=dtype, dV=dtype),
        _dq_kernel: dict(common, dOut=dtype, Delta=torch.float32, dQ=dtype),
    }


@triton_custom_op("mmfuse::cross_attention_fwd_triton", fake=fake_fwd, triton_only_args=1)
def cross_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, scale: float, causal: bool, attn_mask: torch.Tensor | None,
    dropout_p: float, philox: torch.Tensor | None, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_fwd`` (+ ``allow_tf32``)."""
    samples = _padded_samples(q, k, kv_lens)
    extras = _Extras(q, k, attn_mask, dropout_p, philox)
    k, v = _zero_rows(_hidden_keys(k, key_padding_mask, extras, causal, samples), k, v)
    return _forward(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32,
                    (q.shape[0], q.shape[2], q.shape[1]), extras)


@triton_custom_op("mmfuse::cross_attention_bwd_triton", fake=fake_bwd)
def cross_attention_bwd_triton(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, kv_lens: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    scale: float, causal: bool, attn_mask: torch.Tensor | None, dropout_p: float, philox: torch.Tensor | None,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_bwd`` (+ ``allow_tf32``)."""
    samples = _padded_samples(q, k, kv_lens)
    extras = _Extras(q, k, attn_mask, dropout_p, philox)
    hidden = _hidden_keys(k, key_padding_mask, extras, causal, samples)
    k, v = _zero_rows(hidden, k, v)
    dq, dk, dv = _backward(grad_out, grad_lse, q, k, v, out, lse, samples, key_padding_mask, scale, causal,
                           allow_tf32, extras)
    # exactly 0 for keys no query sees, also when a NaN query row multiplies their dS = 0
    dk, dv = _zero_rows(hidden, dk, dv)
    return dq, dk, dv


@triton_custom_op("mmfuse::cross_attention_varlen_fwd_triton", fake=fake_varlen_fwd, triton_only_args=1)
def cross_attention_varlen_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_varlen_fwd`` (+ ``allow_tf32``)."""
    samples = _varlen_samples(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _forward(q, k, v, samples, None, scale, causal, allow_tf32, (q.shape[1], q.shape[0]))


@triton_custom_op("mmfuse::cross_attention_varlen_bwd_triton", fake=fake_bwd)
def cross_attention_varlen_bwd_triton(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_varlen_bwd`` (+ ``allow_tf32``)."""
    samples = _varlen_samples(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _backward(grad_out, grad_lse, q, k, v, out, lse, samples, None, scale, causal, allow_tf32)


def _register() -> None:
    register_attention_autograd(cross_attention_fwd_triton, cross_attention_bwd_triton)
    register_attention_autograd(cross_attention_varlen_fwd_triton, cross_attention_varlen_bwd_triton)


_register()
