"""Triton cross-attention ops, padded and varlen, forward and backward: launchers and the
ahead-of-time table; their argument preparation (per-sample vectors, checks, extras, hidden keys)
is in ``mmfuse.triton.attention_inputs``. The kernels (FlashAttention-2, Dao 2023, with softcap, sinks,
Dv != D, attention mask + its gradient, dropout) are in ``mmfuse.triton.attention_kernels``
(forward) and ``mmfuse.triton.attention_backward``, the split-KV decode schedule in
``mmfuse.triton.attention_decode``.

fp32 inputs use ``tl.dot(input_precision="ieee")`` unless ``allow_tf32``.
"""
from __future__ import annotations

import torch
import triton

from mmfuse.backends import triton_interpreted
from mmfuse.contract import attention as contract
from mmfuse.contract.attention import register_attention_autograd
from mmfuse.triton import attention_backward, attention_decode, attention_kernels
from mmfuse.triton._launch import launch, triton_custom_op
from mmfuse.triton.attention_backward import (
    DELTA_BLOCK_M,
    DELTA_BLOCK_M_INTERPRETED,
    _delta_kernel,
    _dkdv_kernel,
    _dq_kernel,
)
from mmfuse.triton.attention_inputs import (
    Extras,
    check_extras,
    has_work,
    hidden_keys,
    padded_samples,
    varlen_hidden_keys,
    varlen_samples,
    zero_rows,
)
from mmfuse.triton.attention_kernels import _forward_kernel, block_d, precision, tile_meta


def _common_args(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32, extras):
    heads_q, heads_kv, dim, dim_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    has_mask = key_padding_mask is not None
    # a dummy pointer when there is no mask: HAS_MASK=False never reads it
    mask = key_padding_mask.contiguous().view(torch.uint8) if has_mask else samples.vectors[0]
    args = (mask, *samples.vectors, scale, heads_q, heads_q // heads_kv, samples.lse_head,
            mask.shape[-1] if has_mask else 0, *extras.args(samples.vectors[0]))
    meta = dict(HEAD_DIM=dim, HEAD_DV=dim_v, BLOCK_D=block_d(dim), BLOCK_DV=block_d(dim_v), HAS_MASK=has_mask,
                CAUSAL=causal, PRECISION=precision(q.dtype, allow_tf32),
                UPCAST=triton_interpreted() and q.dtype == torch.bfloat16, **extras.meta(), **tile_meta())
    return args, meta


def _forward(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32, lse_shape, extras, num_splits=None):
    """out and lse; ``num_splits`` (tests): force the split-KV schedule's split count (1: one pass)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    if has_work(q, samples.max_q):
        args, meta = _common_args(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32, extras)
        splits = num_splits or attention_decode.choose_splits(samples.batch, q.shape[-2], samples.max_q,
                                                              samples.max_k, q.device)
        if splits > 1:
            attention_decode.forward_split(q, k, v, out, lse, samples.vectors, samples.lse_head, samples.batch,
                                           samples.max_q, samples.max_k, args, meta, extras.sinks, splits)
            return out, lse
        dummy = samples.vectors[0]
        grid = lambda m: (triton.cdiv(samples.max_q, m["BLOCK_M"]), samples.batch * q.shape[-2])  # noqa: E731
        launch(_forward_kernel)[grid](q, k, v, out, lse, *args, dummy, dummy, 0, 0,
                                     HAS_SINKS=extras.sinks is not None, SPLIT=False, **meta)
    elif extras.sinks is not None and lse.numel():  # no key anywhere: lse is the sink
        lse.copy_(extras.sinks.to(torch.float32)[:, None])
        out.zero_()
    return out, lse


def _backward(grad_out, grad_lse, q, k, v, out, lse, samples, key_padding_mask, scale, causal, allow_tf32,
              extras, dmask):
    q, k, v, grad_out = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # keys past a sample's length get 0
    if has_work(q, samples.max_q) and has_work(k, samples.max_k):
        args, meta = _common_args(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32, extras)
        heads_q, heads_kv = q.shape[-2], k.shape[-2]
        delta = torch.empty_like(lse)
        block_m = DELTA_BLOCK_M_INTERPRETED if triton_interpreted() else DELTA_BLOCK_M
        launch(_delta_kernel)[(triton.cdiv(samples.max_q, block_m), samples.batch * heads_q)](
            out.contiguous(), grad_out, grad_lse if grad_lse is not None else lse, delta,
            samples.vectors[0], samples.vectors[1], samples.vectors[4], heads_q, samples.lse_head,
            HEAD_DIM=meta["HEAD_DV"], BLOCK_D=meta["BLOCK_DV"], HAS_DLSE=grad_lse is not None, BLOCK_M=block_m,
        )
        mask_grad = dmask.numel() > 0
        dm_layout = extras.layout(dmask.shape) if mask_grad else (0, 0, 0)
        grid_kv = lambda m: (triton.cdiv(samples.max_k, m["BLOCK_N"]), samples.batch * heads_kv)  # noqa: E731
        launch(_dkdv_kernel)[grid_kv](q, k, v, grad_out, lse, delta, dk, dv, *args,
                                     dmask if mask_grad else samples.vectors[0], *dm_layout, MASK_GRAD=mask_grad,
                                     **meta)
        grid_q = lambda m: (triton.cdiv(samples.max_q, m["BLOCK_M"]), samples.batch * heads_q)  # noqa: E731
        launch(_dq_kernel)[grid_q](q, k, v, grad_out, lse, delta, dq, *args, **meta)
    return dq, dk, dv


def _dmask(q, mask_grad, shape):
    """dS for the attention mask's gradient: zeros of ``shape`` (float32; hidden and unvisited
    entries stay 0), or the spec's empty tensor without mask_grad."""
    if mask_grad:
        return torch.zeros(shape, device=q.device, dtype=torch.float32)
    return torch.empty(0, device=q.device, dtype=torch.float32)


