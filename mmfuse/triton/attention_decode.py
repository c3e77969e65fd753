"""Split-KV ("Flash-Decoding") schedule of the attention forward for short queries.

Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference" (2023): at decode time
(a few queries per sequence against a long key cache) the (query block, sample, head) grid of
the one-pass kernel has fewer programs than the GPU has SMs, and each program walks every key
alone. Splitting each row's keys into chunks, one program per chunk, fills the GPU; every
program writes its chunk's normalised partial output and log-sum-exp in float32, and a merge
kernel combines them: with ``lse = logsumexp_s(lse_s)``, ``out = sum_s exp(lse_s - lse) out_s``.

The split programs run ``_forward_kernel`` itself (``SPLIT=True``: same tiles, masks, softcap,
attention mask, key ranges and dropout; a chunk is a multiple of every tile width, so each tile
and its Philox counters are the one-pass schedule's), so the two schedules compute the same
function up to the summation order. Sinks are added once, in the merge. ``choose_splits`` decides;
``FORCE_SPLITS`` overrides it (tests run both schedules under the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.backends import triton_interpreted
from mmfuse.triton._launch import launch
from mmfuse.triton.attention_kernels import _forward_kernel, add_sink

# Tests set this to force a number of splits (1: the one-pass schedule); None: choose_splits.
FORCE_SPLITS: int | None = None
MAX_DECODE_QUERIES = 16  # longest query sequence the split schedule takes
MIN_SPLIT_KEYS = 256  # fewest keys worth a program of their own
MAX_SPLITS = 64
MERGE_BLOCK_M = 16


def split_align() -> int:
    """Chunk sizes are multiples of every BLOCK_N the autotuner may pick (of the interpreter's 16)."""
    return 16 if triton_interpreted() else 128


def choose_splits(batch: int, heads_q: int, max_q, max_k, device: torch.device) -> int:
    """Splits per row: 1 (the one-pass schedule) unless the queries are short (<= 16, one query
    tile) and batch x heads leaves SMs idle; then enough to fill about two waves, at least
    MIN_SPLIT_KEYS keys each, at most MAX_SPLITS. Only a schedule: results do not depend on it."""
    if FORCE_SPLITS is not None:
        return max(1, int(FORCE_SPLITS))
    if device.type != "cuda" or triton_interpreted():
        return 1
    if not all(isinstance(x, int) for x in (batch, max_q, max_k)) or max_q > MAX_DECODE_QUERIES:
        return 1  # symbolic bounds under torch.compile: the one-pass schedule
    programs = batch * heads_q
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_k // MIN_SPLIT_KEYS, MAX_SPLITS))


def split_keys(max_k: int, splits: int) -> tuple[int, int]:
    """(splits, keys per split): chunks aligned to split_align(), no empty trailing split."""
    align = split_align()
    chunk = triton.cdiv(triton.cdiv(max(max_k, 1), splits), align) * align
    return triton.cdiv(max(max_k, 1), chunk), chunk


@triton.jit
def _merge_kernel(
    PartOut, PartLse,  # fp32 (splits, lse positions, Dv), (splits, lse positions)
    Out,  # (rows_q, Hq, Dv)
    Lse,  # fp32, the forward's layout
    QStart, QLen, LseStart,  # (B,) int32
    Sinks,  # (Hq,) float; read when HAS_SINKS
    heads_q, lse_head, part_stride, num_splits,
    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s, then the sink; a split
    without visible keys has lse_s = -inf and weighs 0, a NaN one makes the row NaN."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1) // heads_q
    h = tl.program_id(1) % heads_q
    q_len = tl.load(QLen + b)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len
    ok = row_ok[:, None] & (offs_dv < HEAD_DV)[None, :]
    pos = tl.load(LseStart + b).to(tl.int64) + h * lse_head + offs_m
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        top = tl.maximum(top, tl.load(PartLse + s * part_stride + pos, mask=row_ok, other=float("-inf")))
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for s in range(num_splits):
        part = s * part_stride + pos
        w = tl.exp(tl.load(PartLse + part, mask=row_ok, other=float("-inf")) - shift)
        o = tl.load(PartOut + part[:, None] * HEAD_DV + offs_dv[None, :], mask=ok, other=0.0)
        total += w
        acc += w[:, None] * o
    has_key = (total > 0.0) | (total != total)
    t_safe = tl.where(has_key, total, 1.0)
    out = acc / t_safe[:, None]
    lse = tl.where(has_key, shift + tl.log(t_safe), float("-inf"))
    if HAS_SINKS:
        lse, out = add_sink(lse, out, Sinks, h)
    q_row = tl.load(QStart + b).to(tl.int64)
    o_off = (q_row + offs_m)[:, None] * (heads_q * HEAD_DV) + h * HEAD_DV + offs_dv[None, :]
    tl.store(Out + o_off, out.to(Out.dtype.element_ty), mask=ok)
    tl.store(Lse + pos, lse, mask=row_ok)


def forward_split(q, k, v, out, lse, vectors, lse_head, batch, max_q, max_k, args, meta, sinks, splits):
    """The split schedule: ``_forward_kernel`` with SPLIT on a (query block, sample * head,
    split) grid into float32 partials, then ``_merge_kernel`` into ``out`` and ``lse``.
    ``args``/``meta``: the one-pass launch's (its Sinks argument is ignored by SPLIT)."""
    splits, chunk = split_keys(max_k, splits)
    heads_q, dim_v = q.shape[-2], v.shape[-1]
    positions = lse.numel()
    part_out = torch.empty((splits, positions, dim_v), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((splits, positions), device=q.device, dtype=torch.float32)
    grid = lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), batch * heads_q, splits)  # noqa: E731
    launch(_forward_kernel)[grid](q, k, v, out, lse, *args, part_out, part_lse, chunk, positions,
                                 **dict(meta, HAS_SINKS=False, SPLIT=True))
    q_start, q_len, lse_start = vectors[0], vectors[1], vectors[4]
    launch(_merge_kernel)[(triton.cdiv(max_q, MERGE_BLOCK_M), batch * heads_q)](
        part_out, part_lse, out, lse, q_start, q_len, lse_start, sinks if sinks is not None else q_start,
        heads_q, lse_head, positions, splits,
        HEAD_DV=dim_v, BLOCK_DV=meta["BLOCK_DV"], HAS_SINKS=sinks is not None, BLOCK_M=MERGE_BLOCK_M,
    )



def aot_cases() -> list:
    """The split schedule's compilations for ``mmfuse.triton.aot_check``: the SPLIT forward with
    the key padding and causal masks at BLOCK_D 64, every config float16 keeps, one for fp32,
    and everything on (softcap, attention mask, dropout) for float16, and key_ranges for float16 at one
    config; the merge (no tl.dot: the dtype changes only its store) for float16 at every BLOCK_DV
    with and without sinks, bfloat16 and float32 at 128 with sinks."""
    from mmfuse.triton._aot import kernel_case, tuned_configs
    from mmfuse.triton.attention_kernels import aot_dtypes, aot_meta, attention_pointers

    cases = []
    for dtype, allow_tf32 in aot_dtypes():
        label = f"{str(dtype)[6:]}{'-tf32' if allow_tf32 else ''}"
        variants = {torch.float16: [(64, False, False), (64, True, False), (64, False, True)],
                    torch.bfloat16: []}.get(dtype, [(64, False, False)])
        variants = variants if not allow_tf32 else []
        for width, extra, ranges in variants:
            pointers = dict(attention_pointers(dtype, True, extra)[_forward_kernel], PartOut=torch.float32,
                            PartLse=torch.float32)
            meta = dict(aot_meta(dtype, allow_tf32, width, extra=extra, softcap=extra, ranges=ranges), HAS_SINKS=False,
                        SPLIT=True)
            configs = tuned_configs(_forward_kernel, pointers, meta)
            every = dtype == torch.float16 and not ranges
            cases += [kernel_case(_forward_kernel, label, pointers, meta, floats=("scale", "drop_scale", "softcap"),
                                  config=c) for c in (configs if every else configs[:1])]
    vectors = dict.fromkeys(("QStart", "QLen", "LseStart"), torch.int32)
    for dtype, width, sinks in ([(torch.float16, w, s) for w in (16, 32, 64, 128) for s in (False, True)]
                                + [(torch.bfloat16, 128, True), (torch.float32, 128, True)]):
        pointers = dict(PartOut=torch.float32, PartLse=torch.float32, Out=dtype, Lse=torch.float32,
                        Sinks=torch.float32, **vectors)
        cases.append(kernel_case(_merge_kernel, str(dtype)[6:], pointers,
                                 dict(HEAD_DV=width, BLOCK_DV=width, HAS_SINKS=sinks, BLOCK_M=MERGE_BLOCK_M)))
    return cases
