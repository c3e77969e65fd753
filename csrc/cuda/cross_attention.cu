// CUDA launchers for mmfuse::cross_attention_{fwd,bwd} and cross_attention_varlen_{fwd,bwd}:
// validation, output allocation and the launches of csrc/cuda/cross_attention_kernel.cuh
// (FlashAttention-2 forward and backward on sm_80+ tensor cores, split-KV decode). The kernels
// take float16 and bfloat16 with (head dim, value head dim) (64, 64), (128, 128) or (128, 64),
// and issue #26's variants: attn_mask (bool or float, in-kernel bias), its gradient (mask_grad),
// Philox dropout, softcap and sinks, and issue #28's key_ranges (per-query key windows, whose
// key tiles outside every window are skipped); mmfuse/ops/attention.py routes every other case
// elsewhere and names the reason when backend="cuda" is asked for.
//
// On the LibTorch stable ABI (csrc/cuda/stable_cuda.h): the host-side masking below runs ATen ops
// through the dispatcher, with every Scalar operand a 0-dim tensor on the device.
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cross_attention_kernel.cuh"
#include "../attention_mask.h"
#include "stable_cuda.h"

namespace mmfuse {
namespace {

namespace att = cuda::attention;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// attn_mask as a contiguous additive tensor of dtype `bias_type` on q's device (bool: True -> -inf,
// False -> 0; any float dtype converted), or undefined without one; shapes as attention_mask_view
// (csrc/attention_mask.h) returns them.
Tensor attention_mask_bias(const char* op, const std::optional<Tensor>& attn_mask, const Tensor& q, const Tensor& k,
                           bool varlen, int64_t min_width, ScalarType bias_type) {
  const Tensor full = attention_mask_view(op, attn_mask, q, k, varlen, min_width);
  if (!full.defined()) return full;
  if (full.scalar_type() == dtype::kBool) {
    Tensor bias = zeros_like_as(q, full.sizes(), bias_type);
    op::masked_fill_(bias, full, kNegInf);
    return bias;
  }
  return mmfuse::contiguous(to_dtype(full, bias_type));
}

void check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, int64_t ndim) {
  const Device device = q.device();
  const ScalarType type = q.scalar_type();
  for (const Tensor* t : {&q, &k, &v}) {
    MMFUSE_CHECK(t->dim() == ndim && t->is_cuda() && t->device() == device && t->scalar_type() == type, op,
                 ": q, k, v must be CUDA tensors of rank ", ndim, " on one device with one dtype, got ", shape(*t), " ",
                 t->scalar_type(), " on ", device_str(t->device()));
  }
  MMFUSE_CHECK(type == dtype::kHalf || type == dtype::kBFloat16, op,
               ": the CUDA kernel takes float16 or bfloat16, got ", type);
  const std::vector<int64_t> qs = sizes_of(q), ks = sizes_of(k), vs = sizes_of(v);
  MMFUSE_CHECK(IntArrayRef(ks).slice(0, ndim - 1).equals(IntArrayRef(vs).slice(0, ndim - 1)) &&
                   ks[ndim - 1] == qs[ndim - 1] && ks[ndim - 2] > 0 && qs[ndim - 2] % ks[ndim - 2] == 0,
               op, ": k and v must have one shape but for v's head dim, k q's head dim, and a head count dividing q's; "
               "got q ", shape_str(qs), " k ", shape_str(ks), " v ", shape_str(vs));
  MMFUSE_CHECK(att::head_dims_supported(static_cast<int>(qs[ndim - 1]), static_cast<int>(vs[ndim - 1])), op,
               ": the CUDA kernel takes (head dim, value head dim) (64, 64), (128, 128) or (128, 64), got (",
               qs[ndim - 1], ", ", vs[ndim - 1], ")");
}

// Contiguous, and 16-byte aligned for cp.async (a view at an odd storage offset is copied).
Tensor dense(const Tensor& t) {
  Tensor c = mmfuse::contiguous(t);
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : torch::stable::clone(c);
}

Tensor float_like(const char* op, const char* name, const Tensor& t, IntArrayRef want, const Tensor& q) {
  const Device device = t.device(), q_device = q.device();
  MMFUSE_CHECK(t.sizes().equals(want) && device == q_device, op, ": ", name, " must have shape ", shape_str(want), " on ",
               device_str(q_device), ", got ", shape(t), " on ", device_str(device));
  return mmfuse::contiguous(to_dtype(t, dtype::kFloat));
}

// q, k, v, sizes and dtype-independent scalars; the caller fills masks/cu_seqlens and outputs.
att::AttentionParams base_params(const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal) {
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
  Tensor bias;     // padded (B or 1, Hq or 1, Lq, Lk), varlen (Hq or 1, total_q, W); undefined when none
  Tensor sinks;    // (Hq,) float32
  Tensor philox;   // (2,) int64 on q's device
  double dropout_p = 0.0, softcap = 0.0;
};

Variants variants(const char* op, const Tensor& q, const Tensor& k, bool varlen, int64_t min_width,
                  const std::optional<Tensor>& attn_mask, double dropout_p, const std::optional<Tensor>& philox,
                  double softcap, const std::optional<Tensor>& sinks) {
  Variants x;
  x.bias = attention_mask_bias(op, attn_mask, q, k, varlen, min_width, dtype::kFloat);
  MMFUSE_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be a finite float >= 0 (0: off), got ",
               softcap);
  // the kernels hold it as a float: outside float's normal range it would become inf (NaN scores) or 0 (no cap)
  MMFUSE_CHECK(softcap == 0.0 || (softcap >= std::numeric_limits<float>::min() && softcap <= std::numeric_limits<float>::max()),
               op, ": softcap must be 0 or within float32's normal range [", std::numeric_limits<float>::min(), ", ",
               std::numeric_limits<float>::max(), "], got ", softcap);
  x.softcap = softcap;
  const Device q_device = q.device();
  const int64_t heads_q = q.size(-2);
  if (sinks) {
    const Tensor& t = *sinks;
    MMFUSE_CHECK(t.dim() == 1 && t.size(0) == heads_q && t.device() == q_device && is_floating_type(t.scalar_type()),
                 op, ": sinks must be a float (Hq,) = (", heads_q, ",) tensor on ", device_str(q_device), ", got ",
                 shape(t), " ", t.scalar_type(), " on ", device_str(t.device()));
    x.sinks = mmfuse::contiguous(to_dtype(t, dtype::kFloat));
  }
  MMFUSE_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must lie in [0, 1), got ", dropout_p);
  x.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    MMFUSE_CHECK(philox && philox->dim() == 1 && philox->size(0) == 2 && philox->scalar_type() == dtype::kLong &&
                     (philox->device() == q_device || philox->device().type() == DeviceType::CPU),
                 op, ": dropout needs philox, an int64 (2,) tensor (seed, offset) on ", device_str(q_device),
                 " or the CPU, got ", philox ? shape(*philox) : shape_str({}), philox ? " " : " none");
    x.philox = mmfuse::contiguous(torch::stable::to(*philox, q_device));  // read in-kernel: no host sync, graph-capturable
  }
  return x;
}

