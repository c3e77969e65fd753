"""Pure-PyTorch cross-modal attention: the oracle the kernels are tested against and the last
fallback of ``mmfuse.cross_attention``.

It materialises the ``(Lq, Lk)`` score matrix, so it is exact but not memory-efficient; the
fused kernels compute the same function with FlashAttention's online softmax (Dao et al.,
"FlashAttention", 2022; "FlashAttention-2", 2023). Inputs are validated by
``mmfuse.ops.attention``; this module only does the float math and is differentiable by
plain autograd.

Conventions shared with the kernels:

- half inputs (float16, bfloat16) are computed in float32 and the output cast back; float32
  and float64 are computed in their own dtype. ``lse`` stays in the compute dtype.
- GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)`` (FlashAttention's and
  ``scaled_dot_product_attention(enable_gqa=True)``'s grouping). Queries are viewed as
  ``(B, Hkv, group, Lq, D)`` so k and v are broadcast, never copied.
- causal is bottom-right aligned per sample: query ``i`` sees key ``j`` iff
  ``j <= i + kv_len - q_len``, with ``kv_len``/``q_len`` the sample's own lengths.
- a query row with no visible key outputs 0 and has ``lse = -inf``; its gradients are 0. A score
  of -inf counts as a hidden key, whether a mask or an infinite q or k made it.
"""
from __future__ import annotations

