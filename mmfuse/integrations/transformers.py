"""``attn_implementation="mmfuse"`` for Hugging Face transformers >= 5.

Importing this module registers ``"mmfuse"`` in transformers' two registries:

- ``AttentionInterface`` (``transformers.modeling_utils``): :func:`mmfuse_attention_forward`,
  called by every attention layer as ``fn(module, query, key, value, attention_mask, dropout,
  scaling, is_causal=..., **kwargs)`` with q/k/v as ``(B, H, L, D)`` and the KV heads not
  repeated (GQA); it returns ``(out (B, Lq, Hq, Dv), None)``. Each call runs one mmfuse op,
  ``torch.ops.mmfuse.cross_attention_fwd`` or ``cross_attention_varlen_fwd``, on the C++ CPU
  kernel for CPU tensors and the CUDA/Triton kernels for CUDA tensors; a setting that no fused
  kernel computes on that device raises ``NotImplementedError`` naming the feature and the model
  setting (``MMFUSE_BACKEND=reference`` in the environment runs mmfuse's PyTorch reference
  instead, explicitly). PyTorch's own attention is never used.
- ``AttentionMaskInterface`` (``transformers.masking_utils``): :func:`mmfuse_mask`, called by
  ``create_causal_mask`` / ``create_bidirectional_mask`` / ``create_sliding_window_causal_mask``
  once per forward. It hands the kernel the cheapest exact form of the mask:

  ============================================  ==============================================
  what the model asks for                        what the kernel gets
  ============================================  ==============================================
  causal, no padding, aligned (prefill, decode)  ``None`` + ``causal=True``
  causal with a KV cache of other size (static   ``kv_lens`` (bottom-right alignment at the
  cache, chunked prefill)                        queries' absolute positions) + ``causal``
  causal with padding (left or right)            ``key_padding_mask`` + ``causal``
  bidirectional with right padding               ``kv_lens`` (per-sample key counts)
  bidirectional with any other padding           ``key_padding_mask``
  anything else (sliding windows, packed          a dense bool mask, batch-broadcast when the
  sequences, image-token overlays)               padding allows, read in-kernel
  a 4-D mask the model built itself (Mllama)     that mask (bool or float), in-kernel
  ============================================  ==============================================

  The tensor it returns is transformers' own convention (a ``(B, kv_length)`` bool padding
  mask, True = keep, for the compact forms, as ``flash_attention_mask`` returns; a ``(B, 1, Lq,
  Lk)`` bool mask, True = keep, as ``sdpa_mask`` returns, for the dense one), so model code
  that inspects or slices it keeps working; the kernel arguments ride along on the tensor
  (attribute ``_mmfuse_form``), computed once per forward instead of once per layer.

Semantics followed (transformers 5.x, ``integrations/sdpa_attention.py`` and
``masking_utils.py``): a mask, when given, carries the causal pattern (``is_causal`` is used
only without a mask, as in ``sdpa_attention_forward``); without a mask, ``is_causal`` with one
query is full attention, and with ``1 < Lq < Lk`` it is SDPA's top-left alignment (transformers
crops k/v to the first Lq keys there: an empty static cache). Rows with no visible key (padded
query positions) output 0, where SDPA outputs 0 too and eager a uniform average.

kwargs models pass and what they become: ``softcap`` (Gemma 2) → ``softcap``; ``s_aux``
(gpt-oss sinks) → ``sinks``; ``position_bias`` (T5) → a float ``attn_mask`` with its gradient;
``dropout`` → Philox ``dropout_p``; ``scaling`` → ``scale``; ``cu_seq_lens_q/k`` with
``max_length_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) →
``cross_attention_varlen`` (``sliding_window`` then becomes a packed per-row window mask);
``output_attentions=True`` and ``head_mask`` raise (no weights are materialised).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mmfuse.integrations.transformers needs Hugging Face transformers >= 5.0: "
        "pip install 'mmfuse[hf]' (or pip install 'transformers>=5.0')"
    ) from exc

from mmfuse._checks import is_tracing
from mmfuse.backends import BACKENDS, VERIFIED_CUDA_OPS, _unavailable
from mmfuse.ops import attention as _attn

_major = int(transformers.__version__.split(".")[0])
if _major < 5:
    raise ImportError(
        f"mmfuse.integrations.transformers needs transformers >= 5.0 (AttentionMaskInterface), found "
        f"{transformers.__version__}: pip install 'mmfuse[hf]'"
    )

NAME = "mmfuse"

__all__ = ["NAME", "mmfuse_attention_forward", "mmfuse_mask", "register"]


@dataclass(frozen=True)
class _Form:
    """Kernel arguments for one mask: kv_lens (B,) int32, key_padding_mask (B, Lk) bool True =
    hide, attn_mask (bool True = hide, or float bias), and whether the pattern is causal
    (bottom-right at kv_lens, or at Lk without kv_lens)."""

    kv_lens: torch.Tensor | None = None
    key_padding_mask: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    causal: bool = False
    width: int | None = None  # the key length the form was built for


# --------------------------------------------------------------------------------------- masks


def _padding(attention_mask, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    """The 2-D padding mask (True = keep) over this layer's keys [kv_offset, kv_offset + kv_length)."""
    pad = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if pad is None:
        return None
    return pad[:, kv_offset:kv_offset + kv_length].to(torch.bool)