// Points p at x's tensors. The bias' strides: head 0 where broadcast; padded batch 0 where broadcast.
void add_variants(att::AttentionParams& p, const Variants& x, bool varlen) {
  if (x.bias.defined()) {
    const Tensor& b = x.bias;
    const std::vector<int64_t> bs = sizes_of(b);
    const size_t n = bs.size();
    p.attn_bias = ptr<float>(b);
    p.bias_row_stride = bs[n - 1];
    p.bias_head_stride = bs[n - 3] == 1 ? 0 : bs[n - 2] * bs[n - 1];
    p.bias_batch_stride = varlen || bs[0] == 1 ? 0 : bs[1] * bs[2] * bs[3];
  }
  p.softcap = static_cast<float>(x.softcap);
  p.sinks = x.sinks.defined() ? ptr<float>(x.sinks) : nullptr;
  p.dropout = x.dropout_p > 0.0;
  p.philox = p.dropout ? ptr<int64_t>(x.philox) : nullptr;
  p.keep_threshold = static_cast<uint32_t>(std::floor(x.dropout_p * 4294967296.0));
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - x.dropout_p));
}

struct PaddedInputs {
  Tensor q, k, v, kv_lens, mask;  // kv_lens int32, mask bool; undefined when not given
  Tensor hidden;  // (B, Lk) bool: keys no query sees (padding, or attn_mask / key_ranges + causal); or undefined
};

// key_ranges (issue #28) checked for what the kernels rely on, contiguous: padded (B, Lq, 2) or
// (B, Hq, Lq, 2), returned as (B, Hq or 1, Lq, 2); varlen (total_q, 2) or (Hq, total_q, 2),
// returned as (Hq or 1, total_q, 2); undefined without. Their values are checked in Python
// (mmfuse/ops/attention.py check_key_ranges, one read-back): the kernels read a query's range only
// for the sample's real queries and intersect it with the sample's keys, so any int32 values from
// a raw op call only choose which of the row's own keys it sees, never an address.
Tensor key_ranges_of(const char* op, const std::optional<Tensor>& key_ranges, const Tensor& q, bool varlen) {
  if (!key_ranges) return Tensor();
  const Tensor& r = *key_ranges;
  const int64_t heads = q.size(-2);
  const std::vector<int64_t> rs = sizes_of(r);
  const size_t rdim = rs.size();
  const bool type_ok = r.scalar_type() == dtype::kInt && r.device() == q.device();
  bool shape_ok;
  if (varlen) {
    const int64_t total_q = q.size(0);
    shape_ok = (rdim == 2 && rs[0] == total_q && rs[1] == 2) ||
               (rdim == 3 && rs[0] == heads && rs[1] == total_q && rs[2] == 2);
    MMFUSE_CHECK(shape_ok && type_ok, op, ": key_ranges must be an int32 (total_q, 2) = (", total_q,
                 ", 2) or (Hq, total_q, 2) = (", heads, ", ", total_q, ", 2) tensor on ", device_str(q.device()),
                 ", got ", shape_str(rs), " ", r.scalar_type(), " on ", device_str(r.device()));
  } else {
    const int64_t batch = q.size(0), len_q = q.size(1);
    shape_ok = (rdim == 3 && rs[0] == batch && rs[1] == len_q && rs[2] == 2) ||
               (rdim == 4 && rs[0] == batch && rs[1] == heads && rs[2] == len_q && rs[3] == 2);
    MMFUSE_CHECK(shape_ok && type_ok, op, ": key_ranges must be an int32 (B, Lq, 2) = (", batch, ", ", len_q,
                 ", 2) or (B, Hq, Lq, 2) = (", batch, ", ", heads, ", ", len_q, ", 2) tensor on ",
                 device_str(q.device()), ", got ", shape_str(rs), " ", r.scalar_type(), " on ", device_str(r.device()));
  }
  const Tensor c = mmfuse::contiguous(r);
  return varlen ? (rdim == 2 ? torch::stable::unsqueeze(c, 0) : c) : (rdim == 3 ? torch::stable::unsqueeze(c, 1) : c);
}

