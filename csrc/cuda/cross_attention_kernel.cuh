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
//
// Semantics are the CPU kernel's (csrc/cpu/cross_attention.cpp): layout (B, L, H, D) or packed
// (total, H, D) with int32 cu_seqlens; query head h reads kv head h / (Hq / Hkv); key j is
// visible to query i iff j < kv_len, the key padding mask does not hide it, and (causal)
// j <= i + kv_len − q_len; rows with no visible key give out 0, lse −inf and zero gradients.
// Keys at or past kv_len are never read.
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
// k/v (B, Lk, Hkv, D), lse (B, Hq, Lq). Varlen: q (total_q, Hq, D), k/v (total_k, Hkv, D),
// lse (Hq, total_q), sample b's rows cu_seqlens[b] .. cu_seqlens[b + 1].
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;               // forward output, backward input O
  float* lse;              // forward output, backward input
  const void* dout;        // backward: dO, q's shape
  const float* dlse;       // backward: lse's shape, or null
  float* delta;            // backward scratch: lse's shape
  void* dq;                // backward outputs, q's / k's shapes
  void* dk;
  void* dv;
  const int32_t* cu_seqlens_q;      // (B + 1), varlen only (else null)
  const int32_t* cu_seqlens_k;      // (B + 1), varlen only
  const int32_t* kv_lens;           // (B), padded, optional
  const uint8_t* key_padding_mask;  // (B, Lk) bool bytes, padded, optional; nonzero = hidden
  int64_t len_q;                    // padded Lq; varlen max_seqlen_q (the grid's extent)
  int64_t len_k;                    // padded Lk; varlen max_seqlen_k
  int64_t lse_len;                  // lse's last dimension: Lq, or total_q (varlen)
  int64_t q_rows;                   // rows of q: B * Lq, or total_q
  int batch;
  int heads_q;
  int heads_kv;
  int head_dim;
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
  } else {
    s.q_row = b * p.len_q;
    s.q_len = p.len_q;
    s.k_row = b * p.len_k;
    // clamped so that a bad length can never address past the sample's keys
    s.k_len = p.kv_lens != nullptr ? min64(max64(static_cast<int64_t>(p.kv_lens[b]), int64_t(0)), p.len_k) : p.len_k;
    s.k_extent = p.len_k;
    s.lse_base = static_cast<int64_t>(b) * p.heads_q * p.len_q;
    s.mask = p.key_padding_mask != nullptr ? p.key_padding_mask + b * p.len_k : nullptr;
  }
  return s;
}

// Keys [0, end) that queries below `query_end` can see: the key loop's bound (bottom-right causal).
__device__ __forceinline__ int64_t key_end(const Sample& s, bool causal, int64_t query_end) {
  if (!causal) return s.k_len;
  return min64(max64(query_end + s.k_len - s.q_len, int64_t(0)), s.k_len);
}

