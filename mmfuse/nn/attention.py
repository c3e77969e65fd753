"""``CrossModalAttention``: a batch-first drop-in for ``nn.MultiheadAttention`` on mmfuse's
cross-attention op, with per-sample key lengths and grouped-query attention."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mmfuse.ops.attention import check_cross_attention_inputs, cross_attention
from mmfuse.reference import attention as reference_attention

_NAME = "CrossModalAttention"


class CrossModalAttention(nn.Module):
    """Multi-head attention from one modality's tokens (queries) to another's (keys/values).

    Parameters have ``nn.MultiheadAttention``'s names and shapes, so a state_dict of
    ``nn.MultiheadAttention(embed_dim, num_heads, bias=bias, kdim=kdim, vdim=vdim,
    batch_first=True)`` loads into this layer, which then gives the same outputs (in eval mode,
    on inputs where no query row is fully masked): ``in_proj_weight`` (3E, E) and
    ``in_proj_bias`` (3E,) when kdim == vdim == embed_dim, else ``q_proj_weight`` (E, E),
    ``k_proj_weight`` (E, kdim), ``v_proj_weight`` (E, vdim) and ``in_proj_bias``; and
    ``out_proj``.

    Arguments:
        embed_dim: E, the query (and output) feature size.
        num_heads: number of query heads; must divide embed_dim. head_dim = E // num_heads.
        dropout: dropout probability on the attention probabilities, in training mode.
        bias: whether the input and output projections have biases.
        kdim, vdim: key and value feature sizes; default embed_dim.
        batch_first: must be True: inputs are (B, L, features), the layout of mmfuse's
            (B, L, H, D) attention, reached without a transpose.
        num_kv_heads: number of key/value heads (GQA/MQA); must divide num_heads; default
            num_heads. With fewer kv heads the k/v projections output num_kv_heads * head_dim
            features, are always separate (``q/k/v_proj_weight``), and an
            ``nn.MultiheadAttention`` state_dict no longer fits.
        backend: the ``mmfuse.cross_attention`` backend for the fused path.
        device, dtype: of the parameters.

    Differences from ``nn.MultiheadAttention``: a query row whose keys are all masked attends
    to nothing, so its attention output before ``out_proj`` is 0 (MHA's is NaN outside its
    inference fast path); ``key_padding_mask`` must be bool (additive float masks are rejected);
    ``need_weights`` defaults to False; there is no ``attn_mask`` (use ``kv_lens``,
    ``key_padding_mask``, or ``mmfuse.cross_attention(causal=True)``).
    """

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
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if batch_first is not True:
            raise ValueError(
                f"{_NAME}: batch_first must be True (inputs are (batch, seq, feature)); "
                f"transpose sequence-first inputs with .transpose(0, 1), got batch_first={batch_first!r}"
            )
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
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = True
        self.backend = backend
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
        need_weights: bool = False,
        kv_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value``.

        Arguments:
            query: (B, Lq, embed_dim).
            key: (B, Lk, kdim).
            value: (B, Lk, vdim); None means value = key (then kdim must equal vdim).
            key_padding_mask: (B, Lk) bool, optional; True marks a key to ignore.
            need_weights: also return the attention weights averaged over heads. They are
                computed by the reference backend, which materialises (B, num_heads, Lq, Lk).
            kv_lens: (B,) integer, optional: sample b's valid keys are the first kv_lens[b].
                Combined with key_padding_mask: a key is used iff within kv_lens and not masked.

        Returns:
            out: (B, Lq, embed_dim) in query's dtype.
            weights: (B, Lq, Lk) in query's dtype if need_weights (after dropout, as
                ``nn.MultiheadAttention`` returns them), else None.

        With ``need_weights`` or with dropout active (training and dropout > 0) the attention
        runs through the reference backend, bypassing the fused kernels: they neither return
        probabilities nor apply dropout.
        """
        value = key if value is None else value
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"{_NAME}: key_padding_mask must be bool (True = ignore the key), got {key_padding_mask.dtype}; "
                "an additive float mask of nn.MultiheadAttention converts with `mask == float('-inf')` "
                "when its entries are 0 or -inf (other additive biases are not supported)"
            )
        q, k, v = self._project(query, key, value)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights or dropout_p > 0.0:
            scale = check_cross_attention_inputs(_NAME, q, k, v, kv_lens, key_padding_mask, None, False)
            out, _, probs = reference_attention.cross_attention(
                q, k, v, scale=scale, kv_lens=kv_lens, key_padding_mask=key_padding_mask, dropout_p=dropout_p
            )
            weights = probs.mean(dim=1).to(query.dtype) if need_weights else None
        else:
            out = cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=key_padding_mask, backend=self.backend)
            weights = None
        return self.out_proj(out.flatten(2)), weights

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