// Points p at key_ranges_of's tensor: head stride 0 for one range per query, batch stride padded only.
void add_ranges(att::AttentionParams& p, const Tensor& ranges, bool varlen) {
  if (!ranges.defined() || ranges.numel() == 0) return;
  p.key_ranges = ptr<int32_t>(ranges);
  p.ranges_head_stride = ranges.size(-3) == 1 ? 0 : ranges.stride(-3);
  p.ranges_batch_stride = varlen ? 0 : ranges.stride(0);
}

// Keys of each sample that no query of any head sees through its key range within the causal and
// kv_lens bounds and, when defined, the bias (-inf hides): (B, Lk) bool. ranges (B, Hq or 1, Lq, 2).
// Without a bias each query's window [lo, hi) adds 1 on its keys in a difference array (O(B Hq Lq +
// B Lk)); with one, the windows meet the bias element by element.
Tensor padded_unseen_ranges(const Tensor& ranges, const Tensor& bias, const Tensor& kv_lens, int64_t B, int64_t Lq,
                            int64_t Lk, bool causal) {
  const Tensor lens = torch::stable::view(
      kv_lens.defined() ? to_dtype(kv_lens, dtype::kLong)
                        : torch::stable::full({B}, static_cast<double>(Lk), dtype::kLong, std::nullopt, ranges.device()),
      {B, 1, 1});
  const Tensor r = to_dtype(ranges, dtype::kLong);
  const Tensor lo = op::clamp(torch::stable::select(r, -1, 0), 0, static_cast<double>(Lk));  // (B, Hq or 1, Lq)
  Tensor hi = op::minimum(torch::stable::select(r, -1, 1), lens);
  if (causal) {  // j <= i + len - Lq
    const Tensor last = op::add(torch::stable::view(op::arange(Lq, ranges), {1, 1, Lq}),
                                op::add(lens, -static_cast<double>(Lq - 1)));
    hi = op::minimum(hi, last);
  }
  hi = op::maximum(hi, lo);
  if (bias.defined()) {
    const Tensor j = torch::stable::view(op::arange(Lk, ranges), {1, 1, 1, Lk});
    const Tensor open = op::logical_and(op::logical_and(op::ne(bias, kNegInf), op::ge(j, torch::stable::unsqueeze(lo, -1))),
                                        op::lt(j, torch::stable::unsqueeze(hi, -1)));  // (B, Hq or 1, Lq, Lk)
    return op::logical_not(op::any(torch::stable::flatten(open, 1, 2), 1));
  }
  const Tensor ones = torch::stable::full({B, lo.size(1) * Lq}, 1.0, dtype::kLong, std::nullopt, ranges.device());
  Tensor diff = zeros_like_as(ones, {B, Lk + 1});
  op::scatter_add_(diff, 1, torch::stable::reshape(lo, {B, -1}), ones);
  op::scatter_add_(diff, 1, torch::stable::reshape(hi, {B, -1}), op::neg(ones));
  return op::le(op::cumsum(torch::stable::narrow(diff, 1, 0, Lk), 1), 0);
}

