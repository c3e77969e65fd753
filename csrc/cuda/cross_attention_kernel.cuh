// CUDA kernel bodies for mmfuse::cross_attention_{fwd,bwd} and their varlen forms, fp16/bf16 on
// sm_80+ tensor cores (mma.sync m16n8k16, ldmatrix, cp.async: csrc/cuda/mma.cuh). CUDA headers
// only (no torch), so nvcc compile-checks it without a CUDA torch and the host emulator runs it.
//
// The algorithm is FlashAttention-2's (Dao 2023, "FlashAttention-2: Faster Attention with Better
// Parallelism and Work Partitioning"), written for this project:
//
// Forward: one CTA of 4 warps per (64-query tile, q head, sample). The Q tile is loaded once;
//   K/V tiles of 64 keys are double-buffered in shared memory with cp.async. Each warp owns 16
//   query rows: S = Q Kᵀ by ldmatrix + mma into fp32 registers, the online softmax in registers
//   (row max / row sum over the 4 lanes of a quad that share a row of the C fragment), P rounded
//   to fp16/bf16 in registers and reused as the A operand of P V (V by ldmatrix.trans), fp32
//   output accumulators rescaled once at the end. Scores are kept in log2 units (scale·log2 e)
//   so the exponentials are exp2.
// Backward: a delta kernel, delta = rowsum(dO ∘ O) − dlse (0 on rows without a visible key);
//   a dK/dV kernel, one CTA per (64-key tile, kv head, sample) looping over the q heads of the
//   GQA group and 32-query tiles, P recomputed from lse, dV += Pᵀ dO and dK += dSᵀ Q in fp32
//   registers; a dQ kernel, one CTA per (64-query tile, q head, sample) looping over key
//   tiles, dQ += dS K. Every output element has one owner CTA: deterministic, no atomics.
//   All five products per tile are mma's; dS and P are rounded to fp16/bf16 as their A operand.
// Decode (split-KV, FlashDecoding: Dao, Haziza, Massa, Sizov 2023, "Flash-Decoding for
//   long-context inference"): for short query tiles against long keys the forward grid gains a
//   split dimension, each CTA covers a range of key tiles and writes a float32 partial (out, lse);
//   a merge kernel combines the splits of a row by their log-sum-exp (and adds the sink).
//
// Score variants (issue #26), per element of S in the forward and both backward kernels:
//   s = scale q·k; softcap > 0: s = softcap tanh(s / softcap) (Gemma 2); + attn bias (float32,
//   read from global memory per tile element, only where the key is otherwise visible: -inf hides
//   it whatever q·k gave); softmax; dropout by the Philox4x32-10 stream of
//   mmfuse/contract/attention.py (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
//   SC 2011), regenerated in every kernel, never stored; row sums and lse use undropped P.
//   Sinks (gpt-oss) join the forward's denominator in the epilogue only: the returned lse
//   includes them, so the backward's P = exp(s - lse) needs no sink term.
//   Backward: dS = P ∘ (dP ∘ Z − delta) (Z the dropout keep/(1-p)), written as the bias
//   gradient (dmask) by the dK/dV kernel, then times 1 − tanh² (softcap) for dQ and dK.
//   v / out / dO / dv have their own head dim Dv (kHeadDimV).
//
// Semantics are the CPU kernel's (csrc/cpu/cross_attention.cpp): layout (B, L, H, D) or packed
// (total, H, D) with int32 cu_seqlens; query head h reads kv head h / (Hq / Hkv); key j is
// visible to query i iff j < kv_len, the key padding mask does not hide it, and (causal)
// j <= i + kv_len − q_len, the attn bias is not -inf there, and (key_ranges, issue #28) j lies in
// query i's [start, end) for its head; rows with no visible key give out 0, lse −inf (the sink
// with sinks) and zero gradients. Keys at or past kv_len are never read.
//
// Key ranges skip work, not only mask it (the block skipping FlashAttention-2 does for causal
// masks, Dao 2023): a forward / dQ CTA loads only the key tiles between the smallest start and the
// largest end of its rows' windows (range within the causal and kv_len bounds), a dK/dV CTA only
// the (q head, query tile) steps of which some query sees one of its keys. Elements of a loaded
// tile outside their query's range are hidden after the other masks (skipped by a lane whose rows'
// ranges cover the tile). Without key_ranges the only cost is a null test per tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mma.cuh"
#include "shared_memory.cuh"

namespace mmfuse {
namespace cuda {
namespace attention {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;  // query rows per forward / dQ CTA: 16 per warp
constexpr int kBlockN = 64;           // keys per K/V tile (and per dK/dV CTA: 16 per warp)
constexpr int kBlockMBwd = 32;        // query rows per step of the dK/dV kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a launch needs, pointers to contiguous tensors. Padded: q (B, Lq, Hq, D),
// k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv), lse (B, Hq, Lq). Varlen: q (total_q, Hq, D),
// k (total_k, Hkv, D), v (total_k, Hkv, Dv), lse (Hq, total_q), sample b's rows
// cu_seqlens[b] .. cu_seqlens[b + 1].
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;               // forward output, backward input O: (.., Hq, Dv)
  float* lse;              // forward output, backward input
  const void* dout;        // backward: dO, out's shape
  const float* dlse;       // backward: lse's shape, or null
  float* delta;            // backward scratch: lse's shape
  void* dq;                // backward outputs, q's / k's / v's shapes
  void* dk;
  void* dv;
  const int32_t* cu_seqlens_q;      // (B + 1), varlen only (else null)
  const int32_t* cu_seqlens_k;      // (B + 1), varlen only
  const int32_t* kv_lens;           // (B), padded, optional
  const uint8_t* key_padding_mask;  // (B, Lk) bool bytes, padded, optional; nonzero = hidden
  // additive float32 bias, optional. Padded: element (b, h, i, j) at b * bias_batch_stride +
  // h * bias_head_stride + i * bias_row_stride + j ((B or 1, Hq or 1, Lq, Lk), stride 0 where
  // broadcast). Varlen: (Hq or 1, total_q, W), packed query row r, local key j at
  // h * bias_head_stride + r * bias_row_stride + j (bias_batch_stride unused).
  const float* attn_bias;
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride;
  // backward: dS (the bias gradient), float32, optional, zero-filled by the caller; strides as
  // for attn_bias, but never broadcast: (B, Hq, Lq, Lk) or (Hq, total_q, W)
  float* dbias;
  int64_t dbias_batch_stride, dbias_head_stride, dbias_row_stride;
  const int64_t* philox;            // dropout: (seed, offset) int64 in device memory, or null
  uint32_t keep_threshold;          // keep iff the element's word >= floor(dropout_p 2^32)
  float dropout_scale;              // 1 / (1 - dropout_p)
  bool dropout;                     // dropout_p > 0
  float softcap;                    // 0: off
  const float* sinks;               // (Hq,) float32, forward only, or null
  // key_ranges (issue #28), int32 [start, end) pairs, optional: query i of a sample sees only its
  // keys start <= j < end (besides the masks above). Padded (B, Hq or 1, Lq, 2): the pair of
  // (b, h, i) at b * ranges_batch_stride + h * ranges_head_stride + 2 i; varlen (Hq or 1,
  // total_q, 2): packed row r of head h at h * ranges_head_stride + 2 r (ranges_batch_stride
  // unused). ranges_head_stride 0: one range per query for every head. Bounds outside
  // [0, the sample's keys] are harmless (keys past kv_len stay hidden, nothing is read for them).
  const int32_t* key_ranges;
  int64_t ranges_batch_stride, ranges_head_stride;
  // decode split-KV forward: splits > 1 writes partial results (out_partial (splits, q_rows,
  // Hq, Dv) float32, lse_partial (splits, Hq, lse rows)) that the merge kernel combines
  int splits;
  float* out_partial;
  float* lse_partial;
  int64_t len_q;                    // padded Lq; varlen: the longest query sequence (the grid's extent)
  int64_t len_k;                    // padded Lk; varlen: the longest key sequence
  int64_t lse_len;                  // lse's last dimension: Lq, or total_q (varlen)
  int64_t q_rows;                   // rows of q: B * Lq, or total_q
  int batch;
  int heads_q;
  int heads_kv;
  int head_dim;                     // of q and k
  int head_dim_v;                   // of v, out, dO, dv
  float scale;
  bool causal;
};

// int64_t is long here and long long elsewhere: one spelling for both nvcc and the emulator.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a < b ? b : a; }

// One sample's rows and lengths.
struct Sample {
  int64_t q_row, q_len;  // first q/out row and query count
  int64_t k_row, k_len;  // first k/v row and visible-key bound (kv_lens[b], or the sequence length)
  int64_t k_extent;      // k/v rows of the sample whose gradients this sample's CTAs write
  int64_t lse_base;      // lse index of (head 0, query 0); head h adds h * lse_len
  const uint8_t* mask;   // the sample's (Lk,) key padding mask row, or null
  const float* bias;     // the sample's attn bias at (head 0, query 0, key 0), or null
  float* dbias;          // the sample's dS at (head 0, query 0, key 0), or null
  const int32_t* ranges;  // the sample's key range pair of (head 0, query 0), or null
};

__device__ __forceinline__ Sample sample_of(const AttentionParams& p, int b) {
  Sample s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_row = p.cu_seqlens_q[b];
    s.q_len = max64(0, p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]);
    s.k_row = p.cu_seqlens_k[b];
    s.k_len = max64(0, p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]);
    s.k_extent = s.k_len;
    s.lse_base = s.q_row;
    s.mask = nullptr;
    s.bias = p.attn_bias != nullptr ? p.attn_bias + s.q_row * p.bias_row_stride : nullptr;
    s.dbias = p.dbias != nullptr ? p.dbias + s.q_row * p.dbias_row_stride : nullptr;
    s.ranges = p.key_ranges != nullptr ? p.key_ranges + 2 * s.q_row : nullptr;
  } else {
    s.q_row = b * p.len_q;
    s.q_len = p.len_q;
    s.k_row = b * p.len_k;
    // clamped so that a bad length can never address past the sample's keys
    s.k_len = p.kv_lens != nullptr ? min64(max64(static_cast<int64_t>(p.kv_lens[b]), int64_t(0)), p.len_k) : p.len_k;
    s.k_extent = p.len_k;
    s.lse_base = static_cast<int64_t>(b) * p.heads_q * p.len_q;
    s.mask = p.key_padding_mask != nullptr ? p.key_padding_mask + b * p.len_k : nullptr;
    s.bias = p.attn_bias != nullptr ? p.attn_bias + b * p.bias_batch_stride : nullptr;
    s.dbias = p.dbias != nullptr ? p.dbias + b * p.dbias_batch_stride : nullptr;
    s.ranges = p.key_ranges != nullptr ? p.key_ranges + b * p.ranges_batch_stride : nullptr;
  }
  return s;
}

