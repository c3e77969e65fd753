"""Cross-modal attention: queries from one modality attend to keys/values of another.

Public surface: ``cross_attention`` on padded ``(B, L, H, D)`` tensors with per-sample key
lengths or a key padding mask, and ``cross_attention_varlen`` on packed ``(total, H, D)``
tensors with int32 ``cu_seqlens``, FlashAttention's two layouts (Dao et al., "FlashAttention-2",
2023; ``flash_attn.flash_attn_interface``). Both validate every argument, choose a backend
(``mmfuse.backends``) and dispatch to the custom ops ``mmfuse::cross_attention_fwd`` /
``cross_attention_varlen_fwd`` (C++ CPU kernel, csrc/cpu/cross_attention.cpp; CUDA kernel,
csrc/cuda/cross_attention.cu, float16/bfloat16 with (head dim, value head dim) in _CUDA_HEAD_DIMS), to the Triton
kernels or to the pure-PyTorch reference. The ops' backward is the separate ``*_bwd`` op, registered here with
``torch.library.register_autograd``: the forward saves ``out`` and ``lse``, the backward
recomputes the probabilities from them (FlashAttention-2's backward).

Semantics shared by both functions:

- ``scale`` defaults to ``1 / sqrt(D)``.
- GQA/MQA: ``Hq`` is a multiple of ``Hkv``; query head ``h`` reads kv head ``h // (Hq // Hkv)``
  (as FlashAttention and ``scaled_dot_product_attention(enable_gqa=True)``).
- ``causal`` is bottom-right aligned (FlashAttention >= 2.1): query ``i`` sees key ``j`` iff
  ``j <= i + kv_len - q_len``, where ``kv_len`` is the sample's own number of valid keys
  (``kv_lens[b]``, or ``Lk`` without ``kv_lens``; in varlen, the sequence's length) and ``q_len``
  its number of queries. A ``key_padding_mask`` hides keys but does not move the alignment.
- A query with no visible key (``kv_lens[b] == 0``, all keys masked, or causal with more
  queries than keys) outputs 0, has ``lse = -inf`` and gets zero gradients. FlashAttention-2
  stores ``+inf`` there instead (so that its backward's ``exp(s - lse)`` is 0); -inf is the
  logsumexp of an empty set and what ``torch.logsumexp`` gives.
- ``lse`` is float32, or float64 for float64 inputs (so that ``gradcheck`` can check it).
- An empty batch (B = 0, or no tokens in varlen) returns empty outputs, like other torch ops.
- Both take ``attn_mask`` (bool, or a float bias added to the scores, with its gradient),
  ``dropout_p`` (attention dropout from a Philox4x32-10 stream whose (seed, offset) is drawn per
  call from torch's default generator of q's device; the stream is defined in
  ``mmfuse.contract.attention``), ``softcap`` (Gemma 2) and ``sinks`` (gpt-oss), and a value
  head dim different from q's. ``_FEATURES`` says which kernel computes which in-kernel; a call
  needing one a kernel lacks goes to the next backend (``auto``) or is refused (explicit).
"""
from __future__ import annotations

import math

import torch

from mmfuse._checks import (
    INT_DTYPES,
    check_bool,
    MAX_INT64,
    FLOAT_DTYPES,
    is_tracing,
    check_lengths,
    check_positive,
    check_same_device,
    check_tensor,
)
from mmfuse.backends import choose_backend
from mmfuse.contract import attention as _contract  # noqa: F401  (registers the compiled ops' fake kernels and autograd)
from mmfuse.contract.attention import TRITON_MAX_HEAD_DIM
from mmfuse.contract.seqlens import max_seqlen
from mmfuse.reference import attention as reference_attention

# the backends with a kernel for this op
_IMPLEMENTED = frozenset({"cuda", "cpu", "triton", "reference"})

# what the CUDA kernel (csrc/cuda/cross_attention_kernel.cuh, tensor-core mma) takes
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
# (q/k head dim, v head dim) pairs the CUDA kernels are instantiated for
_CUDA_HEAD_DIMS = ((64, 64), (128, 128), (128, 64))
# its largest dynamic shared memory per block, per head dim (the dQ kernel's DqSmem): 128 is over
# the 99 KiB of sm_86/sm_89/sm_120 GPUs
_CUDA_SHARED_BYTES = {(64, 64): 55_424, (128, 128): 104_576, (128, 64): 80_000}
_CUDA_MAX_GRID_Z = 65535  # samples (grid z) and query heads (grid y) per launch