// Keys of each sample that no query of any head sees through the bias (-inf), the causal rule and
// kv_lens: (B, Lk) bool. Such keys never influence anything, whatever k and v hold (README).
Tensor padded_unseen(const Tensor& bias, const Tensor& kv_lens, int64_t B, int64_t Lq, int64_t Lk, bool causal) {
  Tensor open = op::any(op::ne(bias, kNegInf), 1);  // (B or 1, Lq, Lk)
  if (causal) {
    const Tensor lens = kv_lens.defined()
                            ? to_dtype(kv_lens, dtype::kLong)
                            : torch::stable::full({B}, static_cast<double>(Lk), dtype::kLong, std::nullopt, bias.device());
    const Tensor i = torch::stable::view(op::arange(Lq, bias), {1, Lq, 1});
    const Tensor j = torch::stable::view(op::arange(Lk, bias), {1, 1, Lk});
    const Tensor shift = torch::stable::view(op::add(lens, -static_cast<double>(Lq)), {B, 1, 1});
    open = op::logical_and(open, op::le(j, op::add(i, shift)));  // (B, Lq, Lk)
  }
  return mmfuse::contiguous(op::expand(op::logical_not(op::any(open, 1)), {B, Lk}));
}

PaddedInputs padded_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                           const std::optional<Tensor>& kv_lens, const std::optional<Tensor>& key_padding_mask,
                           const Tensor& bias, const Tensor& ranges, bool causal) {
  check_qkv(op, q, k, v, 4);
  const std::vector<int64_t> qs = sizes_of(q), ks = sizes_of(k);
  MMFUSE_CHECK(ks[0] == qs[0], op, ": k must have q's batch size ", qs[0], ", got ", shape_str(ks));
  const Device q_device = q.device();
  PaddedInputs in{dense(q), dense(k), dense(v), Tensor(), Tensor(), Tensor()};
  if (kv_lens) {
    const Tensor& t = *kv_lens;
    MMFUSE_CHECK(t.dim() == 1 && t.size(0) == qs[0] && t.device() == q_device &&
                     is_integral(t.scalar_type(), /*include_bool=*/false),
                 op, ": kv_lens must be an integer (B=", qs[0], ",) tensor on ", device_str(q_device), ", got ",
                 shape(t), " ", t.scalar_type(), " on ", device_str(t.device()));
    // range-checked before the narrowing to int32 (one read-back), as on the CPU; compared in int64
    const Tensor lens64 = to_dtype(t, dtype::kLong);
    const Tensor ok = op::to_cpu(op::all(op::logical_and(op::ge(lens64, 0), op::le(lens64, ks[1]))));
    MMFUSE_CHECK(*ok.const_data_ptr<bool>(), op, ": kv_lens must lie in [0, ", ks[1], "]");
    in.kv_lens = mmfuse::contiguous(to_dtype(t, dtype::kInt));
  }
  if (key_padding_mask) {
    const Tensor& t = *key_padding_mask;
    MMFUSE_CHECK(t.scalar_type() == dtype::kBool && t.dim() == 2 && t.size(0) == ks[0] && t.size(1) == ks[1] &&
                     t.device() == q_device,
                 op, ": key_padding_mask must be a bool (B, Lk) = (", ks[0], ", ", ks[1], ") tensor on ",
                 device_str(q_device), ", got ", shape(t), " ", t.scalar_type());
    in.mask = mmfuse::contiguous(t);
    in.hidden = in.mask;
  }
  const bool has_bias = bias.defined(), has_ranges = ranges.defined();
  if ((has_bias || has_ranges) && ks[1] > 0) {
    const int64_t B = qs[0], Lq = qs[1], Lk = ks[1];
    const Tensor unseen = has_ranges ? padded_unseen_ranges(ranges, bias, in.kv_lens, B, Lq, Lk, causal)
                                     : padded_unseen(bias, in.kv_lens, B, Lq, Lk, causal);
    in.hidden = key_padding_mask ? op::logical_or(in.hidden, unseen) : unseen;
  }
  if (key_padding_mask || ((has_bias || has_ranges) && ks[1] > 0)) {
    // a hidden key never influences anything, whatever it holds: the tile products multiply every
    // key of a tile, and 0 · NaN would let a masked key's NaN or inf through (as on the CPU and Triton)
    const Tensor hidden = torch::stable::view(in.hidden, {ks[0], ks[1], 1, 1});
    in.k = op::masked_fill(in.k, hidden, 0);
    in.v = op::masked_fill(in.v, hidden, 0);
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
  p.kv_lens = in.kv_lens.defined() ? ptr<int32_t>(in.kv_lens) : nullptr;
  p.key_padding_mask = in.mask.defined() ? static_cast<const uint8_t*>(in.mask.data_ptr()) : nullptr;
  return p;
}

struct VarlenInputs {
  Tensor q, k, v, cu_q, cu_k;
  int64_t max_q, max_k;  // the longest real sequences: the grid's size (max_seqlen is only a bound)
  Tensor hidden;         // (total_k,) bool: keys no query sees through the bias and causal; or undefined
};

// The kernels index q/k/out through cu_seqlens and size their grid by max_seqlen, so a bad
// prefix sum would read or write out of bounds and a short max_seqlen would leave rows
// unwritten. Checked on the device like the CPU kernel checks them, read back in one sync.
// Returns the longest real query and key sequences, read back in the same sync.
std::pair<int64_t, int64_t> check_cu_seqlens(const char* op, const Tensor& cu_q, const Tensor& cu_k, int64_t rows_q,
                                             int64_t rows_k, int64_t max_q, int64_t max_k) {
  const DeviceGuard guard(cu_q.get_device_index());
  auto valid = [](const Tensor& cu, int64_t rows, int64_t max_len) {
    const Tensor c = to_dtype(cu, dtype::kLong);
    const Tensor steps = op::diff(c, 0);
    const Tensor ok = op::logical_and(
        op::logical_and(op::eq(torch::stable::select(c, 0, 0), 0),
                        op::eq(torch::stable::select(c, 0, -1), static_cast<double>(rows))),
        op::logical_and(op::all(op::ge(steps, 0)), op::all(op::le(steps, static_cast<double>(max_len)))));
    const Tensor longest = steps.numel() > 0 ? op::max(steps) : zeros_like_as(c, {});
    return op::stack({to_dtype(ok, dtype::kLong), longest});
  };
  const Tensor got = op::to_cpu(op::stack({valid(cu_q, rows_q, max_q), valid(cu_k, rows_k, max_k)}));
  const int64_t* g = got.const_data_ptr<int64_t>();
  MMFUSE_CHECK(g[0] != 0, op, ": cu_seqlens_q must start at 0, be non-decreasing with steps <= max_seqlen_q (", max_q,
               ") and end at q's ", rows_q, " rows");
  MMFUSE_CHECK(g[2] != 0, op, ": cu_seqlens_k must start at 0, be non-decreasing with steps <= max_seqlen_k (", max_k,
               ") and end at k's ", rows_k, " rows");
  return {g[1], g[3]};
}

VarlenInputs varlen_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                           const Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_qkv(op, q, k, v, 3);
  const Device q_device = q.device();
  for (const Tensor* cu : {&cu_q, &cu_k}) {
    MMFUSE_CHECK(cu->dim() == 1 && cu->size(0) >= 1 && cu->scalar_type() == dtype::kInt && cu->device() == q_device,
                 op, ": cu_seqlens must be int32 (B+1,) tensors on ", device_str(q_device), ", got ", shape(*cu), " ",
                 cu->scalar_type(), " on ", device_str(cu->device()));
  }
  MMFUSE_CHECK(cu_q.size(0) == cu_k.size(0), op, ": cu_seqlens_q and cu_seqlens_k must have one length");
  MMFUSE_CHECK(max_q >= 0 && max_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q, ", ", max_k);
  const auto [longest_q, longest_k] = check_cu_seqlens(op, cu_q, cu_k, q.size(0), k.size(0), max_q, max_k);
  return {dense(q), dense(k), dense(v), mmfuse::contiguous(cu_q), mmfuse::contiguous(cu_k), longest_q, longest_k, Tensor()};
}

