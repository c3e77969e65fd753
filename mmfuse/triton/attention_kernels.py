"""Triton kernels for cross-modal attention: the forward, and the tile helpers, score variants
and autotune configs the backward kernels (``mmfuse.triton.attention_backward``) share
(FlashAttention-2, Dao 2023).

Forward: one program per (query block, sample, head) streams K/V tiles through an online
softmax; the sample's key count bounds the loop, so padded keys are never read, and the key
padding mask and the bottom-right causal mask are applied per tile. With SPLIT (the decode
schedule of ``mmfuse.triton.attention_decode``) program_id(2) takes one chunk of the keys and
writes its float32 (out, lse) partial for the merge kernel there.

Score variants (``mmfuse.contract.attention``): SOFTCAP caps the scaled score as
``softcap * tanh(s / softcap)`` (Gemma 2, Team et al. 2024), before the attention mask tile (a
float32 bias added to the scores, bool masks arrive as 0/-inf) and the masks; HAS_SINKS adds
one logit per head to the softmax denominator in the forward epilogue (gpt-oss; "attention
sinks", Xiao et al. 2023), so lse includes it and the backward's P = exp(s - lse) needs no sink
term. v/out/dO/dV have their own head dim HEAD_DV (tile BLOCK_DV); q/k keep HEAD_DIM.
Attention dropout: each program regenerates the keep mask of its tile from Philox4x32-10
(Triton's ``philox_impl``, the stream of ``mmfuse.contract.attention``); it is never stored.
Key ranges (HAS_RANGES, issue #28): query i sees only keys [lo_i, hi_i) besides the other masks
(``row_ranges``); a query tile's key loop runs only over the key tiles its rows' ranges reach
(``range_blocks``), and the dK/dV kernel only over the span of the query tiles whose ranges
reach its key tile, so work follows the ranges' area, not Lq x Lk.

Padded ``(B, L, H, D)`` and packed ``(total, H, D)`` tensors are both token rows; per-sample
int32 vectors give each sample's first query/key row, its lengths, and where its lse starts.
The attention mask and dS are addressed as ``b * sb + h * sh + (first query row + i) * si + j``
(the launcher folds the padded layout's sample stride into sb). This module imports nothing
from the launchers.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import philox_impl

from mmfuse.backends import triton_config_pinned, triton_interpreted

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries on a GPU. Exact fp32 (no tf32)
# takes _SMALL_TILE alone: Triton multiplies it on the FMA units with every operand in registers,
# and `make triton-check` measured 64 x 64 tiles spilling 1-28 KB per thread in all three kernels
# where 32 x 32 on 8 warps spills nothing but dK/dV at head dim 128 (1.9 KB on sm_80). It is also
# the fallback when no tensor-core tile fits (tf32 at head dim 128: 64 x 64 needs 177-193 KiB of
# shared memory, over sm_80's 163 KiB).
TENSOR_CORE_TILES = ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 2))
SMALL_TILE = (32, 32, 8, 2)
# Largest (BLOCK_M or BLOCK_N) x BLOCK_D tile, in bytes, that a tensor-core config may stream.
# Measured by `make triton-check` (sm_80/sm_90): past it the K/V pipeline overflows shared memory
# (sm_80: 163 KiB) or the accumulators spill.
TILE_BYTES = 16 * 1024
AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DV", "CAUSAL", "HAS_MASK", "HAS_BIAS", "DROPOUT", "SOFTCAP", "HAS_RANGES"]


def _configs(block_names):
    if triton_interpreted():  # the interpreter is slow: one small tile
        return [triton.Config({name: 16 for name in block_names}, num_warps=1)]
    return [
        triton.Config({block_names[0]: m, block_names[1]: n}, num_warps=w, num_stages=s)
        for m, n, w, s in TENSOR_CORE_TILES + (SMALL_TILE,)
    ]


def fitting_configs(configs, named_args, **meta):
    """The autotune configs for this head dim and dtype (``early_config_prune``): the small tile
    for fp32 without tf32; otherwise the tensor-core tiles that fit, or else the small tile."""
    elem = named_args["Q"].element_size()

    def tile(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    small = [c for c in configs if tile(c) == SMALL_TILE]
    if meta["PRECISION"] == "ieee" and elem == 4:
        return small
    block_d = max(meta["BLOCK_D"], meta.get("BLOCK_DV", meta["BLOCK_D"]))
    kept = [c for c in configs if tile(c) != SMALL_TILE
            and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * block_d * elem <= TILE_BYTES]
    if meta.get("DROPOUT") or meta.get("HAS_BIAS") or meta.get("MASK_GRAD"):
        # the attention mask tile and the Philox state on top: `make triton-check` measured the
        # 128 x 128 forward over shared memory and 128-row tiles spilling 0.9-1.7 KB in dK/dV
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    kept = kept or small
    return kept[:1] if triton_config_pinned() else kept


def _autotune(*extra_keys):
    def wrap(kernel):
        if triton_interpreted():
            return kernel
        return triton.autotune(configs=_configs(["BLOCK_M", "BLOCK_N"]), key=AUTOTUNE_KEY + list(extra_keys),
                               prune_configs_by={"early_config_prune": fitting_configs})(kernel)

    return wrap


def tile_meta():
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
def query_program(QStart, QLen, KStart, KLen, heads_q):
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
def row_ranges(Ranges, ranges_sb, ranges_sh, b, h, q_row, offs_m, q_len, HAS_RANGES: tl.constexpr):
    """key_ranges' [lo, hi) of the query rows offs_m of sample b, head h (int32 pairs at
    b * sb + h * sh + 2 * (first query row + i); sb = sh = 0 for ranges shared by every head);
    rows past q_len get [0, 0). Without HAS_RANGES, zeros that nothing reads."""
    lo = offs_m * 0
    hi = lo
    if HAS_RANGES:
        pair = Ranges + b.to(tl.int64) * ranges_sb + h.to(tl.int64) * ranges_sh + (q_row + offs_m) * 2
        lo = tl.load(pair, mask=offs_m < q_len, other=0)
        hi = tl.load(pair + 1, mask=offs_m < q_len, other=0)
    return lo, hi


@triton.jit
def range_blocks(lo, hi, start, end, BLOCK_N: tl.constexpr):
    """Block skipping over key ranges: the key loop [start, end) of a query tile narrowed to the
    span of its rows' non-empty ranges, its start rounded down to a multiple of BLOCK_N (the
    tiles, and so the dropout stream's counters, stay the unnarrowed loop's); empty (start >= end)
    when every range is. FlashAttention-2 (Dao 2023) skips the tiles past the causal diagonal
    the same way; here the bound comes from the data."""
    some = lo < hi
    first = tl.min(tl.where(some, lo, 2147483647), 0)
    last = tl.max(tl.where(some, hi, 0), 0)
    return tl.maximum(start, tl.maximum(first, 0) // BLOCK_N * BLOCK_N), tl.minimum(end, last)


@triton.jit
def _tanh(x):
    """tanh in fp32 without overflow: (1 - e) / (1 + e), e = exp(-2|x|), odd-extended; its
    Taylor series to x^7 below |x| = 0.1, where 1 - e would cancel."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0.0, -t, t)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(x) < 0.1, small, t)