# What each fused kernel computes in-kernel besides q, k, v, kv_lens, key_padding_mask and causal
# (the reference computes everything). A call that needs a feature a backend lacks leaves it.
_FEATURES = {
    "cpu": frozenset({"attn_mask", "dropout", "softcap", "sinks", "mask_grad", "head_dim_v", "varlen_mask",
                      "varlen_dropout", "key_ranges"}),
    "triton": frozenset({"attn_mask", "dropout", "softcap", "sinks", "mask_grad", "head_dim_v", "varlen_mask",
                         "varlen_dropout", "key_ranges"}),
    "cuda": frozenset({"attn_mask", "dropout", "softcap", "sinks", "mask_grad", "head_dim_v", "varlen_mask",
                       "varlen_dropout", "key_ranges"}),
}
_FEATURE_NAMES = {
    "attn_mask": "an attn_mask", "dropout": "attention dropout", "softcap": "softcap",
    "sinks": "attention sinks", "mask_grad": "the gradient of an attn_mask that requires grad",
    "head_dim_v": "a value head dim different from q's", "varlen_mask": "an attn_mask on packed sequences",
    "varlen_dropout": "attention dropout on packed sequences",
    "key_ranges": "per-query key_ranges",
}


def _features(q, v, *, varlen: bool, attn_mask=None, dropout_p=0.0, softcap=0.0, sinks=None,
              key_ranges=None) -> set[str]:
    """The ``_FEATURES`` a call needs."""
    need = set() if key_ranges is None else {"key_ranges"}
    if attn_mask is not None:
        need.add("varlen_mask" if varlen else "attn_mask")
        if attn_mask.requires_grad and torch.is_grad_enabled():
            need.add("mask_grad")
    if dropout_p > 0.0:
        need.add("varlen_dropout" if varlen else "dropout")
    if softcap > 0.0:
        need.add("softcap")
    if sinks is not None:
        need.add("sinks")
    if v.shape[-1] != q.shape[-1]:
        need.add("head_dim_v")
    return need