// rows of `values` (n, W) summed per segment: out[b] = sum of values[i] with segment[i] == b, (segments, W) int64
// (at::index_add_ along dim 0, whose Scalar alpha the stable boxed call cannot pass)
Tensor segment_sum_rows(const Tensor& values, const Tensor& segment, int64_t segments, int64_t width) {
  const int64_t n = values.size(0);
  Tensor sums = zeros_like_as(segment, {segments, width}, dtype::kLong);
  const Tensor index = mmfuse::contiguous(op::expand(torch::stable::view(segment, {n, 1}), {n, width}));
  op::scatter_add_(sums, 0, index, to_dtype(values, dtype::kLong));
  return sums;
}

// Varlen keys no query sees through the bias (Hq or 1, total_q, W) and/or the key ranges (Hq or 1,
// total_q, 2) and the causal rule: the packed key rows of each sample, from the rows of its queries
// (one segment reduction; with ranges alone, a difference array per sample as on the padded path).
void hide_unseen_varlen(VarlenInputs& in, const Tensor& bias, const Tensor& ranges, bool causal) {
  const int64_t batch = in.cu_q.size(0) - 1, total_q = in.q.size(0), total_k = in.k.size(0);
  const bool has_bias = bias.defined();
  const int64_t W = has_bias ? bias.size(-1) : in.max_k;  // >= every sequence's keys
  if (total_k == 0) return;
  Tensor cu_q = to_dtype(in.cu_q, dtype::kLong), cu_k = to_dtype(in.cu_k, dtype::kLong);
  const Tensor lens_q = op::diff(cu_q, 0), lens_k = op::diff(cu_k, 0);
  const Tensor rows = op::arange(total_q, cu_q);
  const Tensor sample = op::searchsorted(torch::stable::narrow(cu_q, 0, 1, batch), rows, /*right=*/true);  // (total_q,)
  const Tensor j = torch::stable::view(op::arange(W, cu_q), {1, W});
  const Tensor klen = torch::stable::view(op::index_select(lens_k, 0, sample), {total_q, 1});
  // the last key each row may see by the causal rule, plus one: i + klen - qlen + 1
  const Tensor causal_end =
      causal ? op::add(op::sub(op::add(torch::stable::view(op::sub(rows, op::index_select(cu_q, 0, sample)), {total_q, 1}),
                                       klen),
                               torch::stable::view(op::index_select(lens_q, 0, sample), {total_q, 1})),
                       1.0)
             : Tensor();
  Tensor seen;  // (batch, W): some query row of sample b sees local key j
  if (ranges.defined()) {
    const Tensor r = to_dtype(ranges, dtype::kLong);  // (Hq or 1, total_q, 2)
    const Tensor kl = torch::stable::view(klen, {1, total_q});
    const Tensor lo = op::minimum(op::clamp_min(torch::stable::select(r, -1, 0), 0), kl);
    Tensor hi = op::minimum(torch::stable::select(r, -1, 1), kl);
    if (causal) hi = op::minimum(hi, torch::stable::view(causal_end, {1, total_q}));
    hi = op::maximum(hi, lo);
    if (has_bias) {
      const Tensor j3 = torch::stable::unsqueeze(j, 0);
      const Tensor open = op::any(op::logical_and(op::logical_and(op::ne(bias, kNegInf),
                                                                  op::ge(j3, torch::stable::unsqueeze(lo, -1))),
                                                  op::lt(j3, torch::stable::unsqueeze(hi, -1))),
                                  0);  // (total_q, W)
      seen = op::gt(segment_sum_rows(open, sample, batch, W), 0);
    } else {
      const Tensor base = torch::stable::view(op::mul(sample, static_cast<double>(W + 1)), {1, total_q});
      const Tensor ones = torch::stable::full({lo.numel()}, 1.0, dtype::kLong, std::nullopt, cu_q.device());
      Tensor diff = zeros_like_as(ones, {batch * (W + 1)});
      op::scatter_add_(diff, 0, torch::stable::flatten(op::add(base, lo)), ones);
      op::scatter_add_(diff, 0, torch::stable::flatten(op::add(base, hi)), op::neg(ones));
      Tensor per_sample = torch::stable::view(diff, {batch, W + 1});
      seen = op::gt(op::cumsum(torch::stable::narrow(per_sample, 1, 0, W), 1), 0);
    }
  } else {
    Tensor open = op::logical_and(op::any(op::ne(bias, kNegInf), 0), op::lt(j, klen));  // (total_q, W)
    if (causal) open = op::logical_and(open, op::lt(j, causal_end));
    seen = op::gt(segment_sum_rows(open, sample, batch, W), 0);
  }
  const Tensor krows = op::arange(total_k, cu_k);
  const Tensor ksample = op::searchsorted(torch::stable::narrow(cu_k, 0, 1, batch), krows, /*right=*/true);
  const Tensor local = op::sub(krows, op::index_select(cu_k, 0, ksample));
  // seen[ksample, local], through the flat index ksample * W + local
  const Tensor flat = op::add(op::mul(ksample, static_cast<double>(W)), local);
  in.hidden = op::logical_not(op::index_select(torch::stable::flatten(seen), 0, flat));
  const Tensor hidden = torch::stable::view(in.hidden, {total_k, 1, 1});
  in.k = op::masked_fill(in.k, hidden, 0);
  in.v = op::masked_fill(in.v, hidden, 0);
}