// Keys [0, end) that queries below `query_end` can see: the key loop's bound (bottom-right causal).
__device__ __forceinline__ int64_t key_end(const Sample& s, bool causal, int64_t query_end) {
  if (!causal) return s.k_len;
  return min64(max64(query_end + s.k_len - s.q_len, int64_t(0)), s.k_len);
}

// Key `key` (of the tile starting at `key0`, whose mask bytes are `mask_tile`) visible to `query`
// by the sample's geometry (lengths, key padding, causal); the attn bias may hide it too.
__device__ __forceinline__ bool visible(const Sample& s, bool causal, const uint8_t* mask_tile, int64_t key0,
                                        int64_t query, int64_t key) {
  if (key >= s.k_len || query >= s.q_len) return false;
  if (causal && key > query + s.k_len - s.q_len) return false;
  return mask_tile == nullptr || mask_tile[key - key0] == 0;
}

// The key range [lo, hi) of `query` from `ranges` (a q head's pairs, query 0 first), bounds below 0
// raised to 0 (keys are never negative; it keeps the arithmetic on them in int32); read only for
// the sample's queries: a row past them (never stored) gets an empty one.
__device__ __forceinline__ void key_range(const int32_t* ranges, const Sample& s, int64_t query, int32_t& lo,
                                          int32_t& hi) {
  lo = hi = 0;
  if (query < s.q_len) lo = max(ranges[2 * query], 0), hi = max(ranges[2 * query + 1], 0);
}

// Which elements of a 16 x 64 C-fragment tile (this lane's rows row_of[0] and row_of[1], keys
// key0 + 8 j + 2 (lane & 3) + (i & 1)) lie inside their query's key range: bit 4 j + i. Computed
// before the tile's products, so that only these 32 bits stay live across them.
__device__ __forceinline__ uint32_t range_bits(const int32_t* ranges, const Sample& s, const int64_t (&row_of)[2],
                                               int64_t key0) {
  int32_t lo[2], hi[2];
  key_range(ranges, s, row_of[0], lo[0], hi[0]);
  key_range(ranges, s, row_of[1], lo[1], hi[1]);
  // in int32 relative to the lane's first key (a tile with a range lies below its int32 end), so
  // that each element compares a constant
  const int32_t base = static_cast<int32_t>(key0) + 2 * static_cast<int32_t>(threadIdx.x % 4);
  const int32_t from[2] = {lo[0] - base, lo[1] - base}, to[2] = {hi[0] - base, hi[1] - base};
  if (max(from[0], from[1]) <= 0 && min(to[0], to[1]) >= kBlockN) return 0xffffffffu;  // both rows cover the tile
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int32_t c = 8 * j + (i & 1);
      if (c >= from[i >> 1] && c < to[i >> 1]) bits |= 1u << (4 * j + i);
    }
  }
  return bits;
}

// Sets the elements of a 16 x 64 C-fragment tile outside their key range (clear in `bits`, of
// range_bits) to `hidden`: -inf for a score, 0 for a probability. Applied after the other masks.
__device__ __forceinline__ void hide_outside(float (&x)[kBlockN / 8][4], uint32_t bits, float hidden) {
  if (bits == 0xffffffffu) return;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (!(bits >> (4 * j + i) & 1u)) x[j][i] = hidden;
    }
  }
}

// The per-(sample, head) part of the score transform: scale, softcap and the head's bias rows.
struct Scorer {
  const float* bias;  // (query 0, key 0) of this sample and q head, or null
  int64_t bias_row;
  float scale, scale_log2, softcap;
};

__device__ __forceinline__ Scorer scorer_of(const AttentionParams& p, const Sample& s, int64_t h) {
  Scorer c;
  c.bias = s.bias != nullptr ? s.bias + h * p.bias_head_stride : nullptr;
  c.bias_row = p.bias_row_stride;
  c.scale = p.scale;
  c.scale_log2 = p.scale * kLog2e;
  c.softcap = p.softcap;
  return c;
}

// The score of (query, key) in log2 units from acc = q·k, −inf when the key is hidden (the bias
// is read only for geometrically visible pairs: never out of the sample's rows or keys).
// dcap: the softcap's derivative 1 − tanh², 1 without softcap.
__device__ __forceinline__ float score_log2(const Scorer& c, const Sample& s, bool causal, const uint8_t* mask_tile,
                                            int64_t key0, int64_t query, int64_t key, float acc, float& dcap) {
  dcap = 1.f;
  if (!visible(s, causal, mask_tile, key0, query, key)) return -INFINITY;
  if (c.softcap == 0.f && c.bias == nullptr) return acc * c.scale_log2;
  float x = acc * c.scale;
  if (c.softcap > 0.f) {
    const float t = tanhf(x / c.softcap);
    x = c.softcap * t;
    dcap = 1.f - t * t;
  }
  if (c.bias != nullptr) {
    const float b = c.bias[query * c.bias_row + key];
    if (b == -INFINITY) return -INFINITY;
    x += b;
  }
  return x * kLog2e;
}

// ----------------------------------------------------------------------------------- dropout
// Philox4x32-10 (Salmon et al., SC 2011; the round and key constants of Random123 and Triton's
// tl.randint), the stream of mmfuse/contract/attention.py, as csrc/cpu/cross_attention.cpp's
// philox8: element (b, h, i, j) of the (B, Hq, Lq*, Lk*) probabilities draws word j % 4 of the
// counter (g lo, g hi, offset lo, offset hi) with g = ((b Hq + h) Lq* + i) ceil(Lk* / 4) + j / 4
// and key (seed lo, seed hi); kept iff the word >= keep_threshold. Lq*, Lk* are len_q, len_k:
// the padded sizes, or varlen's longest sequences (the launcher reads them from cu_seqlens).
__device__ __forceinline__ void philox4x32_10(uint64_t g, uint64_t seed, uint64_t offset, uint32_t (&w)[4]) {
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

// The dropout stream of one (sample b, q head h): counters of query row i start at (row0 + i) * per_row.
struct Dropout {
  bool on;
  uint64_t seed, offset;
  int64_t row0, per_row;
  uint32_t threshold;
  float scale;
};

__device__ __forceinline__ Dropout dropout_of(const AttentionParams& p, int64_t b, int64_t h) {
  Dropout d;
  d.on = p.dropout;
  d.seed = d.on ? static_cast<uint64_t>(p.philox[0]) : 0;
  d.offset = d.on ? static_cast<uint64_t>(p.philox[1]) : 0;
  d.row0 = (b * p.heads_q + h) * p.len_q;
  d.per_row = (p.len_k + 3) / 4;
  d.threshold = p.keep_threshold;
  d.scale = p.dropout_scale;
  return d;
}

// Keep bits of query `row`, keys key and key + 1 (key even, so one counter): bit 0, bit 1.
__device__ __forceinline__ uint32_t keep_pair(const Dropout& d, int64_t row, int64_t key) {
  uint32_t w[4];
  philox4x32_10(static_cast<uint64_t>((d.row0 + row) * d.per_row + key / 4), d.seed, d.offset, w);
  // selects, not w[key & 2]: a runtime index would put w in local memory (a stack frame per call)
  const bool upper = (key & 2) != 0;
  const uint32_t lo = upper ? w[2] : w[0], hi = upper ? w[3] : w[1];
  return (lo >= d.threshold ? 1u : 0u) | (hi >= d.threshold ? 2u : 0u);
}

// Keep bit of one element.
__device__ __forceinline__ bool keep_one(const Dropout& d, int64_t row, int64_t key) {
  uint32_t w[4];
  philox4x32_10(static_cast<uint64_t>((d.row0 + row) * d.per_row + key / 4), d.seed, d.offset, w);
  const int e = static_cast<int>(key & 3);  // selected, not indexed (see keep_pair)
  const uint32_t word = e == 0 ? w[0] : e == 1 ? w[1] : e == 2 ? w[2] : w[3];
  return word >= d.threshold;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}

// Two floats rounded to T, the lower-indexed in the low half (the mma fragment convention).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint16_t a, b;
  if constexpr (std::is_same_v<T, __half>) {
    a = __half_as_ushort(__float2half_rn(lo));
    b = __half_as_ushort(__float2half_rn(hi));
  } else {
    a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
  }
  return static_cast<uint32_t>(a) | static_cast<uint32_t>(b) << 16;
}