// Key `key` (of the tile starting at `key0`, whose mask bytes are `mask_tile`) visible to `query`.
__device__ __forceinline__ bool visible(const Sample& s, bool causal, const uint8_t* mask_tile, int64_t key0,
                                        int64_t query, int64_t key) {
  if (key >= s.k_len) return false;
  if (causal && key > query + s.k_len - s.q_len) return false;
  return mask_tile == nullptr || mask_tile[key - key0] == 0;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
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

// One step of the two-stage cp.async pipeline, before tile `tile` of `tiles` is consumed from
// stage tile & 1: prefetch(tile + 1, stage) issues the next tile's loads into the other stage,
// then this tile's copies are awaited and the block synchronised. The caller ends each step with
// __syncthreads() so that the stage it read is free before the next step's prefetch refills it.
template <typename Index, typename Prefetch>
__device__ __forceinline__ void pipeline_step(Index tile, Index tiles, Prefetch&& prefetch) {
  if (tile + 1 < tiles) {
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
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_kv_tile(T* sk, T* sv, uint8_t* smask, const T* k, const T* v, int64_t k_stride,
                                             const Sample& s, int64_t end, int tile, int stage) {
  constexpr int kTileKV = Tile<kHeadDim>::template kElems<kBlockN>;
  const int64_t key0 = static_cast<int64_t>(tile) * kBlockN, valid = min64(kBlockN, end - key0);
  load_rows<T, kHeadDim, kBlockN>(sk + stage * kTileKV, k, k_stride, s.k_row + key0, valid);
  load_rows<T, kHeadDim, kBlockN>(sv + stage * kTileKV, v, k_stride, s.k_row + key0, valid);
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
// g, half 1: row g + 8) to global rows first_row + r, for r < valid.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_rows(T* dst, int64_t stride, int64_t first_row, int64_t valid, int r0,
                                          const float (&acc)[kHeadDim / 8][4], const float (&row_scale)[2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + (lane >> 2) + 8 * half;
    if (r >= valid) continue;
    T* row = dst + (first_row + r) * stride + 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      *reinterpret_cast<uint32_t*>(row + 8 * j) =
          pack2<T>(acc[j][2 * half] * row_scale[half], acc[j][2 * half + 1] * row_scale[half]);
    }
  }
}

// ----------------------------------------------------------------------------------- forward

// The work of one CTA of the per-query-tile grid (forward, dQ): queries i0 .. i0 + rows - 1 of
// q head h (kv head hk) of sample blockIdx.z, and the key tiles they can see.
struct QueryTile {
  Sample s;
  int h, hk;
  int64_t i0, rows;  // rows == 0: the tile lies past the sample's queries (varlen grids cover the longest)
  int64_t end;       // keys [0, end) are visible to some query of the tile
  int tiles;         // K/V tiles of kBlockN keys below end
  int64_t row_of[2];  // this lane's rows in the C fragments: g and g + 8 of its warp's 16
};

__device__ __forceinline__ QueryTile query_tile(const AttentionParams& p) {
  QueryTile t;
  t.s = sample_of(p, blockIdx.z);
  t.h = blockIdx.y;
  t.hk = t.h / (p.heads_q / p.heads_kv);
  t.i0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  t.rows = max64(0, min64(kBlockM, t.s.q_len - t.i0));
  t.end = key_end(t.s, p.causal, t.i0 + t.rows);
  t.tiles = static_cast<int>((t.end + kBlockN - 1) / kBlockN);
  const int64_t first = t.i0 + 16 * (threadIdx.x / 32) + (threadIdx.x % 32) / 4;
  t.row_of[0] = first, t.row_of[1] = first + 8;
  return t;
}

template <int kHeadDim>
struct ForwardSmem {
  using Tl = Tile<kHeadDim>;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + Tl::template kElems<kBlockM>;  // two stages
  static constexpr int kV = kK + 2 * Tl::template kElems<kBlockN>;
  static constexpr int kEnd = kV + 2 * Tl::template kElems<kBlockN>;
  template <typename T>
  static constexpr size_t bytes() { return kEnd * sizeof(T) + 2 * kBlockN; }  // + mask bytes per stage
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(AttentionParams p) {
  using Tl = Tile<kHeadDim>;
  using Sm = ForwardSmem<kHeadDim>;
  constexpr int kS = Tl::kStride, kTileKV = Tl::template kElems<kBlockN>;
  const QueryTile work = query_tile(p);
  if (work.rows == 0) return;
  const Sample& s = work.s;
  const int64_t i0 = work.i0, rows = work.rows, end = work.end, (&row_of)[2] = work.row_of;
  const int tiles = work.tiles, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q_stride = static_cast<int64_t>(p.heads_q) * kHeadDim, k_stride = static_cast<int64_t>(p.heads_kv) * kHeadDim;
  const T* q = static_cast<const T*>(p.q) + work.h * kHeadDim;
  const T* k = static_cast<const T*>(p.k) + work.hk * kHeadDim;
  const T* v = static_cast<const T*>(p.v) + work.hk * kHeadDim;
  T* out = static_cast<T*>(p.out) + work.h * kHeadDim;
  float* lse = p.lse + s.lse_base + work.h * p.lse_len;
  if (tiles == 0) {  // no visible key in the whole tile: 0 and -inf, nothing read
    float o[kHeadDim / 8][4];
    zero(o);
    const float none[2] = {0.f, 0.f};
    store_rows<T, kHeadDim>(out, q_stride, s.q_row + i0, rows, 16 * warp, o, none);
    if ((lane & 3) == 0) {
      for (int half = 0; half < 2; ++half)
        if (row_of[half] < s.q_len) lse[row_of[half]] = -INFINITY;
    }
    return;
  }

  MMFUSE_DYNAMIC_SHARED(T, smem);
  T* sq = smem + Sm::kQ;
  uint8_t* smask = reinterpret_cast<uint8_t*>(smem + Sm::kEnd);
  auto load_kv = [&](int tile, int stage) {
    load_kv_tile<T, kHeadDim>(smem + Sm::kK, smem + Sm::kV, smask, k, v, k_stride, s, end, tile, stage);
  };
  load_rows<T, kHeadDim, kBlockM>(sq, q, q_stride, s.q_row + i0, rows);
  load_kv(0, 0);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float o[kHeadDim / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this lane's columns only
  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    pipeline_step(tile, tiles, load_kv);
    const T* sk = smem + Sm::kK + stage * kTileKV;
    const T* sv = smem + Sm::kV + stage * kTileKV;
    const uint8_t* mask_tile = s.mask != nullptr ? smask + stage * kBlockN : nullptr;
    const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;

    float sc[kBlockN / 8][4];
    zero(sc);
    gemm_abt<kBlockN, kHeadDim, kS, kS>(sc, sq, 16 * warp, sk);

    // scale to log2 units, hide invisible keys, then the online softmax per row half
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t key = key0 + 8 * j + 2 * (lane & 3) + (i & 1);
        sc[j][i] = visible(s, p.causal, mask_tile, key0, row_of[i >> 1], key) ? sc[j][i] * scale_log2 : -INFINITY;
      }
    }
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
      row_sum[half] = row_sum[half] * correction + sum;
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) o[j][2 * half] *= correction, o[j][2 * half + 1] *= correction;
    }
    gemm_xb<kHeadDim, kBlockN, kS>(o, sc, sv);
    __syncthreads();  // this stage's buffers are refilled by the next iteration's prefetch
  }

  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = row_sum[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[half] = l > 0.f ? 1.f / l : 0.f;
    if ((lane & 3) == 0 && row_of[half] < s.q_len) {
      lse[row_of[half]] = l > 0.f ? (row_max[half] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
  store_rows<T, kHeadDim>(out, q_stride, s.q_row + i0, rows, 16 * warp, o, inv);
}

// ---------------------------------------------------------------------------------- backward

// lse in log2 units for P = exp2(s · scale · log2 e − lse2); +inf where lse is −inf (no visible
// key, or a padding row), so that P is 0 there and never NaN.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// delta = rowsum(dO ∘ O) − dlse per (query row, q head), in lse's layout; 0 where lse is −inf.
// One warp per (row, head).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_backward_delta_kernel(AttentionParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (item >= p.q_rows * p.heads_q) return;  // warp-uniform
  const int lane = threadIdx.x % 32;
  const int64_t row = item / p.heads_q, h = item % p.heads_q;
  const T* o = static_cast<const T*>(p.out) + (row * p.heads_q + h) * p.head_dim;
  const T* g = static_cast<const T*>(p.dout) + (row * p.heads_q + h) * p.head_dim;
  float sum = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) sum += to_float(o[d]) * to_float(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane != 0) return;
  // padded: lse (B, Hq, Lq) and row = b Lq + i; varlen: lse (Hq, total_q), one "sample" of lse_len rows
  const int64_t idx = (row / p.lse_len) * p.heads_q * p.lse_len + h * p.lse_len + row % p.lse_len;
  p.delta[idx] = p.lse[idx] == -INFINITY ? 0.f : sum - (p.dlse != nullptr ? p.dlse[idx] : 0.f);
}

