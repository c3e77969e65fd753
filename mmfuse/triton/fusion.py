"""Triton kernels for the fusion ops: ``fused_concat_linear`` and ``combine_modalities``.

``fused_concat_linear`` is one tiled GEMM that reads up to four (A, B) source pairs through their
own pointers and strides, ``C = act(Σ_s A_s @ B_s^T + bias)``: the forward passes
``(x_i, W[:, block i])`` so no concatenation is built, and the backward reuses the same kernel
for ``dX_i = g @ W_i`` and ``dW_i = g^T @ x_i`` through transposed views (no activation there),
after one elementwise pass ``g = grad_out * act'(preact)``. ``combine_modalities`` is one
elementwise pass over up to four modalities, forward and backward; the backward recomputes the
pre-activation from the inputs it reads anyway, so none is stored. Accumulation is fp32; fp32
inputs use exact fp32 products (``input_precision="ieee"``) unless ``allow_tf32``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmfuse.backends import triton_config_pinned, triton_interpreted
from mmfuse.contract.fusion import (
    fake_combine_modalities,
    fake_combine_modalities_bwd,
    fake_fused_concat_linear,
    fake_fused_concat_linear_bwd,
    register_fusion_autograd,
)
from mmfuse.triton._launch import launch, triton_custom_op

MAX_SOURCES = 4
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "tanh": 4, "sigmoid": 5}
MODE_CODES = {"sum": 0, "product": 1, "gated": 2}
ELEMENTWISE_BLOCK = 1024


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.maximum(x, 0.0)
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        x = x * tl.sigmoid(x)
    elif ACT == 4:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif ACT == 5:
        x = tl.sigmoid(x)
    return x


@triton.jit
def _activate_grad(x, ACT: tl.constexpr):
    if ACT == 0:
        d = tl.full(x.shape, 1.0, tl.float32)
    elif ACT == 1:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif ACT == 3:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 4:
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        d = 1.0 - t * t
    else:
        s = tl.sigmoid(x)
        d = s * (1.0 - s)
    return d


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, K, sam, sak, sbn, sbk, offs_m, offs_n, M, N,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc (BLOCK_M, BLOCK_N) += A[offs_m, :K] @ B[offs_n, :K]^T
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * sam + k[None, :] * sak,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * sbn + k[:, None] * sbk,
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _multi_source_gemm_kernel(
    a0, b0, a1, b1, a2, b2, a3, b3,  # A_s (M, K_s) and B_s (N, K_s), any strides
    k0, k1, k2, k3,
    sa0m, sa0k, sb0n, sb0k, sa1m, sa1k, sb1n, sb1k, sa2m, sa2k, sb2n, sb2k, sa3m, sa3k, sb3n, sb3k,
    bias_ptr,  # (N,) or unused
    c_ptr,  # (M, N) output, strides scm, scn
    pre_ptr,  # (M, N) pre-activation, contiguous; written when STORE_PRE
    M, N, scm, scn,
    NUM_SOURCES: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, a0, b0, k0, sa0m, sa0k, sb0n, sb0k, offs_m, offs_n, M, N, BLOCK_K, PRECISION, UPCAST)
    if NUM_SOURCES > 1:
        acc = _accumulate(acc, a1, b1, k1, sa1m, sa1k, sb1n, sb1k, offs_m, offs_n, M, N, BLOCK_K, PRECISION, UPCAST)
    if NUM_SOURCES > 2:
        acc = _accumulate(acc, a2, b2, k2, sa2m, sa2k, sb2n, sb2k, offs_m, offs_n, M, N, BLOCK_K, PRECISION, UPCAST)
    if NUM_SOURCES > 3:
        acc = _accumulate(acc, a3, b3, k3, sa3m, sa3k, sb3n, sb3k, offs_m, offs_n, M, N, BLOCK_K, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ty = c_ptr.dtype.element_ty
    # the activation sees the pre-activation as stored, as the unfused composition does
    pre = acc.to(out_ty).to(tl.float32)
    if STORE_PRE:
        tl.store(pre_ptr + offs_m[:, None] * N + offs_n[None, :], pre.to(out_ty), mask=mask)
    tl.store(c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn, _activate(pre, ACT).to(out_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): Hopper/Ampere tensor-core tiles, large ones
# for the bulk and a narrower one for small N; exact fp32 (no tf32) takes _IEEE_TILE alone:
# Triton multiplies it on the FMA units with the operands in registers, and `make triton-check`
# measured the tensor-core tiles spilling up to 120 KB per thread (a minute to compile each)
# where 32 x 64 x 32 on 8 warps spills nothing. The 128 x 256 tile is for 2-byte operands: in
# fp32 (tf32) it needs 192 KiB of shared memory on sm_80 and 288 KiB on sm_90, over both limits.
_TENSOR_CORE_TILES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4))
_IEEE_TILE = (32, 64, 32, 8, 2)


def _gemm_configs():
    if triton_interpreted():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in _TENSOR_CORE_TILES + (_IEEE_TILE,)]


def _gemm_tiles_for_precision(configs, named_args, **meta):
    """``early_config_prune``: the exact-fp32 tile for fp32 without tf32, else the tensor-core
    tiles (the 128 x 256 one for 2-byte operands only)."""
    def tile(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    elem = named_args["a0"].element_size()
    if meta["PRECISION"] == "ieee" and elem == 4:
        kept = [c for c in configs if tile(c) == _IEEE_TILE]
    else:
        kept = [c for c in configs if tile(c) != _IEEE_TILE and (elem == 2 or c.kwargs["BLOCK_N"] < 256)]
    return kept[:1] if triton_config_pinned() else kept


_gemm = triton.autotune(_gemm_configs(), key=["M", "N", "NUM_SOURCES"],
                        prune_configs_by={"early_config_prune": _gemm_tiles_for_precision})(_multi_source_gemm_kernel)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> tuple[str, bool]:
    """(tl.dot input precision, upcast operands to fp32 first).

    The CPU interpreter multiplies bfloat16 tiles as their raw 16-bit patterns, so there half
    operands are upcast first: bf16/fp16 products are exact in fp32 and accumulate in fp32, the
    tensor cores' semantics on a GPU.
    """
    if dtype == torch.float32:
        return ("tf32" if allow_tf32 else "ieee"), False
    if triton_interpreted():
        return "ieee", True
    return "tf32", False


def multi_source_gemm(pairs, out, *, bias=None, activation="none", preact=None, allow_tf32=False):
    """``out = act(Σ A_s @ B_s^T + bias)`` for up to four ``(A_s (M, K_s), B_s (N, K_s))`` pairs."""
    assert 1 <= len(pairs) <= MAX_SOURCES
    m, n = out.shape
    if m == 0 or n == 0:
        return out
    padded = list(pairs) + [pairs[0]] * (MAX_SOURCES - len(pairs))
    tensors = [t for pair in padded for t in pair]
    precision, upcast = _precision(pairs[0][0].dtype, allow_tf32)
    ks = [a.shape[1] for a, _ in padded]
    strides = [s for a, b in padded for s in (a.stride(0), a.stride(1), b.stride(0), b.stride(1))]
    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    launch(_gemm)[grid](
        *tensors, *ks, *strides,
        bias if bias is not None else out, out, preact if preact is not None else out,
        m, n, out.stride(0), out.stride(1),
        NUM_SOURCES=len(pairs), HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[activation],
        STORE_PRE=preact is not None, PRECISION=precision, UPCAST=upcast,
    )
    return out


@triton_custom_op("mmfuse::fused_concat_linear_triton", fake=fake_fused_concat_linear, triton_only_args=1)
def fused_concat_linear_triton(
    xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, activation: str, allow_tf32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.fused_concat_linear`` (at most four inputs)."""
    n, out_features = xs[0].shape[0], weight.shape[0]
    out = xs[0].new_empty(n, out_features)
    preact = xs[0].new_empty(0) if activation == "none" else torch.empty_like(out)
    multi_source_gemm(_weight_blocks(xs, weight), out, bias=bias, activation=activation,
                      preact=None if activation == "none" else preact, allow_tf32=allow_tf32)
    return out, preact