// Shared-memory tiles are rows of kHeadDim elements padded by 8 (16 bytes): rows stay 16-byte
// aligned for cp.async and ldmatrix, and the 8 row addresses of one ldmatrix fall in distinct banks.
template <int kHeadDim>
struct Tile {
  static constexpr int kStride = kHeadDim + 8;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  template <int kRows>
  static constexpr int kElems = kRows * kStride;
};

// Rows [0, kRows) of a tile from global rows first_row.. (row stride `stride` elements, `src`
// already at the head's column); rows at or past `valid` are zero-filled (the mma's read them;
// V's must be finite, as P = 0 there and 0 * NaN is NaN).
template <typename T, int kHeadDim, int kRows>
__device__ __forceinline__ void load_rows(T* tile, const T* src, int64_t stride, int64_t first_row, int64_t valid) {
  using Tl = Tile<kHeadDim>;
  for (int c = threadIdx.x; c < kRows * Tl::kChunks; c += kThreads) {
    const int r = c / Tl::kChunks, col = (c % Tl::kChunks) * 8;
    T* dst = tile + r * Tl::kStride + col;
    MMFUSE_SHARED_DEAD(dst, 16);  // the previous tile of this stage
    if (r < valid) {
      cp_async_16(dst, src + (first_row + r) * stride + col);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// The kBlockN mask bytes of keys key0.. (1 = hidden, also past the sample's keys), plain loads
// by the first kBlockN threads; visible to the block after the next barrier.
__device__ __forceinline__ void load_mask(uint8_t* mask_tile, const Sample& s, int64_t key0) {
  if (s.mask == nullptr || threadIdx.x >= kBlockN) return;
  const int64_t key = key0 + threadIdx.x;
  mask_tile[threadIdx.x] = key < s.k_len ? s.mask[key] : 1;
}

// One step of the two-stage cp.async pipeline, before the `tile`-th tile loaded (from 0) is
// consumed from stage tile & 1: when `more` tiles follow, prefetch(tile + 1, stage) issues the
// next one's loads into the other stage; then this tile's copies are awaited and the block
// synchronised. The caller ends each step with __syncthreads() so that the stage it read is free
// before the next step's prefetch refills it.
template <typename Index, typename Prefetch>
__device__ __forceinline__ void pipeline_step(Index tile, bool more, Prefetch&& prefetch) {
  if (more) {
    prefetch(tile + 1, static_cast<int>((tile + 1) & 1));
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// K/V tile `tile` (keys tile * kBlockN .. below `end`, zero rows past it) and its mask bytes into
// stage `stage` of the double buffers sk, sv (kBlockN rows each) and smask (kBlockN bytes each).
template <typename T, int kHeadDim, int kHeadDimV>
__device__ __forceinline__ void load_kv_tile(T* sk, T* sv, uint8_t* smask, const T* k, const T* v, int64_t k_stride,
                                             int64_t v_stride, const Sample& s, int64_t end, int tile, int stage) {
  constexpr int kTileK = Tile<kHeadDim>::template kElems<kBlockN>;
  constexpr int kTileV = Tile<kHeadDimV>::template kElems<kBlockN>;
  const int64_t key0 = static_cast<int64_t>(tile) * kBlockN, valid = min64(kBlockN, end - key0);
  load_rows<T, kHeadDim, kBlockN>(sk + stage * kTileK, k, k_stride, s.k_row + key0, valid);
  load_rows<T, kHeadDimV, kBlockN>(sv + stage * kTileV, v, v_stride, s.k_row + key0, valid);
  load_mask(smask + stage * kBlockN, s, key0);
}

// A operand (16 x 16) from a row-major tile: rows r0.., columns c0.. (ldmatrix x4: matrices
// (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8) are registers a0a1, a2a3, a4a5, a6a7).
template <int kStride, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int r0, int c0) {
  const int lane = threadIdx.x % 32, m = lane >> 3, r = lane & 7;
  ldmatrix_x4(a, tile + (r0 + r + (m & 1) * 8) * kStride + c0 + (m >> 1) * 8);
}

// B operands of two n8 blocks (n0.., n0 + 8..) for k = k0..k0 + 15 from a tile stored [n][k]
// (K for S = Q Kᵀ): B[k][n] = tile[n][k], the non-transposed 8 x 8 matrices.
template <int kStride, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32, m = lane >> 3, r = lane & 7;
  uint32_t x[4];
  ldmatrix_x4(x, tile + (n0 + r + (m >> 1) * 8) * kStride + k0 + (m & 1) * 8);
  b0[0] = x[0], b0[1] = x[1], b1[0] = x[2], b1[1] = x[3];
}

// B operands of two n8 blocks (n0.., n0 + 8..) for k = k0..k0 + 15 from a tile stored [k][n]
// (V for P V): ldmatrix.trans.
template <int kStride, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b0)[2], uint32_t (&b1)[2], const T* tile, int k0, int n0) {
  const int lane = threadIdx.x % 32, m = lane >> 3, r = lane & 7;
  uint32_t x[4];
  ldmatrix_x4_trans(x, tile + (k0 + r + (m & 1) * 8) * kStride + n0 + (m >> 1) * 8);
  b0[0] = x[0], b0[1] = x[1], b1[0] = x[2], b1[1] = x[3];
}

// acc (16 x kN) += A (16 x kK, row-major tile rows r0..) · Bᵀ where B is a [n][k] tile (kN x kK).
template <int kN, int kK, int kStrideA, int kStrideB, typename T>
__device__ __forceinline__ void gemm_abt(float (&acc)[kN / 8][4], const T* a_tile, int r0, const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < kK; kk += 16) {
    uint32_t a[4];
    load_a<kStrideA>(a, a_tile, r0, kk);
#pragma unroll
    for (int n = 0; n < kN; n += 16) {
      uint32_t b0[2], b1[2];
      load_b_nk<kStrideB>(b0, b1, b_tile, n, kk);
      mma_m16n8k16<T>(acc[n / 8], a, b0, acc[n / 8]);
      mma_m16n8k16<T>(acc[n / 8 + 1], a, b1, acc[n / 8 + 1]);
    }
  }
}