template <int kHeadDim>
struct DkDvSmem {
  using Tl = Tile<kHeadDim>;
  static constexpr int kK = 0;
  static constexpr int kV = kK + Tl::template kElems<kBlockN>;
  static constexpr int kQ = kV + Tl::template kElems<kBlockN>;  // two stages each of Q and dO
  static constexpr int kDO = kQ + 2 * Tl::template kElems<kBlockMBwd>;
  static constexpr int kEnd = kDO + 2 * Tl::template kElems<kBlockMBwd>;
  // then float lse2[2][kBlockMBwd], delta[2][kBlockMBwd], and the tile's kBlockN mask bytes
  template <typename T>
  static constexpr size_t bytes() { return kEnd * sizeof(T) + 4 * kBlockMBwd * sizeof(float) + kBlockN; }
};

// dK, dV of one 64-key tile of kv head hk: warp w owns keys 16w .. 16w + 15 and accumulates
// their dK, dV rows (16 x D each) in registers over every (q head of the group, 32-query tile).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(AttentionParams p) {
  using Tl = Tile<kHeadDim>;
  using Sm = DkDvSmem<kHeadDim>;
  constexpr int kS = Tl::kStride, kTileQ = Tl::template kElems<kBlockMBwd>;
  const int hk = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Sample s = sample_of(p, b);
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  if (key0 >= s.k_extent) return;
  const int64_t key_rows = min64(static_cast<int64_t>(kBlockN), s.k_extent - key0);  // rows written
  const int64_t key_valid = min64(max64(s.k_len - key0, int64_t(0)), static_cast<int64_t>(kBlockN));  // rows read
  const int group = p.heads_q / p.heads_kv;
  const int64_t q_stride = static_cast<int64_t>(p.heads_q) * kHeadDim, k_stride = static_cast<int64_t>(p.heads_kv) * kHeadDim;

  // queries before first_q see no key of this tile (causal); none at all if the tile has no valid
  // key (then no query tile either: first_q = q_len alone would leave the ragged last one)
  const int64_t first_q = key_valid == 0 ? s.q_len : (p.causal ? max64(int64_t(0), key0 - (s.k_len - s.q_len)) : 0);
  const int64_t tile0 = first_q / kBlockMBwd;
  const int64_t q_tiles = key_valid == 0 ? 0 : max64(int64_t(0), (s.q_len + kBlockMBwd - 1) / kBlockMBwd - tile0);
  const int64_t steps = group * q_tiles;

  float dk[kHeadDim / 8][4], dv[kHeadDim / 8][4];
  zero(dk);
  zero(dv);
  if (steps > 0) {
    MMFUSE_DYNAMIC_SHARED(T, smem);
    T* sk = smem + Sm::kK;
    T* sv = smem + Sm::kV;
    float* slse = reinterpret_cast<float*>(smem + Sm::kEnd);  // [2][kBlockMBwd]
    float* sdelta = slse + 2 * kBlockMBwd;
    uint8_t* smask = reinterpret_cast<uint8_t*>(sdelta + 2 * kBlockMBwd);
    const uint8_t* mask_tile = s.mask != nullptr ? smask : nullptr;
    auto load_step = [&](int64_t step, int stage) {
      const int64_t h = hk * group + step / q_tiles, i0 = (tile0 + step % q_tiles) * kBlockMBwd;
      const int64_t valid = min64(static_cast<int64_t>(kBlockMBwd), s.q_len - i0);
      load_rows<T, kHeadDim, kBlockMBwd>(smem + Sm::kQ + stage * kTileQ, static_cast<const T*>(p.q) + h * kHeadDim,
                                         q_stride, s.q_row + i0, valid);
      load_rows<T, kHeadDim, kBlockMBwd>(smem + Sm::kDO + stage * kTileQ, static_cast<const T*>(p.dout) + h * kHeadDim,
                                         q_stride, s.q_row + i0, valid);
      if (threadIdx.x < kBlockMBwd) {
        const int64_t idx = s.lse_base + h * p.lse_len + i0 + threadIdx.x;
        const bool in = threadIdx.x < valid;
        slse[stage * kBlockMBwd + threadIdx.x] = in ? lse_log2(p.lse[idx]) : INFINITY;
        sdelta[stage * kBlockMBwd + threadIdx.x] = in ? p.delta[idx] : 0.f;
      }
    };
    load_rows<T, kHeadDim, kBlockN>(sk, static_cast<const T*>(p.k) + hk * kHeadDim, k_stride, s.k_row + key0, key_valid);
    load_rows<T, kHeadDim, kBlockN>(sv, static_cast<const T*>(p.v) + hk * kHeadDim, k_stride, s.k_row + key0, key_valid);
    load_mask(smask, s, key0);
    load_step(0, 0);
    cp_async_commit();

    const float scale_log2 = p.scale * kLog2e;
    const int64_t key_of[2] = {key0 + 16 * warp + (lane >> 2), key0 + 16 * warp + (lane >> 2) + 8};
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step & 1);
      pipeline_step(step, steps, load_step);
      const T* sq = smem + Sm::kQ + stage * kTileQ;
      const T* sdo = smem + Sm::kDO + stage * kTileQ;
      const float* lse2 = slse + stage * kBlockMBwd;
      const float* delta = sdelta + stage * kBlockMBwd;
      const int64_t i0 = (tile0 + step % q_tiles) * kBlockMBwd;

      // Pᵀ (16 keys x 32 queries) = exp2(K Qᵀ · scale log2 e − lse2), 0 where hidden
      float pt[kBlockMBwd / 8][4];
      zero(pt);
      gemm_abt<kBlockMBwd, kHeadDim, kS, kS>(pt, sk, 16 * warp, sq);
      int cols[kBlockMBwd / 8][2];