# --------------------------------------------------------------------------- ops


@triton_custom_op("mmfuse::cross_attention_fwd_triton", fake=contract.fake_fwd, triton_only_args=1)
def cross_attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, scale: float, causal: bool, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, philox: torch.Tensor | None = None, softcap: float = 0.0,
    sinks: torch.Tensor | None = None, key_ranges: torch.Tensor | None = None, allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_fwd`` (+ ``allow_tf32``)."""
    samples = padded_samples(q, k, kv_lens)
    check_extras("cross_attention_fwd", q, k, samples, attn_mask, dropout_p, philox, sinks, varlen=False,
                 key_ranges=key_ranges)
    extras = Extras(q, attn_mask, dropout_p, philox, softcap, sinks, samples, key_ranges=key_ranges)
    k, v = zero_rows(hidden_keys(k, key_padding_mask, extras, causal, samples), k, v)
    return _forward(q, k, v, samples, key_padding_mask, scale, causal, allow_tf32,
                    (q.shape[0], q.shape[2], q.shape[1]), extras)


@triton_custom_op("mmfuse::cross_attention_bwd_triton", fake=contract.fake_bwd)
def cross_attention_bwd_triton(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, kv_lens: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    scale: float, causal: bool, attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
    philox: torch.Tensor | None = None, softcap: float = 0.0, sinks: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None, mask_grad: bool = False, allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_bwd`` (+ ``allow_tf32``); ``sinks`` needs
    no kernel term (lse includes it)."""
    samples = padded_samples(q, k, kv_lens)
    check_extras("cross_attention_bwd", q, k, samples, attn_mask, dropout_p, philox, sinks, False, mask_grad,
                 key_ranges)
    extras = Extras(q, attn_mask, dropout_p, philox, softcap, None, samples, key_ranges=key_ranges)
    hidden = hidden_keys(k, key_padding_mask, extras, causal, samples)
    k, v = zero_rows(hidden, k, v)
    dmask = _dmask(q, mask_grad, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    dq, dk, dv = _backward(grad_out, grad_lse, q, k, v, out, lse, samples, key_padding_mask, scale, causal,
                           allow_tf32, extras, dmask)
    # exactly 0 for keys no query sees, also when a NaN query row multiplies their dS = 0
    dk, dv = zero_rows(hidden, dk, dv)
    return dq, dk, dv, dmask


@triton_custom_op("mmfuse::cross_attention_varlen_fwd_triton", fake=contract.fake_varlen_fwd, triton_only_args=1)
def cross_attention_varlen_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, philox: torch.Tensor | None = None, softcap: float = 0.0,
    sinks: torch.Tensor | None = None, key_ranges: torch.Tensor | None = None, allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_varlen_fwd`` (+ ``allow_tf32``)."""
    samples = varlen_samples(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_extras("cross_attention_varlen_fwd", q, k, samples, attn_mask, dropout_p, philox, sinks, varlen=True,
                 key_ranges=key_ranges)
    extras = Extras(q, attn_mask, dropout_p, philox, softcap, sinks, samples, varlen=True, key_ranges=key_ranges)
    k, v = zero_rows(varlen_hidden_keys(k, extras, causal, cu_seqlens_q, cu_seqlens_k), k, v)
    return _forward(q, k, v, samples, None, scale, causal, allow_tf32, (q.shape[1], q.shape[0]), extras)


@triton_custom_op("mmfuse::cross_attention_varlen_bwd_triton", fake=contract.fake_varlen_bwd)
def cross_attention_varlen_bwd_triton(
    grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, scale: float, causal: bool, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, philox: torch.Tensor | None = None, softcap: float = 0.0,
    sinks: torch.Tensor | None = None, key_ranges: torch.Tensor | None = None, mask_grad: bool = False,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of ``torch.ops.mmfuse.cross_attention_varlen_bwd`` (+ ``allow_tf32``)."""
    samples = varlen_samples(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_extras("cross_attention_varlen_bwd", q, k, samples, attn_mask, dropout_p, philox, sinks, True, mask_grad,
                 key_ranges)
    extras = Extras(q, attn_mask, dropout_p, philox, softcap, None, samples, varlen=True, key_ranges=key_ranges)
    hidden = varlen_hidden_keys(k, extras, causal, cu_seqlens_q, cu_seqlens_k)
    k, v = zero_rows(hidden, k, v)
    width = attn_mask.shape[-1] if attn_mask is not None else 0
    dmask = _dmask(q, mask_grad, (q.shape[1], q.shape[0], width))
    dq, dk, dv = _backward(grad_out, grad_lse, q, k, v, out, lse, samples, None, scale, causal, allow_tf32,
                           extras, dmask)
    dk, dv = zero_rows(hidden, dk, dv)
    return dq, dk, dv, dmask


# --------------------------------------------------------------------------- ahead-of-time cases

def _attention_pointers(dtype, has_mask, extra=False) -> dict:
    """Every attention kernel -> its tensor arguments' dtypes (the forward's and the backward's tables)."""
    return {**attention_kernels.attention_pointers(dtype, has_mask, extra),
            **attention_backward.attention_pointers(dtype, has_mask, extra)}


def aot_cases() -> list:
    """The forward's, the backward's and the split schedule's tables."""
    return attention_kernels.aot_cases() + attention_backward.aot_cases() + attention_decode.aot_cases()


def _register() -> None:
    register_attention_autograd(cross_attention_fwd_triton, cross_attention_bwd_triton)
    register_attention_autograd(cross_attention_varlen_fwd_triton, cross_attention_varlen_bwd_triton, varlen=True)


_register()