// acc (16 x kN) += X (16 x kK, fp32 C fragments, rounded to T) · B where B is a [k][n] tile.
// C fragments of n8 blocks 2s, 2s + 1 are exactly the A fragment of k-step s.
template <int kN, int kK, int kStrideB, typename T>
__device__ __forceinline__ void gemm_xb(float (&acc)[kN / 8][4], const float (&x)[kK / 8][4], const T* b_tile) {
#pragma unroll
  for (int s = 0; s < kK / 16; ++s) {
    const uint32_t a[4] = {pack2<T>(x[2 * s][0], x[2 * s][1]), pack2<T>(x[2 * s][2], x[2 * s][3]),
                           pack2<T>(x[2 * s + 1][0], x[2 * s + 1][1]), pack2<T>(x[2 * s + 1][2], x[2 * s + 1][3])};
#pragma unroll
    for (int n = 0; n < kN; n += 16) {
      uint32_t b0[2], b1[2];
      load_b_kn<kStrideB>(b0, b1, b_tile, 16 * s, n);
      mma_m16n8k16<T>(acc[n / 8], a, b0, acc[n / 8]);
      mma_m16n8k16<T>(acc[n / 8 + 1], a, b1, acc[n / 8 + 1]);
    }
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Stores rows r0.. of a 16 x kHeadDim fp32 C-fragment block times `row_scale[half]` (half 0: row
// g, half 1: row g + 8) to global rows first_row + r, for r < valid; Out is T (packed pairs) or float.
template <typename Out, int kHeadDim>
__device__ __forceinline__ void store_rows(Out* dst, int64_t stride, int64_t first_row, int64_t valid, int r0,
                                          const float (&acc)[kHeadDim / 8][4], const float (&row_scale)[2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + (lane >> 2) + 8 * half;
    if (r >= valid) continue;
    Out* row = dst + (first_row + r) * stride + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      const float lo = acc[j][2 * half] * row_scale[half], hi = acc[j][2 * half + 1] * row_scale[half];
      if constexpr (std::is_same_v<Out, float>) {
        *reinterpret_cast<float2*>(row + 8 * j) = make_float2(lo, hi);
      } else {
        *reinterpret_cast<uint32_t*>(row + 8 * j) = pack2<Out>(lo, hi);
      }
    }
  }
}

// ----------------------------------------------------------------------------------- forward

// The work of one CTA of the per-query-tile grid (forward, dQ): queries i0 .. i0 + rows - 1 of
// q head h (kv head hk) of sample blockIdx.z, and the key tiles they can see. The forward's grid
// x is (query tile, split) with the split fastest.
struct QueryTile {
  Sample s;
  int h, hk;
  int64_t i0, rows;  // rows == 0: the tile lies past the sample's queries (varlen grids cover the longest)
  int64_t end;       // keys [0, end) are visible to some query of the tile
  int first;         // the first key tile any query of the tile sees: 0, or the first in its key ranges
  int tiles;         // K/V tiles of kBlockN keys from tile `first` on, below end
  const int32_t* ranges;  // the q head's key ranges (query 0's pair), or null
  int64_t row_of[2];  // this lane's rows in the C fragments: g and g + 8 of its warp's 16
};

__device__ __forceinline__ QueryTile query_tile(const AttentionParams& p, int splits) {
  QueryTile t;
  t.s = sample_of(p, blockIdx.z);
  t.h = blockIdx.y;
  t.hk = t.h / (p.heads_q / p.heads_kv);
  t.i0 = static_cast<int64_t>(blockIdx.x / splits) * kBlockM;
  t.rows = max64(0, min64(kBlockM, t.s.q_len - t.i0));
  t.end = key_end(t.s, p.causal, t.i0 + t.rows);
  t.first = 0;
  t.ranges = nullptr;
  if (t.s.ranges != nullptr) {
    // Block skipping (as FlashAttention-2 skips the blocks a causal mask hides, Dao 2023): only
    // the key tiles that meet some row's window (its key range within its causal and kv_len
    // bound) are loaded. Every warp reads the tile's ranges (lane l: rows l and l + 32) and
    // reduces them alike, so the bounds agree without shared memory. With ranges every bound
    // lies in int32: 0 <= lo and hi <= the range's end.
    t.ranges = t.s.ranges + t.h * p.ranges_head_stride;
    int32_t lo = 0x7fffffff, hi = 0;
    for (int64_t row = t.i0 + threadIdx.x % 32; row < t.i0 + t.rows; row += 32) {
      const int32_t a = t.ranges[2 * row], b = t.ranges[2 * row + 1];
      const int32_t w_lo = max(a, 0), w_hi = static_cast<int32_t>(min64(b, key_end(t.s, p.causal, row + 1)));
      if (w_lo < w_hi) lo = min(lo, w_lo), hi = max(hi, w_hi);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    t.end = hi;  // at most the causal bound: every window's end is
    t.first = lo < hi ? lo / kBlockN : 0;
  }
  t.tiles = static_cast<int>((t.end + kBlockN - 1) / kBlockN) - t.first;
  const int64_t first = t.i0 + 16 * (threadIdx.x / 32) + (threadIdx.x % 32) / 4;
  t.row_of[0] = first, t.row_of[1] = first + 8;
  return t;
}

template <int kHeadDim, int kHeadDimV>
struct ForwardSmem {
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + Tile<kHeadDim>::template kElems<kBlockM>;  // two stages
  static constexpr int kV = kK + 2 * Tile<kHeadDim>::template kElems<kBlockN>;
  static constexpr int kEnd = kV + 2 * Tile<kHeadDimV>::template kElems<kBlockN>;
  template <typename T>
  static constexpr size_t bytes() { return kEnd * sizeof(T) + 2 * kBlockN; }  // + mask bytes per stage
};

template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(AttentionParams p) {
  using Sm = ForwardSmem<kHeadDim, kHeadDimV>;
  constexpr int kS = Tile<kHeadDim>::kStride, kSv = Tile<kHeadDimV>::kStride;
  constexpr int kTileK = Tile<kHeadDim>::template kElems<kBlockN>;
  constexpr int kTileV = Tile<kHeadDimV>::template kElems<kBlockN>;
  const int splits = p.splits > 1 ? p.splits : 1, split = static_cast<int>(blockIdx.x % splits);
  const QueryTile work = query_tile(p, splits);
  if (work.rows == 0) return;
  const Sample& s = work.s;
  const int64_t i0 = work.i0, rows = work.rows, end = work.end, (&row_of)[2] = work.row_of;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // this split's key tiles [tile_begin, tile_end) of the tile's `tiles` from `first` on (absolute
  // indices: the pipeline's stage of tile t is t & 1)
  const int per_split = (work.tiles + splits - 1) / splits;
  const int tile_begin = work.first + min64(static_cast<int64_t>(split) * per_split, work.tiles);
  const int tile_end = work.first + min64(static_cast<int64_t>(split + 1) * per_split, work.tiles);
  const int64_t q_stride = static_cast<int64_t>(p.heads_q) * kHeadDim, k_stride = static_cast<int64_t>(p.heads_kv) * kHeadDim;
  const int64_t o_stride = static_cast<int64_t>(p.heads_q) * kHeadDimV, v_stride = static_cast<int64_t>(p.heads_kv) * kHeadDimV;
  const T* q = static_cast<const T*>(p.q) + work.h * kHeadDim;
  const T* k = static_cast<const T*>(p.k) + work.hk * kHeadDim;
  const T* v = static_cast<const T*>(p.v) + work.hk * kHeadDimV;
  const Scorer scorer = scorer_of(p, s, work.h);
  const Dropout drop = dropout_of(p, blockIdx.z, work.h);

  float o[kHeadDimV / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this lane's columns only
  if (tile_begin < tile_end) {  // else no visible key in the whole tile (or split): 0 and -inf, nothing read
    MMFUSE_DYNAMIC_SHARED(T, smem);
    T* sq = smem + Sm::kQ;
    uint8_t* smask = reinterpret_cast<uint8_t*>(smem + Sm::kEnd);
    auto load_kv = [=](int tile, int stage) {  // by value: by reference, ptxas spilled 8 bytes (sm_80, D 64)
      load_kv_tile<T, kHeadDim, kHeadDimV>(smem + Sm::kK, smem + Sm::kV, smask, k, v, k_stride, v_stride, s, end,
                                           tile, stage);
    };
    load_rows<T, kHeadDim, kBlockM>(sq, q, q_stride, s.q_row + i0, rows);
    load_kv(tile_begin, tile_begin & 1);
    cp_async_commit();

    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int stage = tile & 1;
      pipeline_step(tile, tile + 1 < tile_end, load_kv);
      const T* sk = smem + Sm::kK + stage * kTileK;
      const T* sv = smem + Sm::kV + stage * kTileV;
      const uint8_t* mask_tile = s.mask != nullptr ? smask + stage * kBlockN : nullptr;
      const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;

      const uint32_t in_range = work.ranges != nullptr ? range_bits(work.ranges, s, row_of, key0) : 0xffffffffu;
      float sc[kBlockN / 8][4];
      zero(sc);
      gemm_abt<kBlockN, kHeadDim, kS, kS>(sc, sq, 16 * warp, sk);

      // scores in log2 units, −inf where hidden, then the online softmax per row half
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t key = key0 + 8 * j + 2 * (lane & 3) + (i & 1);
          float dcap;
          sc[j][i] = score_log2(scorer, s, p.causal, mask_tile, key0, row_of[i >> 1], key, sc[j][i], dcap);
        }
      }
      hide_outside(sc, in_range, -INFINITY);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = row_max[half];
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[j][2 * half], sc[j][2 * half + 1]));
        // the 4 lanes of a quad hold one row's 64 columns between them
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float shift = mx == -INFINITY ? 0.f : mx;  // nothing visible yet: exp2(-inf - 0) = 0, no NaN
        const float correction = exp2f(row_max[half] - shift);
        row_max[half] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          sc[j][2 * half] = exp2f(sc[j][2 * half] - shift);
          sc[j][2 * half + 1] = exp2f(sc[j][2 * half + 1] - shift);
          sum += sc[j][2 * half] + sc[j][2 * half + 1];
        }
        row_sum[half] = row_sum[half] * correction + sum;  // undropped
#pragma unroll
        for (int j = 0; j < kHeadDimV / 8; ++j) o[j][2 * half] *= correction, o[j][2 * half + 1] *= correction;
        if (drop.on) {  // P V uses the dropped probabilities
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j) {
            const uint32_t keep = keep_pair(drop, row_of[half], key0 + 8 * j + 2 * (lane & 3));
            sc[j][2 * half] *= (keep & 1u) ? drop.scale : 0.f;
            sc[j][2 * half + 1] *= (keep & 2u) ? drop.scale : 0.f;
          }
        }
      }
      gemm_xb<kHeadDimV, kBlockN, kSv>(o, sc, sv);
      __syncthreads();  // this stage's buffers are refilled by the next iteration's prefetch
    }
  }

  // epilogue: out = o / l and lse, with the sink in the denominator (one-pass only: the merge
  // kernel adds it to split results); a split writes its float32 partial (out, lse) instead
  const bool partial = splits > 1;
  const bool sink = p.sinks != nullptr && !partial;
  const float sink_value = sink ? p.sinks[work.h] : 0.f;
  float inv[2], lse_row[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = row_sum[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float m2 = row_max[half];
    if (l != l) {  // a NaN score reached the row: NaN out and lse, as the CPU kernel (and a split's
      inv[half] = NAN;  // partial carries the NaN into the merge)
      lse_row[half] = NAN;
    } else if (!(l > 0.f)) {  // no visible key
      inv[half] = 0.f;
      lse_row[half] = sink ? sink_value : -INFINITY;
    } else if (sink) {
      // lse = logaddexp(lse0, sink), out = out0 exp(lse0 - lse), in log2 units around m = max
      const float sink2 = sink_value * kLog2e, m = fmaxf(m2, sink2);
      const float lse2 = m + log2f(l * exp2f(m2 - m) + exp2f(sink2 - m));
      inv[half] = exp2f(m2 - lse2);
      lse_row[half] = lse2 * kLn2;
    } else {
      inv[half] = 1.f / l;
      lse_row[half] = (m2 + log2f(l)) * kLn2;
    }
  }
  if (!partial) {
    T* out = static_cast<T*>(p.out) + work.h * kHeadDimV;
    float* lse = p.lse + s.lse_base + work.h * p.lse_len;
    store_rows<T, kHeadDimV>(out, o_stride, s.q_row + i0, rows, 16 * warp, o, inv);
    if ((lane & 3) == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
        if (row_of[half] < s.q_len) lse[row_of[half]] = lse_row[half];
    }
  } else {
    float* out = p.out_partial + static_cast<int64_t>(split) * p.q_rows * o_stride + work.h * kHeadDimV;
    float* lse = p.lse_partial + static_cast<int64_t>(split) * p.q_rows * p.heads_q + s.lse_base + work.h * p.lse_len;
    store_rows<float, kHeadDimV>(out, o_stride, s.q_row + i0, rows, 16 * warp, o, inv);
    if ((lane & 3) == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half)
        if (row_of[half] < s.q_len) lse[row_of[half]] = lse_row[half];
    }
  }
}

