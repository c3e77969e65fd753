"""Contract of ``fused_concat_linear`` and ``combine_modalities``: fake kernels and autograd,
shared by the compiled ops and their Triton twins (which take ``allow_tf32`` last)."""
from __future__ import annotations

import torch

from mmfuse import _extension


def fake_fused_concat_linear(xs, weight, bias, activation):
    out = xs[0].new_empty(xs[0].shape[0], weight.shape[0])
    return out, (xs[0].new_empty(0) if activation == "none" else torch.empty_like(out))


def fake_fused_concat_linear_bwd(grad_out, xs, weight, preact, activation, has_bias):
    grad_bias = weight.new_empty(weight.shape[0]) if has_bias else weight.new_empty(0)
    return [x.new_empty(x.shape) for x in xs], weight.new_empty(weight.shape), grad_bias


def fake_combine_modalities(projected, mode, weights, gate_logits, activation):
    return projected[0].new_empty(projected[0].shape)


def fake_combine_modalities_bwd(grad_out, projected, mode, weights, gate_logits, activation):
    grad_weights = weights.new_empty(weights.shape) if mode == "sum" else projected[0].new_empty(0)
    grad_gates = [p.new_empty(p.shape) for p in projected] if mode == "gated" else []
    return [p.new_empty(p.shape) for p in projected], grad_weights, grad_gates


def register_fusion_autograd(linear_op, linear_bwd_op, combine_op, combine_bwd_op) -> None:
    """Backward of each forward op is its ``_bwd`` op; the Triton ops take ``allow_tf32`` last."""

    def linear_setup(ctx, inputs, output):
        xs, weight, bias, activation = inputs[:4]
        ctx.extra = tuple(inputs[4:])
        ctx.num, ctx.activation, ctx.has_bias = len(xs), activation, bias is not None
        ctx.save_for_backward(*xs, weight, output[1])

    def linear_backward(ctx, grad_out, _grad_preact):
        *xs, weight, preact = ctx.saved_tensors
        grad_xs, grad_weight, grad_bias = linear_bwd_op(
            grad_out.contiguous(), xs, weight, preact, ctx.activation, ctx.has_bias, *ctx.extra
        )
        return (list(grad_xs), grad_weight, grad_bias if ctx.has_bias else None, None) + (None,) * len(ctx.extra)

    def combine_setup(ctx, inputs, output):
        projected, mode, weights, gate_logits, activation = inputs
        ctx.num, ctx.mode, ctx.activation, ctx.num_gates = len(projected), mode, activation, len(gate_logits)
        # no pre-activation is saved: the backward recomputes it from the inputs it reads anyway
        ctx.save_for_backward(*projected, *gate_logits, weights)

    def combine_backward(ctx, grad_out):
        saved = ctx.saved_tensors
        projected, gates = list(saved[: ctx.num]), list(saved[ctx.num : ctx.num + ctx.num_gates])
        weights = saved[-1]
        grads, grad_weights, grad_gates = combine_bwd_op(
            grad_out.contiguous(), projected, ctx.mode, weights, gates, ctx.activation
        )
        return (list(grads), None, grad_weights if ctx.mode == "sum" else None,
                list(grad_gates) if ctx.mode == "gated" else [], None)

    torch.library.register_autograd(linear_op, linear_backward, setup_context=linear_setup)
    torch.library.register_autograd(combine_op, combine_backward, setup_context=combine_setup)


if _extension.has_cpu_kernels():
    torch.library.register_fake("mmfuse::fused_concat_linear", fake_fused_concat_linear)
    torch.library.register_fake("mmfuse::fused_concat_linear_bwd", fake_fused_concat_linear_bwd)
    torch.library.register_fake("mmfuse::combine_modalities", fake_combine_modalities)
    torch.library.register_fake("mmfuse::combine_modalities_bwd", fake_combine_modalities_bwd)
    register_fusion_autograd(
        torch.ops.mmfuse.fused_concat_linear.default, torch.ops.mmfuse.fused_concat_linear_bwd,
        torch.ops.mmfuse.combine_modalities.default, torch.ops.mmfuse.combine_modalities_bwd,
    )