@triton.jit
def _scores(q, k_tile, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, bias_si, softcap, lo, hi,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
            SOFTCAP: tl.constexpr, HAS_RANGES: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores, -inf where the key is hidden: scaled, capped when SOFTCAP,
    plus the attention mask tile; and tanh(scaled / softcap) (the cap's derivative is 1 - t²;
    the scaled score itself without SOFTCAP)."""
    s = tl.dot(q, tl.trans(k_tile), input_precision=PRECISION) * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    visible = (offs_n < k_len)[None, :] & (offs_m < q_len)[:, None]
    if HAS_RANGES:  # row i sees keys [lo_i, hi_i)
        visible = visible & (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None])
    if HAS_BIAS:  # bias_head: row 0 of this (sample, head)'s float32 mask; -inf hides whatever q·k gave
        bias = tl.load(bias_head + offs_m[:, None].to(tl.int64) * bias_si + offs_n[None, :], mask=visible, other=0.0)
        s += bias
        visible = visible & (bias != float("-inf"))
    if HAS_MASK:
        ignored = tl.load(mask_row + offs_n, mask=offs_n < k_len, other=1)
        visible = visible & (ignored == 0)[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (k_len - q_len))
    return tl.where(visible, s, float("-inf")), t


@triton.jit
def _keep(Philox, SeqLens, bh, offs_m, start_n, keep_thr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dropout keep mask of the (BLOCK_M, BLOCK_N) tile of keys start_n.. (a multiple of 4)
    of queries offs_m of (sample, head) bh = b * Hq + h, in the stream's padded (B, Hq, Lq, Lk)
    layout, Lq and Lk read from SeqLens (the varlen launcher computes the longest sequences on
    the device): key j of query i draws word j % 4 of Philox4x32-10 at counter (g, offset),
    g = (bh * Lq + i) * ceil(Lk / 4) + j // 4, key seed (mmfuse.contract.attention). Philox runs
    once per counter, on a (BLOCK_M, BLOCK_N / 4) grid, and its 4 words are interleaved into the
    tile (join + reshape: column 4c + w is word w of counter c). keep_thr is
    floor(p * 2^32) - 2^31, compared with the word's top bit flipped (both int32)."""
    seed = tl.load(Philox).to(tl.uint64, bitcast=True)
    offset = tl.load(Philox + 1).to(tl.uint64, bitcast=True)
    seq_q = tl.load(SeqLens).to(tl.int64)
    seq_k = tl.load(SeqLens + 1).to(tl.int64)
    offs_c = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    g = (bh.to(tl.int64) * seq_q + offs_m.to(tl.int64))[:, None] * ((seq_k + 3) // 4) + offs_c[None, :]
    g = g.to(tl.uint64, bitcast=True)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (offset >> 32).to(tl.uint32)
    r0, r1, r2, r3 = philox_impl(c0, c1, c2, c3, (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32), 10)
    # join(join(r0, r2), join(r1, r3))[..., a, b] is word 2a + b: reshaped, column 4c + w holds word w
    u = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return (u.to(tl.int32, bitcast=True) ^ -2147483648) >= keep_thr


@triton.jit
def add_sink(lse, out, Sinks, h):
    """The sink logit of head h joins the row's softmax: lse' = logaddexp(lse, sink),
    out' = out * exp(lse - lse') (0 where no key is visible, where lse' = sink)."""
    sink = tl.load(Sinks + h).to(tl.float32)
    top = tl.maximum(lse, sink)
    shift = tl.where(top == float("-inf"), 0.0, top)
    new = shift + tl.log(tl.exp(lse - shift) + tl.exp(sink - shift))
    factor = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - new))
    return new, out * factor[:, None]