// Split-KV merge (FlashDecoding): out = Σ_s exp(lse_s − lse) out_s with lse = logsumexp_s lse_s
// (then logaddexp with the sink, out scaled by exp(lse_without − lse)); rows where every split
// saw nothing get 0 and −inf (the sink). One warp per (query row, q head), as the delta kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_split_merge_kernel(AttentionParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= p.q_rows * p.heads_q) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t row = item / p.heads_q, h = item % p.heads_q;
  const int64_t idx = (row / p.lse_len) * p.heads_q * p.lse_len + h * p.lse_len + row % p.lse_len;
  const int64_t lse_split = p.q_rows * p.heads_q, out_split = p.q_rows * p.heads_q * p.head_dim_v;
  float m = -INFINITY;
  bool nan = false;  // a split saw a NaN score: the row is NaN (fmaxf alone would drop that split)
  for (int s = 0; s < p.splits; ++s) {
    const float x = p.lse_partial[s * lse_split + idx];
    nan |= x != x;
    m = fmaxf(m, x);
  }
  if (nan) {  // warp-uniform: every lane read the same partial lse
    T* out = static_cast<T*>(p.out) + item * p.head_dim_v;
    for (int d = lane; d < p.head_dim_v; d += 32) out[d] = from_float<T>(NAN);
    if (lane == 0) p.lse[idx] = NAN;
    return;
  }
  float total = 0.f;  // Σ exp(lse_s − m)
  if (m != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) total += expf(p.lse_partial[s * lse_split + idx] - m);
  }
  float lse = m == -INFINITY ? -INFINITY : m + logf(total);
  float out_scale = 1.f;  // exp(lse_without_sink − lse)
  if (p.sinks != nullptr) {
    const float sink = p.sinks[h];
    if (lse == -INFINITY) {
      lse = sink;
    } else {
      const float mm = fmaxf(lse, sink), with = mm + logf(expf(lse - mm) + expf(sink - mm));
      out_scale = expf(lse - with);
      lse = with;
    }
  }
  T* out = static_cast<T*>(p.out) + item * p.head_dim_v;
  const float* part = p.out_partial + item * p.head_dim_v;
  for (int d = lane; d < p.head_dim_v; d += 32) {
    float acc = 0.f;
    if (m != -INFINITY) {
      for (int s = 0; s < p.splits; ++s) {
        const float w = expf(p.lse_partial[s * lse_split + idx] - m) / total;
        if (w != 0.f) acc += w * part[s * out_split + d];
      }
    }
    out[d] = from_float<T>(acc * out_scale);
  }
  if (lane == 0) p.lse[idx] = lse;
}

// ---------------------------------------------------------------------------------- backward

// lse in log2 units for P = exp2(score_log2 − lse2); +inf where lse is −inf (no visible key, or
// a padding row), so that P is 0 there and never NaN.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// P from a score in log2 units: exactly 0 where hidden.
__device__ __forceinline__ float prob(float score2, float lse2) {
  return score2 == -INFINITY ? 0.f : exp2f(score2 - lse2);
}

// delta = rowsum(dO ∘ O) − dlse per (query row, q head), in lse's layout; 0 where lse is −inf.
// One warp per (row, head).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_backward_delta_kernel(AttentionParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= p.q_rows * p.heads_q) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t row = item / p.heads_q, h = item % p.heads_q;
  const T* o = static_cast<const T*>(p.out) + item * p.head_dim_v;
  const T* g = static_cast<const T*>(p.dout) + item * p.head_dim_v;
  float sum = 0.f;
  for (int d = lane; d < p.head_dim_v; d += 32) sum += to_float(o[d]) * to_float(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane != 0) return;
  // padded: lse (B, Hq, Lq) and row = b Lq + i; varlen: lse (Hq, total_q), one "sample" of lse_len rows
  const int64_t idx = (row / p.lse_len) * p.heads_q * p.lse_len + h * p.lse_len + row % p.lse_len;
  p.delta[idx] = p.lse[idx] == -INFINITY ? 0.f : sum - (p.dlse != nullptr ? p.dlse[idx] : 0.f);
}

template <int kHeadDim, int kHeadDimV>
struct DkDvSmem {
  static constexpr int kK = 0;
  static constexpr int kV = kK + Tile<kHeadDim>::template kElems<kBlockN>;
  static constexpr int kQ = kV + Tile<kHeadDimV>::template kElems<kBlockN>;  // two stages each of Q and dO
  static constexpr int kDO = kQ + 2 * Tile<kHeadDim>::template kElems<kBlockMBwd>;
  static constexpr int kEnd = kDO + 2 * Tile<kHeadDimV>::template kElems<kBlockMBwd>;
  // then float lse2[2][kBlockMBwd], delta[2][kBlockMBwd], the tile's kBlockN mask bytes, and the
  // softcap factors of each thread's Pᵀ fragment as fp16 pairs, word-major ([kCapWords][kThreads]:
  // a warp's 32 lanes hit 32 banks). They live in shared memory, not registers: held across the
  // dV and dP products they made the (128, 128) kernel spill on sm_90a at 255 registers.
  static constexpr int kCapWords = kBlockMBwd / 4;
  template <typename T>  // read by the kernel too: __host__ __device__
  __host__ __device__ static constexpr size_t cap_offset() {
    return kEnd * sizeof(T) + 4 * kBlockMBwd * sizeof(float) + kBlockN;
  }
  template <typename T>
  static constexpr size_t bytes() { return cap_offset<T>() + kCapWords * kThreads * sizeof(uint32_t); }
};

