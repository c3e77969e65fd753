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


def _out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out (and grad_out): q's shape with v's head dim."""
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def fake_fwd(q, k, v, kv_lens, key_padding_mask, scale, causal, attn_mask=None, dropout_p=0.0, philox=None,
             softcap=0.0, sinks=None, key_ranges=None):
    batch, len_q, heads_q, _ = q.shape
    return _out(q, v), q.new_empty((batch, heads_q, len_q), dtype=_lse_dtype(q))


def fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, attn_mask=None,
                    dropout_p=0.0, philox=None, softcap=0.0, sinks=None, key_ranges=None):
    return _out(q, v), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


def _dmask_shape(q, attn_mask, varlen: bool) -> tuple:
    if varlen:
        return (q.shape[1], q.shape[0], attn_mask.shape[-1])
    return (q.shape[0], q.shape[2], q.shape[1], attn_mask.shape[-1])


def _fake_bwd(varlen: bool):
    def fake(grad_out, grad_lse, q, k, v, *rest):
        # rest: out, lse, the forward's inputs after v, mask_grad
        attn_mask = rest[_MASK_INDEX[varlen] - 1] if len(rest) > _MASK_INDEX[varlen] - 1 else None
        mask_grad = rest[_NUM_INPUTS[varlen] - 1] if len(rest) > _NUM_INPUTS[varlen] - 1 else False
        dmask = (q.new_empty(_dmask_shape(q, attn_mask, varlen), dtype=_lse_dtype(q)) if mask_grad
                 else q.new_empty((0,), dtype=_lse_dtype(q)))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask

    return fake


# where attn_mask and sinks sit among a forward op's inputs (q, k, v, *rest)
_MASK_INDEX = {False: 7, True: 9}   # padded: q k v kv_lens kpm scale causal attn_mask; varlen: ... causal attn_mask
_SINKS_INDEX = {False: 11, True: 13}
_NUM_INPUTS = {False: 13, True: 15}  # the compiled ops' forward inputs (Triton twins add allow_tf32 after them)
fake_bwd = _fake_bwd(False)
fake_varlen_bwd = _fake_bwd(True)


def _reduce_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a full-size mask gradient over the dimensions the mask broadcasts along (size 1, or
    missing in front)."""
    lead = grad.dim() - len(shape)
    if lead:
        grad = grad.sum(dim=tuple(range(lead)))
    dims = tuple(d for d, n in enumerate(shape) if n == 1 and grad.shape[d] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def sinks_grad(grad_out, grad_lse, out, lse, sinks, varlen: bool) -> torch.Tensor:
    """d loss / d sinks (Hq,): ``-sum_rows exp(sink_h - lse) * delta`` with
    ``delta = rowsum(dO ∘ O) - dlse``, the probability of the sink times the row's delta."""
    compute = lse.dtype
    rowdot = (grad_out.to(compute) * out.to(compute)).sum(-1)  # (B, Lq, Hq) or (total_q, Hq)
    delta = rowdot.transpose(0, 1) if varlen else rowdot.transpose(1, 2)  # lse's layout
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute)
    head = (slice(None), None) if varlen else (None, slice(None), None)
    p_sink = torch.exp(sinks.to(compute)[head] - lse)
    dims = tuple(d for d in range(lse.dim()) if d != (0 if varlen else 1))
    return -(p_sink * delta).sum(dim=dims).to(sinks.dtype)


def register_attention_autograd(fwd_op, bwd_op, varlen: bool = False) -> None:
    """Autograd for a forward op ``(q, k, v, *rest) -> (out, lse)`` whose backward op takes
    ``(grad_out, grad_lse, q, k, v, out, lse, *rest, mask_grad, *extra)`` (``extra``: a Triton
    twin's trailing ``allow_tf32``) and returns
    ``(dq, dk, dv, dmask)``. Gradients flow to q, k, v, a float ``attn_mask`` (dmask summed over
    its broadcast dimensions) and ``sinks`` (``sinks_grad``); the other inputs get none."""
    mask_at, sinks_at, split = _MASK_INDEX[varlen], _SINKS_INDEX[varlen], _NUM_INPUTS[varlen] - 3

    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rest = inputs[3:]

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        rest = ctx.rest
        attn_mask, sinks = rest[mask_at - 3], rest[sinks_at - 3]
        needs = ctx.needs_input_grad
        mask_grad = bool(attn_mask is not None and attn_mask.is_floating_point() and needs[mask_at])
        grad_out = grad_out.contiguous()
        dq, dk, dv, dmask = bwd_op(grad_out, grad_lse, q, k, v, out, lse, *rest[:split], mask_grad, *rest[split:])
        grads = [dq, dk, dv] + [None] * len(rest)
        if mask_grad:
            grads[mask_at] = _reduce_to(dmask, attn_mask.shape).to(attn_mask.dtype)
        if sinks is not None and needs[sinks_at]:
            grads[sinks_at] = sinks_grad(grad_out, grad_lse, out, lse, sinks, varlen)
        return tuple(grads)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    torch.library.register_fake("mmfuse::cross_attention_fwd", fake_fwd)
    torch.library.register_fake("mmfuse::cross_attention_varlen_fwd", fake_varlen_fwd)
    torch.library.register_fake("mmfuse::cross_attention_bwd", fake_bwd)
    torch.library.register_fake("mmfuse::cross_attention_varlen_bwd", fake_varlen_bwd)
    register_attention_autograd(torch.ops.mmfuse.cross_attention_fwd.default, torch.ops.mmfuse.cross_attention_bwd.default)
    register_attention_autograd(
        torch.ops.mmfuse.cross_attention_varlen_fwd.default, torch.ops.mmfuse.cross_attention_varlen_bwd.default,
        varlen=True,
    )
