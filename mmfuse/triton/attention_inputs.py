"""Argument preparation for the Triton attention launchers (``mmfuse.triton.cross_attention``):
the per-sample vectors the kernels index (padded and varlen), cheap checks of what they index,
the in-kernel extras (attention mask as a float32 bias, dropout, softcap, sinks) and their
layouts, and the keys no query sees, whose k/v rows are zeroed before the tile products."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.symbolic_shapes import guard_or_true

from mmfuse.contract.attention import keep_threshold


class Samples:
    """Per-sample int32 vectors (first query row, query count, first key row, key count, lse
    start), the lse row stride per head, and the bound on query and key counts for the grid;
    ``seq_lens()``: int32 (Lq*, Lk*) on the device, the dropout stream's padded sizes."""

    def __init__(self, q_start, q_len, k_start, k_len, lse_start, lse_head, max_q, max_k, seq_lens):
        self.vectors = tuple(t.to(torch.int32).contiguous() for t in (q_start, q_len, k_start, k_len, lse_start))
        self.lse_head, self.max_q, self.max_k = lse_head, max_q, max_k
        self.batch = q_len.shape[0]
        self.seq_lens = seq_lens


def has_work(t: torch.Tensor, max_len) -> bool:
    # max_len may be an unbacked SymInt under torch.compile (varlen max_seqlen=None): assume
    # work then; the kernels skip the blocks past each sample's length
    return guard_or_true(t.numel() > 0) and guard_or_true(max_len > 0)


def padded_samples(q, k, kv_lens):
    batch, len_q, heads_q, _ = q.shape
    len_k = k.shape[1]
    index = torch.arange(batch, device=q.device, dtype=torch.int32)
    q_len = torch.full_like(index, len_q)
    k_len = torch.full_like(index, len_k) if kv_lens is None else kv_lens

    def seq_lens():  # filled by kernels, not copied from the host: CUDA-graph safe
        sizes = torch.empty(2, dtype=torch.int32, device=q.device)
        sizes[0], sizes[1] = len_q, len_k
        return sizes

    return Samples(index * len_q, q_len, index * len_k, k_len, index * (heads_q * len_q), len_q, len_q, len_k,
                    seq_lens)