#pragma unroll
      for (int j = 0; j < kBlockMBwd / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = 8 * j + 2 * (lane & 3) + (i & 1);
          cols[j][i & 1] = col;
          pt[j][i] = visible(s, p.causal, mask_tile, key0, i0 + col, key_of[i >> 1])
                         ? exp2f(pt[j][i] * scale_log2 - lse2[col]) : 0.f;
        }
      }
      gemm_xb<kHeadDim, kBlockMBwd, kS>(dv, pt, sdo);  // dV += Pᵀ dO

      // dSᵀ = Pᵀ ∘ (V dOᵀ − delta)
      float dst[kBlockMBwd / 8][4];
      zero(dst);
      gemm_abt<kBlockMBwd, kHeadDim, kS, kS>(dst, sv, 16 * warp, sdo);
#pragma unroll
      for (int j = 0; j < kBlockMBwd / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[j][i] = pt[j][i] * (dst[j][i] - delta[cols[j][i & 1]]);
      }
      gemm_xb<kHeadDim, kBlockMBwd, kS>(dk, dst, sq);  // dK += dSᵀ Q (scaled at the end)
      __syncthreads();
    }
  }
  // every key row of the sample gets its gradient, 0 past kv_len (never read, never visible)
  const float dk_scale[2] = {p.scale, p.scale}, one[2] = {1.f, 1.f};
  store_rows<T, kHeadDim>(static_cast<T*>(p.dk) + hk * kHeadDim, k_stride, s.k_row + key0, key_rows, 16 * warp, dk,
                          dk_scale);
  store_rows<T, kHeadDim>(static_cast<T*>(p.dv) + hk * kHeadDim, k_stride, s.k_row + key0, key_rows, 16 * warp, dv,
                          one);
}