_DENSE = object()  # "no compact form": build the dense mask


def _tag(mask: torch.Tensor, form: _Form) -> torch.Tensor:
    mask._mmfuse_form = form
    return mask


def mmfuse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    allow_is_bidirectional_skip: bool = False,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask function for ``"mmfuse"`` (``AttentionMaskInterface``): the cheapest
    exact form of the mask ``mask_function`` ∧ padding describes (see the module docstring).

    Same arguments as ``transformers.masking_utils.sdpa_mask``: the layer's queries are the
    absolute positions ``q_offset + [0, q_length)``, its keys ``kv_offset + [0, kv_length)``, and
    ``attention_mask`` the ``(B, seen + q_length)`` padding mask (True/1 = keep)."""
    # the compact forms read the padding mask's values: not while tracing (torch.compile, export)
    if not is_tracing() and not (isinstance(q_offset, torch.Tensor) and q_offset.numel() != 1):
        q_off = int(q_offset)
        if mask_function is causal_mask_function:
            form = _causal_form(batch_size, q_length, kv_length, q_off, kv_offset, attention_mask, device)
            if form is not _DENSE:
                return form
        elif mask_function is bidirectional_mask_function:
            return _bidirectional_form(kv_length, kv_offset, attention_mask)
    dense = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
        device=device,
    )
    if dense is None:
        return None
    # sdpa_mask expands a batch-independent pattern (no padding) along the batch: hand the kernel one copy
    hide = ~(dense[:1] if dense.shape[0] > 1 and dense.stride(0) == 0 else dense)
    return _tag(dense, _Form(attn_mask=hide, width=kv_length))


def _causal_form(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, device):
    """Causal over absolute positions (key p visible to query t iff p <= t) as the kernel's
    bottom-right causal: query i (absolute q_offset + i) sees key j (absolute kv_offset + j) iff
    j <= i + width - q_length with width = q_offset - kv_offset + q_length, so kv_lens = width;
    padding as key_padding_mask (it does not move the alignment); None for plain causal. Where the layout does
    not fit: _DENSE (the caller builds the dense mask)."""
    width = q_offset - kv_offset + q_length
    if not q_length <= width <= kv_length:
        return _DENSE
    pad = _padding(attention_mask, kv_length, kv_offset)
    padded = pad is not None and not bool(pad[:, :width].all())
    if width == kv_length and not padded and (q_length == kv_length or q_length == 1):
        return None  # plain causal (or one query seeing every key): is_causal, as SDPA
    kv_lens = None if width == kv_length else torch.full((batch_size,), width, dtype=torch.int32, device=device)
    key_padding_mask = ~pad if padded else None
    keep = torch.arange(kv_length, device=device) < width
    keep = keep.expand(batch_size, kv_length) if pad is None else keep & pad
    return _tag(keep.contiguous(), _Form(kv_lens=kv_lens, key_padding_mask=key_padding_mask, causal=True,
                                         width=kv_length))


def _bidirectional_form(kv_length, kv_offset, attention_mask):
    """Every query sees every unpadded key: kv_lens where the padding is a prefix (right
    padding), else key_padding_mask; None without padding."""
    pad = _padding(attention_mask, kv_length, kv_offset)
    if pad is None or bool(pad.all()):
        return None
    lengths = pad.sum(1)
    prefix = torch.arange(kv_length, device=pad.device) < lengths[:, None]
    if bool((prefix == pad).all()):
        form = _Form(kv_lens=lengths.to(torch.int32), width=kv_length)
    else:
        form = _Form(key_padding_mask=~pad, width=kv_length)
    return _tag(pad.contiguous(), form)


# ----------------------------------------------------------------------------------- attention


def _describe(module) -> str:
    name = type(module).__name__
    layer = getattr(module, "layer_idx", None)
    return f"{name} (layer {layer})" if layer is not None else name


def _form_of(attention_mask, query, key, is_causal: bool, module) -> _Form:
    """The kernel arguments for the mask a layer received."""
    len_q, len_k = query.shape[2], key.shape[2]
    if attention_mask is None:
        # as sdpa_attention_forward: is_causal only without a mask, off for one query, top-left
        if not is_causal or len_q == 1:
            return _Form()
        if len_k == len_q:
            return _Form(causal=True)
        if len_k > len_q:  # SDPA crops k/v to the first len_q keys (an empty static cache's prefill)
            lens = torch.full((query.shape[0],), len_q, dtype=torch.int32, device=query.device)
            return _Form(kv_lens=lens, causal=True)
        # more queries than keys, top-left: query i sees keys j <= i
        rows = torch.arange(len_q, device=query.device)[:, None]
        return _Form(attn_mask=torch.arange(len_k, device=query.device)[None, :] > rows)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"mmfuse attention in {_describe(module)}: attention_mask must be a tensor or None, got "
            f"{type(attention_mask).__name__} (a flex_attention BlockMask? set attn_implementation='mmfuse' on the "
            f"model so that transformers builds the mask with mmfuse's mask function)"
        )
    form = getattr(attention_mask, "_mmfuse_form", None)
    if form is not None:
        if form.width != len_k:
            if form.attn_mask is not None and form.width > len_k:
                return _Form(attn_mask=form.attn_mask[..., :len_k])
            raise ValueError(
                f"mmfuse attention in {_describe(module)}: the attention mask was built for {form.width} keys, the "
                f"layer has {len_k}"
            )
        return form
    # a mask that did not come from mmfuse_mask: a model's own 4-D mask, or a 2-D padding mask
    if attention_mask.dim() == 4:
        mask = attention_mask[..., :len_k]
        if mask.shape[-2] == 1 and len_q > 1:
            mask = mask.expand(*mask.shape[:2], len_q, len_k)
        return _Form(attn_mask=~mask if mask.dtype == torch.bool else mask)
    if attention_mask.dim() == 2:
        # FlashAttention's contract (modeling_flash_attention_utils): a (B, Lk) padding mask, 1 = keep
        if attention_mask.shape != (key.shape[0], len_k):
            raise ValueError(
                f"mmfuse attention in {_describe(module)}: a 2-D attention_mask must be a (batch, kv_length) = "
                f"({key.shape[0]}, {len_k}) padding mask, got {tuple(attention_mask.shape)}"
            )
        return _Form(key_padding_mask=~attention_mask.to(torch.bool), causal=is_causal)
    raise ValueError(
        f"mmfuse attention in {_describe(module)}: attention_mask must be 2-D (padding) or 4-D, got shape "
        f"{tuple(attention_mask.shape)}"
    )


def _pick_backend(op: str, query, v, batch: int, need: set[str], settings: list[str], module) -> str:
    """The fused kernel that runs this call; never PyTorch's attention. MMFUSE_BACKEND, when set,
    is the user's explicit choice (``reference`` included)."""
    env = os.environ.get("MMFUSE_BACKEND", "auto")
    if env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"MMFUSE_BACKEND must be one of {list(BACKENDS)}, got {env!r}")
        return env
    order = ("cuda", "triton") if query.device.type == "cuda" else ("cpu",)
    reasons = []
    for backend in order:
        if backend == "cuda" and op not in VERIFIED_CUDA_OPS:
            reasons.append("cuda: the CUDA kernel is not on the verified list (mmfuse.backends.VERIFIED_CUDA_OPS)")
            continue
        why = _unavailable(backend, query.device) or _attn._unsupported(query, batch, need)(backend)
        if why is None:
            return backend
        reasons.append(f"{backend}: {why}")
    raise NotImplementedError(
        f"mmfuse attention in {_describe(module)} ({', '.join(settings) or 'plain attention'}) on {query.device.type} "
        f"{query.dtype} tensors: no fused mmfuse kernel computes this case ({'; '.join(reasons)}). Set "
        f"MMFUSE_BACKEND=reference to run mmfuse's PyTorch reference explicitly, or use another attn_implementation."
    )


