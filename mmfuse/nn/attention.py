"""``CrossModalAttention``: a drop-in for ``nn.MultiheadAttention`` on mmfuse's cross-attention
op, with per-sample key lengths and grouped-query attention."""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from mmfuse.ops.attention import check_cross_attention_inputs, check_key_ranges, cross_attention, draw_philox
from mmfuse.reference import attention as reference_attention

_NAME = "CrossModalAttention"


class CrossModalAttention(nn.Module):
    """Multi-head attention from one modality's tokens (queries) to another's (keys/values).

    A drop-in for ``nn.MultiheadAttention``: the same constructor arguments, parameter names and
    shapes, ``forward`` signature, defaults and outputs. A state_dict of
    ``nn.MultiheadAttention(embed_dim, num_heads, bias=bias, kdim=kdim, vdim=vdim,
    batch_first=...)`` loads into this layer, which then gives the same outputs (in eval mode, on
    inputs where no query row is fully masked): ``in_proj_weight`` (3E, E) and ``in_proj_bias``
    (3E,) when kdim == vdim == embed_dim, else ``q_proj_weight`` (E, E), ``k_proj_weight``
    (E, kdim), ``v_proj_weight`` (E, vdim) and ``in_proj_bias``; and ``out_proj``. Assigned in
    place of ``self_attn``/``multihead_attn`` of ``nn.TransformerEncoderLayer`` or
    ``nn.TransformerDecoderLayer`` it is called as those layers call MHA.

    Arguments:
        embed_dim: E, the query (and output) feature size.
        num_heads: number of query heads; must divide embed_dim. head_dim = E // num_heads.
        dropout: dropout probability on the attention probabilities, in training mode.
        bias: whether the input and output projections have biases.
        kdim, vdim: key and value feature sizes; default embed_dim.
        batch_first: True (this layer's default, kept for its existing callers; MHA's default
            is False, so pass it explicitly when replacing a sequence-first MHA): inputs are
            (B, L, features), mmfuse's (B, L, H, D) layout, reached without a transpose. False:
            (L, B, features), transposed to batch-first on the way in and back on the way out
            (the projections then copy the transposed inputs).
        num_kv_heads: number of key/value heads (GQA/MQA); must divide num_heads; default
            num_heads. With fewer kv heads the k/v projections output num_kv_heads * head_dim
            features, are always separate (``q/k/v_proj_weight``), and an
            ``nn.MultiheadAttention`` state_dict no longer fits.
        softcap: float >= 0; > 0 soft-caps the scaled scores at ``softcap * tanh(s / softcap)``
            before the masks (Gemma 2). 0 (default): off, as in MHA.
        sinks: bool; True adds a learned parameter ``sinks`` (num_heads,), initialised to 0, a
            logit per head in every row's softmax denominator (gpt-oss's attention sinks). An
            ``nn.MultiheadAttention`` state_dict then lacks it (load with ``strict=False``).
        backend: the ``mmfuse.cross_attention`` backend for the fused path.
        device, dtype: of the parameters.

    Where a call runs. The fused kernels (``mmfuse.cross_attention``) compute softmax over
    visible keys with a key mask, a bottom-right aligned causal mask, an in-kernel (Lq, Lk)
    attention mask (bool, or any float bias, added to the scores exactly) and attention dropout
    (a Philox stream seeded from torch's generator: ``torch.manual_seed`` reproduces it; the
    backward regenerates the mask). MHA's causal masks
    (``nn.Transformer.generate_square_subsequent_mask``, ``is_causal``) are top-left aligned,
    the same mask as the in-kernel causal path only when Lq == Lk. So:

    - fused: ``need_weights=False`` (dropout active in training or not), with
      (a) a bool ``key_padding_mask``, a float one holding only 0 and -inf (converted to bool),
      and/or ``kv_lens``; and
      (b) no ``attn_mask``; or a (Lq, Lq) ``attn_mask`` equal to the causal mask (bool: True
      above the diagonal; float: -inf above, 0 elsewhere; detected by comparing with a
      generated one), or ``is_causal=True`` where MHA applies its own causal mask (no
      key_padding_mask, no weights): the in-kernel causal path when Lq == Lk; or any other
      ``attn_mask``, bool or float, (Lq, Lk) or per-head (B * H, Lq, Lk): read in-kernel.
      A float ``key_padding_mask`` with values other than 0/-inf is merged into the in-kernel
      mask (materialised as (B, 1, Lq, Lk)).
      Recognising a float key_padding_mask or a causal attn_mask reads the mask's values: a
      host sync on CUDA and a graph break under ``torch.compile`` (bool key_padding_mask,
      ``kv_lens`` and ``is_causal`` without a key_padding_mask need neither). Under
      ``torch.export``, which cannot branch on values, neither is recognised: both are read
      in-kernel as general masks.
      A float mask that requires grad (a learned bias) is always read as a general mask and
      gets its gradient from the kernel. A backend lacking a feature a call needs
      (``mmfuse.ops.attention._FEATURES``) is skipped by ``backend="auto"``.
    - reference (``mmfuse.reference.attention``, materialises the (B, H, Lq, Lk) scores, as
      MHA does): ``need_weights=True`` (it returns the probabilities, after dropout, from the
      same Philox stream). Masks are merged as MHA merges them (bool -> -inf, then summed) and
      added to the scores.

    Difference from ``nn.MultiheadAttention``: a query row whose keys are all masked attends to
    nothing, so its attention output before ``out_proj`` and its weights are 0 (MHA's are NaN
    outside its inference fast path). In eval mode without autograd, ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder`` take their inference fast path as they do with MHA (when
    batch_first, biases, an even num_heads and kdim == vdim == embed_dim with no GQA): they read
    this layer's ``in_proj_weight``, ``in_proj_bias``, ``out_proj`` and ``merge_masks`` and run
    torch's fused encoder kernel themselves, without calling this layer (the same function).
    """

    # nn.TransformerEncoderLayer's inference fast path calls self_attn.merge_masks; MHA's own
    # only reads num_heads, which this layer has too
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        num_kv_heads: int | None = None,
        *,
        softcap: float = 0.0,
        sinks: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(
                f"{_NAME}: num_heads must be > 0 and divide embed_dim, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"{_NAME}: num_kv_heads must be > 0 and divide num_heads={num_heads}, got {num_kv_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{_NAME}: dropout must lie in [0, 1), got {dropout}")
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 <= softcap < float("inf"):
            raise ValueError(f"{_NAME}: softcap must be a finite float >= 0 (0: off), got {softcap!r}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = backend
        self.softcap = float(softcap)
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(num_heads, **factory))
        else:
            self.register_parameter("sinks", None)
        kv_dim = num_kv_heads * self.head_dim
        # MHA packs q, k, v into one matrix exactly when they all map E -> E
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim and kv_dim == embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation, so that a fresh layer trains like one
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_lens: torch.Tensor | None = None,
        key_ranges: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value``; ``nn.MultiheadAttention.forward``'s
        signature and defaults, plus ``kv_lens``.

        Arguments (B batch, Lq/Lk query/key lengths, E embed_dim, H num_heads):
            query: (B, Lq, E) with batch_first, (Lq, B, E) without; (Lq, E) unbatched.
            key: (B, Lk, kdim), (Lk, B, kdim) or (Lk, kdim), like query.
            value: like key with vdim features; None means value = key (kdim must equal vdim).
            key_padding_mask: (B, Lk) ((Lk,) unbatched), optional: bool (True = ignore the key)
                or float (added to the scores).
            need_weights: also return the attention probabilities. True by default, as in MHA;
                pass False to stay on the fused kernels.
            attn_mask: optional, bool (True = not allowed) or float (added to the scores),
                (Lq, Lk) for every sample and head, or (B * H, Lq, Lk) per sample and head
                ((H, Lq, Lk) unbatched). Bool and float masks of one call should share a dtype
                (a mismatch warns, as in MHA).
            average_attn_weights: average the returned weights over heads.
            is_causal: a hint that attn_mask is the causal mask, as in MHA: attn_mask is still
                required. Without key_padding_mask and need_weights, MHA then ignores
                attn_mask and applies the top-left causal mask (query i sees keys j <= i),
                and so does this layer.
            kv_lens: (B,) integer ((1,) unbatched), optional: sample b's valid keys are the first
                kv_lens[b].
                Combined with the masks: a key is used iff within kv_lens and not masked.
            key_ranges: int32 (B, Lq, 2) or (B, H, Lq, 2) ((Lq, 2) unbatched), batch first whatever
                ``batch_first`` says, optional: query i sees only keys [start, end), in-kernel with
                key-tile skipping (``mmfuse.masks`` builds them: sliding windows, documents,
                Flamingo media ranges, bidirectional media blocks in causal text).

        Returns:
            attn_output: like query with E features, in query's dtype.
            attn_weights [None unless need_weights]: (B, Lq, Lk) averaged over heads, or
                (B, H, Lq, Lk) per head ((Lq, Lk) / (H, Lq, Lk) unbatched), in query's dtype,
                after dropout as MHA returns them.
        """
        value = key if value is None else value
        batched = _check_ranks(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
            key_ranges = None if key_ranges is None else key_ranges.unsqueeze(0)
        elif not self.batch_first:
            # (L, B, E) -> (B, L, E): mmfuse's attention is batch-first, so this costs a transpose
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, kv_lens,
            key_ranges,
        )
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attend(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, kv_lens,
        key_ranges=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batch-first attention with MHA's mask semantics; routes to the fused op or the reference."""
        batch, len_q, len_k = query.shape[0], query.shape[1], key.shape[1]
        _check_mask_dtypes(key_padding_mask, attn_mask)
        if key_padding_mask is not None and key_padding_mask.shape != (batch, len_k):
            raise ValueError(
                f"{_NAME}: key_padding_mask must have shape (batch, Lk) = {(batch, len_k)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                f"{_NAME}: is_causal=True is a hint and needs attn_mask, as in nn.MultiheadAttention; "
                "nn.Transformer.generate_square_subsequent_mask(L) makes one"
            )
        dropout_p = self.dropout if self.training else 0.0
        # the kernels return no probabilities: skip the mask checks
        on_reference = need_weights
        # a learned mask is a general additive one: not converted to bool, not recognised as causal
        learned = any(m is not None and m.requires_grad and m.is_floating_point() for m in (attn_mask, key_padding_mask))
        # torch.export cannot branch on a mask's values: there a float key_padding_mask and an
        # attn_mask are read in-kernel as general masks (the same results, without the shortcuts)
        by_value = not torch.compiler.is_exporting()
        if is_causal and key_padding_mask is None and not need_weights:
            # what MHA does here: attn_mask dropped, SDPA's own top-left causal mask applied
            attn_mask, top_left_causal = None, True
        else:
            if attn_mask is not None:
                self._check_attn_mask_shape(attn_mask, batch, len_q, len_k)
            top_left_causal = (attn_mask is not None and not on_reference and not learned and by_value
                               and _is_top_left_causal(attn_mask))
            attn_mask = None if top_left_causal else attn_mask
        # mmfuse's causal is bottom-right aligned: the same mask as top-left only when Lq == Lk
        # bool(): under torch.export the lengths are SymInts and == a SymBool; the op takes a bool
        causal = top_left_causal and bool(len_q == len_k)
        if top_left_causal and not causal:
            attn_mask = torch.ones(len_q, len_k, dtype=torch.bool, device=query.device).triu_(1)
        float_padding = key_padding_mask is not None and key_padding_mask.dtype != torch.bool
        padding = None if on_reference or learned or (float_padding and not by_value) else _as_bool_padding(key_padding_mask)
        q, k, v = self._project(query, key, value)
        if not on_reference:
            if key_padding_mask is not None and padding is None:
                # a general float key padding bias: merged with attn_mask into one in-kernel mask
                mask = _additive_bias(attn_mask, key_padding_mask, batch, self.num_heads, q.dtype)
                mask = mask.expand(mask.shape[0], mask.shape[1], len_q, len_k)
            elif attn_mask is not None and attn_mask.dim() == 3:  # (B * H, Lq, Lk) -> (B, H, Lq, Lk)
                mask = attn_mask.unflatten(0, (batch, self.num_heads))
            else:
                mask = attn_mask
            out = cross_attention(
                q, k, v, kv_lens=kv_lens, key_padding_mask=padding, causal=causal, attn_mask=mask,
                dropout_p=dropout_p, softcap=self.softcap, sinks=self.sinks, key_ranges=key_ranges,
                backend=self.backend,
            )
            return self.out_proj(out.flatten(2)), None
        scale = check_cross_attention_inputs(_NAME, q, k, v, kv_lens, None, None, causal)
        check_key_ranges(_NAME, q, key_ranges, (batch, self.num_heads, len_q), len_k)
        bias = _additive_bias(attn_mask, key_padding_mask, batch, self.num_heads, q.dtype)
        philox = draw_philox(q.device) if dropout_p > 0.0 else None
        out, _, probs = reference_attention.cross_attention(
            q, k, v, scale=scale, causal=causal, kv_lens=kv_lens, attn_bias=bias, dropout_p=dropout_p,
            philox=philox, softcap=self.softcap, sinks=self.sinks, key_ranges=key_ranges,
        )
        weights = None
        if need_weights:
            weights = (probs.mean(dim=1) if average_attn_weights else probs).to(query.dtype)
        return self.out_proj(out.flatten(2)), weights

    def _check_attn_mask_shape(self, attn_mask: torch.Tensor, batch: int, len_q: int, len_k: int) -> None:
        expected = (len_q, len_k) if attn_mask.dim() == 2 else (batch * self.num_heads, len_q, len_k)
        if tuple(attn_mask.shape) != expected:
            raise ValueError(
                f"{_NAME}: a {attn_mask.dim()}-D attn_mask must have shape {expected}, got {tuple(attn_mask.shape)}"
            )

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input projections, viewed as (B, L, heads, head_dim) without a transpose."""
        for arg, t, features in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != features:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{_NAME}: {arg} must have shape (batch, seq, {features}), got {got}")
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"{_NAME}: value must have key's batch and length {tuple(key.shape[:2])}, got {tuple(value.shape)}"
            )
        kv_dim = self.num_kv_heads * self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split([self.embed_dim, kv_dim, kv_dim])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.split([self.embed_dim, kv_dim, kv_dim])
        q = F.linear(query, w_q, b_q).unflatten(-1, (self.num_heads, self.head_dim))
        k = F.linear(key, w_k, b_k).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = F.linear(value, w_v, b_v).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return q, k, v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # An MHA checkpoint has full-size k/v projections; say why it cannot fit a GQA layer
        # before torch's generic "size mismatch" / "unexpected key" messages.
        if self.num_kv_heads != self.num_heads and (
            prefix + "in_proj_weight" in state_dict
            or state_dict.get(prefix + "k_proj_weight", self.k_proj_weight).shape != self.k_proj_weight.shape
        ):
            error_msgs.append(
                f"CrossModalAttention: this layer has num_kv_heads={self.num_kv_heads} < num_heads={self.num_heads} "
                f"(GQA), so its k/v projections are ({self.num_kv_heads * self.head_dim}, kdim); the state_dict "
                "has full-size ones, as an nn.MultiheadAttention state_dict does, and does not fit"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, dropout={self.dropout}, backend={self.backend!r}"
        )


def _check_ranks(query, key, value, key_padding_mask, attn_mask) -> bool:
    """MHA's rank rules (``F._mha_shape_check``); True when the input is batched."""
    if not isinstance(query, torch.Tensor) or query.dim() not in (2, 3):
        got = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"{_NAME}: query must be 3-D (batched) or 2-D (unbatched), got {got}")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != query.dim():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{_NAME}: {name} must be {query.dim()}-D like query, got {got}")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        raise ValueError(
            f"{_NAME}: key_padding_mask must be {query.dim() - 1}-D for a {query.dim()}-D query, "
            f"got shape {tuple(key_padding_mask.shape)}"
        )
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError(f"{_NAME}: attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
    return batched


def _check_mask_dtypes(key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None) -> None:
    """``F._canonical_mask``'s rules: bool or floating masks; mixing the two is deprecated."""
    for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(
                f"{_NAME}: {name} must be bool (True = not allowed) or floating point (added to the scores), "
                f"got {mask.dtype}"
            )
    if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
        warnings.warn(
            "Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both instead.",
            stacklevel=4,
        )


def _is_top_left_causal(attn_mask: torch.Tensor) -> bool:
    """Whether a square (L, L) mask is ``generate_square_subsequent_mask(L)`` (float 0/-inf) or
    its bool form: query i sees exactly keys j <= i."""
    if attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1]:
        return False
    hidden = torch.ones(attn_mask.shape, dtype=torch.bool, device=attn_mask.device).triu_(1)
    if attn_mask.dtype == torch.bool:
        return torch.equal(attn_mask, hidden)
    return torch.equal(attn_mask == float("-inf"), hidden) and not attn_mask.masked_fill(hidden, 0.0).any()


def _as_bool_padding(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The bool form (True = ignore) of a key padding mask, or None when it has none: a float
    mask converts when its entries are all 0 or -inf, other additive biases do not."""
    if key_padding_mask is None or key_padding_mask.dtype == torch.bool:
        return key_padding_mask
    ignored = key_padding_mask == float("-inf")
    if key_padding_mask.masked_fill(ignored, 0.0).any():
        return None
    return ignored


def _additive_bias(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int, heads: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """MHA's merged float mask as a (B or 1, H or 1, Lq, Lk) bias: bool masks become -inf where
    True, attn_mask and key_padding_mask are summed."""
    bias = None
    if attn_mask is not None:
        bias = _as_float_mask(attn_mask, dtype)
        bias = bias[None, None] if bias.dim() == 2 else bias.unflatten(0, (batch, heads))
    if key_padding_mask is not None:
        padding = _as_float_mask(key_padding_mask, dtype)[:, None, None, :]
        bias = padding if bias is None else bias + padding
    return bias


def _as_float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)