template <int kHeadDim>
struct DqSmem {
  using Tl = Tile<kHeadDim>;
  static constexpr int kQ = 0;
  static constexpr int kDO = kQ + Tl::template kElems<kBlockM>;
  static constexpr int kK = kDO + Tl::template kElems<kBlockM>;  // two stages each of K and V
  static constexpr int kV = kK + 2 * Tl::template kElems<kBlockN>;
  static constexpr int kEnd = kV + 2 * Tl::template kElems<kBlockN>;
  // then the mask bytes of two stages
  template <typename T>
  static constexpr size_t bytes() { return kEnd * sizeof(T) + 2 * kBlockN; }
};

// dQ of one 64-query tile of q head h: warp w owns queries 16w .. 16w + 15, loops over key tiles.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(AttentionParams p) {
  using Tl = Tile<kHeadDim>;
  using Sm = DqSmem<kHeadDim>;
  constexpr int kS = Tl::kStride, kTileKV = Tl::template kElems<kBlockN>;
  const QueryTile work = query_tile(p);
  if (work.rows == 0) return;
  const Sample& s = work.s;
  const int64_t i0 = work.i0, rows = work.rows, end = work.end, (&row_of)[2] = work.row_of;
  const int tiles = work.tiles, h = work.h, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q_stride = static_cast<int64_t>(p.heads_q) * kHeadDim, k_stride = static_cast<int64_t>(p.heads_kv) * kHeadDim;
  const T* k = static_cast<const T*>(p.k) + work.hk * kHeadDim;
  const T* v = static_cast<const T*>(p.v) + work.hk * kHeadDim;

  float dq[kHeadDim / 8][4];
  zero(dq);
  if (tiles > 0) {
    MMFUSE_DYNAMIC_SHARED(T, smem);
    const T* sq = smem + Sm::kQ;
    const T* sdo = smem + Sm::kDO;
    uint8_t* smask = reinterpret_cast<uint8_t*>(smem + Sm::kEnd);
    auto load_kv = [=](int tile, int stage) {  // by value: by reference, ptxas spilled 8 bytes (sm_80, D 64)
      load_kv_tile<T, kHeadDim>(smem + Sm::kK, smem + Sm::kV, smask, k, v, k_stride, s, end, tile, stage);
    };
    load_rows<T, kHeadDim, kBlockM>(smem + Sm::kQ, static_cast<const T*>(p.q) + h * kHeadDim, q_stride, s.q_row + i0,
                                    rows);
    load_rows<T, kHeadDim, kBlockM>(smem + Sm::kDO, static_cast<const T*>(p.dout) + h * kHeadDim, q_stride,
                                    s.q_row + i0, rows);
    load_kv(0, 0);
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
    const float scale_log2 = p.scale * kLog2e;
    for (int tile = 0; tile < tiles; ++tile) {
      const int stage = tile & 1;
      pipeline_step(tile, tiles, load_kv);
      const T* sk = smem + Sm::kK + stage * kTileKV;
      const T* sv = smem + Sm::kV + stage * kTileKV;
      const uint8_t* mask_tile = s.mask != nullptr ? smask + stage * kBlockN : nullptr;
      const int64_t key0 = static_cast<int64_t>(tile) * kBlockN;

      float pr[kBlockN / 8][4];  // P (16 queries x 64 keys)
      zero(pr);
      gemm_abt<kBlockN, kHeadDim, kS, kS>(pr, sq, 16 * warp, sk);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t key = key0 + 8 * j + 2 * (lane & 3) + (i & 1);
          pr[j][i] = visible(s, p.causal, mask_tile, key0, row_of[i >> 1], key)
                         ? exp2f(pr[j][i] * scale_log2 - lse2[i >> 1]) : 0.f;
        }
      }
      float ds[kBlockN / 8][4];  // dS = P ∘ (dO Vᵀ − delta)
      zero(ds);
      gemm_abt<kBlockN, kHeadDim, kS, kS>(ds, sdo, 16 * warp, sv);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[j][i] = pr[j][i] * (ds[j][i] - delta[i >> 1]);
      }
      gemm_xb<kHeadDim, kBlockN, kS>(dq, ds, sk);  // dQ += dS K (scaled at the end)
      __syncthreads();
    }
  }
  const float dq_scale[2] = {p.scale, p.scale};
  store_rows<T, kHeadDim>(static_cast<T*>(p.dq) + h * kHeadDim, q_stride, s.q_row + i0, rows, 16 * warp, dq, dq_scale);
}

