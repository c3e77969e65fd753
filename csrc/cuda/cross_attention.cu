// CUDA launchers for mmfuse::cross_attention_{fwd,bwd} and cross_attention_varlen_{fwd,bwd}:
// validation, output allocation and the launches of csrc/cuda/cross_attention_kernel.cuh
// (FlashAttention-2 forward and backward on sm_80+ tensor cores, split-KV decode). The kernels
// take float16 and bfloat16 with (head dim, value head dim) (64, 64), (128, 128) or (128, 64),
// and issue #26's variants: attn_mask (bool or float, in-kernel bias), its gradient (mask_grad),
// Philox dropout, softcap and sinks, and issue #28's key_ranges (per-query key windows, whose
// key tiles outside every window are skipped); mmfuse/ops/attention.py routes every other case
// elsewhere and names the reason when backend="cuda" is asked for.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "../attention_mask.h"
#include "cross_attention_kernel.cuh"

namespace mmfuse {
namespace {

namespace att = cuda::attention;

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ndim) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == ndim && t->is_cuda() && t->device() == q.device() && t->scalar_type() == q.scalar_type(),
                op, ": q, k, v must be CUDA tensors of rank ", ndim, " on one device with one dtype, got ", t->sizes(),
                " ", t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernel takes float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.sizes().slice(0, ndim - 1) == v.sizes().slice(0, ndim - 1) && k.size(-1) == q.size(-1) &&
                  k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0,
              op, ": k and v must have one shape but for v's head dim, k q's head dim, and a head count dividing q's; "
              "got q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes());
  TORCH_CHECK(att::head_dims_supported(static_cast<int>(q.size(-1)), static_cast<int>(v.size(-1))), op,
              ": the CUDA kernel takes (head dim, value head dim) (64, 64), (128, 128) or (128, 64), got (",
              q.size(-1), ", ", v.size(-1), ")");
}

// Contiguous, and 16-byte aligned for cp.async (a view at an odd storage offset is copied).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

at::Tensor float_like(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                      const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == shape && t.device() == q.device(), op, ": ", name, " must have shape ", shape, " on ",
              q.device(), ", got ", t.sizes(), " on ", t.device());
  return t.to(at::kFloat).contiguous();
}

// q, k, v, sizes and dtype-independent scalars; the caller fills masks/cu_seqlens and outputs.
att::AttentionParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                 bool causal) {
  att::AttentionParams p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.heads_q = static_cast<int>(q.size(-2));
  p.heads_kv = static_cast<int>(k.size(-2));
  p.head_dim = static_cast<int>(q.size(-1));
  p.head_dim_v = static_cast<int>(v.size(-1));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.splits = 1;
  return p;
}

// Issue #26's variant arguments, validated and converted: the float32 bias (bool -> 0 / -inf),
// float32 sinks and philox on q's device; they stay alive while the kernels run.
struct Variants {
  at::Tensor bias;     // padded (B or 1, Hq or 1, Lq, Lk), varlen (Hq or 1, total_q, W); undefined when none
  at::Tensor sinks;    // (Hq,) float32
  at::Tensor philox;   // (2,) int64 on q's device
  double dropout_p = 0.0, softcap = 0.0;
};

