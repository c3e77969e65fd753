"""Contract of the cross-attention ops (padded and varlen, forward and backward): fake kernels
and autograd, shared by the compiled ops and their Triton twins."""
from __future__ import annotations

import torch

from mmfuse import _extension

# The largest head dim the Triton kernels take: at 256 every autotune config overflows sm_80's
# shared memory or spills (measured by ``make triton-check``); larger ones go to another backend.
TRITON_MAX_HEAD_DIM = 128

def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def fake_fwd(q, k, v, kv_lens, key_padding_mask, scale, causal):
    batch, len_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, len_q), dtype=_lse_dtype(q))


def fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


def fake_bwd(grad_out, grad_lse, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def register_attention_autograd(fwd_op, bwd_op) -> None:
    """Autograd for a forward op ``(q, k, v, *rest) -> (out, lse)`` whose backward op takes
    ``(grad_out, grad_lse, q, k, v, out, lse, *rest)``; ``rest`` (masks or cu_seqlens,
    scale, causal, ...) gets no gradient."""

    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rest = inputs[3:]

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(grad_out.contiguous(), grad_lse, q, k, v, out, lse, *ctx.rest)
        return (dq, dk, dv) + (None,) * len(ctx.rest)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    torch.library.register_fake("mmfuse::cross_attention_fwd", fake_fwd)
    torch.library.register_fake("mmfuse::cross_attention_varlen_fwd", fake_varlen_fwd)
    torch.library.register_fake("mmfuse::cross_attention_bwd", fake_bwd)
    torch.library.register_fake("mmfuse::cross_attention_varlen_bwd", fake_bwd)
    register_attention_autograd(torch.ops.mmfuse.cross_attention_fwd.default, torch.ops.mmfuse.cross_attention_bwd.default)
    register_attention_autograd(
        torch.ops.mmfuse.cross_attention_varlen_fwd.default, torch.ops.mmfuse.cross_attention_varlen_bwd.default
    )