def _unsupported(q: torch.Tensor, batch: int, need: set[str] = frozenset(), dim_v: int | None = None):
    """Why a backend cannot take attention over ``q`` (padded or packed) in ``batch`` samples
    with the ``need``ed features and value head dim ``dim_v`` (default q's)."""
    dim_v = q.shape[-1] if dim_v is None else dim_v

    def reason(backend: str) -> str | None:
        if backend in _FEATURES:
            missing = sorted(need - _FEATURES[backend])
            if missing:
                return f"the {backend} kernel does not compute {', '.join(_FEATURE_NAMES[m] for m in missing)}"
        if backend == "triton" and q.dtype == torch.float64:
            return "the Triton kernels take float16, bfloat16 and float32 inputs, got float64"
        if backend == "triton" and max(q.shape[-1], dim_v) > TRITON_MAX_HEAD_DIM:
            return f"the Triton kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {q.shape[-1]} (v: {dim_v})"
        if backend == "cuda":
            if q.dtype not in _CUDA_DTYPES:
                return f"the CUDA kernel takes float16 and bfloat16 inputs (tensor-core mma), got {q.dtype}"
            dims = (q.shape[-1], dim_v)
            if dims not in _CUDA_HEAD_DIMS:
                return (f"the CUDA kernel takes (head dim, value head dim) in {list(_CUDA_HEAD_DIMS)}, "
                        f"got {dims}")
            if q.is_cuda:
                have = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
                if _CUDA_SHARED_BYTES[dims] > have:
                    return (f"the CUDA kernel at head dims {dims} needs {_CUDA_SHARED_BYTES[dims]} bytes "
                            f"of shared memory per block, this GPU allows {have}")
            if max(q.shape[-2], batch) > _CUDA_MAX_GRID_Z:
                return f"the CUDA kernel takes at most {_CUDA_MAX_GRID_Z} samples and heads per call, got {batch} and {q.shape[-2]}"
        return None

    return reason


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
    return_lse: bool = False,
    allow_tf32: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-modal attention on padded batches: ``softmax(q kᵀ · scale) v`` over visible keys.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), float16, bfloat16, float32 or float64.
        k: (batch_size, seqlen_k, nheads_k, headdim), q's dtype and device.
            nheads must be a multiple of nheads_k (GQA/MQA).
        v: (batch_size, seqlen_k, nheads_k, headdim_v), like k but for its head dim, which may
            differ from q's (DeepSeek's MLA: 192 / 128); out then has headdim_v.
        kv_lens: (batch_size,) integer tensor, optional. Sample b's valid keys are the first
            kv_lens[b], 0 <= kv_lens[b] <= seqlen_k. None: all seqlen_k keys are valid.
        key_padding_mask: (batch_size, seqlen_k) bool tensor, optional, any pattern. True marks
            a key to ignore (``nn.MultiheadAttention``'s convention). Given together with
            kv_lens, a key is visible iff it is within kv_lens AND not masked.
        scale: float > 0, optional. Multiplies q kᵀ before the softmax; default 1/sqrt(headdim).
        causal: bool. Bottom-right aligned causal mask: query i sees key j iff
            j <= i + kv_len - seqlen_q, with kv_len = kv_lens[b] (seqlen_k without kv_lens).
        attn_mask: optional, (seqlen_q, seqlen_k) or (batch_size or 1, nheads or 1, seqlen_q,
            seqlen_k), on q's device. bool: True hides the key (``nn.MultiheadAttention``'s
            convention); float (any floating dtype): added to the scaled scores, -inf hides the
            key. Read in-kernel, any float values (not only 0/-inf), exactly. A float mask that
            requires grad (a learned bias: ALiBi slopes, T5's position_bias) gets its gradient,
            dS summed over the dimensions it broadcasts along. Combined with the other masks: a
            key is used iff every mask lets it through.
        dropout_p: float in [0, 1). Attention dropout on the probabilities: each one is kept
            with probability 1 - dropout_p and scaled by 1 / (1 - dropout_p), from a Philox
            stream seeded per call from torch's default generator of q's device, so
            ``torch.manual_seed`` reproduces a run and every backend drops the same elements
            (``mmfuse.contract.attention`` defines the stream). lse is that of the undropped
            probabilities. Applied whenever > 0 (pass 0 in eval).
        softcap: float >= 0. When > 0 the scaled scores become ``softcap * tanh(s / softcap)``
            before attn_mask is added and the masks apply (Gemma 2's soft-capping); 0 is off.
        sinks: (nheads,) float tensor on q's device, optional: a learned logit per query head
            that joins every row's softmax denominator (gpt-oss's attention sinks),
            ``p_j = exp(s_j) / (sum_j exp(s_j) + exp(sinks[h]))``; gets its gradient. A row with
            no visible key outputs 0; lse includes the sink.
        key_ranges: int32 (batch_size, seqlen_q, 2) or (batch_size, nheads, seqlen_q, 2) on q's
            device, optional: query i sees only keys ``[start, end)``, 0 <= start <= end <=
            seqlen_k, intersected with the other masks (``mmfuse.masks`` builds them: sliding
            windows, documents, Flamingo media, bidirectional media inside causal text). O(Lq)
            memory; key tiles outside every range of a query tile are skipped. An empty range
            gives the row 0 (lse -inf) and zero gradients.
        return_lse: bool. Also return the log-sum-exp of each row's scaled scores (and sink).
        allow_tf32: bool. Let the Triton kernel multiply float32 tiles in TF32 on the GPU
            (faster, ~1e-3 relative error); other backends always compute float32 in IEEE.
        backend: "auto", "cuda", "triton", "cpu" or "reference" (see ``mmfuse.backends``).

    Returns:
        out: (batch_size, seqlen_q, nheads, headdim_v) in q's dtype. Rows with no visible key are 0.
        lse [if return_lse]: (batch_size, nheads, seqlen_q), float32 (float64 for float64
            inputs); -inf for rows with no visible key (without sinks).
    """
    op = "cross_attention"
    scale = check_cross_attention_inputs(op, q, k, v, kv_lens, key_padding_mask, scale, causal)
    check_attn_mask_and_dropout(op, q, k, attn_mask, dropout_p)
    softcap = check_softcap_and_sinks(op, q, softcap, sinks)
    check_key_ranges(op, q, key_ranges, (q.shape[0], q.shape[2], q.shape[1]), k.shape[1])
    dropout_p = float(dropout_p)
    check_bool(op, "return_lse", return_lse)
    check_bool(op, "allow_tf32", allow_tf32)
    need = _features(q, v, varlen=False, attn_mask=attn_mask, dropout_p=dropout_p, softcap=softcap, sinks=sinks,
                     key_ranges=key_ranges)
    backend = choose_backend(op, backend, q.device, _IMPLEMENTED, _unsupported(q, q.shape[0], need, v.shape[-1]))
    philox = draw_philox(q.device) if dropout_p > 0.0 else None
    if backend == "reference":
        out, lse, _ = reference_attention.cross_attention(
            q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, key_padding_mask=key_padding_mask,
            attn_bias=_as_bias(attn_mask, q), dropout_p=dropout_p, philox=philox, softcap=softcap, sinks=sinks,
            key_ranges=key_ranges,
        )
    else:
        args = (q.contiguous(), k.contiguous(), v.contiguous(), kv_lens, key_padding_mask, scale, causal,
                attn_mask, dropout_p, philox, softcap, sinks, key_ranges)
        if backend == "triton":
            out, lse = _triton().cross_attention_fwd_triton(*args, allow_tf32)
        else:
            out, lse = torch.ops.mmfuse.cross_attention_fwd(*args)
    return (out, lse) if return_lse else out


def check_key_ranges(op: str, q: torch.Tensor, key_ranges, rows: tuple[int, int, int], len_k) -> None:
    """key_ranges: int32, (B, Lq, 2) or (B, Hq, Lq, 2) for ``rows = (B, Hq, Lq)`` (varlen: B = None,
    (total_q, 2) or (Hq, total_q, 2)), on q's device, 0 <= start <= end <= len_k (an int, or per
    row a (rows,) tensor of the row's sequence length) — checked in eager mode (a host sync on
    CUDA), naming the first bad query."""
    if key_ranges is None:
        return
    batch, heads, len_q = rows
    check_tensor(op, "key_ranges", key_ranges, dtypes=(torch.int32,))
    check_same_device(op, {"q": q, "key_ranges": key_ranges})
    lead = () if batch is None else (batch,)
    shapes = (lead + (len_q, 2), lead + (heads, len_q, 2))
    if tuple(key_ranges.shape) not in shapes:
        raise ValueError(f"{op}: key_ranges must have shape {shapes[0]} or {shapes[1]}, got {tuple(key_ranges.shape)}")
    if is_tracing() or key_ranges.numel() == 0:
        return
    ranges = key_ranges.cpu().long()
    bound = len_k if isinstance(len_k, int) else len_k.cpu().long()
    bad = (ranges[..., 0] < 0) | (ranges[..., 0] > ranges[..., 1]) | (ranges[..., 1] > bound)
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        start, end = ranges[where].tolist()
        limit = bound if isinstance(bound, int) else int(bound[where[-1]])
        raise ValueError(f"{op}: key_ranges must satisfy 0 <= start <= end <= {limit} (the query's key count), "
                         f"got [{start}, {end}) at index {where}")


def check_softcap_and_sinks(op: str, q: torch.Tensor, softcap, sinks) -> float:
    """softcap: a finite float >= 0; sinks: None or a float (nheads,) tensor on q's device.
    Returns softcap as a float."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{op}: softcap must be a float >= 0 (0: off), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"{op}: softcap must be a finite float >= 0 (0: off), got {softcap}")
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    if q.dtype != torch.float64 and softcap != 0.0 and not tiny <= softcap <= huge:
        # the kernels compute in float32: such a cap would become inf (NaN scores) or 0 (no cap)
        raise ValueError(f"{op}: softcap must be 0 or within float32's normal range [{tiny}, {huge}] for {q.dtype} "
                         f"inputs, got {softcap}")
    if sinks is not None:
        check_tensor(op, "sinks", sinks, dtypes=FLOAT_DTYPES, shape=(q.shape[-2],))
        check_same_device(op, {"q": q, "sinks": sinks})
    return float(softcap)