import math

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = False,
    kv_lens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    q_lens: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    philox: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked softmax(q kᵀ · scale) v on padded ``(B, L, H, D)`` tensors.

    Arguments:
        q: (B, Lq, Hq, D), float16/bfloat16/float32/float64.
        k: (B, Lk, Hkv, D), q's dtype; ``Hq % Hkv == 0``.
        v: (B, Lk, Hkv, Dv), q's dtype; Dv may differ from D (out has Dv).
        scale: multiplies the scores before the softmax.
        causal: bottom-right aligned causal mask, per sample (see the module docstring).
        kv_lens: (B,) integer or None. Sample ``b`` has valid keys ``[0, kv_lens[b])``;
            None means all ``Lk``.
        key_padding_mask: (B, Lk) bool or None; True marks a key to ignore. Combined with
            ``kv_lens``: a key is visible iff it is within ``kv_lens`` and not masked.
        q_lens: (B,) integer or None. Sample ``b``'s real query count, used only for the causal
            alignment (the varlen path pads queries); None means all ``Lq``.
        attn_bias: float (B or 1, Hq or 1, Lq, Lk) or None, added to the scaled scores
            (``nn.MultiheadAttention``'s additive masks); a -inf entry hides the key, like
            the masks above, so a row whose every key is hidden outputs 0, not NaN.
        dropout_p: dropout probability applied to the attention probabilities (training only;
            0 disables it).
        philox: int64 (seed, offset) or None. Given, dropout keeps exactly the elements the
            fused kernels keep (``philox_keep``, the stream of ``mmfuse.contract.attention``);
            None, it uses ``torch.nn.functional.dropout``.
        softcap: > 0: the scaled scores become ``softcap * tanh(s / softcap)`` before the bias
            and the masks (Gemma 2's soft-capping); 0: off.
        sinks: (Hq,) float or None: a learned logit per query head that joins every row's
            softmax denominator (gpt-oss's attention sinks): ``p_j = exp(s_j - m) / (sum_j
            exp(s_j - m) + exp(sink_h - m))``. A row with no visible key outputs 0; lse includes
            the sink (so it is ``sink_h`` on such a row).
        key_ranges: integer (B, Lq, 2) or (B, Hq, Lq, 2) or None: query i sees only keys
            ``[start, end)`` (intersected with the other masks).

    Returns:
        out: (B, Lq, Hq, Dv) in q's dtype.
        lse: (B, Hq, Lq) in the compute dtype (float32, or float64 for float64 inputs):
            logsumexp of each row's visible scaled scores (and the sink), -inf for a row with none.
        probs: (B, Hq, Lq, Lk) in the compute dtype: the attention probabilities after dropout.
    """
    batch, len_q, heads_q, head_dim = q.shape
    len_k, heads_kv, dim_v = k.shape[1], k.shape[2], v.shape[3]
    group = heads_q // heads_kv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    # (B, Hkv, group, Lq, D) against (B, Hkv, 1, Lk, D): one kv head serves `group` query heads
    qh = q.to(compute).reshape(batch, len_q, heads_kv, group, head_dim).permute(0, 2, 3, 1, 4)
    kh = k.to(compute).permute(0, 2, 1, 3).unsqueeze(2)
    vh = v.to(compute).permute(0, 2, 1, 3).unsqueeze(2)

    visible = visible_keys(
        batch, len_q, len_k, q.device, causal=causal, kv_lens=kv_lens,
        key_padding_mask=key_padding_mask, q_lens=q_lens,
    )
    visible = visible[:, None, None]
    if key_ranges is not None:  # (B, Lq, 2) or (B, Hq, Lq, 2) -> (B, Hkv or 1, group or 1, Lq, 1)
        ranges = key_ranges.long()
        ranges = ranges.unflatten(1, (heads_kv, group)) if ranges.dim() == 4 else ranges[:, None, None]
        pos = torch.arange(len_k, device=q.device)
        visible = visible & (pos >= ranges[..., :1]) & (pos < ranges[..., 1:])
    bias = None
    if attn_bias is not None:
        # (B', H', Lq, Lk) -> (B', Hkv or 1, group or 1, Lq, Lk), the layout of the scores
        bias = attn_bias.to(compute)
        bias = bias.unflatten(1, (heads_kv, group)) if bias.shape[1] == heads_q else bias.unsqueeze(2)
        visible = visible & (bias != float("-inf"))
    # A key that no query sees never influences anything, whatever it holds: its k and v rows are
    # zeroed before the products (0 · NaN in `probs @ v` would otherwise let its NaN through).
    seen = visible.flatten(1, 3).any(dim=1)  # (B or 1, Lk)
    kh = kh.masked_fill(~seen[:, None, None, :, None], 0.0)
    vh = vh.masked_fill(~seen[:, None, None, :, None], 0.0)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    sink = None if sinks is None else sinks.to(compute).reshape(1, heads_kv, group, 1, 1)
    probs, lse = masked_softmax(scores, visible, sink)
    if dropout_p > 0.0 and philox is not None:
        keep = philox_keep(philox, dropout_p, batch, heads_q, len_q, len_k, q.device)
        keep = keep.unflatten(1, (heads_kv, group))
        probs = probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p))
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vh)

    out = out.permute(0, 3, 1, 2, 4).reshape(batch, len_q, heads_q, dim_v).to(q.dtype)
    lse = lse.reshape(batch, heads_q, len_q)
    probs = probs.reshape(batch, heads_q, len_q, len_k)
    return out, lse, probs


_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for uint32 values ``a`` held in int64 and a constant ``b``,
    without overflowing int64: b is split into 16-bit halves."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16)
    x = t + ((u & 0xFFFF) << 16)
    return (x >> 32) + (u >> 16), x & _M32


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) on
    uint32 counter words held in int64 tensors; returns the 4 output words likewise."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _PHILOX_ROUND[0])
        hi1, lo1 = _mulhilo(c2, _PHILOX_ROUND[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_KEY_STEP[0]) & _M32
        k1 = (k1 + _PHILOX_KEY_STEP[1]) & _M32
    return c0, c1, c2, c3


def philox_uniform(philox: torch.Tensor, batch: int, heads: int, len_q: int, len_k: int,
                   device: torch.device) -> torch.Tensor:
    """int64 (B, H, Lq, Lk): the 32-bit dropout draw of every attention probability, the stream
    defined in ``mmfuse.contract.attention``."""
    seed, offset = (int(x) % 2**64 for x in philox.tolist())
    groups = (len_k + 3) // 4
    g = torch.arange(batch * heads * len_q * groups, device=device, dtype=torch.int64)
    zeros = torch.zeros_like(g)
    words = philox4x32_10(
        (g & _M32, g >> 32, zeros + (offset & _M32), zeros + (offset >> 32)), (seed & _M32, seed >> 32)
    )
    words = torch.stack(words, dim=-1).reshape(batch, heads, len_q, groups * 4)
    return words[..., :len_k]


def philox_keep(philox: torch.Tensor, dropout_p: float, batch: int, heads: int, len_q: int, len_k: int,
                device: torch.device) -> torch.Tensor:
    """bool (B, H, Lq, Lk): which attention probabilities dropout keeps (the fused kernels' mask)."""
    threshold = int(math.floor(float(dropout_p) * 2.0**32))
    return philox_uniform(philox, batch, heads, len_q, len_k, device) >= threshold


def visible_keys(
    batch: int,
    len_q: int,
    len_k: int,
    device: torch.device,
    *,
    causal: bool,
    kv_lens: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    q_lens: torch.Tensor | None,
) -> torch.Tensor:
    """Bool (B, Lq or 1, Lk): True where query i of sample b may attend to key j.

    The padding part does not depend on the query, so without ``causal`` the query axis has
    size 1 and broadcasts.
    """
    key_pos = torch.arange(len_k, device=device)
    if kv_lens is None:
        visible = torch.ones(batch, len_k, dtype=torch.bool, device=device)
    else:
        visible = key_pos < kv_lens[:, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask
    visible = visible[:, None, :]
    if causal:
        k_count = torch.full((batch,), len_k, device=device) if kv_lens is None else kv_lens.long()
        q_count = torch.full((batch,), len_q, device=device) if q_lens is None else q_lens.long()
        # bottom-right alignment: the last real query sees every valid key
        last_key = torch.arange(len_q, device=device)[None, :] + (k_count - q_count)[:, None]
        visible = visible & (key_pos[None, None, :] <= last_key[:, :, None])
    return visible


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor,
                   sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last axis of ``scores`` restricted to ``visible``, NaN-free.

    Returns ``(probs, lse)``: ``probs`` like ``scores``, zero outside ``visible`` and on rows
    with no visible entry; ``lse`` (``scores.shape[:-1]``), -inf on such rows. Forward and
    backward stay finite on empty rows: their exponent is shifted by 0 (not by a max of -inf,
    which gives -inf - -inf = NaN) and their sum is replaced by 1 before dividing, so each
    division and log only ever sees a sum >= 1. ``sink`` (broadcastable to ``scores.shape[:-1]
    + (1,)``): one more always-visible logit per row in the denominator, whose probability is
    dropped from ``probs`` (attention sinks).
    """
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink is not None:
        probs, lse = masked_softmax(torch.cat([scores, sink.expand(scores.shape[:-1] + (1,))], dim=-1),
                                    torch.ones((), dtype=torch.bool, device=scores.device))
        return probs[..., :-1], lse
    # a score of -inf hides its key whether a mask or the arithmetic (an infinite q or k) made it,
    # as in the fused kernels' online softmax; NaN scores stay and propagate
    has_key = (scores != float("-inf")).any(dim=-1, keepdim=True)
    # softmax does not depend on the shift, so it carries no gradient
    row_max = torch.where(has_key, _row_max(scores.detach()), 0.0)
    exp = torch.exp(scores - row_max)
    row_sum = torch.where(has_key, exp.sum(dim=-1, keepdim=True), 1.0)
    # 0 where the score is -inf even when the row's shift and sum are NaN (a NaN query or visible
    # score): a hidden key's probability, and so its gradient, is exactly 0 on every row
    probs = torch.where(scores == float("-inf"), 0.0, exp / row_sum)
    lse = torch.where(has_key, row_max + torch.log(row_sum), float("-inf"))
    return probs, lse.squeeze(-1)


def _row_max(scores: torch.Tensor) -> torch.Tensor:
    # amax refuses an empty axis. With no keys every row is empty and its shift unused; while
    # tracing with an unbacked key count the size is unknown, so take the path valid for both.
    if guard_or_true(scores.shape[-1] == 0):
        sentinel = scores.new_full(scores.shape[:-1] + (1,), float("-inf"))
        return torch.cat([scores, sentinel], dim=-1).amax(dim=-1, keepdim=True)
    return scores.amax(dim=-1, keepdim=True)


def cross_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    scale: float,
    causal: bool = False,
    attn_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    philox: torch.Tensor | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on packed sequences, by scattering them into a padded layout.

    Arguments:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv); sample ``b`` owns rows
            ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 prefix sums of the sequence lengths.
        max_seqlen_q, max_seqlen_k: the padded size; upper bounds of the lengths. With dropout
            they must be the longest lengths: the dropout stream is the padded one at that size.
        scale, causal: as in ``cross_attention``; causal aligns each sample's own lengths.
        attn_bias: float (Hq or 1, total_q, W) or None, W >= max_seqlen_k: row r is packed query
            r's bias over the keys of its own sequence.
        dropout_p, philox, softcap, sinks: as in ``cross_attention``.
        key_ranges: integer (total_q, 2) or (Hq, total_q, 2) or None: packed query r sees only
            keys ``[start, end)`` of its own sequence.

    Returns:
        out: (total_q, Hq, Dv) in q's dtype.
        lse: (Hq, total_q) in the compute dtype (FlashAttention's varlen layout).

    Index tensors rather than a Python loop over samples keep the batch size and lengths
    off the host, so the function traces under ``torch.compile(fullgraph=True)``.
    """
    batch = cu_seqlens_q.shape[0] - 1
    q_lens = cu_seqlens_q.diff()
    kv_lens = cu_seqlens_k.diff()
    q_index = _padded_index(cu_seqlens_q, q.shape[0])
    k_index = _padded_index(cu_seqlens_k, k.shape[0])

    q_pad = q.new_zeros((batch, max_seqlen_q) + q.shape[1:]).index_put(q_index, q)
    k_pad = k.new_zeros((batch, max_seqlen_k) + k.shape[1:]).index_put(k_index, k)
    v_pad = v.new_zeros((batch, max_seqlen_k) + v.shape[1:]).index_put(k_index, v)
    bias = None
    if attn_bias is not None:
        # (Hq', total_q, W) -> (B, Lq, Hq', max_seqlen_k) -> (B, Hq', Lq, max_seqlen_k); keys past W are
        # past every sequence, hidden by the lengths
        rows = attn_bias.transpose(0, 1)[..., :max_seqlen_k]
        bias = rows.new_zeros((batch, max_seqlen_q) + rows.shape[1:]).index_put(q_index, rows)
        bias = torch.nn.functional.pad(bias, (0, max_seqlen_k - rows.shape[-1])).permute(0, 2, 1, 3)
    ranges = None
    if key_ranges is not None:  # (Hq', total_q, 2) -> (B, Hq', Lq, 2); padded query rows see nothing
        rows = (key_ranges if key_ranges.dim() == 3 else key_ranges[None]).transpose(0, 1).long()
        ranges = rows.new_zeros((batch, max_seqlen_q) + rows.shape[1:]).index_put(q_index, rows)
        ranges = ranges.permute(0, 2, 1, 3) if key_ranges.dim() == 3 else ranges[:, :, 0]
    out, lse, _ = cross_attention(
        q_pad, k_pad, v_pad, scale=scale, causal=causal, kv_lens=kv_lens, q_lens=q_lens, attn_bias=bias,
        dropout_p=dropout_p, philox=philox, softcap=softcap, sinks=sinks, key_ranges=ranges,
    )
    sample, position = q_index
    # lse (B, Hq, Lq) indexed on its first and last axes gives (total_q, Hq)
    return out[sample, position], lse[sample, :, position].transpose(0, 1).contiguous()


def _padded_index(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, position) of each packed row in the padded ``(B, max_seqlen)`` layout."""
    starts = cu_seqlens.long()
    token = torch.arange(total, device=cu_seqlens.device)
    # right=True skips zero-length samples, whose end equals the next sample's start
    sample = torch.searchsorted(starts[1:], token, right=True)
    return sample, token - starts[sample]