def mmfuse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for ``"mmfuse"`` (``AttentionInterface``).

    query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv) with Hq % Hkv == 0;
    returns (out (B, Lq, Hq, Dv), None)."""
    where = _describe(module)
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"mmfuse attention in {where}: output_attentions=True needs the attention weights, which mmfuse's fused "
            f"kernels never materialise; use attn_implementation='eager' for them"
        )
    if kwargs.get("head_mask") is not None:
        raise ValueError(f"mmfuse attention in {where}: head_mask is not supported (scale the heads' outputs instead)")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softcap = float(softcap) if softcap else 0.0
    dropout = float(dropout)
    settings = []
    if softcap:
        settings.append(f"softcap={softcap} (config.attn_logit_softcapping)")
    if s_aux is not None:
        settings.append("s_aux (learned attention sinks)")
    if dropout > 0.0:
        settings.append(f"dropout={dropout} (config.attention_dropout, training)")
    if value.shape[-1] != query.shape[-1]:
        settings.append(f"value head dim {value.shape[-1]} != query head dim {query.shape[-1]}")
    if position_bias is not None:
        settings.append("position_bias (T5-style relative attention bias)")
    if sliding_window is not None:
        settings.append(f"sliding_window={sliding_window}")

    if all(x is not None for x in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        return _varlen(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias,
                       softcap, s_aux, sliding_window, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
                       settings), None

    form = _form_of(attention_mask, query, key, is_causal, module)
    attn_mask = form.attn_mask
    if position_bias is not None:
        bias = position_bias[..., :key.shape[2]]
        if attn_mask is None:
            attn_mask = bias
        elif attn_mask.dtype == torch.bool:
            attn_mask = bias.masked_fill(attn_mask, float("-inf"))
        else:
            attn_mask = bias + attn_mask
    if attn_mask is not None:
        settings.append("an attention mask read in-kernel")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    need = _attn._features(q, v, varlen=False, attn_mask=attn_mask, dropout_p=dropout, softcap=softcap, sinks=s_aux)
    backend = _pick_backend("cross_attention", q, v, q.shape[0], need, settings, module)
    out = _attn.cross_attention(
        q, k, v, kv_lens=form.kv_lens, key_padding_mask=form.key_padding_mask, scale=scaling, causal=form.causal,
        attn_mask=attn_mask, dropout_p=dropout, softcap=softcap, sinks=s_aux, backend=backend,
    )
    return out, None


def _seq_ids(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per packed row: its sequence index and its position within the sequence."""
    lengths = cu.diff().long()
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)
    local = torch.arange(total, device=cu.device) - cu.long()[seq]
    return seq, local


