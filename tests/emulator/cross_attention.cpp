// Harness for csrc/cuda/cross_attention_kernel.cuh: launches the forward and the three backward
// kernels the way the launcher (csrc/cuda/cross_attention.cu) does, with the same launch shapes,
// on the host emulator (g++) or a GPU (nvcc). Used by tests/test_cross_attention_emulator.py.
#include "harness.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "cuda/cross_attention_kernel.cuh"

namespace {

namespace att = mmfuse::cuda::attention;

// Sizes as the launcher fills them: padded when cu_seqlens_q is null (len_q/len_k = Lq/Lk,
// lse_len = Lq), varlen otherwise (len_q/len_k = the longest sequences, lse_len = total_q); then
// the issue-26 variants (attn bias and its gradient with their strides, dropout from philox,
// softcap, sinks, the value head dim, and the decode splits with their float32 partial buffers);
// then issue #28's key_ranges with their batch and head strides (int32 elements).
att::AttentionParams params(const void* q, const void* k, const void* v, void* out, float* lse,
                            const int32_t* cu_seqlens_q, const int32_t* cu_seqlens_k, const int32_t* kv_lens,
                            const uint8_t* key_padding_mask, int64_t len_q, int64_t len_k, int64_t lse_len,
                            int64_t q_rows, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t head_dim,
                            double scale, int64_t causal, const float* attn_bias, int64_t bias_b, int64_t bias_h,
                            int64_t bias_r, float* dbias, int64_t dbias_b, int64_t dbias_h, int64_t dbias_r,
                            const int64_t* philox, double dropout_p, double softcap, const float* sinks,
                            int64_t head_dim_v, int64_t splits, float* out_partial, float* lse_partial,
                            const int32_t* key_ranges, int64_t ranges_b, int64_t ranges_h) {
  att::AttentionParams p{};
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse;
  p.cu_seqlens_q = cu_seqlens_q, p.cu_seqlens_k = cu_seqlens_k;
  p.kv_lens = kv_lens, p.key_padding_mask = key_padding_mask;
  p.len_q = len_q, p.len_k = len_k, p.lse_len = lse_len, p.q_rows = q_rows;
  p.batch = static_cast<int>(batch), p.heads_q = static_cast<int>(heads_q), p.heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.head_dim_v = static_cast<int>(head_dim_v);
  p.scale = static_cast<float>(scale);
  p.causal = causal != 0;
  p.attn_bias = attn_bias, p.bias_batch_stride = bias_b, p.bias_head_stride = bias_h, p.bias_row_stride = bias_r;
  p.dbias = dbias, p.dbias_batch_stride = dbias_b, p.dbias_head_stride = dbias_h, p.dbias_row_stride = dbias_r;
  p.dropout = dropout_p > 0.0;
  p.philox = p.dropout ? philox : nullptr;
  p.keep_threshold = static_cast<uint32_t>(std::floor(dropout_p * 4294967296.0));
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.softcap = static_cast<float>(softcap);
  p.sinks = sinks;
  p.splits = static_cast<int>(splits);
  p.out_partial = out_partial, p.lse_partial = lse_partial;
  p.key_ranges = key_ranges, p.ranges_batch_stride = ranges_b, p.ranges_head_stride = ranges_h;
  return p;
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": invalid attention parameters");
}

// harness::launch, opting in to more than 48 KiB of dynamic shared memory on the GPU as the launcher does.
void launch(void (*kernel)(att::AttentionParams), const att::KernelLaunch& l, const att::AttentionParams& p) {
  if (att::launches_nothing(l)) return;
  if (kernel == nullptr) throw std::runtime_error("no kernel for these head dims: invalid attention parameters");
#ifdef __CUDACC__
  if (l.shared_bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.shared_bytes));
  }
#endif
  harness::launch(kernel, l.grid, l.block, l.shared_bytes, p);
}

template <typename T>
void forward(const att::AttentionParams& p) {
  att::KernelLaunch l{};
  check(att::forward_launch<T>(p, &l), "forward_launch");
  launch(att::pair_kernels<T>(p.head_dim, p.head_dim_v).forward, l, p);
  if (p.splits > 1) {
    check(att::merge_launch(p, &l), "merge_launch");
    launch(att::attention_split_merge_kernel<T>, l, p);
  }
}

