// CUDA launchers for mmfuse::cross_attention_{fwd,bwd} and cross_attention_varlen_{fwd,bwd}:
// validation, output allocation and the launches of csrc/cuda/cross_attention_kernel.cuh
// (FlashAttention-2 forward and backward on sm_80+ tensor cores). The kernels take float16 and
// bfloat16 with head dim 64 or 128; mmfuse/ops/attention.py routes every other case elsewhere
// and names the reason when backend="cuda" is asked for.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <utility>

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
  TORCH_CHECK(att::head_dims_supported(static_cast<int>(q.size(-1)), static_cast<int>(q.size(-1))), op,
              ": the CUDA kernel takes head dim 64 or 128, got ", q.size(-1));
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(-1) == q.size(-1) && k.size(-2) > 0 && q.size(-2) % k.size(-2) == 0,
              op, ": k and v must have one shape, q's head dim, and a head count dividing q's; got q ", q.sizes(),
              " k ", k.sizes(), " v ", v.sizes());
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
  return p;
}

// The CUDA kernel has no in-kernel attention mask and no dropout (yet); mmfuse/ops/attention.py
// routes such calls to Triton or the reference and names the reason when backend="cuda" is asked for.
void refuse_mask_and_dropout(const char* op, const std::optional<at::Tensor>& attn_mask, double dropout_p) {
  TORCH_CHECK(!attn_mask.has_value(), op, ": the CUDA kernel takes no attn_mask (use kv_lens, key_padding_mask, causal, "
              "or the Triton/reference backends)");
  TORCH_CHECK(dropout_p == 0.0, op, ": the CUDA kernel has no attention dropout, got dropout_p=", dropout_p,
              " (use the Triton or reference backends)");
}

struct PaddedInputs {
  at::Tensor q, k, v, kv_lens, mask;  // kv_lens int32, mask bool; undefined when not given
};

PaddedInputs padded_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& kv_lens, const std::optional<at::Tensor>& key_padding_mask) {
  check_qkv(op, q, k, v, 4);
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k must have q's batch size ", q.size(0), ", got ", k.sizes());
  PaddedInputs in{dense(q), dense(k), dense(v), {}, {}};
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
    // a hidden key never influences anything, whatever it holds: the tile products multiply every
    // key of a tile, and 0 · NaN would let a masked key's NaN or inf through (as on the CPU and Triton)
    const at::Tensor hidden = in.mask.view({k.size(0), k.size(1), 1, 1});
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
  return {dense(q), dense(k), dense(v), cu_q.contiguous(), cu_k.contiguous(), longest_q, longest_k};
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

// A kernel's dynamic shared memory against what this GPU gives one block: dQ at head dim 128
// needs 104,576 bytes, over the 99 KiB of sm_86/sm_89/sm_120 parts (sm_80: 163 KiB, sm_90:
// 227 KiB). fp16 and bf16 tiles have one size, so __half sizes both.
void check_shared_memory(const char* op, const att::AttentionParams& p, int device,
                         cudaError_t (*config)(const att::AttentionParams&, att::KernelLaunch*), const char* kernel) {
  att::KernelLaunch l{};
  C10_CUDA_CHECK(config(p, &l));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(l.shared_bytes <= static_cast<size_t>(limit), op, ": the CUDA ", kernel, " kernel at head dim ",
              p.head_dim, " needs ", l.shared_bytes, " bytes of shared memory per block, this GPU allows ", limit,
              "; use backend='triton'");
}

std::tuple<at::Tensor, at::Tensor> run_forward(const char* op, att::AttentionParams p, const at::Tensor& q,
                                               at::IntArrayRef lse_shape) {
  check_grid(op, p);
  check_shared_memory(op, p, q.get_device(), att::forward_launch<__half>, "forward");
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty(lse_shape, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const char* op, att::AttentionParams p,
                                                            const at::Tensor& grad_out,
                                                            const std::optional<at::Tensor>& grad_lse,
                                                            const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& out,
                                                            const at::Tensor& lse, at::IntArrayRef lse_shape) {
  check_grid(op, p);
  check_shared_memory(op, p, q.get_device(), att::dq_launch<__half>, "dQ");
  check_shared_memory(op, p, q.get_device(), att::dkdv_launch<__half>, "dK/dV");
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device() == q.device(), op,
                ": grad_out and out must have q's shape ", q.sizes(), " and dtype ", q.scalar_type(), ", got ",
                t->sizes(), " ", t->scalar_type());
  }
  const at::Tensor g = dense(grad_out), o = dense(out), l = float_like(op, "lse", lse, lse_shape, q);
  const at::Tensor dl = grad_lse ? float_like(op, "grad_lse", *grad_lse, lse_shape, q) : at::Tensor();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
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
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> cross_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const std::optional<at::Tensor>& kv_lens,
                                                            const std::optional<at::Tensor>& key_padding_mask,
                                                            double scale, bool causal,
                                                            const std::optional<at::Tensor>& attn_mask,
                                                            double dropout_p, const std::optional<at::Tensor>& philox) {
  const char* op = "cross_attention_fwd";
  refuse_mask_and_dropout(op, attn_mask, dropout_p);
  const PaddedInputs in = padded_inputs(op, q, k, v, kv_lens, key_padding_mask);
  return run_forward(op, padded_params(in, scale, causal), in.q, {q.size(0), q.size(2), q.size(1)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& kv_lens,
    const std::optional<at::Tensor>& key_padding_mask, double scale, bool causal,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, const std::optional<at::Tensor>& philox) {
  const char* op = "cross_attention_bwd";
  refuse_mask_and_dropout(op, attn_mask, dropout_p);
  const PaddedInputs in = padded_inputs(op, q, k, v, kv_lens, key_padding_mask);
  return run_backward(op, padded_params(in, scale, causal), grad_out, grad_lse, in.q, in.k, in.v, out, lse,
                      {q.size(0), q.size(2), q.size(1)});
}

std::tuple<at::Tensor, at::Tensor> cross_attention_varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                   const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                                   const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                                   int64_t max_seqlen_k, double scale, bool causal) {
  const char* op = "cross_attention_varlen_fwd";
  const VarlenInputs in = varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return run_forward(op, varlen_params(in, scale, causal), in.q, {q.size(1), q.size(0)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal) {
  const char* op = "cross_attention_varlen_bwd";
  const VarlenInputs in = varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  return run_backward(op, varlen_params(in, scale, causal), grad_out, grad_lse, in.q,
                      in.k, in.v, out, lse, {q.size(1), q.size(0)});
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("cross_attention_fwd", &cross_attention_fwd_cuda);
  m.impl("cross_attention_bwd", &cross_attention_bwd_cuda);
  m.impl("cross_attention_varlen_fwd", &cross_attention_varlen_fwd_cuda);
  m.impl("cross_attention_varlen_bwd", &cross_attention_varlen_bwd_cuda);
}

}  // namespace mmfuse