att::AttentionParams varlen_params(const VarlenInputs& in, double scale, bool causal) {
  att::AttentionParams p = base_params(in.q, in.k, in.v, scale, causal);
  const int64_t rows_q = in.q.size(0);
  p.batch = static_cast<int>(in.cu_q.size(0) - 1);
  p.len_q = in.max_q;
  p.len_k = in.max_k;
  p.lse_len = rows_q;
  p.q_rows = rows_q;
  p.cu_seqlens_q = ptr<int32_t>(in.cu_q);
  p.cu_seqlens_k = ptr<int32_t>(in.cu_k);
  return p;
}

void check_grid(const char* op, const att::AttentionParams& p) {
  MMFUSE_CHECK(p.batch <= 65535 && p.heads_q <= 65535, op, ": the CUDA kernel takes at most 65535 samples and heads, got ",
               p.batch, " and ", p.heads_q);
}

// A kernel's dynamic shared memory against what this GPU gives one block (sizes per head-dim pair
// in cross_attention_kernel.cuh: dQ at (128, 128) needs 104,576 bytes, over the 99 KiB of
// sm_86/sm_89/sm_120 parts; sm_80: 163 KiB, sm_90: 227 KiB). fp16 and bf16 tiles have one size,
// so __half sizes both.
void check_shared_memory(const char* op, const att::AttentionParams& p, int device,
                         cudaError_t (*config)(const att::AttentionParams&, att::KernelLaunch*), const char* kernel) {
  att::KernelLaunch l{};
  MMFUSE_CUDA_CHECK(config(p, &l));
  int limit = 0;
  MMFUSE_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  MMFUSE_CHECK(l.shared_bytes <= static_cast<size_t>(limit), op, ": the CUDA ", kernel, " kernel at head dims (",
               p.head_dim, ", ", p.head_dim_v, ") needs ", l.shared_bytes,
               " bytes of shared memory per block, this GPU allows ", limit, "; use backend='triton'");
}