def _weight_blocks(xs, weight):
    pairs, col = [], 0
    for x in xs:
        pairs.append((x, weight[:, col : col + x.shape[1]]))
        col += x.shape[1]
    return pairs


@triton.jit
def _activation_grad_kernel(grad_ptr, pre_ptr, g_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        g = g * _activate_grad(tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT)
    tl.store(g_ptr + offs, g, mask=mask)


def _activation_backward(grad_out: torch.Tensor, preact: torch.Tensor, activation: str) -> torch.Tensor:
    """fp32 ``grad_out * act'(preact)``."""
    grad_out = grad_out.contiguous()
    g = torch.empty(grad_out.shape, dtype=torch.float32, device=grad_out.device)
    if g.numel():
        launch(_activation_grad_kernel)[(triton.cdiv(g.numel(), ELEMENTWISE_BLOCK),)](
            grad_out, preact if activation != "none" else grad_out, g, g.numel(),
            ACT=ACTIVATION_CODES[activation], BLOCK=ELEMENTWISE_BLOCK)
    return g


@triton_custom_op("mmfuse::fused_concat_linear_bwd_triton", fake=fake_fused_concat_linear_bwd, triton_only_args=1)
def fused_concat_linear_bwd_triton(
    grad_out: torch.Tensor, xs: list[torch.Tensor], weight: torch.Tensor, preact: torch.Tensor, activation: str,
    has_bias: bool, allow_tf32: bool,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(grad_xs, grad_weight, grad_bias) through the multi-source GEMM on transposed views."""
    g = _activation_backward(grad_out, preact, activation)  # (N, out) fp32
    gk = g.to(xs[0].dtype) if xs[0].dtype != torch.float32 else g  # GEMM operands in the input dtype
    grad_xs, grad_weight, col = [], torch.empty_like(weight), 0
    for x in xs:
        d = x.shape[1]
        w_block = weight[:, col : col + d]
        grad_xs.append(multi_source_gemm([(gk, w_block.t())], torch.empty_like(x), allow_tf32=allow_tf32))
        multi_source_gemm([(gk.t(), x.t())], grad_weight[:, col : col + d], allow_tf32=allow_tf32)
        col += d
    grad_bias = g.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return grad_xs, grad_weight, grad_bias


# ---- combine_modalities ------------------------------------------------------------------


@triton.jit
def _combine_fwd_kernel(p0, p1, p2, p3, z0, z1, z2, z3, w_ptr, out_ptr, numel,
                        NUM: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    out_ty = out_ptr.dtype.element_ty
    pre = _combine_preact(p0, p1, p2, p3, z0, z1, z2, z3, w_ptr, offs, mask, out_ty, NUM, MODE)
    tl.store(out_ptr + offs, _activate(pre, ACT).to(out_ty), mask=mask)


@triton.jit
def _combine_preact(p0, p1, p2, p3, z0, z1, z2, z3, w_ptr, offs, mask, out_ty, NUM: tl.constexpr, MODE: tl.constexpr):
    # the combination in fp32, rounded to the output dtype as a stored pre-activation would be
    y = _combine_term(p0, z0, w_ptr, 0, offs, mask, MODE)
    if NUM > 1:
        y = _combine_step(y, _combine_term(p1, z1, w_ptr, 1, offs, mask, MODE), MODE)
    if NUM > 2:
        y = _combine_step(y, _combine_term(p2, z2, w_ptr, 2, offs, mask, MODE), MODE)
    if NUM > 3:
        y = _combine_step(y, _combine_term(p3, z3, w_ptr, 3, offs, mask, MODE), MODE)
    return y.to(out_ty).to(tl.float32)


@triton.jit
def _combine_term(p_ptr, z_ptr, w_ptr, m, offs, mask, MODE: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        p = p * tl.load(w_ptr + m).to(tl.float32)
    elif MODE == 2:
        p = p * tl.sigmoid(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    return p


@triton.jit
def _combine_step(y, term, MODE: tl.constexpr):
    if MODE == 1:
        return y * term
    return y + term


def _sources(ts, fill):
    ts = list(ts) if ts else []
    return ts + [fill] * (MAX_SOURCES - len(ts))


@triton_custom_op("mmfuse::combine_modalities_triton", fake=fake_combine_modalities)
def combine_modalities_triton(
    projected: list[torch.Tensor], mode: str, weights: torch.Tensor | None, gate_logits: list[torch.Tensor],
    activation: str,
) -> torch.Tensor:
    """Triton twin of ``torch.ops.mmfuse.combine_modalities`` (at most four modalities)."""
    out = torch.empty_like(projected[0])
    numel = out.numel()
    if numel:
        launch(_combine_fwd_kernel)[(triton.cdiv(numel, ELEMENTWISE_BLOCK),)](
            *_sources(projected, projected[0]), *_sources(gate_logits, projected[0]),
            weights if weights is not None else out, out, numel,
            NUM=len(projected), MODE=MODE_CODES[mode], ACT=ACTIVATION_CODES[activation], BLOCK=ELEMENTWISE_BLOCK)
    return out


@triton.jit
def _combine_bwd_kernel(g_ptr, p0, p1, p2, p3, z0, z1, z2, z3, w_ptr,
                        gp0, gp1, gp2, gp3, gz0, gz1, gz2, gz3, partial_ptr, numel,
                        NUM: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # g_ptr: grad_out; partial_ptr: (programs, 4) fp32 per-program sums of g * p_m ("sum" mode),
    # reduced on the host. The pre-activation is recomputed from the inputs read here anyway.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != 0:
        pre = _combine_preact(p0, p1, p2, p3, z0, z1, z2, z3, w_ptr, offs, mask, gp0.dtype.element_ty, NUM, MODE)
        g = g * _activate_grad(pre, ACT)
    _combine_bwd_one(g, p0, p1, p2, p3, z0, w_ptr, gp0, gz0, partial_ptr, pid, 0, offs, mask, NUM, MODE)
    if NUM > 1:
        _combine_bwd_one(g, p1, p0, p2, p3, z1, w_ptr, gp1, gz1, partial_ptr, pid, 1, offs, mask, NUM, MODE)
    if NUM > 2:
        _combine_bwd_one(g, p2, p0, p1, p3, z2, w_ptr, gp2, gz2, partial_ptr, pid, 2, offs, mask, NUM, MODE)
    if NUM > 3:
        _combine_bwd_one(g, p3, p0, p1, p2, z3, w_ptr, gp3, gz3, partial_ptr, pid, 3, offs, mask, NUM, MODE)


@triton.jit
def _combine_bwd_one(g, p_ptr, o1, o2, o3, z_ptr, w_ptr, gp_ptr, gz_ptr, partial_ptr, pid, m, offs, mask,
                     NUM: tl.constexpr, MODE: tl.constexpr):
    # gradient for modality m, whose tensor is p_ptr; o1..o3 are the other modalities (first NUM-1 used)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out_ty = gp_ptr.dtype.element_ty
    if MODE == 0:
        tl.store(gp_ptr + offs, (g * tl.load(w_ptr + m).to(tl.float32)).to(out_ty), mask=mask)
        tl.store(partial_ptr + pid * 4 + m, tl.sum(g * p, axis=0))
    elif MODE == 1:
        others = tl.full(g.shape, 1.0, tl.float32)
        if NUM > 1:
            others = others * tl.load(o1 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 2:
            others = others * tl.load(o2 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 3:
            others = others * tl.load(o3 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gp_ptr + offs, (g * others).to(out_ty), mask=mask)
    else:
        s = tl.sigmoid(tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(gp_ptr + offs, (g * s).to(out_ty), mask=mask)
        tl.store(gz_ptr + offs, (g * p * s * (1.0 - s)).to(out_ty), mask=mask)


@triton_custom_op("mmfuse::combine_modalities_bwd_triton", fake=fake_combine_modalities_bwd)
def combine_modalities_bwd_triton(
    grad_out: torch.Tensor, projected: list[torch.Tensor], mode: str, weights: torch.Tensor | None,
    gate_logits: list[torch.Tensor], activation: str,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Triton twin of ``torch.ops.mmfuse.combine_modalities_bwd``; deterministic (no atomics)."""
    g = grad_out.contiguous()
    num, numel = len(projected), g.numel()
    grads = [torch.empty_like(p) for p in projected]
    grad_z = [torch.empty_like(p) for p in projected] if mode == "gated" else []
    programs = triton.cdiv(numel, ELEMENTWISE_BLOCK)
    partial = torch.zeros(programs, MAX_SOURCES, dtype=torch.float32, device=g.device)
    if numel:
        launch(_combine_bwd_kernel)[(programs,)](
            g, *_sources(projected, projected[0]), *_sources(gate_logits, projected[0]),
            weights if weights is not None else g, *_sources(grads, grads[0]),
            *_sources(grad_z or grads, grads[0]), partial, numel,
            NUM=num, MODE=MODE_CODES[mode], ACT=ACTIVATION_CODES[activation], BLOCK=ELEMENTWISE_BLOCK)
    grad_w = partial[:, :num].sum(0).to(weights.dtype) if mode == "sum" else projected[0].new_empty(0)
    return grads, grad_w, grad_z


# ---- ahead-of-time cases ---------------------------------------------------------------------

# (dtype, allow_tf32) the launchers take (float64 goes to another backend)
_DTYPES = ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False), (torch.float32, True))
# the three GEMMs multi_source_gemm runs, by the operand strides that are 1 (Triton turns a unit
# stride into a constant, which is what lets loads vectorise): the forward x_s @ W_s^T reads both
# along K; dX = g @ W_s reads g along K and W_s^T along N; dW = g^T @ x reads g^T along M and
# x^T along N. The output is N-contiguous in all three.
_GEMM_UNIT_STRIDES = {"forward": ("sa{s}k", "sb{s}k"), "grad_input": ("sa{s}k", "sb{s}n"),
                      "grad_weight": ("sa{s}m", "sb{s}n")}