Variants variants(const char* op, const at::Tensor& q, const at::Tensor& k, bool varlen, int64_t min_width,
                  const std::optional<at::Tensor>& attn_mask, double dropout_p, const std::optional<at::Tensor>& philox,
                  double softcap, const std::optional<at::Tensor>& sinks) {
  Variants x;
  x.bias = attention_mask_bias(op, attn_mask, q, k, varlen, min_width, at::kFloat);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be a finite float >= 0 (0: off), got ",
              softcap);
  // the kernels hold it as a float: outside float's normal range it would become inf (NaN scores) or 0 (no cap)
  TORCH_CHECK(softcap == 0.0 || (softcap >= std::numeric_limits<float>::min() && softcap <= std::numeric_limits<float>::max()),
              op, ": softcap must be 0 or within float32's normal range [", std::numeric_limits<float>::min(), ", ",
              std::numeric_limits<float>::max(), "], got ", softcap);
  x.softcap = softcap;
  const int64_t heads_q = q.size(-2);
  if (sinks) {
    const at::Tensor& t = *sinks;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == heads_q && t.device() == q.device() && at::isFloatingType(t.scalar_type()),
                op, ": sinks must be a float (Hq,) = (", heads_q, ",) tensor on ", q.device(), ", got ", t.sizes(), " ",
                t.scalar_type(), " on ", t.device());
    x.sinks = t.to(at::kFloat).contiguous();
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must lie in [0, 1), got ", dropout_p);
  x.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    TORCH_CHECK(philox && philox->dim() == 1 && philox->size(0) == 2 && philox->scalar_type() == at::kLong &&
                    (philox->device() == q.device() || philox->device().is_cpu()),
                op, ": dropout needs philox, an int64 (2,) tensor (seed, offset) on ", q.device(), " or the CPU, got ",
                philox ? philox->sizes() : at::IntArrayRef{}, philox ? " " : " none");
    x.philox = philox->to(q.device()).contiguous();  // read in-kernel: no host sync, graph-capturable
  }
  return x;
}

// Points p at x's tensors. The bias' strides: head 0 where broadcast; padded batch 0 where broadcast.
void add_variants(att::AttentionParams& p, const Variants& x, bool varlen) {
  if (x.bias.defined()) {
    const at::Tensor& b = x.bias;
    p.attn_bias = b.data_ptr<float>();
    p.bias_row_stride = b.size(-1);
    p.bias_head_stride = b.size(-3) == 1 ? 0 : b.size(-2) * b.size(-1);
    p.bias_batch_stride = varlen || b.size(0) == 1 ? 0 : b.size(1) * b.size(2) * b.size(3);
  }
  p.softcap = static_cast<float>(x.softcap);
  p.sinks = x.sinks.defined() ? x.sinks.data_ptr<float>() : nullptr;
  p.dropout = x.dropout_p > 0.0;
  p.philox = p.dropout ? x.philox.data_ptr<int64_t>() : nullptr;
  p.keep_threshold = static_cast<uint32_t>(std::floor(x.dropout_p * 4294967296.0));
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - x.dropout_p));
}

struct PaddedInputs {
  at::Tensor q, k, v, kv_lens, mask;  // kv_lens int32, mask bool; undefined when not given
  at::Tensor hidden;  // (B, Lk) bool: keys no query sees (padding, or attn_mask / key_ranges + causal); or undefined
};

// key_ranges (issue #28) checked for what the kernels rely on, contiguous: padded (B, Lq, 2) or
// (B, Hq, Lq, 2), returned as (B, Hq or 1, Lq, 2); varlen (total_q, 2) or (Hq, total_q, 2),
// returned as (Hq or 1, total_q, 2); undefined without. Their values are checked in Python
// (mmfuse/ops/attention.py check_key_ranges, one read-back): the kernels read a query's range only
// for the sample's real queries and intersect it with the sample's keys, so any int32 values from
// a raw op call only choose which of the row's own keys it sees, never an address.
at::Tensor key_ranges_of(const char* op, const std::optional<at::Tensor>& key_ranges, const at::Tensor& q,
                         bool varlen) {
  if (!key_ranges) return at::Tensor();
  const at::Tensor& r = *key_ranges;
  const int64_t heads = q.size(-2);
  bool shape_ok;
  if (varlen) {
    const int64_t total_q = q.size(0);
    shape_ok = (r.dim() == 2 && r.size(0) == total_q && r.size(1) == 2) ||
               (r.dim() == 3 && r.size(0) == heads && r.size(1) == total_q && r.size(2) == 2);
    TORCH_CHECK(shape_ok && r.scalar_type() == at::kInt && r.device() == q.device(), op,
                ": key_ranges must be an int32 (total_q, 2) = (", total_q, ", 2) or (Hq, total_q, 2) = (", heads, ", ",
                total_q, ", 2) tensor on ", q.device(), ", got ", r.sizes(), " ", r.scalar_type(), " on ", r.device());
  } else {
    const int64_t batch = q.size(0), len_q = q.size(1);
    shape_ok = (r.dim() == 3 && r.size(0) == batch && r.size(1) == len_q && r.size(2) == 2) ||
               (r.dim() == 4 && r.size(0) == batch && r.size(1) == heads && r.size(2) == len_q && r.size(3) == 2);
    TORCH_CHECK(shape_ok && r.scalar_type() == at::kInt && r.device() == q.device(), op,
                ": key_ranges must be an int32 (B, Lq, 2) = (", batch, ", ", len_q, ", 2) or (B, Hq, Lq, 2) = (", batch,
                ", ", heads, ", ", len_q, ", 2) tensor on ", q.device(), ", got ", r.sizes(), " ", r.scalar_type(),
                " on ", r.device());
  }
  const at::Tensor c = r.contiguous();
  return varlen ? (c.dim() == 2 ? c.unsqueeze(0) : c) : (c.dim() == 3 ? c.unsqueeze(1) : c);
}