// ------------------------------------------------------------------------------ launch shapes

// Grid, block and dynamic shared memory of each kernel: the one formula shared by the CUDA
// launcher and the host-emulator harness (tests/emulator/cross_attention.cpp).
struct KernelLaunch {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};

inline bool head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

// Per-query-tile grid (forward, dQ): (query tiles, Hq, B). cudaErrorInvalidValue for an
// unsupported head dim, cudaErrorInvalidConfiguration past the grid limits.
template <typename T>
inline cudaError_t query_tile_launch(const AttentionParams& p, bool forward, KernelLaunch* launch) {
  if (!head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  const int64_t tiles = (p.len_q + kBlockM - 1) / kBlockM;
  if (tiles > 0x7fffffffLL || p.heads_q > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(tiles), p.heads_q, p.batch);
  launch->block = dim3(kThreads);
  if (forward) {
    launch->shared_bytes = p.head_dim == 64 ? ForwardSmem<64>::bytes<T>() : ForwardSmem<128>::bytes<T>();
  } else {
    launch->shared_bytes = p.head_dim == 64 ? DqSmem<64>::bytes<T>() : DqSmem<128>::bytes<T>();
  }
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
  if (!head_dim_supported(p.head_dim)) return cudaErrorInvalidValue;
  const int64_t tiles = (p.len_k + kBlockN - 1) / kBlockN;
  if (tiles > 0x7fffffffLL || p.heads_kv > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(tiles), p.heads_kv, p.batch);
  launch->block = dim3(kThreads);
  launch->shared_bytes = p.head_dim == 64 ? DkDvSmem<64>::bytes<T>() : DkDvSmem<128>::bytes<T>();
  return cudaSuccess;
}

inline cudaError_t delta_launch(const AttentionParams& p, KernelLaunch* launch) {
  const int64_t blocks = (p.q_rows * p.heads_q + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(blocks));
  launch->block = dim3(kThreads);
  launch->shared_bytes = 0;
  return cudaSuccess;
}

inline bool launches_nothing(const KernelLaunch& l) { return l.grid.x == 0 || l.grid.y == 0 || l.grid.z == 0; }

#ifdef __CUDACC__  // the host emulator launches through emu::launch instead
// kernel<<<l>>>(p) on `stream`, opting in to more than 48 KiB of dynamic shared memory when needed.
inline cudaError_t launch_kernel(void (*kernel)(AttentionParams), const KernelLaunch& l, const AttentionParams& p,
                                 cudaStream_t stream) {
  if (launches_nothing(l)) return cudaSuccess;
  if (l.shared_bytes > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.shared_bytes));
    if (status != cudaSuccess) return status;
  }
  kernel<<<l.grid, l.block, l.shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