def aot_cases() -> list:
    """What the launchers above launch on a GPU, for ``mmfuse.triton.aot_check``. The GEMM:
    per dtype and operand layout every autotune config, the forward with four sources, bias,
    GELU and the stored pre-activation (the most code), the backward as it runs (one source, no
    epilogue); fewer sources and the other activations, elementwise epilogue changes, at one
    config. The elementwise kernels: every activation, mode and modality count per dtype."""
    from mmfuse.triton._aot import kernel_case, tuned_configs

    cases = []
    for dtype, allow_tf32 in _DTYPES:
        label = f"{str(dtype)[6:]}{'-tf32' if allow_tf32 else ''}"
        precision, upcast = _precision(dtype, allow_tf32)
        for layout, unit_strides in _GEMM_UNIT_STRIDES.items():
            ones = [name.format(s=s) for name in unit_strides for s in range(MAX_SOURCES)] + ["scn"]
            forward = layout == "forward"
            variants = [dict(NUM_SOURCES=MAX_SOURCES if forward else 1, HAS_BIAS=forward,
                             ACT=ACTIVATION_CODES["gelu" if forward else "none"], STORE_PRE=forward)]
            if forward and dtype == torch.float16:
                variants += [dict(NUM_SOURCES=n, HAS_BIAS=False, ACT=code, STORE_PRE=code != 0)
                             for n in range(1, MAX_SOURCES) for code in ACTIVATION_CODES.values()]
            for i, flags in enumerate(variants):
                meta = dict(flags, PRECISION=precision, UPCAST=upcast)
                # bfloat16 has float16's tiles, MMA shapes and shared memory: one config
                configs = tuned_configs(_gemm, _gemm_pointers(dtype), meta)
                if i > 0 or dtype == torch.bfloat16:
                    configs = configs[:1]
                cases += [kernel_case(_gemm, f"{label} {layout}", _gemm_pointers(dtype), meta, ones=ones, config=c)
                          for c in configs]
        if allow_tf32:  # the elementwise kernels have no tl.dot
            continue
        for code in ACTIVATION_CODES.values():
            cases.append(kernel_case(_activation_grad_kernel, label,
                                     dict(grad_ptr=dtype, pre_ptr=dtype, g_ptr=torch.float32),
                                     dict(ACT=code, BLOCK=ELEMENTWISE_BLOCK)))
        cases += _combine_cases(dtype, label)
    return cases