def draw_philox(device: torch.device) -> torch.Tensor:
    """int64 (seed, offset) for one call's dropout, drawn from torch's default generator of
    ``device`` (so ``torch.manual_seed`` reproduces it; each call advances the generator). A
    tensor, not Python ints, so that ``torch.compile`` traces it (as SDPA's philox_seed/offset)."""
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)


def check_attn_mask_and_dropout(op: str, q: torch.Tensor, k: torch.Tensor, attn_mask, dropout_p) -> None:
    """attn_mask: bool or float, (Lq, Lk) or (B or 1, Hq or 1, Lq, Lk), on q's device;
    dropout_p: a float in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must lie in [0, 1), got {dropout_p}")
    if attn_mask is None:
        return
    check_tensor(op, "attn_mask", attn_mask, ndim=(2, 4), dtypes=(torch.bool,) + tuple(FLOAT_DTYPES))
    check_same_device(op, {"q": q, "attn_mask": attn_mask})
    batch, len_q, heads_q = q.shape[0], q.shape[1], q.shape[2]
    len_k = k.shape[1]
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() == 2:
        ok = shape == (len_q, len_k)
    else:
        ok = shape[0] in (batch, 1) and shape[1] in (heads_q, 1) and shape[2:] == (len_q, len_k)
    if not ok:
        raise ValueError(
            f"{op}: attn_mask must have shape (seqlen_q, seqlen_k) = {(len_q, len_k)} or (batch_size or 1, "
            f"nheads or 1, seqlen_q, seqlen_k) = ({batch} or 1, {heads_q} or 1, {len_q}, {len_k}), got {shape}"
        )


def _as_bias(attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """attn_mask as the reference's float (B or 1, Hq or 1, Lq, Lk) bias."""
    if attn_mask is None:
        return None
    mask = attn_mask if attn_mask.dim() == 4 else attn_mask[None, None]
    if mask.dtype == torch.bool:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.zeros(mask.shape, dtype=compute, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def cross_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | torch.Tensor | None,
    max_seqlen_k: int | torch.Tensor | None,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
    return_lse: bool = False,
    allow_tf32: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-modal attention on packed variable-length sequences (``flash_attn_varlen_func``).

    Arguments:
        q: (total_q, nheads, headdim), where total_q = total number of query tokens in the
            batch; float16, bfloat16, float32 or float64.
        k: (total_k, nheads_k, headdim), where total_k = total number of key tokens in the
            batch; q's dtype and device. nheads must be a multiple of nheads_k (GQA/MQA).
        v: (total_k, nheads_k, headdim_v), like k but for its head dim (out has headdim_v).
        cu_seqlens_q: (batch_size + 1,) int32, the cumulative query lengths: 0, then
            non-decreasing, ending at total_q. Sequence b's queries are rows
            cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q.
        cu_seqlens_k: (batch_size + 1,) int32, the same for k and v, ending at total_k.
        max_seqlen_q: int or 0-dim integer tensor (as transformers passes it), at least the
            longest query sequence (an upper bound is fine), or None to compute it from
            cu_seqlens_q (a host sync in eager mode; an unbacked SymInt under ``torch.compile``,
            so no graph break: see ``mmfuse.contract.seqlens``). Under ``torch.compile`` a
            tensor's value is not read (that would break the graph): the bound is then
            computed from cu_seqlens_q on the device.
        max_seqlen_k: likewise for the key sequences.
        scale: float > 0, optional; default 1/sqrt(headdim).
        causal: bool. Bottom-right aligned within each sequence: query i of sequence b sees
            key j iff j <= i + len_k[b] - len_q[b].
        attn_mask: optional, (total_q, W) or (nheads or 1, total_q, W) on q's device, W at
            least the longest key sequence: row r is packed query r's mask over the keys of
            its own sequence (column j = the sequence's key j; columns past its length are not
            read). bool (True hides) or float (added to the scores, -inf hides), as in
            ``cross_attention``, gradient included.
        dropout_p: float in [0, 1). Attention dropout; the stream is ``cross_attention``'s on
            the batch padded to its longest sequences (so padding the inputs and calling
            ``cross_attention`` with the same generator state drops the same elements).
        softcap, sinks: as in ``cross_attention``.
        key_ranges: int32 (total_q, 2) or (nheads, total_q, 2), optional: packed query r sees
            only keys ``[start, end)`` of its own sequence, 0 <= start <= end <= that
            sequence's length (see ``cross_attention``).
        return_lse: bool. Also return the log-sum-exp of each row's scaled scores.
        allow_tf32: bool. Let the Triton kernel multiply float32 tiles in TF32 on the GPU
            (faster, ~1e-3 relative error); other backends always compute float32 in IEEE.
        backend: "auto", "cuda", "triton", "cpu" or "reference".

    Returns:
        out: (total_q, nheads, headdim_v) in q's dtype. Rows with no visible key are 0.
        lse [if return_lse]: (nheads, total_q), float32 (float64 for float64 inputs), the
            layout of FlashAttention's varlen softmax_lse; -inf for rows with no visible key.

    The lengths are checked against cu_seqlens and max_seqlen eagerly (one host sync on CUDA);
    under ``torch.compile`` the values are unknown and the checks are skipped.
    """
    op = "cross_attention_varlen"
    scale = _check_qkv(op, q, k, v, packed=True, scale=scale)
    check_bool(op, "causal", causal)
    check_bool(op, "return_lse", return_lse)
    check_bool(op, "allow_tf32", allow_tf32)
    check_same_device(op, {"q": q, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k})
    max_seqlen_q = _max_seqlen_arg(op, "max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _max_seqlen_arg(op, "max_seqlen_k", max_seqlen_k)
    longest_q = _check_cu_seqlens(op, "q", q, "cu_seqlens_q", cu_seqlens_q, "max_seqlen_q", max_seqlen_q)
    longest_k = _check_cu_seqlens(op, "k", k, "cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"{op}: cu_seqlens_k must have shape (batch_size + 1,) = {tuple(cu_seqlens_q.shape)} "
            f"like cu_seqlens_q, got {tuple(cu_seqlens_k.shape)}"
        )
    _check_varlen_mask(op, q, attn_mask, longest_k)
    check_attn_mask_and_dropout(op, q, k, None, dropout_p)
    dropout_p = float(dropout_p)
    softcap = check_softcap_and_sinks(op, q, softcap, sinks)
    if key_ranges is not None:  # each row's bound: its sequence's key count
        check_same_device(op, {"q": q, "key_ranges": key_ranges})
        row_k = None if is_tracing() else cu_seqlens_k.diff().long().repeat_interleave(
            cu_seqlens_q.diff().long(), output_size=q.shape[0])
        check_key_ranges(op, q, key_ranges, (None, q.shape[1], q.shape[0]), row_k)
    need = _features(q, v, varlen=True, attn_mask=attn_mask, dropout_p=dropout_p, softcap=softcap, sinks=sinks,
                     key_ranges=key_ranges)
    backend = choose_backend(op, backend, q.device, _IMPLEMENTED, _unsupported(q, cu_seqlens_q.shape[0] - 1, need, v.shape[-1]))
    # work is sized by the real lengths where they are known (eager); max_seqlen is only a bound. The
    # dropout stream is defined at the longest lengths, so with dropout a traced call computes them.
    if longest_q is not None:
        max_seqlen_q, max_seqlen_k = longest_q, longest_k
    if max_seqlen_q is None or (dropout_p > 0.0 and longest_q is None):
        max_seqlen_q = max_seqlen(cu_seqlens_q)
    if max_seqlen_k is None or (dropout_p > 0.0 and longest_k is None):
        max_seqlen_k = max_seqlen(cu_seqlens_k)
    philox = draw_philox(q.device) if dropout_p > 0.0 else None
    if backend == "reference":
        bias = None if attn_mask is None else _as_bias(attn_mask, q).reshape((-1,) + attn_mask.shape[-2:])
        out, lse = reference_attention.cross_attention_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, causal=causal,
            attn_bias=bias, dropout_p=dropout_p, philox=philox, softcap=softcap, sinks=sinks, key_ranges=key_ranges,
        )
    else:
        args = (q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, causal, attn_mask, dropout_p, philox, softcap, sinks, key_ranges)
        if backend == "triton":
            out, lse = _triton().cross_attention_varlen_fwd_triton(*args, allow_tf32)
        else:
            out, lse = torch.ops.mmfuse.cross_attention_varlen_fwd(*args)
    return (out, lse) if return_lse else out


def _max_seqlen_arg(op: str, name: str, value):
    """max_seqlen as an int or None: a 0-dim integer tensor (transformers' ``max_length_q``) is
    read in eager mode (the cu_seqlens check syncs anyway) and dropped while tracing, where the
    bound is computed from cu_seqlens instead (reading it would break the graph)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() != 0 or value.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: {name} must be an int, a 0-dim integer tensor or None, got a tensor of shape "
                        f"{tuple(value.shape)} and dtype {value.dtype}")
    return None if is_tracing() else int(value)


def _check_varlen_mask(op: str, q: torch.Tensor, attn_mask, longest_k: int | None) -> None:
    """attn_mask: bool or float (total_q, W) or (nheads or 1, total_q, W), W >= the longest key sequence."""
    if attn_mask is None:
        return
    check_tensor(op, "attn_mask", attn_mask, ndim=(2, 3), dtypes=(torch.bool,) + tuple(FLOAT_DTYPES))
    check_same_device(op, {"q": q, "attn_mask": attn_mask})
    total_q, heads_q = q.shape[0], q.shape[1]
    rows, heads = attn_mask.shape[-2], (attn_mask.shape[0] if attn_mask.dim() == 3 else 1)
    width_ok = longest_k is None or attn_mask.shape[-1] >= longest_k
    if rows != total_q or heads not in (heads_q, 1) or not width_ok:
        raise ValueError(
            f"{op}: attn_mask must have shape (total_q, W) or (nheads or 1, total_q, W) = ({heads_q} or 1, {total_q}, W) "
            f"with W >= the longest key sequence ({longest_k}), got {tuple(attn_mask.shape)}"
        )


def check_cross_attention_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
) -> float:
    """Validate ``cross_attention``'s arguments; returns the scale to use.

    Shared with ``mmfuse.nn.CrossModalAttention``, whose weights/dropout path calls the
    reference directly.
    """
    scale = _check_qkv(op, q, k, v, packed=False, scale=scale)
    check_bool(op, "causal", causal)
    batch, len_k = k.shape[0], k.shape[1]
    check_same_device(op, {"q": q, "kv_lens": kv_lens, "key_padding_mask": key_padding_mask})
    if kv_lens is not None:
        check_lengths(op, "kv_lens", kv_lens, batch=batch, max_len=len_k, device=q.device)
    if key_padding_mask is not None:
        check_tensor(op, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,), shape=(batch, len_k))
    return scale