// Points p at key_ranges_of's tensor: head stride 0 for one range per query, batch stride padded only.
void add_ranges(att::AttentionParams& p, const at::Tensor& ranges, bool varlen) {
  if (!ranges.defined() || ranges.numel() == 0) return;
  p.key_ranges = ranges.data_ptr<int32_t>();
  p.ranges_head_stride = ranges.size(-3) == 1 ? 0 : ranges.stride(-3);
  p.ranges_batch_stride = varlen ? 0 : ranges.stride(0);
}

// Keys of each sample that no query of any head sees through its key range within the causal and
// kv_lens bounds and, when defined, the bias (-inf hides): (B, Lk) bool. ranges (B, Hq or 1, Lq, 2).
// Without a bias each query's window [lo, hi) adds 1 on its keys in a difference array (O(B Hq Lq +
// B Lk)); with one, the windows meet the bias element by element.
at::Tensor padded_unseen_ranges(const at::Tensor& ranges, const at::Tensor& bias, const at::Tensor& kv_lens,
                                int64_t B, int64_t Lq, int64_t Lk, bool causal) {
  const auto lopts = ranges.options().dtype(at::kLong);
  const at::Tensor lens = (kv_lens.defined() ? kv_lens.to(at::kLong) : at::full({B}, Lk, lopts)).view({B, 1, 1});
  const at::Tensor r = ranges.to(at::kLong);
  const at::Tensor lo = r.select(-1, 0).clamp(0, Lk);  // (B, Hq or 1, Lq)
  at::Tensor hi = at::minimum(r.select(-1, 1), lens);
  if (causal) hi = at::minimum(hi, at::arange(Lq, lopts).view({1, 1, Lq}) + lens - (Lq - 1));  // j <= i + len - Lq
  hi = at::maximum(hi, lo);
  if (bias.defined()) {
    const at::Tensor j = at::arange(Lk, lopts).view({1, 1, 1, Lk});
    const at::Tensor open = bias.ne(-std::numeric_limits<double>::infinity()) & j.ge(lo.unsqueeze(-1)) &
                            j.lt(hi.unsqueeze(-1));  // (B, Hq or 1, Lq, Lk)
    return open.flatten(1, 2).any(1).logical_not();
  }
  const at::Tensor ones = at::ones({B, lo.size(1) * Lq}, lopts);
  at::Tensor diff = at::zeros({B, Lk + 1}, lopts);
  diff.scatter_add_(1, lo.reshape({B, -1}), ones).scatter_add_(1, hi.reshape({B, -1}), ones.neg());
  return diff.slice(1, 0, Lk).cumsum(1).le(0);
}

// Keys of each sample that no query of any head sees through the bias (-inf), the causal rule and
// kv_lens: (B, Lk) bool. Such keys never influence anything, whatever k and v hold (README).
at::Tensor padded_unseen(const at::Tensor& bias, const at::Tensor& kv_lens, int64_t B, int64_t Lq, int64_t Lk,
                         bool causal) {
  at::Tensor open = bias.ne(-std::numeric_limits<double>::infinity()).any(1);  // (B or 1, Lq, Lk)
  if (causal) {
    const auto opts = bias.options().dtype(at::kLong);
    const at::Tensor lens = kv_lens.defined() ? kv_lens.to(at::kLong) : at::full({B}, Lk, opts);
    const at::Tensor i = at::arange(Lq, opts).view({1, Lq, 1}), j = at::arange(Lk, opts).view({1, 1, Lk});
    open = open & j.le(i + (lens - Lq).view({B, 1, 1}));  // (B, Lq, Lk)
  }
  return open.any(1).logical_not().expand({B, Lk}).contiguous();
}