// dK, dV of one 64-key tile of kv head hk: warp w owns keys 16w .. 16w + 15 and accumulates
// their dK, dV rows (16 x D and 16 x Dv) in registers over every (q head of the group, 32-query
// tile). With p.dbias it also writes dS (the bias gradient) of every visited element.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(AttentionParams p) {
  using Sm = DkDvSmem<kHeadDim, kHeadDimV>;
  constexpr int kS = Tile<kHeadDim>::kStride, kSv = Tile<kHeadDimV>::kStride;
  constexpr int kTileQ = Tile<kHeadDim>::template kElems<kBlockMBwd>;
  constexpr int kTileDO = Tile<kHeadDimV>::template kElems<kBlockMBwd>;
  const int hk = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Sample s = sample_of(p, b);
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  if (key0 >= s.k_extent) return;
  const int64_t key_valid = min64(max64(s.k_len - key0, int64_t(0)), static_cast<int64_t>(kBlockN));  // rows read
  const int group = p.heads_q / p.heads_kv;
  const int64_t q_stride = static_cast<int64_t>(p.heads_q) * kHeadDim, k_stride = static_cast<int64_t>(p.heads_kv) * kHeadDim;
  const int64_t o_stride = static_cast<int64_t>(p.heads_q) * kHeadDimV, v_stride = static_cast<int64_t>(p.heads_kv) * kHeadDimV;

  // queries before first_q see no key of this tile (causal); none at all if the tile has no valid
  // key (then no query tile either: first_q = q_len alone would leave the ragged last one)
  const int64_t first_q = key_valid == 0 ? s.q_len : (p.causal ? max64(int64_t(0), key0 - (s.k_len - s.q_len)) : 0);
  const int64_t tile0 = first_q / kBlockMBwd;
  const int64_t q_tiles = key_valid == 0 ? 0 : max64(int64_t(0), (s.q_len + kBlockMBwd - 1) / kBlockMBwd - tile0);
  const int64_t steps = group * q_tiles;
  // With key ranges, the steps (q head, query tile) none of whose queries sees a key of this tile
  // by its window (key range, causal and kv_len bounds) are skipped: every warp reads the step's
  // 32 ranges (lane l: query l) and votes, so all warps agree without shared memory.
  const int32_t* ranges = s.ranges;
  static_assert(kBlockMBwd == 32, "one query per lane");
  auto seen = [&](int64_t step) {
    const int64_t h = hk * group + step / q_tiles, query = (tile0 + step % q_tiles) * kBlockMBwd + lane;
    int32_t lo, hi;
    key_range(ranges + h * p.ranges_head_stride, s, query, lo, hi);
    int64_t end = min64(min64(hi, s.k_len), key0 + kBlockN);  // the tile's keys below kv_len
    if (p.causal) end = min64(end, query + s.k_len - s.q_len + 1);
    return __ballot_sync(0xffffffffu, max64(lo, key0) < end) != 0;
  };
  auto next_step = [&](int64_t step) {  // the first step from `step` on that sees the tile (every one without ranges)
    if (ranges != nullptr)
      while (step < steps && !seen(step)) ++step;
    return step;
  };
  int64_t step = next_step(0);

  float dk[kHeadDim / 8][4], dv[kHeadDimV / 8][4];
  zero(dk);
  zero(dv);
  if (step < steps) {
    MMFUSE_DYNAMIC_SHARED(T, smem);
    T* sk = smem + Sm::kK;
    T* sv = smem + Sm::kV;
    float* slse = reinterpret_cast<float*>(smem + Sm::kEnd);  // [2][kBlockMBwd]
    float* sdelta = slse + 2 * kBlockMBwd;
    uint8_t* smask = reinterpret_cast<uint8_t*>(sdelta + 2 * kBlockMBwd);
    const uint8_t* mask_tile = s.mask != nullptr ? smask : nullptr;
    uint32_t* scap = reinterpret_cast<uint32_t*>(reinterpret_cast<char*>(smem) + Sm::template cap_offset<T>()) +
                     threadIdx.x;  // this thread's words, kThreads apart
    const bool capped = p.softcap > 0.f;
    auto load_step = [&](int64_t step, int stage) {
      const int64_t h = hk * group + step / q_tiles, i0 = (tile0 + step % q_tiles) * kBlockMBwd;
      const int64_t valid = min64(static_cast<int64_t>(kBlockMBwd), s.q_len - i0);
      load_rows<T, kHeadDim, kBlockMBwd>(smem + Sm::kQ + stage * kTileQ, static_cast<const T*>(p.q) + h * kHeadDim,
                                         q_stride, s.q_row + i0, valid);
      load_rows<T, kHeadDimV, kBlockMBwd>(smem + Sm::kDO + stage * kTileDO,
                                          static_cast<const T*>(p.dout) + h * kHeadDimV, o_stride, s.q_row + i0, valid);
      if (threadIdx.x < kBlockMBwd) {
        const int64_t idx = s.lse_base + h * p.lse_len + i0 + threadIdx.x;
        const bool in = threadIdx.x < valid;
        slse[stage * kBlockMBwd + threadIdx.x] = in ? lse_log2(p.lse[idx]) : INFINITY;
        sdelta[stage * kBlockMBwd + threadIdx.x] = in ? p.delta[idx] : 0.f;
      }
    };
    load_rows<T, kHeadDim, kBlockN>(sk, static_cast<const T*>(p.k) + hk * kHeadDim, k_stride, s.k_row + key0, key_valid);
    load_rows<T, kHeadDimV, kBlockN>(sv, static_cast<const T*>(p.v) + hk * kHeadDimV, v_stride, s.k_row + key0,
                                     key_valid);
    load_mask(smask, s, key0);
    load_step(step, 0);
    cp_async_commit();

    const int64_t key_base = key0 + 16 * warp + (lane >> 2);  // this lane's keys: key_base, key_base + 8
    for (int stage = 0; step < steps; stage ^= 1) {
      {
        const int64_t next = next_step(step + 1);  // found again at the end: not kept across the step
        pipeline_step(stage, next < steps, [&](int, int st) { load_step(next, st); });
      }
      const T* sq = smem + Sm::kQ + stage * kTileQ;
      const T* sdo = smem + Sm::kDO + stage * kTileDO;
      const float* lse2 = slse + stage * kBlockMBwd;
      const float* delta = sdelta + stage * kBlockMBwd;
      const int64_t h = hk * group + step / q_tiles, i0 = (tile0 + step % q_tiles) * kBlockMBwd;
      const Scorer scorer = scorer_of(p, s, h);
      const Dropout drop = dropout_of(p, b, h);

      // bit 4 j + i: element [j][i] kept, first by its query's key range (read before the products,
      // so that no more than these bits stay live across them), then by dropout; a 0 bit from the
      // key range also zeroes P below
      uint32_t keep = 0xffffffffu;
      if (ranges != nullptr) {
        const int32_t* r = ranges + h * p.ranges_head_stride;
        keep = 0;
#pragma unroll
        for (int j = 0; j < kBlockMBwd / 8; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {  // element [j][c + 2 e]: query i0 + 8 j + 2 (lane & 3) + c, key key_base + 8 e
            int32_t lo, hi;
            key_range(r, s, i0 + 8 * j + 2 * (lane & 3) + c, lo, hi);
            if (key_base >= lo && key_base < hi) keep |= 1u << (4 * j + c);
            if (key_base + 8 >= lo && key_base + 8 < hi) keep |= 1u << (4 * j + c + 2);
          }
        }
      }
      // Pᵀ (16 keys x 32 queries) = exp2(score − lse2), 0 where hidden; dcap: the softcap factor,
      // kept as fp16 pairs in this thread's shared words (dS is rounded to T for the mma anyway)
      float pt[kBlockMBwd / 8][4];
      zero(pt);
      gemm_abt<kBlockMBwd, kHeadDim, kS, kS>(pt, sk, 16 * warp, sq);
#pragma unroll
      for (int j = 0; j < kBlockMBwd / 8; ++j) {
        float dcap[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = 8 * j + 2 * (lane & 3) + (i & 1);
          pt[j][i] = prob(score_log2(scorer, s, p.causal, mask_tile, key0, i0 + col, (key_base + 8 * (i >> 1)), pt[j][i],
                                     dcap[i]),
                          lse2[col]);
          if (ranges != nullptr && !(keep >> (4 * j + i) & 1u)) pt[j][i] = 0.f;  // outside the key range
          if (drop.on && !keep_one(drop, i0 + col, (key_base + 8 * (i >> 1)))) keep &= ~(1u << (4 * j + i));
        }
        if (capped) {
          scap[(2 * j) * kThreads] = pack2<__half>(dcap[0], dcap[1]);
          scap[(2 * j + 1) * kThreads] = pack2<__half>(dcap[2], dcap[3]);
        }
      }
      if (drop.on) {  // dV += (P ∘ Z)ᵀ dO
        float pd[kBlockMBwd / 8][4];
#pragma unroll
        for (int j = 0; j < kBlockMBwd / 8; ++j) {
#pragma unroll
          for (int i = 0; i < 4; ++i) pd[j][i] = (keep >> (4 * j + i) & 1u) ? pt[j][i] * drop.scale : 0.f;
        }
        gemm_xb<kHeadDimV, kBlockMBwd, kSv>(dv, pd, sdo);
      } else {
        gemm_xb<kHeadDimV, kBlockMBwd, kSv>(dv, pt, sdo);  // dV += Pᵀ dO
      }

      // dSᵀ = Pᵀ ∘ (Z ∘ V dOᵀ − delta)
      float dst[kBlockMBwd / 8][4];
      zero(dst);
      gemm_abt<kBlockMBwd, kHeadDimV, kSv, kSv>(dst, sv, 16 * warp, sdo);
      float* dbias = s.dbias != nullptr ? s.dbias + h * p.dbias_head_stride : nullptr;
#pragma unroll
      for (int j = 0; j < kBlockMBwd / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float dp = dst[j][i];
          if (drop.on) dp = (keep >> (4 * j + i) & 1u) ? dp * drop.scale : 0.f;
          const int col = 8 * j + 2 * (lane & 3) + (i & 1);
          dst[j][i] = pt[j][i] * (dp - delta[col]);
          if (dbias != nullptr) {  // this CTA owns (b, h, every query, these keys): exactly 0 where hidden
            const int64_t query = i0 + col, key = (key_base + 8 * (i >> 1));
            if (query < s.q_len && key < s.k_len) {
              dbias[query * p.dbias_row_stride + key] = pt[j][i] == 0.f ? 0.f : dst[j][i];
            }
          }
          if (capped) {
            const uint32_t d2 = scap[(2 * j + (i >> 1)) * kThreads];
            dst[j][i] *= __half2float(__ushort_as_half(static_cast<unsigned short>((i & 1) ? d2 >> 16 : d2 & 0xffffu)));
          }
        }
      }
      gemm_xb<kHeadDim, kBlockMBwd, kS>(dk, dst, sq);  // dK += dS_rawᵀ Q (scaled at the end)
      __syncthreads();
      step = next_step(step + 1);
    }
  }
  // every key row of the sample gets its gradient, 0 past kv_len (never read, never visible)
  // (the sample's rows are found again rather than held in registers across the loop: (128, 128)
  // has none to spare)
  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  const Sample out = sample_of(p, b);
  const int64_t key_rows = min64(static_cast<int64_t>(kBlockN), out.k_extent - key0);  // rows written
  store_rows<T, kHeadDim>(static_cast<T*>(p.dk) + hk * kHeadDim, k_stride, out.k_row + key0, key_rows, 16 * warp, dk,
                          dk_scale);
  store_rows<T, kHeadDimV>(static_cast<T*>(p.dv) + hk * kHeadDimV, v_stride, out.k_row + key0, key_rows, 16 * warp, dv,
                           one);
}