def _varlen(module, query, key, value, attention_mask, dropout, scaling, is_causal, position_bias, softcap, s_aux,
            sliding_window, cu_q, cu_k, max_q, max_k, settings):
    """Padding-free layout (FlashAttention's varlen kwargs): (B, H, L, D) rows flattened into
    (total, H, D) packed sequences delimited by cu_seq_lens."""
    where = _describe(module)
    if position_bias is not None:
        raise NotImplementedError(
            f"mmfuse attention in {where}: position_bias (T5-style relative bias) with packed sequences "
            f"(cu_seq_lens_q/k) is not supported: pass padded batches instead"
        )
    for name, cu, n in (("cu_seq_lens_q", cu_q, query.shape[0] * query.shape[2]),
                        ("cu_seq_lens_k", cu_k, key.shape[0] * key.shape[2])):
        if cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
            raise TypeError(f"mmfuse attention in {where}: {name} must be a 1-D int32/int64 tensor, got "
                            f"{cu.dtype} of shape {tuple(cu.shape)}")
        if n >= 2**31:
            raise ValueError(f"mmfuse attention in {where}: {name}: {n} packed tokens, more than int32 indexes")
    cu_q32, cu_k32 = cu_q.to(torch.int32), cu_k.to(torch.int32)  # range checked above (values <= total)
    heads_q, heads_k = query.shape[1], key.shape[1]
    q = query.transpose(1, 2).reshape(-1, heads_q, query.shape[-1])
    k = key.transpose(1, 2).reshape(-1, heads_k, key.shape[-1])
    v = value.transpose(1, 2).reshape(-1, heads_k, value.shape[-1])
    window = None
    if sliding_window is not None and not is_tracing():
        seq, local = _seq_ids(cu_q32, q.shape[0])
        width = int(cu_k32.diff().max()) if cu_k32.numel() > 1 else 0
        if width > sliding_window:
            # transformers' sliding window: key j visible to query i iff j > i - sliding_window (both local)
            window = torch.arange(width, device=q.device)[None, :] <= (local[:, None] - sliding_window)
    if attention_mask is not None:
        _check_packed_mask(attention_mask, cu_q, cu_k, q.shape[0], k.shape[0], is_causal, sliding_window, where)
    if window is not None:
        settings.append("a packed sliding-window mask")
    need = _attn._features(q, v, varlen=True, attn_mask=window, dropout_p=dropout, softcap=softcap, sinks=s_aux)
    backend = _pick_backend("cross_attention_varlen", q, v, cu_q32.shape[0] - 1, need, settings, module)
    out = _attn.cross_attention_varlen(
        q, k, v, cu_q32, cu_k32, max_q, max_k, scale=scaling, causal=bool(is_causal), attn_mask=window,
        dropout_p=dropout, softcap=softcap, sinks=s_aux, backend=backend,
    )
    return out.view(query.shape[0], -1, heads_q, value.shape[-1])