PaddedInputs padded_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& key_padding_mask,
                           const at::Tensor& bias, const at::Tensor& ranges, bool causal) {
  check_qkv(op, q, k, v, 4);
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k must have q's batch size ", q.size(0), ", got ", k.sizes());
  PaddedInputs in{dense(q), dense(k), dense(v), {}, {}, {}};
  if (kv_lens) {
    TORCH_CHECK(kv_lens->dim() == 1 && kv_lens->size(0) == q.size(0) && kv_lens->device() == q.device() &&
                    at::isIntegralType(kv_lens->scalar_type(), /*includeBool=*/false),
                op, ": kv_lens must be an integer (B=", q.size(0), ",) tensor on ", q.device(), ", got ",
                kv_lens->sizes(), " ", kv_lens->scalar_type(), " on ", kv_lens->device());
    // range-checked before the narrowing to int32 (one read-back), as on the CPU
    TORCH_CHECK((kv_lens->ge(0) & kv_lens->le(k.size(1))).all().item<bool>(), op, ": kv_lens must lie in [0, ",
                k.size(1), "]");
    in.kv_lens = kv_lens->to(at::kInt).contiguous();
  }
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == k.size(0) && key_padding_mask->size(1) == k.size(1) &&
                    key_padding_mask->device() == q.device(),
                op, ": key_padding_mask must be a bool (B, Lk) = (", k.size(0), ", ", k.size(1), ") tensor on ",
                q.device(), ", got ", key_padding_mask->sizes(), " ", key_padding_mask->scalar_type());
    in.mask = key_padding_mask->contiguous();
    in.hidden = in.mask;
  }
  if ((bias.defined() || ranges.defined()) && k.size(1) > 0) {
    const int64_t B = q.size(0), Lq = q.size(1), Lk = k.size(1);
    const at::Tensor unseen = ranges.defined() ? padded_unseen_ranges(ranges, bias, in.kv_lens, B, Lq, Lk, causal)
                                               : padded_unseen(bias, in.kv_lens, B, Lq, Lk, causal);
    in.hidden = in.hidden.defined() ? in.hidden | unseen : unseen;
  }
  if (in.hidden.defined()) {
    // a hidden key never influences anything, whatever it holds: the tile products multiply every
    // key of a tile, and 0 · NaN would let a masked key's NaN or inf through (as on the CPU and Triton)
    const at::Tensor hidden = in.hidden.view({k.size(0), k.size(1), 1, 1});
    in.k = in.k.masked_fill(hidden, 0);
    in.v = in.v.masked_fill(hidden, 0);
  }
  return in;
}

att::AttentionParams padded_params(const PaddedInputs& in, double scale, bool causal) {
  att::AttentionParams p = base_params(in.q, in.k, in.v, scale, causal);
  p.batch = static_cast<int>(in.q.size(0));
  p.len_q = in.q.size(1);
  p.len_k = in.k.size(1);
  p.lse_len = p.len_q;
  p.q_rows = p.batch * p.len_q;
  p.kv_lens = in.kv_lens.defined() ? in.kv_lens.data_ptr<int32_t>() : nullptr;
  p.key_padding_mask = in.mask.defined() ? reinterpret_cast<const uint8_t*>(in.mask.data_ptr<bool>()) : nullptr;
  return p;
}

struct VarlenInputs {
  at::Tensor q, k, v, cu_q, cu_k;
  int64_t max_q, max_k;  // the longest real sequences: the grid's size (max_seqlen is only a bound)
  at::Tensor hidden;     // (total_k,) bool: keys no query sees through the bias and causal; or undefined
};