// out (q's rows, Hq, Dv) and lse; decode shapes (<= 8 queries, too few CTAs for the GPU) run the
// split-KV schedule with float32 partial buffers and the merge kernel.
std::tuple<Tensor, Tensor> run_forward(const char* op, att::AttentionParams p, const Tensor& q, const Tensor& v,
                                       IntArrayRef lse_shape) {
  const int32_t device = q.get_device_index();
  check_grid(op, p);
  check_shared_memory(op, p, device, att::forward_launch<__half>, "forward");
  std::vector<int64_t> out_shape = sizes_of(q);
  out_shape.back() = v.size(-1);
  Tensor out = empty_like_as(q, out_shape);
  Tensor lse = empty_like_as(q, lse_shape, dtype::kFloat);
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  int sms = 0;
  MMFUSE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  p.splits = att::decode_splits(p, sms);
  Tensor out_partial, lse_partial;
  if (p.splits > 1) {
    out_partial = empty_like_as(q, {p.splits, p.q_rows, p.heads_q, p.head_dim_v}, dtype::kFloat);
    lse_partial = empty_like_as(q, {p.splits, p.q_rows * p.heads_q}, dtype::kFloat);
    p.out_partial = ptr<float>(out_partial);
    p.lse_partial = ptr<float>(lse_partial);
  }
  p.out = out.data_ptr();
  p.lse = ptr<float>(lse);
  const DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  if (q.scalar_type() == dtype::kHalf) {
    MMFUSE_CUDA_CHECK(att::launch_forward<__half>(p, stream));
  } else {
    MMFUSE_CUDA_CHECK(att::launch_forward<__nv_bfloat16>(p, stream));
  }
  return {out, lse};
}

// dmask for mask_grad (float32 zeros, each element written by at most one CTA, the rest stay 0):
// padded (B, Hq, Lq, Lk), varlen (Hq, total_q, W); torch.empty(0) (float32) without it.
Tensor add_dmask(const char* op, att::AttentionParams& p, bool mask_grad, const Tensor& bias, const Tensor& q,
                 bool varlen) {
  if (!mask_grad) return empty_like_as(q, {0}, dtype::kFloat);
  MMFUSE_CHECK(bias.defined(), op, ": mask_grad needs attn_mask (the gradient is the mask's), got none");
  const int64_t width = bias.size(-1);
  const int64_t rows = varlen ? q.size(0) : q.size(1);
  Tensor dmask = varlen ? zeros_like_as(q, {p.heads_q, rows, width}, dtype::kFloat)
                        : zeros_like_as(q, {p.batch, p.heads_q, rows, width}, dtype::kFloat);
  p.dbias = ptr<float>(dmask);
  p.dbias_row_stride = width;
  p.dbias_head_stride = rows * width;
  p.dbias_batch_stride = varlen ? 0 : p.heads_q * rows * width;
  return dmask;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> run_backward(const char* op, att::AttentionParams p, const Tensor& grad_out,
                                                        const std::optional<Tensor>& grad_lse, const Tensor& q,
                                                        const Tensor& k, const Tensor& v, const Tensor& out,
                                                        const Tensor& lse, IntArrayRef lse_shape, Tensor dmask,
                                                        const Tensor& hidden) {
  const int32_t device = q.get_device_index();
  check_grid(op, p);
  check_shared_memory(op, p, device, att::dq_launch<__half>, "dQ");
  check_shared_memory(op, p, device, att::dkdv_launch<__half>, "dK/dV");
  std::vector<int64_t> out_shape = sizes_of(q);
  out_shape.back() = v.size(-1);
  const ScalarType type = q.scalar_type();
  const Device q_device = q.device();
  for (const Tensor* t : {&grad_out, &out}) {
    MMFUSE_CHECK(t->sizes().equals(out_shape) && t->scalar_type() == type && t->device() == q_device, op,
                 ": grad_out and out must have shape ", shape_str(out_shape), " (q's, with v's head dim) and ",
                 "dtype ", type, ", got ", shape(*t), " ", t->scalar_type());
  }
  const Tensor g = dense(grad_out), o = dense(out), l = float_like(op, "lse", lse, lse_shape, q);
  const Tensor dl = grad_lse ? float_like(op, "grad_lse", *grad_lse, lse_shape, q) : Tensor();
  Tensor dq = torch::stable::empty_like(q), dk = torch::stable::empty_like(k), dv = torch::stable::empty_like(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv, dmask};
  Tensor delta = torch::stable::empty_like(l);
  p.out = o.data_ptr();
  p.lse = ptr<float>(l);
  p.dout = g.data_ptr();
  p.dlse = grad_lse ? ptr<float>(dl) : nullptr;
  p.delta = ptr<float>(delta);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  const DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  if (type == dtype::kHalf) {
    MMFUSE_CUDA_CHECK(att::launch_backward<__half>(p, stream));
  } else {
    MMFUSE_CUDA_CHECK(att::launch_backward<__nv_bfloat16>(p, stream));
  }
  if (hidden.defined()) {
    // hidden keys' gradients are exactly 0, also when a NaN query row reached them through dSᵀ Q
    const Tensor h = k.dim() == 4 ? torch::stable::view(hidden, {k.size(0), k.size(1), 1, 1})
                                  : torch::stable::view(hidden, {k.size(0), 1, 1});
    op::masked_fill_(dk, h, 0);
    op::masked_fill_(dv, h, 0);
  }
  return {dq, dk, dv, dmask};
}

std::tuple<Tensor, Tensor> cross_attention_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& kv_lens,
    const std::optional<Tensor>& key_padding_mask, double scale, bool causal, const std::optional<Tensor>& attn_mask,
    double dropout_p, const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges) {
  const char* op = "cross_attention_fwd";
  check_qkv(op, q, k, v, 4);
  const Variants x = variants(op, q, k, false, 0, attn_mask, dropout_p, philox, softcap, sinks);
  const Tensor ranges = key_ranges_of(op, key_ranges, q, false);
  const PaddedInputs in = padded_inputs(op, q, k, v, kv_lens, key_padding_mask, x.bias, ranges, causal);
  att::AttentionParams p = padded_params(in, scale, causal);
  add_variants(p, x, false);
  add_ranges(p, ranges, false);
  return run_forward(op, p, in.q, in.v, {q.size(0), q.size(2), q.size(1)});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_attention_bwd_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const std::optional<Tensor>& kv_lens,
    const std::optional<Tensor>& key_padding_mask, double scale, bool causal, const std::optional<Tensor>& attn_mask,
    double dropout_p, const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges, bool mask_grad) {
  const char* op = "cross_attention_bwd";
  check_qkv(op, q, k, v, 4);
  const Variants x = variants(op, q, k, false, 0, attn_mask, dropout_p, philox, softcap, sinks);
  const Tensor ranges = key_ranges_of(op, key_ranges, q, false);
  const PaddedInputs in = padded_inputs(op, q, k, v, kv_lens, key_padding_mask, x.bias, ranges, causal);
  att::AttentionParams p = padded_params(in, scale, causal);
  add_variants(p, x, false);
  add_ranges(p, ranges, false);
  p.sinks = nullptr;  // the returned lse already includes them
  Tensor dmask = add_dmask(op, p, mask_grad, x.bias, q, false);
  return run_backward(op, p, grad_out, grad_lse, in.q, in.k, in.v, out, lse, {q.size(0), q.size(2), q.size(1)}, dmask,
                      in.hidden);
}

