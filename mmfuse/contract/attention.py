"""Contract of the cross-attention ops (padded and varlen, forward and backward): fake kernels
and autograd, shared by the compiled ops and their Triton twins, and the attention-dropout
random stream every backend implements.

Attention dropout (padded ops' ``dropout_p`` and ``philox``). ``philox`` is an int64 tensor
``(seed, offset)`` drawn per call from torch's default generator of the inputs' device
(``mmfuse.ops.attention``), so ``torch.manual_seed`` reproduces a run. Element
``(b, h, i, j)`` of the ``(B, Hq, Lq, Lk)`` attention probabilities (padded sizes) draws word
``j % 4`` of Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
1, 2, 3", SC 2011; the round and key constants of Random123 and of Triton's ``tl.randint``)
with key ``(seed mod 2^32, seed >> 32)`` and counter
``(g mod 2^32, g >> 32, offset mod 2^32, offset >> 32)``, where
``g = ((b * Hq + h) * Lq + i) * ceil(Lk / 4) + j // 4`` (seed and offset read as unsigned 64-bit).
The element is kept iff that 32-bit word is ``>= floor(dropout_p * 2^32)``
(``keep_threshold``), which keeps it with probability ``1 - floor(p 2^32) / 2^32``, and a kept
probability is multiplied by ``1 / (1 - dropout_p)``. Row sums and ``lse`` use the undropped
probabilities; ``out`` uses the dropped ones. The backward regenerates the mask from the same
``philox``; no backend stores it. ``mmfuse.reference.attention.philox_keep`` is the oracle.
"""
from __future__ import annotations

import math

import torch

from mmfuse import _extension

# The largest head dim the Triton kernels take: at 256 every autotune config overflows sm_80's
# shared memory or spills (measured by ``make triton-check``); larger ones go to another backend.
TRITON_MAX_HEAD_DIM = 128

def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def keep_threshold(dropout_p: float) -> int:
    """The 32-bit draw at or above which an element is kept: ``floor(dropout_p * 2^32)``."""
    return int(math.floor(float(dropout_p) * 2.0**32))


def fake_fwd(q, k, v, kv_lens, key_padding_mask, scale, causal, attn_mask=None, dropout_p=0.0, philox=None):
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