template <int kHeadDim, int kHeadDimV>
struct DqSmem {
  static constexpr int kQ = 0;
  static constexpr int kDO = kQ + Tile<kHeadDim>::template kElems<kBlockM>;
  static constexpr int kK = kDO + Tile<kHeadDimV>::template kElems<kBlockM>;  // two stages each of K and V
  static constexpr int kV = kK + 2 * Tile<kHeadDim>::template kElems<kBlockN>;
  static constexpr int kEnd = kV + 2 * Tile<kHeadDimV>::template kElems<kBlockN>;
  // then the mask bytes of two stages
  template <typename T>
  static constexpr size_t bytes() { return kEnd * sizeof(T) + 2 * kBlockN; }
};

// dQ of one 64-query tile of q head h: warp w owns queries 16w .. 16w + 15, loops over key tiles.
template <typename T, int kHeadDim, int kHeadDimV>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(AttentionParams p) {
  using Sm = DqSmem<kHeadDim, kHeadDimV>;
  constexpr int kS = Tile<kHeadDim>::kStride, kSv = Tile<kHeadDimV>::kStride;
  constexpr int kTileK = Tile<kHeadDim>::template kElems<kBlockN>;
  constexpr int kTileV = Tile<kHeadDimV>::template kElems<kBlockN>;
  const QueryTile work = query_tile(p, 1);
  if (work.rows == 0) return;
  const Sample& s = work.s;
  const int64_t i0 = work.i0, rows = work.rows, end = work.end, (&row_of)[2] = work.row_of;
  // key tiles [first, last) (absolute indices: the pipeline's stage of tile t is t & 1)
  const int first = work.first, last = work.first + work.tiles;
  const int h = work.h, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q_stride = static_cast<int64_t>(p.heads_q) * kHeadDim, k_stride = static_cast<int64_t>(p.heads_kv) * kHeadDim;
  const int64_t o_stride = static_cast<int64_t>(p.heads_q) * kHeadDimV, v_stride = static_cast<int64_t>(p.heads_kv) * kHeadDimV;
  const T* k = static_cast<const T*>(p.k) + work.hk * kHeadDim;
  const T* v = static_cast<const T*>(p.v) + work.hk * kHeadDimV;
  const Scorer scorer = scorer_of(p, s, h);
  const Dropout drop = dropout_of(p, blockIdx.z, h);

  float dq[kHeadDim / 8][4];
  zero(dq);
  if (first < last) {
    MMFUSE_DYNAMIC_SHARED(T, smem);
    const T* sq = smem + Sm::kQ;
    const T* sdo = smem + Sm::kDO;
    uint8_t* smask = reinterpret_cast<uint8_t*>(smem + Sm::kEnd);
    auto load_kv = [=](int tile, int stage) {  // by value: by reference, ptxas spilled 8 bytes (sm_80, D 64)
      load_kv_tile<T, kHeadDim, kHeadDimV>(smem + Sm::kK, smem + Sm::kV, smask, k, v, k_stride, v_stride, s, end,
                                           tile, stage);
    };
    load_rows<T, kHeadDim, kBlockM>(smem + Sm::kQ, static_cast<const T*>(p.q) + h * kHeadDim, q_stride, s.q_row + i0,
                                    rows);
    load_rows<T, kHeadDimV, kBlockM>(smem + Sm::kDO, static_cast<const T*>(p.dout) + h * kHeadDimV, o_stride,
                                     s.q_row + i0, rows);
    load_kv(first, first & 1);
    cp_async_commit();

    // this lane's two rows: lse in log2 units and delta, straight from global memory
    float lse2[2], delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const bool in = row_of[half] < s.q_len;
      const int64_t idx = s.lse_base + h * p.lse_len + row_of[half];
      lse2[half] = in ? lse_log2(p.lse[idx]) : INFINITY;
      delta[half] = in ? p.delta[idx] : 0.f;
    }
    for (int tile = first; tile < last; ++tile) {
      const int stage = tile & 1;
      pipeline_step(tile, tile + 1 < last, load_kv);
      const T* sk = smem + Sm::kK + stage * kTileK;
      const T* sv = smem + Sm::kV + stage * kTileV;
      const uint8_t* mask_tile = s.mask != nullptr ? smask + stage * kBlockN : nullptr;
      const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;

      const uint32_t in_range = work.ranges != nullptr ? range_bits(work.ranges, s, row_of, key0) : 0xffffffffu;
      // P (16 queries x 64 keys) times the softcap factor: here P only enters dS, so the factor is
      // folded in at once instead of being held in registers across the dO Vᵀ product
      float pr[kBlockN / 8][4];
      zero(pr);
      gemm_abt<kBlockN, kHeadDim, kS, kS>(pr, sq, 16 * warp, sk);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t key = key0 + 8 * j + 2 * (lane & 3) + (i & 1);
          float dcap;
          pr[j][i] = prob(score_log2(scorer, s, p.causal, mask_tile, key0, row_of[i >> 1], key, pr[j][i], dcap),
                          lse2[i >> 1]) * dcap;
        }
      }
      hide_outside(pr, in_range, 0.f);
      float ds[kBlockN / 8][4];  // dS = P ∘ (Z ∘ dO Vᵀ − delta), times the softcap factor (in pr)
      zero(ds);
      gemm_abt<kBlockN, kHeadDimV, kSv, kSv>(ds, sdo, 16 * warp, sv);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        uint32_t keep = 0xfu;
        if (drop.on) {
          const uint32_t lo = keep_pair(drop, row_of[0], key0 + 8 * j + 2 * (lane & 3));
          const uint32_t hi = keep_pair(drop, row_of[1], key0 + 8 * j + 2 * (lane & 3));
          keep = lo | hi << 2;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float dp = ds[j][i];
          if (drop.on) dp = (keep >> i & 1u) ? dp * drop.scale : 0.f;
          ds[j][i] = pr[j][i] * (dp - delta[i >> 1]);
        }
      }
      gemm_xb<kHeadDim, kBlockN, kS>(dq, ds, sk);  // dQ += dS_raw K (scaled at the end)
      __syncthreads();
    }
  }
  const float dq_scale[2] = {p.scale, p.scale};
  store_rows<T, kHeadDim>(static_cast<T*>(p.dq) + h * kHeadDim, q_stride, s.q_row + i0, rows, 16 * warp, dq, dq_scale);
}

// ------------------------------------------------------------------------------ launch shapes

// The (head dim of q/k, head dim of v) pairs compiled, X(D, Dv) each. Shared memory per block
// (fp16 or bf16), forward / dQ / dK-dV: (64, 64) 46,208 / 55,424 / 41,536; (128, 128) 87,168 /
// 104,576 / 74,304; (128, 64) 70,784 / 80,000 / 57,920 (dQ at (128, 128) is over the 99 KiB of
// sm_86/89/120, under sm_80's 163 KiB and sm_90's 227 KiB: the launcher checks the device's limit
// and names the kernel). (192, 128) (DeepSeek MLA) fits sm_80's shared memory (111,744 / 129,152 /
// 86,592) but its dK/dV kernel spills 144 bytes of registers with 4 warps: not compiled.
#define MMFUSE_ATTENTION_HEAD_DIMS(X) X(64, 64) X(128, 128) X(128, 64)

// the numbers above (and mmfuse/ops/attention.py's _CUDA_SHARED_BYTES, the largest per pair)
static_assert(ForwardSmem<64, 64>::bytes<__half>() == 46208 && DqSmem<64, 64>::bytes<__half>() == 55424 &&
              DkDvSmem<64, 64>::bytes<__half>() == 41536);