def _check_packed_mask(mask, cu_q, cu_k, total_q, total_k, is_causal, sliding_window, where):
    """With cu_seq_lens the kernel computes the packed pattern itself; a mask passed as well
    (transformers builds one from packed position_ids, or one plain row's mask) must carry no
    other information (no padding), else we would silently drop it. Checked once per mask
    object (all layers share it)."""
    checked = getattr(mask, "_mmfuse_packed_ok", None)
    if checked == (id(cu_q), id(cu_k)):
        return
    form = getattr(mask, "_mmfuse_form", None)
    if form is not None and form.attn_mask is not None:
        hide = form.attn_mask
    elif mask.dim() == 4 and mask.dtype == torch.bool:
        hide = ~mask
    else:
        hide = None
    ok = hide is not None and not is_tracing() and tuple(hide.shape[-2:]) == (total_q, total_k)
    if ok:
        seq_q, loc_q = _seq_ids(cu_q, total_q)
        seq_k, loc_k = _seq_ids(cu_k, total_k)
        keep = seq_q[:, None] == seq_k[None, :]
        if is_causal:
            len_q, len_k = cu_q.diff().long()[seq_q], cu_k.diff().long()[seq_q]
            keep &= loc_k[None, :] <= (loc_q + len_k - len_q)[:, None]
        if sliding_window is not None:
            keep &= loc_k[None, :] > loc_q[:, None] - sliding_window
        # with a cache object transformers does not look for packing and builds the mask of one
        # unpadded row (causal, windowed) over all packed tokens; flash_attention_mask reduces that
        # mask to None and FlashAttention applies cu_seq_lens: the same here
        row_q, row_k = torch.arange(total_q, device=hide.device), torch.arange(total_k, device=hide.device)
        row = torch.ones(total_q, total_k, dtype=torch.bool, device=hide.device)
        if is_causal:
            row &= row_k[None, :] <= row_q[:, None] + (total_k - total_q)
        if sliding_window is not None:
            row &= row_k[None, :] > row_q[:, None] + (total_k - total_q) - sliding_window
        given = (~hide).reshape(-1, total_q, total_k)
        ok = bool((given == keep).all()) or bool((given == row).all())
    if not ok:
        raise ValueError(
            f"mmfuse attention in {where}: an attention_mask was passed together with cu_seq_lens_q/k (packed "
            f"sequences) and it is not the packed sequences' own {'causal ' if is_causal else ''}pattern; mmfuse "
            f"computes the packed pattern in-kernel and would ignore it. Pass either the packed kwargs or the mask."
        )
    try:
        mask._mmfuse_packed_ok = (id(cu_q), id(cu_k))
    except (AttributeError, RuntimeError):  # pragma: no cover
        pass


def register(name: str = NAME) -> None:
    """Register the attention and mask functions under ``name`` (done on import for "mmfuse")."""
    AttentionInterface.register(name, mmfuse_attention_forward)
    AttentionMaskInterface.register(name, mmfuse_mask)


register()