// The kernels index q/k/out through cu_seqlens and size their grid by max_seqlen, so a bad
// prefix sum would read or write out of bounds and a short max_seqlen would leave rows
// unwritten. Checked on the device like the CPU kernel checks them, read back in one sync.
// Returns the longest real query and key sequences, read back in the same sync.
std::pair<int64_t, int64_t> check_cu_seqlens(const char* op, const at::Tensor& cu_q, const at::Tensor& cu_k,
                                             int64_t rows_q, int64_t rows_k, int64_t max_q, int64_t max_k) {
  const c10::cuda::CUDAGuard guard(cu_q.device());
  auto valid = [](const at::Tensor& cu, int64_t rows, int64_t max_len) {
    const at::Tensor c = cu.to(at::kLong);
    const at::Tensor steps = c.slice(0, 1) - c.slice(0, 0, -1);
    const at::Tensor ok = c[0].eq(0) & c[-1].eq(rows) & steps.ge(0).all() & steps.le(max_len).all();
    const at::Tensor longest = steps.numel() > 0 ? steps.max() : at::zeros({}, c.options());
    return at::stack({ok.to(at::kLong), longest});
  };
  const at::Tensor got = at::stack({valid(cu_q, rows_q, max_q), valid(cu_k, rows_k, max_k)}).cpu();
  const int64_t* g = got.data_ptr<int64_t>();
  TORCH_CHECK(g[0] != 0, op, ": cu_seqlens_q must start at 0, be non-decreasing with steps <= max_seqlen_q (", max_q,
              ") and end at q's ", rows_q, " rows");
  TORCH_CHECK(g[2] != 0, op, ": cu_seqlens_k must start at 0, be non-decreasing with steps <= max_seqlen_k (", max_k,
              ") and end at k's ", rows_k, " rows");
  return {g[1], g[3]};
}

VarlenInputs varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_qkv(op, q, k, v, 3);
  for (const at::Tensor* cu : {&cu_q, &cu_k}) {
    TORCH_CHECK(cu->dim() == 1 && cu->size(0) >= 1 && cu->scalar_type() == at::kInt && cu->device() == q.device(), op,
                ": cu_seqlens must be int32 (B+1,) tensors on ", q.device(), ", got ", cu->sizes(), " ",
                cu->scalar_type(), " on ", cu->device());
  }
  TORCH_CHECK(cu_q.size(0) == cu_k.size(0), op, ": cu_seqlens_q and cu_seqlens_k must have one length");
  TORCH_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q, ", ", max_k);
  const auto [longest_q, longest_k] = check_cu_seqlens(op, cu_q, cu_k, q.size(0), k.size(0), max_q, max_k);
  return {dense(q), dense(k), dense(v), cu_q.contiguous(), cu_k.contiguous(), longest_q, longest_k, {}};
}