// out, lse from q, k, v. T: __half or __nv_bfloat16; p.head_dim 64 or 128.
template <typename T>
cudaError_t launch_forward(const AttentionParams& p, cudaStream_t stream) {
  KernelLaunch l{};
  const cudaError_t status = forward_launch<T>(p, &l);
  if (status != cudaSuccess) return status;
  return launch_kernel(p.head_dim == 64 ? attention_forward_kernel<T, 64> : attention_forward_kernel<T, 128>, l, p,
                       stream);
}

// dq, dk, dv (and the delta scratch) from dout, dlse, q, k, v, out, lse: three launches in order.
template <typename T>
cudaError_t launch_backward(const AttentionParams& p, cudaStream_t stream) {
  KernelLaunch l{};
  cudaError_t status = delta_launch(p, &l);
  if (status == cudaSuccess) status = launch_kernel(attention_backward_delta_kernel<T>, l, p, stream);
  if (status == cudaSuccess) status = dkdv_launch<T>(p, &l);
  if (status == cudaSuccess) {
    status = launch_kernel(p.head_dim == 64 ? attention_backward_dkdv_kernel<T, 64> : attention_backward_dkdv_kernel<T, 128>,
                           l, p, stream);
  }
  if (status == cudaSuccess) status = dq_launch<T>(p, &l);
  if (status == cudaSuccess) {
    status = launch_kernel(p.head_dim == 64 ? attention_backward_dq_kernel<T, 64> : attention_backward_dq_kernel<T, 128>,
                           l, p, stream);
  }
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