def _gemm_pointers(dtype) -> dict:
    operands = [f"{ab}{s}" for s in range(MAX_SOURCES) for ab in "ab"]
    return dict(dict.fromkeys(operands + ["bias_ptr", "c_ptr", "pre_ptr"], dtype))


def _combine_cases(dtype, label) -> list:
    from mmfuse.triton._aot import kernel_case

    sources = [f"{pz}{m}" for m in range(MAX_SOURCES) for pz in "pz"]
    cases = []
    for mode_name, mode in MODE_CODES.items():
        forward = dict.fromkeys(sources + ["w_ptr", "out_ptr"], dtype)
        activations = ACTIVATION_CODES.values() if mode_name == "sum" else [ACTIVATION_CODES["gelu"]]
        cases += [kernel_case(_combine_fwd_kernel, label, forward,
                              dict(NUM=MAX_SOURCES, MODE=mode, ACT=code, BLOCK=ELEMENTWISE_BLOCK))
                  for code in activations]
        # the weights are read in "sum" mode only; otherwise grad_out stands in
        backward = dict.fromkeys(sources + [f"g{pz}{m}" for m in range(MAX_SOURCES) for pz in "pz"], dtype)
        backward.update(g_ptr=dtype, partial_ptr=torch.float32,
                        w_ptr=dtype)
        cases += [kernel_case(_combine_bwd_kernel, label, backward,
                              dict(NUM=num, MODE=mode, ACT=ACTIVATION_CODES["none" if num < MAX_SOURCES else "gelu"],
                                   BLOCK=ELEMENTWISE_BLOCK))
                  for num in range(1, MAX_SOURCES + 1)]
        cases += [kernel_case(_combine_bwd_kernel, label, backward, dict(NUM=MAX_SOURCES, MODE=mode, ACT=code,
                                                                         BLOCK=ELEMENTWISE_BLOCK))
                  for code in activations if code not in (ACTIVATION_CODES["none"], ACTIVATION_CODES["gelu"])]
    return cases


def _register() -> None:
    register_fusion_autograd(fused_concat_linear_triton, fused_concat_linear_bwd_triton,
                             combine_modalities_triton, combine_modalities_bwd_triton)


_register()