static_assert(ForwardSmem<128, 128>::bytes<__half>() == 87168 && DqSmem<128, 128>::bytes<__half>() == 104576 &&
              DkDvSmem<128, 128>::bytes<__half>() == 74304);
static_assert(ForwardSmem<128, 64>::bytes<__half>() == 70784 && DqSmem<128, 64>::bytes<__half>() == 80000 &&
              DkDvSmem<128, 64>::bytes<__half>() == 57920);

inline bool head_dims_supported(int head_dim, int head_dim_v) {
#define MMFUSE_ATTENTION_PAIR(D, DV) if (head_dim == D && head_dim_v == DV) return true;
  MMFUSE_ATTENTION_HEAD_DIMS(MMFUSE_ATTENTION_PAIR)
#undef MMFUSE_ATTENTION_PAIR
  return false;
}

// Grid, block and dynamic shared memory of each kernel: the one formula shared by the CUDA
// launcher and the host-emulator harness (tests/emulator/cross_attention.cpp).
struct KernelLaunch {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};

using Kernel = void (*)(AttentionParams);

// The kernels and dynamic shared memory of one compiled (D, Dv) pair; null and 0 for any other.
struct PairKernels {
  Kernel forward = nullptr, dq = nullptr, dkdv = nullptr;
  size_t forward_bytes = 0, dq_bytes = 0, dkdv_bytes = 0;
};

template <typename T>
inline PairKernels pair_kernels(int head_dim, int head_dim_v) {
#define MMFUSE_ATTENTION_PAIR(D, DV)                                                                       \
  if (head_dim == D && head_dim_v == DV)                                                                   \
    return {attention_forward_kernel<T, D, DV>, attention_backward_dq_kernel<T, D, DV>,                    \
            attention_backward_dkdv_kernel<T, D, DV>, ForwardSmem<D, DV>::template bytes<T>(),             \
            DqSmem<D, DV>::template bytes<T>(), DkDvSmem<D, DV>::template bytes<T>()};
  MMFUSE_ATTENTION_HEAD_DIMS(MMFUSE_ATTENTION_PAIR)
#undef MMFUSE_ATTENTION_PAIR
  return {};
}

constexpr int kMaxSplits = 64;
constexpr int kMaxDecodeQueries = 8;

// Split-KV decode schedule (FlashDecoding): with at most 8 queries per sample and too few
// (query tile, head, sample) CTAs to fill the GPU's `sm_count` SMs, the keys are split so that
// about two CTAs per SM run, each split covering at least two 64-key tiles. 1 = one pass.
inline int decode_splits(const AttentionParams& p, int sm_count) {
  if (p.len_q > kMaxDecodeQueries || p.len_q == 0 || sm_count <= 0) return 1;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.heads_q;  // one query tile per sample
  if (ctas >= sm_count) return 1;
  const int64_t key_tiles = (p.len_k + kBlockN - 1) / kBlockN;
  const int64_t want = (2 * static_cast<int64_t>(sm_count) + ctas - 1) / ctas;
  const int64_t splits = min64(min64(want, key_tiles / 2), kMaxSplits);
  return splits < 2 ? 1 : static_cast<int>(splits);
}

// Per-query-tile grid (forward, dQ): (query tiles x splits, Hq, B). cudaErrorInvalidValue for
// unsupported head dims or splits, cudaErrorInvalidConfiguration past the grid limits.
template <typename T>
inline cudaError_t query_tile_launch(const AttentionParams& p, bool forward, KernelLaunch* launch) {
  if (!head_dims_supported(p.head_dim, p.head_dim_v)) return cudaErrorInvalidValue;
  const int splits = forward && p.splits > 1 ? p.splits : 1;
  if (splits > kMaxSplits || (splits > 1 && (p.out_partial == nullptr || p.lse_partial == nullptr)))
    return cudaErrorInvalidValue;
  const int64_t tiles = (p.len_q + kBlockM - 1) / kBlockM * splits;
  if (tiles > 0x7fffffffLL || p.heads_q > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(tiles), p.heads_q, p.batch);
  launch->block = dim3(kThreads);
  const PairKernels kernels = pair_kernels<T>(p.head_dim, p.head_dim_v);
  launch->shared_bytes = forward ? kernels.forward_bytes : kernels.dq_bytes;
  return cudaSuccess;
}

template <typename T>
inline cudaError_t forward_launch(const AttentionParams& p, KernelLaunch* launch) {
  return query_tile_launch<T>(p, true, launch);
}

template <typename T>
inline cudaError_t dq_launch(const AttentionParams& p, KernelLaunch* launch) {
  return query_tile_launch<T>(p, false, launch);
}

template <typename T>
inline cudaError_t dkdv_launch(const AttentionParams& p, KernelLaunch* launch) {
  if (!head_dims_supported(p.head_dim, p.head_dim_v)) return cudaErrorInvalidValue;
  const int64_t tiles = (p.len_k + kBlockN - 1) / kBlockN;
  if (tiles > 0x7fffffffLL || p.heads_kv > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(tiles), p.heads_kv, p.batch);
  launch->block = dim3(kThreads);
  launch->shared_bytes = pair_kernels<T>(p.head_dim, p.head_dim_v).dkdv_bytes;
  return cudaSuccess;
}

// One warp per (query row, q head): the delta kernel and the split merge.
inline cudaError_t row_launch(const AttentionParams& p, KernelLaunch* launch) {
  const int64_t blocks = (p.q_rows * p.heads_q + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(blocks));
  launch->block = dim3(kThreads);
  launch->shared_bytes = 0;
  return cudaSuccess;
}

inline cudaError_t delta_launch(const AttentionParams& p, KernelLaunch* launch) { return row_launch(p, launch); }
inline cudaError_t merge_launch(const AttentionParams& p, KernelLaunch* launch) { return row_launch(p, launch); }

inline bool launches_nothing(const KernelLaunch& l) { return l.grid.x == 0 || l.grid.y == 0 || l.grid.z == 0; }

#ifdef __CUDACC__  // the host emulator launches through emu::launch instead
// kernel<<<l>>>(p) on `stream`, opting in to more than 48 KiB of dynamic shared memory when needed.
inline cudaError_t launch_kernel(Kernel kernel, const KernelLaunch& l, const AttentionParams& p, cudaStream_t stream) {
  if (launches_nothing(l)) return cudaSuccess;
  if (kernel == nullptr) return cudaErrorInvalidValue;
  if (l.shared_bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.shared_bytes));
    if (status != cudaSuccess) return status;
  }
  kernel<<<l.grid, l.block, l.shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

// out, lse from q, k, v (p.splits > 1: through the partial buffers and the merge kernel).
// T: __half or __nv_bfloat16; (p.head_dim, p.head_dim_v) one of MMFUSE_ATTENTION_HEAD_DIMS.
template <typename T>
cudaError_t launch_forward(const AttentionParams& p, cudaStream_t stream) {
  KernelLaunch l{};
  cudaError_t status = forward_launch<T>(p, &l);
  if (status == cudaSuccess) status = launch_kernel(pair_kernels<T>(p.head_dim, p.head_dim_v).forward, l, p, stream);
  if (status == cudaSuccess && p.splits > 1) {
    status = merge_launch(p, &l);
    if (status == cudaSuccess) status = launch_kernel(attention_split_merge_kernel<T>, l, p, stream);
  }
  return status;
}

// dq, dk, dv, dbias (and the delta scratch) from dout, dlse, q, k, v, out, lse: three launches in order.
template <typename T>
cudaError_t launch_backward(const AttentionParams& p, cudaStream_t stream) {
  KernelLaunch l{};
  cudaError_t status = delta_launch(p, &l);
  if (status == cudaSuccess) status = launch_kernel(attention_backward_delta_kernel<T>, l, p, stream);
  if (status == cudaSuccess) status = dkdv_launch<T>(p, &l);
  if (status == cudaSuccess) status = launch_kernel(pair_kernels<T>(p.head_dim, p.head_dim_v).dkdv, l, p, stream);
  if (status == cudaSuccess) status = dq_launch<T>(p, &l);
  if (status == cudaSuccess) status = launch_kernel(pair_kernels<T>(p.head_dim, p.head_dim_v).dq, l, p, stream);
  return status;
}
#endif

}  // namespace attention
}  // namespace cuda
}  // namespace mmfuse

#ifdef MMFUSE_KERNEL_COMPILE_CHECK
// Instantiated only by the nvcc compile check (tests/test_build.py): both dtypes, both directions.
#define MMFUSE_INSTANTIATE_ATTENTION(T)                                                                         \
  template cudaError_t mmfuse::cuda::attention::launch_forward<T>(const mmfuse::cuda::attention::AttentionParams&, \
                                                                  cudaStream_t);                                 \
  template cudaError_t mmfuse::cuda::attention::launch_backward<T>(const mmfuse::cuda::attention::AttentionParams&, \
                                                                   cudaStream_t);
MMFUSE_INSTANTIATE_ATTENTION(__half)
MMFUSE_INSTANTIATE_ATTENTION(__nv_bfloat16)
#undef MMFUSE_INSTANTIATE_ATTENTION
#endif