def _check_qkv(op: str, q, k, v, *, packed: bool, scale: float | None) -> float:
    """q, k, v ranks, dtypes, devices and shapes; returns the scale (default 1/sqrt(D))."""
    ndim = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=ndim, dtypes=FLOAT_DTYPES)
        if t.shape[-1] == 0 or t.shape[-2] == 0:
            raise ValueError(f"{op}: {name} must have at least one head and headdim >= 1, got shape {tuple(t.shape)}")
    check_same_device(op, {"q": q, "k": k, "v": v})
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype ({q.dtype}), got {t.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{op}: k must have q's headdim {q.shape[-1]} as its last dimension, got shape {tuple(k.shape)}"
        )
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{op}: v must have k's shape {tuple(k.shape[:-1])} but for its headdim, got {tuple(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k must have q's batch_size {q.shape[0]}, got shape {tuple(k.shape)}")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"{op}: q's nheads must be a multiple of k's nheads_k (GQA/MQA), got nheads={heads_q}, nheads_k={heads_kv}"
        )
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    check_positive(op, "scale", scale)
    return float(scale)


def _check_cu_seqlens(
    op: str, packed_name: str, packed: torch.Tensor, name: str, cu_seqlens, max_seqlen_name: str, max_seqlen
) -> int | None:
    """int32 (B + 1,) prefix sums from 0 to ``packed``'s row count, steps within ``max_seqlen``.

    Returns the longest sequence, or None while tracing (the values are unknown there)."""
    check_tensor(op, name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.shape[0] == 0:
        raise ValueError(f"{op}: {name} must have shape (batch_size + 1,) with at least one entry (0), got shape (0,)")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))):
        raise TypeError(f"{op}: {max_seqlen_name} must be an int, a 0-dim integer tensor or None, "
                        f"got {type(max_seqlen).__name__}")
    if is_tracing():
        return None
    if max_seqlen is not None and not 0 <= max_seqlen <= MAX_INT64:
        raise ValueError(f"{op}: {max_seqlen_name} must lie in [0, 2**63 - 1] (an upper bound of the lengths), "
                         f"got {max_seqlen}")
    values = cu_seqlens.cpu()
    lengths = values.diff()
    if values[0] != 0 or (lengths < 0).any():
        raise ValueError(f"{op}: {name} must start at 0 and be non-decreasing, got {values.tolist()}")
    if values[-1] != packed.shape[0]:
        raise ValueError(
            f"{op}: {name} must end at {packed_name}'s number of rows ({packed.shape[0]}), got {int(values[-1])}"
        )
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(
            f"{op}: {max_seqlen_name} must be >= the longest sequence in {name} ({longest}), got {max_seqlen}"
        )
    return longest


def _triton():
    from mmfuse.triton import cross_attention

    return cross_attention