def varlen_samples(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    q_len, k_len = cu_seqlens_q.diff(), cu_seqlens_k.diff()

    def seq_lens():  # the longest sequences, from cu_seqlens on the device: no host sync
        zero = q_len.new_zeros(1)
        return torch.stack((torch.cat((q_len, zero)).max(), torch.cat((k_len, zero)).max())).to(torch.int32)

    return Samples(cu_seqlens_q[:-1], q_len, cu_seqlens_k[:-1], k_len, cu_seqlens_q[:-1], q.shape[0],
                    max_seqlen_q, max_seqlen_k, seq_lens)


def concrete(*values) -> bool:
    return all(isinstance(x, int) for x in values)


def fail(op, message):
    raise ValueError(f"mmfuse::{op}_triton: {message}")


def check_extras(op, q, k, samples, attn_mask, dropout_p, philox, sinks, varlen, mask_grad=False, key_ranges=None):
    """Cheap checks of what the kernels index (the ops in mmfuse.ops validate the rest; the
    kernels clamp key_ranges' values to the sample's keys, so bad values cannot reach memory)."""
    heads_q = q.shape[-2]
    if key_ranges is not None:
        rows = (q.shape[0],) if varlen else (q.shape[0], q.shape[1])
        shapes = (rows + (2,), (heads_q,) + rows + (2,)) if varlen else (rows + (2,), (rows[0], heads_q, rows[1], 2))
        if key_ranges.dtype != torch.int32 or key_ranges.device != q.device or tuple(key_ranges.shape) not in shapes:
            fail(op, f"key_ranges must be an int32 tensor on {q.device} of shape {shapes[0]} or {shapes[1]}, got "
                     f"{key_ranges.dtype} {tuple(key_ranges.shape)} on {key_ranges.device}")
    if attn_mask is not None:
        if varlen:
            ok = attn_mask.dim() in (2, 3) and attn_mask.shape[-2] == q.shape[0] and (
                attn_mask.dim() == 2 or attn_mask.shape[0] in (1, heads_q))
            width, bound, k_len = attn_mask.shape[-1], samples.max_k, samples.vectors[3]
            if ok and concrete(width, bound, samples.batch) and width < bound and samples.batch and not (
                    torch.compiler.is_compiling() or is_fake(k_len)):  # max_seqlen_k is an upper bound: sync
                ok = width >= int(k_len.max())
            if not ok:
                fail(op, f"attn_mask must be (total_q, W) or (Hq or 1, total_q, W) with total_q = {q.shape[0]}, "
                          f"Hq = {heads_q} and W >= the longest key sequence, got {tuple(attn_mask.shape)}")
        else:
            batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
            ok = attn_mask.dim() in (2, 4) and tuple(attn_mask.shape[-2:]) == (len_q, len_k) and (
                attn_mask.dim() == 2 or (attn_mask.shape[0] in (1, batch) and attn_mask.shape[1] in (1, heads_q)))
            if not ok:
                fail(op, f"attn_mask must be ({len_q}, {len_k}) or (1 or {batch}, 1 or {heads_q}, {len_q}, {len_k}), "
                          f"got {tuple(attn_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        fail(op, f"dropout_p must lie in [0, 1), got {dropout_p}")
    if dropout_p > 0 and (philox is None or philox.dtype != torch.int64 or tuple(philox.shape) != (2,)):
        fail(op, "philox must be an int64 tensor (seed, offset) of shape (2,) when dropout_p > 0, got "
                  f"{None if philox is None else (philox.dtype, tuple(philox.shape))}")
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != heads_q or not sinks.is_floating_point()):
        fail(op, f"sinks must be a float tensor of shape ({heads_q},), got {sinks.dtype} {tuple(sinks.shape)}")
    if mask_grad and (attn_mask is None or attn_mask.dtype == torch.bool):
        fail(op, "mask_grad needs a float attn_mask")


class Extras:
    """The in-kernel attention mask (float32; padded (B or 1, Hq or 1, Lq, Lk), varlen
    (Hq or 1, total_q, W)), dropout (philox (seed, offset), p), softcap, sinks and key_ranges
    (int32; padded (B, Lq, 2) or (B, Hq, Lq, 2), varlen (total_q, 2) or (Hq, total_q, 2))."""

    def __init__(self, q=None, attn_mask=None, dropout_p=0.0, philox=None, softcap=0.0, sinks=None, samples=None,
                 varlen=False, key_ranges=None):
        self.bias = None
        self.varlen = varlen
        self.ranges = None if key_ranges is None else key_ranges.contiguous()
        self.ranges_layout = (0, 0)
        if self.ranges is not None and self.ranges.dim() == (3 if varlen else 4):
            # pair (b, h, i) at b * sb + h * sh + 2 * (first query row of b + i), a padded sample's first row b * Lq
            len_q = q.shape[0] if varlen else q.shape[1]
            self.ranges_layout = (0 if varlen else 2 * (q.shape[-2] - 1) * len_q, 2 * len_q)
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == (3 if varlen else 4) else attn_mask[(None,) * (1 if varlen else 2)]
            if mask.dtype == torch.bool:
                bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
                bias.masked_fill_(mask, float("-inf"))
            else:
                bias = mask.to(torch.float32).contiguous()
            self.bias = bias
        self.dropout_p = float(dropout_p) if philox is not None else 0.0
        self.philox = philox
        self.seq_lens = samples.seq_lens() if self.dropout_p > 0 else None
        self.softcap = float(softcap)
        self.sinks = sinks.contiguous() if sinks is not None else None

    def layout(self, shape):
        """(sb, sh, si) of a (B or 1, H or 1, Lq, Lk) padded or (H or 1, total_q, W) varlen tensor, for
        element b * sb + h * sh + (first query row of b + i) * si + j (a padded sample's first
        row is b * Lq, which sb takes back)."""
        if self.varlen:
            heads, rows, width = shape
            return 0, (0 if heads == 1 else rows * width), width
        batch, heads, len_q, len_k = shape
        return (0 if batch == 1 else heads * len_q * len_k) - len_q * len_k, (0 if heads == 1 else len_q * len_k), len_k

    def args(self, dummy):
        bias = self.bias if self.bias is not None else dummy
        layout = self.layout(self.bias.shape) if self.bias is not None else (0, 0, 0)
        philox = self.philox if self.dropout_p > 0 else dummy
        seq_lens = self.seq_lens if self.dropout_p > 0 else dummy
        keep_thr = keep_threshold(self.dropout_p) - 2**31  # int32: compared with the draw's top bit flipped
        scale = 1.0 / (1.0 - self.dropout_p)
        sinks = self.sinks if self.sinks is not None else dummy
        ranges = self.ranges if self.ranges is not None else dummy
        return (bias, philox, seq_lens, *layout, keep_thr, scale, self.softcap or 1.0, sinks, ranges,
                *self.ranges_layout)

    def meta(self):
        return dict(HAS_BIAS=self.bias is not None, DROPOUT=self.dropout_p > 0, SOFTCAP=self.softcap > 0,
                    HAS_RANGES=self.ranges is not None)

    def outside_ranges(self, width):
        """Bool, True where key j < width lies outside query i's range: padded (B, Hq or 1, Lq, width),
        varlen (Hq or 1, total_q, width); None without key_ranges."""
        if self.ranges is None:
            return None
        r = self.ranges
        if r.dim() == (2 if self.varlen else 3):  # one range per query, shared by every head
            r = r[None] if self.varlen else r[:, None]
        j = torch.arange(width, device=r.device)
        return (j < r[..., :1]) | (j >= r[..., 1:])


def zero_rows(hidden, *tensors):
    """The key-row tensors with the rows of hidden keys zeroed (unchanged when None): a tile
    product multiplies every key of the tile, and 0 · NaN would let a hidden key's NaN or inf
    through (the C++ kernel's ``key_rows``)."""
    if hidden is None:
        return tensors
    return tuple(t.masked_fill(hidden, 0) for t in tensors)


def hidden_keys(k, key_padding_mask, extras, causal, samples):
    """Bool (B, Lk, 1, 1): keys no query sees (the padding mask, or an attention mask or
    key_ranges that hide them from every query the causal rule lets see them), or None."""
    hidden = key_padding_mask
    all_hidden = None
    if extras.bias is not None:
        masked = extras.bias == float("-inf")
        if causal:  # keys the mask hides from every query that causally sees them
            len_q, len_k = masked.shape[-2:]
            i, j = torch.arange(len_q, device=k.device)[:, None], torch.arange(len_k, device=k.device)
            kv_len = samples.vectors[3].long()[:, None, None, None]
            masked = masked | (j > i + kv_len - len_q)
        if extras.ranges is not None:
            masked = masked | extras.outside_ranges(k.shape[1])
        all_hidden = masked.flatten(1, 2).all(1)
    elif extras.ranges is not None:  # no dense mask: O(B Hq Lq + B Lk), never (Lq, Lk)
        batch, len_q, len_k = k.shape[0], extras.ranges.shape[-2], k.shape[1]
        r = extras.ranges.long()
        lo, hi = r[..., 0], r[..., 1]  # (B, [Hq,] Lq)
        kv_len = samples.vectors[3].long().view((batch,) + (1,) * (lo.dim() - 1))
        if causal:
            hi = torch.minimum(hi, torch.arange(len_q, device=k.device) + kv_len - len_q + 1)
        first = torch.arange(batch, device=k.device).view(kv_len.shape) * len_k
        all_hidden = ~_covered(first + lo.clamp(0, len_k), first + torch.minimum(hi, kv_len), batch * len_k)
        all_hidden = all_hidden.view(batch, len_k)
    if all_hidden is not None:
        hidden = all_hidden if hidden is None else hidden | all_hidden
    return None if hidden is None else hidden.expand(k.shape[0], k.shape[1])[:, :, None, None]


def _covered(lo, hi, size):
    """Bool (size,): the positions inside some window [lo, hi) (equal-shape int64 tensors of
    window bounds in [0, size]; empty windows count for nothing), by a difference array."""
    some = (lo < hi).long().flatten()
    diff = torch.zeros(size + 1, dtype=torch.long, device=lo.device)
    diff.scatter_add_(0, lo.flatten(), some)
    diff.scatter_add_(0, hi.clamp(min=0).flatten(), -some)
    return diff.cumsum(0)[:size] > 0


def varlen_hidden_keys(k, extras, causal, cu_seqlens_q, cu_seqlens_k):
    """Bool (total_k, 1, 1): packed keys the attention mask or key_ranges hide from every query of
    their sequence (with causal, from every query that causally sees them), or None; computed on
    the device (no host sync)."""
    if (extras.bias is None and extras.ranges is None) or k.shape[0] == 0 or cu_seqlens_q.shape[0] < 2:
        return None
    batch = cu_seqlens_q.shape[0] - 1
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    total_q = extras.bias.shape[1] if extras.bias is not None else extras.ranges.shape[-2]
    rows = torch.arange(total_q, device=k.device)
    seq = torch.searchsorted(cu_q[1:], rows, right=True).clamp_(max=batch - 1)
    if extras.bias is None:  # key_ranges alone: windows of packed keys, O(Hq total_q + total_k)
        r = extras.ranges.long()
        k_len = cu_k[seq + 1] - cu_k[seq]
        lo, hi = r[..., 0].clamp(min=0), torch.minimum(r[..., 1], k_len)
        if causal:
            hi = torch.minimum(hi, rows - cu_q[seq] + k_len - (cu_q[seq + 1] - cu_q[seq]) + 1)
        lo = torch.minimum(lo, k_len)
        return ~_covered(cu_k[seq] + lo, cu_k[seq] + hi.clamp(min=0), k.shape[0])[:, None, None]
    masked = extras.bias == float("-inf")  # (Hm, total_q, W)
    width = masked.shape[2]
    if extras.ranges is not None:
        masked = masked | extras.outside_ranges(width)
    if causal:
        i = rows - cu_q[seq]
        shift = (cu_k[seq + 1] - cu_k[seq]) - (cu_q[seq + 1] - cu_q[seq])
        masked = masked | (torch.arange(width, device=k.device) > (i + shift)[:, None])
    seen = torch.zeros(batch, width, device=k.device, dtype=torch.int32)
    seen.index_add_(0, seq, (~masked).any(0).to(torch.int32))
    keys = torch.arange(k.shape[0], device=k.device)
    seq_k = torch.searchsorted(cu_k[1:], keys, right=True).clamp_(max=batch - 1)
    return (seen[seq_k, (keys - cu_k[seq_k]).clamp(0, width - 1)] == 0)[:, None, None]