// Varlen keys no query sees through the bias (Hq or 1, total_q, W) and/or the key ranges (Hq or 1,
// total_q, 2) and the causal rule: the packed key rows of each sample, from the rows of its queries
// (one segment reduction; with ranges alone, a difference array per sample as on the padded path).
void hide_unseen_varlen(VarlenInputs& in, const at::Tensor& bias, const at::Tensor& ranges, bool causal) {
  const int64_t batch = in.cu_q.size(0) - 1, total_q = in.q.size(0), total_k = in.k.size(0);
  const int64_t W = bias.defined() ? bias.size(-1) : in.max_k;  // >= every sequence's keys
  if (total_k == 0) return;
  const auto lopts = in.cu_q.options().dtype(at::kLong);
  const at::Tensor cu_q = in.cu_q.to(at::kLong), cu_k = in.cu_k.to(at::kLong);
  const at::Tensor lens_q = cu_q.slice(0, 1) - cu_q.slice(0, 0, -1), lens_k = cu_k.slice(0, 1) - cu_k.slice(0, 0, -1);
  const at::Tensor rows = at::arange(total_q, lopts);
  const at::Tensor sample = at::searchsorted(cu_q.slice(0, 1), rows, /*out_int32=*/false, /*right=*/true);  // (total_q,)
  const at::Tensor j = at::arange(W, lopts).view({1, W});
  const at::Tensor klen = lens_k.index_select(0, sample).view({total_q, 1});
  // the last key each row may see by the causal rule, plus one: i + klen - qlen + 1
  const at::Tensor causal_end =
      causal ? (rows - cu_q.index_select(0, sample)).view({total_q, 1}) + klen -
                   lens_q.index_select(0, sample).view({total_q, 1}) + 1
             : at::Tensor();
  at::Tensor seen;  // (batch, W): some query row of sample b sees local key j
  if (ranges.defined()) {
    const at::Tensor r = ranges.to(at::kLong);  // (Hq or 1, total_q, 2)
    const at::Tensor kl = klen.view({1, total_q});
    const at::Tensor lo = at::minimum(r.select(-1, 0).clamp_min(0), kl);
    at::Tensor hi = at::minimum(r.select(-1, 1), kl);
    if (causal) hi = at::minimum(hi, causal_end.view({1, total_q}));
    hi = at::maximum(hi, lo);
    if (bias.defined()) {
      const at::Tensor open = (bias.ne(-std::numeric_limits<double>::infinity()) & j.unsqueeze(0).ge(lo.unsqueeze(-1)) &
                               j.unsqueeze(0).lt(hi.unsqueeze(-1)))
                                  .any(0);  // (total_q, W)
      seen = at::zeros({batch, W}, lopts).index_add_(0, sample, open.to(at::kLong)).gt(0);
    } else {
      const at::Tensor base = (sample * (W + 1)).view({1, total_q});
      const at::Tensor ones = at::ones({lo.numel()}, lopts);
      at::Tensor diff = at::zeros({batch * (W + 1)}, lopts);
      diff.index_add_(0, (base + lo).flatten(), ones).index_add_(0, (base + hi).flatten(), ones.neg());
      seen = diff.view({batch, W + 1}).slice(1, 0, W).cumsum(1).gt(0);
    }
  } else {
    at::Tensor open = bias.ne(-std::numeric_limits<double>::infinity()).any(0) & j.lt(klen);  // (total_q, W)
    if (causal) open = open & j.lt(causal_end);
    seen = at::zeros({batch, W}, lopts).index_add_(0, sample, open.to(at::kLong)).gt(0);
  }
  const at::Tensor krows = at::arange(total_k, lopts);
  const at::Tensor ksample = at::searchsorted(cu_k.slice(0, 1), krows, false, true);
  const at::Tensor local = krows - cu_k.index_select(0, ksample);
  in.hidden = seen.index({ksample, local}).logical_not();
  const at::Tensor hidden = in.hidden.view({total_k, 1, 1});
  in.k = in.k.masked_fill(hidden, 0);
  in.v = in.v.masked_fill(hidden, 0);
}

att::AttentionParams varlen_params(const VarlenInputs& in, double scale, bool causal) {
  att::AttentionParams p = base_params(in.q, in.k, in.v, scale, causal);
  p.batch = static_cast<int>(in.cu_q.size(0) - 1);
  p.len_q = in.max_q;
  p.len_k = in.max_k;
  p.lse_len = in.q.size(0);
  p.q_rows = in.q.size(0);
  p.cu_seqlens_q = in.cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = in.cu_k.data_ptr<int32_t>();
  return p;
}

void check_grid(const char* op, const att::AttentionParams& p) {
  TORCH_CHECK(p.batch <= 65535 && p.heads_q <= 65535, op, ": the CUDA kernel takes at most 65535 samples and heads, got ",
              p.batch, " and ", p.heads_q);
}

// A kernel's dynamic shared memory against what this GPU gives one block (sizes per head-dim pair
// in cross_attention_kernel.cuh: dQ at (128, 128) needs 104,576 bytes, over the 99 KiB of
// sm_86/sm_89/sm_120 parts; sm_80: 163 KiB, sm_90: 227 KiB). fp16 and bf16 tiles have one size,
// so __half sizes both.
void check_shared_memory(const char* op, const att::AttentionParams& p, int device,
                         cudaError_t (*config)(const att::AttentionParams&, att::KernelLaunch*), const char* kernel) {
  att::KernelLaunch l{};
  C10_CUDA_CHECK(config(p, &l));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(l.shared_bytes <= static_cast<size_t>(limit), op, ": the CUDA ", kernel, " kernel at head dims (",
              p.head_dim, ", ", p.head_dim_v, ") needs ", l.shared_bytes,
              " bytes of shared memory per block, this GPU allows ", limit, "; use backend='triton'");
}