@_autotune("HAS_SINKS", "SPLIT")
@triton.jit
def _forward_kernel(
    Q,  # (rows_q, Hq, D), contiguous
    K,  # (rows_k, Hkv, D), contiguous
    V,  # (rows_k, Hkv, Dv), contiguous
    Out,  # (rows_q, Hq, Dv)
    Lse,  # fp32: query i of head h of sample b at lse_start[b] + h * lse_head + i
    Mask,  # (B, Lk) uint8, 1 = ignore; read when HAS_MASK
    QStart, QLen, KStart, KLen, LseStart,  # (B,) int32
    scale, heads_q, group, lse_head, mask_stride,
    Bias,  # float32 attention mask, (b, h, row, j) at b * sb + h * sh + row * si + j; read when HAS_BIAS
    Philox, SeqLens,  # int64 (seed, offset), int32 (Lq*, Lk*) of the dropout stream; read when DROPOUT
    bias_sb, bias_sh, bias_si, keep_thr, drop_scale, softcap,
    Sinks,  # (Hq,) float; read when HAS_SINKS
    Ranges, ranges_sb, ranges_sh,  # int32 key_ranges, addressed as in row_ranges; read when HAS_RANGES
    PartOut, PartLse,  # SPLIT: fp32 (splits, lse positions, Dv) and (splits, lse positions)
    split_keys, part_stride,  # SPLIT: keys per split (a multiple of BLOCK_N), lse positions
    HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_RANGES: tl.constexpr,
    HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q = _load_tile(Q + q_off, q_ok, UPCAST)
    mask_row = Mask + b.to(tl.int64) * mask_stride
    bias_head = Bias + b.to(tl.int64) * bias_sb + h.to(tl.int64) * bias_sh + q_row * bias_si
    bh = b * heads_q + h
    lo, hi = row_ranges(Ranges, ranges_sb, ranges_sh, b, h, q_row, offs_m, q_len, HAS_RANGES)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    start = 0
    end = _key_end(pid_m, q_len, k_len, BLOCK_M, CAUSAL)
    if SPLIT:  # this program's chunk of the keys
        start = tl.program_id(2) * split_keys
        end = tl.minimum(end, start + split_keys)
    if HAS_RANGES:  # only the key tiles some row's range reaches
        start, end = range_blocks(lo, hi, start, end, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_off, k_ok = _tile_offsets(k_row, offs_n, k_len, hk, heads_kv * HEAD_DIM, offs_d, HEAD_DIM)
        v_off, v_ok = _tile_offsets(k_row, offs_n, k_len, hk, heads_kv * HEAD_DV, offs_dv, HEAD_DV)
        k_tile = _load_tile(K + k_off, k_ok, UPCAST)
        v_tile = _load_tile(V + v_off, v_ok, UPCAST)
        s, _ = _scores(q, k_tile, offs_m, offs_n, q_len, k_len, mask_row, scale, bias_head, bias_si, softcap, lo, hi,
                       HAS_MASK, CAUSAL, PRECISION, HAS_BIAS, SOFTCAP, HAS_RANGES)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with nothing visible yet shift by 0 so that exp(-inf - shift) is 0, not NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(s == float("-inf"), 0.0, tl.exp(s - shift[:, None]))  # 0 for hidden keys, also in a NaN row
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the row sums use the undropped P, the PV product P ∘ keep / (1 - p)
            p = tl.where(_keep(Philox, SeqLens, bh, offs_m, start_n, keep_thr, BLOCK_M, BLOCK_N), p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
        m_i = m_new
    has_key = (l_i > 0.0) | (l_i != l_i)  # a NaN sum (a NaN visible score) keeps its NaN
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # 0 where no key is visible (acc is 0 there)
    lse = tl.where(has_key, m_i + tl.log(l_safe), float("-inf"))
    pos = tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m
    o_off, o_ok = _tile_offsets(q_row, offs_m, q_len, h, heads_q * HEAD_DV, offs_dv, HEAD_DV)
    if SPLIT:  # the merge kernel normalises across splits and adds the sink
        part = tl.program_id(2).to(tl.int64) * part_stride + pos
        tl.store(PartLse + part, lse, mask=offs_m < q_len)
        tl.store(PartOut + part[:, None] * HEAD_DV + offs_dv[None, :], out, mask=o_ok)
    else:
        if HAS_SINKS:
            lse, out = add_sink(lse, out, Sinks, h)
        tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=o_ok)
        tl.store(Lse + pos, lse, mask=offs_m < q_len)


def block_d(head_dim: int) -> int:
    """Columns of a q/k/v tile: the head dim rounded up to a power of two, tl.dot's minimum 16."""
    return max(16, triton.next_power_of_2(head_dim))


def precision(dtype, allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 and str(dtype) == "torch.float32" else "ieee"


# --------------------------------------------------------------------------- ahead-of-time cases


def aot_dtypes():
    """(dtype, allow_tf32) the launchers take, for head dims up to TRITON_MAX_HEAD_DIM."""
    import torch

    return ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True))


def aot_meta(dtype, allow_tf32, width, has_mask=True, causal=True, extra=False, softcap=False, width_v=None,
             ranges=False):
    return dict(HEAD_DIM=width, HEAD_DV=width_v or width, BLOCK_D=width, BLOCK_DV=width_v or width,
                HAS_MASK=has_mask, CAUSAL=causal, PRECISION=precision(dtype, allow_tf32), UPCAST=False,
                HAS_BIAS=extra, DROPOUT=extra, SOFTCAP=softcap, HAS_RANGES=ranges)


def aot_table(kernel_pointers, variant_meta) -> list:
    """The attention kernels' compilations for ``mmfuse.triton.aot_check``, over the kernels of
    ``kernel_pointers(dtype, has_mask, extra)`` (kernel -> its pointers' dtypes), each kernel's own
    constexprs from ``variant_meta(kernel, sinks, mask_grad)``: per dtype and tile
    width BLOCK_D 64 and 128 (one head dim per width: smaller ones only mask columns), every
    autotune config with both the key padding mask and the causal mask on (the most code), with and
    without the attention mask and dropout (whose autotuner keeps only tiles up to 64 x 64; each
    kernel regenerates its dropout mask with Philox in registers); BLOCK_D
    16 and 32, the same program on narrower tiles, at one config; the other mask/causal
    combinations, which change elementwise code only, at one config; bfloat16, whose tiles, MMA
    shapes and shared memory are float16's, at one config per BLOCK_D. Issue #26's variants at
    BLOCK_D 64 and 128, one config each (attention kernels take ~8x the compile time of the
    others: `make triton-check` keeps to its CI budget), bfloat16 left to float16's tiles:
    everything on (softcap, sinks, attention mask, its gradient dS, dropout; the autotuner keeps
    one config) per dtype; softcap (+ sinks in the forward's epilogue; elementwise) for float16
    and fp32 at BLOCK_D 64; Dv != D, (BLOCK_D, BLOCK_DV) = (64, 128) and (128, 64), for float16; key_ranges
    (issue #28: the rows' ranges loaded per tile, tiles outside them skipped) with the key padding and
    causal masks for float16 at BLOCK_D 64, one config."""
    import torch

    from mmfuse.contract.attention import TRITON_MAX_HEAD_DIM
    from mmfuse.triton._aot import kernel_case, tuned_configs

    cases = []

    def add(dtype, label, meta, has_mask, extra, first_only, sinks=False, mask_grad=False):
        for kernel, pointers in kernel_pointers(dtype, has_mask, extra).items():
            full = dict(meta, **variant_meta(kernel, sinks, mask_grad))
            configs = tuned_configs(kernel, pointers, full)
            cases.extend(kernel_case(kernel, label, pointers, full, floats=("scale", "drop_scale", "softcap"), config=c)
                         for c in (configs[:1] if first_only else configs))

    block_ds = sorted({block_d(dim) for dim in range(1, TRITON_MAX_HEAD_DIM + 1)})
    for dtype, allow_tf32 in aot_dtypes():
        label = aot_label(dtype, allow_tf32)
        for width in block_ds:
            for has_mask, causal, extra in ((True, True, True), (True, True, False), (False, False, False),
                                            (True, False, False), (False, True, False)):
                if not (has_mask and causal) and width != 64:
                    continue
                first_only = not (has_mask and causal) or dtype == torch.bfloat16 or width < 64
                add(dtype, label, aot_meta(dtype, allow_tf32, width, has_mask, causal, extra), has_mask, extra,
                    first_only)
            if width >= 64 and dtype != torch.bfloat16:  # bfloat16: float16's tiles
                if dtype == torch.float16 or (width == 64 and not allow_tf32):
                    add(dtype, label, aot_meta(dtype, allow_tf32, width, softcap=True), True, False, True, sinks=True)
                add(dtype, label, aot_meta(dtype, allow_tf32, width, extra=True, softcap=True), True, True, True,
                    sinks=True, mask_grad=True)
                if dtype == torch.float16:
                    add(dtype, label, aot_meta(dtype, allow_tf32, width, width_v=192 - width), True, False, True)
                if dtype == torch.float16 and width == 64:  # key_ranges: per-row loads, skipped tiles
                    add(dtype, label, aot_meta(dtype, allow_tf32, width, ranges=True), True, False, True)
    return cases


def aot_label(dtype, allow_tf32) -> str:
    return f"{str(dtype)[6:]}{'-tf32' if allow_tf32 else ''}"


def aot_cases() -> list:
    """The forward's compilations (``aot_table``); the backward kernels' are in
    ``attention_backward.aot_cases``, the split-KV forward and its merge in
    ``attention_decode.aot_cases``."""
    return aot_table(attention_pointers, lambda kernel, sinks, mask_grad: {"HAS_SINKS": sinks, "SPLIT": False})


def common_pointers(dtype, has_mask, extra=False) -> dict:
    """The tensor arguments every attention kernel takes, by name -> dtype (the mask, bias, philox
    and sinks are a dummy int32 vector when absent); ``extra``: with the attention mask and dropout."""
    import torch

    vectors = dict.fromkeys(("QStart", "QLen", "KStart", "KLen", "LseStart"), torch.int32)
    return dict(Q=dtype, K=dtype, V=dtype, Lse=torch.float32, Mask=torch.uint8 if has_mask else torch.int32,
                Bias=torch.float32 if extra else torch.int32, Philox=torch.int64 if extra else torch.int32,
                SeqLens=torch.int32, Sinks=torch.float32, Ranges=torch.int32, **vectors)


def attention_pointers(dtype, has_mask, extra=False) -> dict:
    """The forward kernel -> its tensor arguments' dtypes (the split arguments are a dummy int32
    vector in the one-pass schedule)."""
    import torch

    return {_forward_kernel: dict(common_pointers(dtype, has_mask, extra), Out=dtype, PartOut=torch.int32,
                                  PartLse=torch.int32)}