template <typename T>
void backward(const att::AttentionParams& p) {
  att::KernelLaunch l{};
  check(att::delta_launch(p, &l), "delta_launch");
  launch(att::attention_backward_delta_kernel<T>, l, p);
  check(att::dkdv_launch<T>(p, &l), "dkdv_launch");
  launch(att::pair_kernels<T>(p.head_dim, p.head_dim_v).dkdv, l, p);
  check(att::dq_launch<T>(p, &l), "dq_launch");
  launch(att::pair_kernels<T>(p.head_dim, p.head_dim_v).dq, l, p);
}

}  // namespace

#define ATTENTION_SIZES                                                                                    \
  const int32_t *cu_seqlens_q, const int32_t *cu_seqlens_k, const int32_t *kv_lens, const uint8_t *mask, \
      int64_t len_q, int64_t len_k, int64_t lse_len, int64_t q_rows, int64_t batch, int64_t heads_q,      \
      int64_t heads_kv, int64_t head_dim, double scale, int64_t causal, const float *attn_bias, int64_t bias_b, \
      int64_t bias_h, int64_t bias_r, float *dbias, int64_t dbias_b, int64_t dbias_h, int64_t dbias_r,       \
      const int64_t *philox, double dropout_p, double softcap, const float *sinks, int64_t head_dim_v,       \
      int64_t splits, float *out_partial, float *lse_partial, const int32_t *key_ranges, int64_t ranges_b,     \
      int64_t ranges_h
#define ATTENTION_SIZE_ARGS                                                                                  \
  cu_seqlens_q, cu_seqlens_k, kv_lens, mask, len_q, len_k, lse_len, q_rows, batch, heads_q, heads_kv, head_dim,  \
      scale, causal, attn_bias, bias_b, bias_h, bias_r, dbias, dbias_b, dbias_h, dbias_r, philox, dropout_p,  \
      softcap, sinks, head_dim_v, splits, out_partial, lse_partial, key_ranges, ranges_b, ranges_h

// q, k, v, out: the tensors; lse (lse's shape) float32.
#define ATTENTION_FORWARD_ENTRY(name, T)                                                                  \
  extern "C" int name(const void* q, const void* k, const void* v, void* out, float* lse, ATTENTION_SIZES) { \
    return harness::run([&] { forward<T>(params(q, k, v, out, lse, ATTENTION_SIZE_ARGS)); });              \
  }
// dlse may be null; delta: float32 scratch of lse's shape; dq, dk, dv: q's, k's, v's shapes.
#define ATTENTION_BACKWARD_ENTRY(name, T)                                                                    \
  extern "C" int name(const void* dout, const float* dlse, const void* q, const void* k, const void* v,       \
                      const void* out, const float* lse, float* delta, void* dq, void* dk, void* dv,          \
                      ATTENTION_SIZES) {                                                                      \
    return harness::run([&] {                                                                                 \
      att::AttentionParams p = params(q, k, v, const_cast<void*>(out), const_cast<float*>(lse), ATTENTION_SIZE_ARGS); \
      p.dout = dout, p.dlse = dlse, p.delta = delta, p.dq = dq, p.dk = dk, p.dv = dv;                         \
      backward<T>(p);                                                                                         \
    });                                                                                                       \
  }
ATTENTION_FORWARD_ENTRY(attention_forward_float16, __half)
ATTENTION_FORWARD_ENTRY(attention_forward_bfloat16, __nv_bfloat16)
ATTENTION_BACKWARD_ENTRY(attention_backward_float16, __half)
ATTENTION_BACKWARD_ENTRY(attention_backward_bfloat16, __nv_bfloat16)
#undef ATTENTION_FORWARD_ENTRY
#undef ATTENTION_BACKWARD_ENTRY
#undef ATTENTION_SIZES
#undef ATTENTION_SIZE_ARGS

// splits[0] = att::decode_splits for these sizes on a GPU of sm_count SMs (the launcher's choice).
extern "C" int attention_decode_splits(int64_t* splits, int64_t len_q, int64_t len_k, int64_t batch, int64_t heads_q,
                                       int64_t sm_count) {
  att::AttentionParams p{};
  p.len_q = len_q, p.len_k = len_k, p.batch = static_cast<int>(batch), p.heads_q = static_cast<int>(heads_q);
  splits[0] = att::decode_splits(p, static_cast<int>(sm_count));
  return 0;
}
