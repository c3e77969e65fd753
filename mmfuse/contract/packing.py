"""Contract of ``pack_modalities`` / ``unpack_modalities``: fake kernels and autograd, shared by
the compiled ops and their Triton twins. Each op's backward is the other op."""
from __future__ import annotations

import torch

from mmfuse import _extension


def fake_pack_modalities(features, lengths, cu_seqlens, type_embedding, padded, out_len):
    batch, dim = features[0].shape[0], features[0].shape[2]
    n = out_len if out_len is not None else torch.library.get_ctx().new_dynamic_size()
    shape = (batch, n) if padded else (n,)
    return features[0].new_empty(*shape, dim), features[0].new_empty(shape, dtype=torch.long)


def fake_unpack_modalities(tokens, lengths, cu_seqlens, sizes):
    return [tokens.new_empty(lengths.shape[1], size, tokens.shape[-1]) for size in sizes]


def register_pack_autograd(pack_op, unpack_op) -> None:
    """Each op's backward is the other op (plus a per-modality sum for the type embedding)."""

    def pack_setup(ctx, inputs, output):
        features, lengths, cu_seqlens, type_embedding, padded, out_len = inputs
        ctx.save_for_backward(lengths, cu_seqlens)
        ctx.sizes = [x.shape[1] for x in features]
        ctx.has_embedding = type_embedding is not None

    def pack_backward(ctx, grad_tokens, grad_ids):
        lengths, cu_seqlens = ctx.saved_tensors
        grads = unpack_op(grad_tokens.contiguous(), lengths, cu_seqlens, ctx.sizes)
        grad_embedding = torch.stack([g.sum((0, 1)) for g in grads]) if ctx.has_embedding else None
        return list(grads), None, None, grad_embedding, None, None

    def unpack_setup(ctx, inputs, output):
        tokens, lengths, cu_seqlens, sizes = inputs
        ctx.save_for_backward(lengths, cu_seqlens)
        ctx.padded = tokens.dim() == 3
        ctx.out_len = tokens.shape[1] if ctx.padded else tokens.shape[0]
        ctx.sizes = sizes

    def unpack_backward(ctx, grads):
        lengths, cu_seqlens = ctx.saved_tensors
        grads = [g.contiguous() for g in grads]
        grad_tokens, _ = pack_op(grads, lengths, cu_seqlens, None, ctx.padded, ctx.out_len)
        return grad_tokens, None, None, None

    torch.library.register_autograd(pack_op, pack_backward, setup_context=pack_setup)
    torch.library.register_autograd(unpack_op, unpack_backward, setup_context=unpack_setup)


if _extension.has_cpu_kernels():
    torch.library.register_fake("mmfuse::pack_modalities", fake_pack_modalities)
    torch.library.register_fake("mmfuse::unpack_modalities", fake_unpack_modalities)
    register_pack_autograd(torch.ops.mmfuse.pack_modalities.default, torch.ops.mmfuse.unpack_modalities.default)