// out (q's rows, Hq, Dv) and lse; decode shapes (<= 8 queries, too few CTAs for the GPU) run the
// split-KV schedule with float32 partial buffers and the merge kernel.
std::tuple<at::Tensor, at::Tensor> run_forward(const char* op, att::AttentionParams p, const at::Tensor& q,
                                               const at::Tensor& v, at::IntArrayRef lse_shape) {
  check_grid(op, p);
  check_shared_memory(op, p, q.get_device(), att::forward_launch<__half>, "forward");
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = v.size(-1);
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
  p.splits = att::decode_splits(p, sms);
  at::Tensor out_partial, lse_partial;
  if (p.splits > 1) {
    out_partial = at::empty({p.splits, p.q_rows, p.heads_q, p.head_dim_v}, q.options().dtype(at::kFloat));
    lse_partial = at::empty({p.splits, p.q_rows * p.heads_q}, q.options().dtype(at::kFloat));
    p.out_partial = out_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  if (q.scalar_type() == at::kHalf) {
    C10_CUDA_CHECK(att::launch_forward<__half>(p, stream));
  } else {
    C10_CUDA_CHECK(att::launch_forward<__nv_bfloat16>(p, stream));
  }
  return {out, lse};
}

// dmask for mask_grad (float32 zeros, each element written by at most one CTA, the rest stay 0):
// padded (B, Hq, Lq, Lk), varlen (Hq, total_q, W); torch.empty(0) (float32) without it.
at::Tensor add_dmask(const char* op, att::AttentionParams& p, bool mask_grad, const at::Tensor& bias,
                     const at::Tensor& q, bool varlen) {
  const auto opts = q.options().dtype(at::kFloat);
  if (!mask_grad) return at::empty({0}, opts);
  TORCH_CHECK(bias.defined(), op, ": mask_grad needs attn_mask (the gradient is the mask's), got none");
  const int64_t width = bias.size(-1);
  at::Tensor dmask = varlen ? at::zeros({p.heads_q, q.size(0), width}, opts)
                            : at::zeros({p.batch, p.heads_q, q.size(1), width}, opts);
  p.dbias = dmask.data_ptr<float>();
  p.dbias_row_stride = width;
  p.dbias_head_stride = dmask.size(-2) * width;
  p.dbias_batch_stride = varlen ? 0 : p.heads_q * dmask.size(-2) * width;
  return dmask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    const char* op, att::AttentionParams p, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    at::IntArrayRef lse_shape, at::Tensor dmask, const at::Tensor& hidden) {
  check_grid(op, p);
  check_shared_memory(op, p, q.get_device(), att::dq_launch<__half>, "dQ");
  check_shared_memory(op, p, q.get_device(), att::dkdv_launch<__half>, "dK/dV");
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = v.size(-1);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_shape) && t->scalar_type() == q.scalar_type() &&
                    t->device() == q.device(),
                op, ": grad_out and out must have shape ", at::IntArrayRef(out_shape), " (q's, with v's head dim) and ",
                "dtype ", q.scalar_type(), ", got ", t->sizes(), " ", t->scalar_type());
  }
  const at::Tensor g = dense(grad_out), o = dense(out), l = float_like(op, "lse", lse, lse_shape, q);
  const at::Tensor dl = grad_lse ? float_like(op, "grad_lse", *grad_lse, lse_shape, q) : at::Tensor();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv, dmask};
  at::Tensor delta = at::empty_like(l);
  p.out = const_cast<void*>(o.data_ptr());
  p.lse = const_cast<float*>(l.data_ptr<float>());
  p.dout = g.data_ptr();
  p.dlse = dl.defined() ? dl.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  if (q.scalar_type() == at::kHalf) {
    C10_CUDA_CHECK(att::launch_backward<__half>(p, stream));
  } else {
    C10_CUDA_CHECK(att::launch_backward<__nv_bfloat16>(p, stream));
  }
  if (hidden.defined()) {
    // hidden keys' gradients are exactly 0, also when a NaN query row reached them through dSᵀ Q
    const at::Tensor h = k.dim() == 4 ? hidden.view({k.size(0), k.size(1), 1, 1}) : hidden.view({k.size(0), 1, 1});
    dk.masked_fill_(h, 0);
    dv.masked_fill_(h, 0);
  }
  return {dq, dk, dv, dmask};
}

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool causal,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, const std::optional<at::Tensor>& philox,
    double softcap, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_ranges) {
  const char* op = "cross_attention_fwd";
  check_qkv(op, q, k, v, 4);
  const Variants x = variants(op, q, k, false, 0, attn_mask, dropout_p, philox, softcap, sinks);
  const at::Tensor ranges = key_ranges_of(op, key_ranges, q, false);
  const PaddedInputs in = padded_inputs(op, q, k, v, kv_lens, key_padding_mask, x.bias, ranges, causal);
  att::AttentionParams p = padded_params(in, scale, causal);
  add_variants(p, x, false);
  add_ranges(p, ranges, false);
  return run_forward(op, p, in.q, in.v, {q.size(0), q.size(2), q.size(1)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool causal,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, const std::optional<at::Tensor>& philox,
    double softcap, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_ranges,
    bool mask_grad) {
  const char* op = "cross_attention_bwd";
  check_qkv(op, q, k, v, 4);
  const Variants x = variants(op, q, k, false, 0, attn_mask, dropout_p, philox, softcap, sinks);
  const at::Tensor ranges = key_ranges_of(op, key_ranges, q, false);
  const PaddedInputs in = padded_inputs(op, q, k, v, kv_lens, key_padding_mask, x.bias, ranges, causal);
  att::AttentionParams p = padded_params(in, scale, causal);
  add_variants(p, x, false);
  add_ranges(p, ranges, false);
  p.sinks = nullptr;  // the returned lse already includes them
  at::Tensor dmask = add_dmask(op, p, mask_grad, x.bias, q, false);
  return run_backward(op, p, grad_out, grad_lse, in.q, in.k, in.v, out, lse, {q.size(0), q.size(2), q.size(1)}, dmask,
                      in.hidden);
}

std::tuple<at::Tensor, at::Tensor> cross_attention_varlen_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, const std::optional<at::Tensor>& philox,
    double softcap, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_ranges) {
  const char* op = "cross_attention_varlen_fwd";
  VarlenInputs in = varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Variants x = variants(op, q, k, true, in.max_k, attn_mask, dropout_p, philox, softcap, sinks);
  const at::Tensor ranges = key_ranges_of(op, key_ranges, q, true);
  if (x.bias.defined() || ranges.defined()) hide_unseen_varlen(in, x.bias, ranges, causal);
  att::AttentionParams p = varlen_params(in, scale, causal);
  add_variants(p, x, true);
  add_ranges(p, ranges, true);
  return run_forward(op, p, in.q, in.v, {q.size(1), q.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, const std::optional<at::Tensor>& philox,
    double softcap, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& key_ranges,
    bool mask_grad) {
  const char* op = "cross_attention_varlen_bwd";
  VarlenInputs in = varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Variants x = variants(op, q, k, true, in.max_k, attn_mask, dropout_p, philox, softcap, sinks);
  const at::Tensor ranges = key_ranges_of(op, key_ranges, q, true);
  if (x.bias.defined() || ranges.defined()) hide_unseen_varlen(in, x.bias, ranges, causal);
  att::AttentionParams p = varlen_params(in, scale, causal);
  add_variants(p, x, true);
  add_ranges(p, ranges, true);
  p.sinks = nullptr;  // the returned lse already includes them
  at::Tensor dmask = add_dmask(op, p, mask_grad, x.bias, q, true);
  return run_backward(op, p, grad_out, grad_lse, in.q, in.k, in.v, out, lse, {q.size(1), q.size(0)}, dmask,
                      in.hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("cross_attention_fwd", &cross_attention_fwd_cuda);
  m.impl("cross_attention_bwd", &cross_attention_bwd_cuda);
  m.impl("cross_attention_varlen_fwd", &cross_attention_varlen_fwd_cuda);
  m.impl("cross_attention_varlen_bwd", &cross_attention_varlen_bwd_cuda);
}

}  // namespace mmfuse