std::tuple<Tensor, Tensor> cross_attention_varlen_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal, const std::optional<Tensor>& attn_mask,
    double dropout_p, const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges) {
  const char* op = "cross_attention_varlen_fwd";
  VarlenInputs in = varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Variants x = variants(op, q, k, true, in.max_k, attn_mask, dropout_p, philox, softcap, sinks);
  const Tensor ranges = key_ranges_of(op, key_ranges, q, true);
  if (attn_mask || key_ranges) hide_unseen_varlen(in, x.bias, ranges, causal);
  att::AttentionParams p = varlen_params(in, scale, causal);
  add_variants(p, x, true);
  add_ranges(p, ranges, true);
  return run_forward(op, p, in.q, in.v, {q.size(1), q.size(0)});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_attention_varlen_bwd_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, bool causal, const std::optional<Tensor>& attn_mask, double dropout_p,
    const std::optional<Tensor>& philox, double softcap, const std::optional<Tensor>& sinks,
    const std::optional<Tensor>& key_ranges, bool mask_grad) {
  const char* op = "cross_attention_varlen_bwd";
  VarlenInputs in = varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Variants x = variants(op, q, k, true, in.max_k, attn_mask, dropout_p, philox, softcap, sinks);
  const Tensor ranges = key_ranges_of(op, key_ranges, q, true);
  if (attn_mask || key_ranges) hide_unseen_varlen(in, x.bias, ranges, causal);
  att::AttentionParams p = varlen_params(in, scale, causal);
  add_variants(p, x, true);
  add_ranges(p, ranges, true);
  p.sinks = nullptr;  // the returned lse already includes them
  Tensor dmask = add_dmask(op, p, mask_grad, x.bias, q, true);
  return run_backward(op, p, grad_out, grad_lse, in.q, in.k, in.v, out, lse, {q.size(1), q.size(0)}, dmask,
                      in.hidden);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("cross_attention_fwd", MMFUSE_BOX(&cross_attention_fwd_cuda));
  m.impl("cross_attention_bwd", MMFUSE_BOX(&cross_attention_bwd_cuda));
  m.impl("cross_attention_varlen_fwd", MMFUSE_BOX(&cross_attention_varlen_fwd_cuda));
  m.impl("cross_attention_varlen_bwd", MMFUSE_BOX(&cross_attention_varlen_bwd_cuda));
}

}  // namespace mmfuse
