// Kernels exercising each primitive of the host emulator (csrc/emu/cuda_emu.h) and of
// csrc/cuda/mma.cuh, built by tests/test_emulator.py with g++ for the emulator and, on a GPU
// machine, with nvcc, so that both runs can be compared.
//
// Negative-test switches (-D): EMU_TEST_DROP_BARRIER removes the reduction's __syncthreads;
// EMU_TEST_WRONG_FRAGMENT swaps A-fragment registers 1 and 2 (rows + 8 vs cols + 8), a classic
// layout bug; EMU_TEST_NO_EARLY_READ leaves out cp_async_kernel's deliberately racy reads.
#include "harness.h"

#include <cstdint>

#include "cuda/mma.cuh"
#include "cuda/shared_memory.cuh"

namespace {

using mmfuse::cuda::MmaM16N8K16Layout;

constexpr unsigned kFullMask = 0xffffffffu;

// Tree sum of one element per thread in static shared memory; any block size up to 1024.
__global__ void block_sum_kernel(const float* x, float* sums, int64_t n) {
  __shared__ float partial[1024];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + tid;
  partial[tid] = i < n ? x[i] : 0.0f;
  for (int stride = 1; stride < static_cast<int>(blockDim.x); stride *= 2) {
#ifndef EMU_TEST_DROP_BARRIER
    __syncthreads();
#endif
    if (tid % (2 * stride) == 0 && tid + stride < static_cast<int>(blockDim.x)) partial[tid] += partial[tid + stride];
  }
  if (tid == 0) sums[blockIdx.x] = partial[0];
}

// One int per thread; out is (12, n): each warp collective's per-lane result.

__global__ void warp_collectives_kernel(const int* in, int* out, float* warp_sums, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int v = in[i];
  int* o = out + i;
  o[0 * n] = __shfl_sync(kFullMask, v, (lane * 7 + 3) % 32);
  o[1 * n] = __shfl_sync(kFullMask, v, lane * 5 + 1, 8);
  o[2 * n] = __shfl_up_sync(kFullMask, v, 3, 16);
  o[3 * n] = __shfl_down_sync(kFullMask, v, 5);
  o[4 * n] = __shfl_down_sync(kFullMask, v, 2, 8);
  o[5 * n] = __shfl_xor_sync(kFullMask, v, 6);
  o[6 * n] = __shfl_xor_sync(kFullMask, v, 13, 8);
  o[7 * n] = static_cast<int>(__ballot_sync(kFullMask, v > 0));
  o[8 * n] = __any_sync(kFullMask, v > 950);
  o[9 * n] = __all_sync(kFullMask, v > -950);
  const unsigned bits = static_cast<unsigned>(v);
  __half2 pair = __halves2half2(__ushort_as_half(bits & 0xffffu), __ushort_as_half(bits >> 16));
  pair = __shfl_down_sync(kFullMask, pair, 1);
  o[10 * n] = static_cast<int>(__half_as_ushort(pair.x) | static_cast<unsigned>(__half_as_ushort(pair.y)) << 16);
  // the two half-warps shuffle separately, each under its own mask
  o[11 * n] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : __shfl_xor_sync(0xffff0000u, v, 2);

  float s = static_cast<float>(v) / 7.0f;
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(kFullMask, s, offset);
  warp_sums[i] = s;
}

// Reverses each block's chunk through dynamic shared memory.
__global__ void reverse_chunks_kernel(const float* x, float* y, int64_t n) {
  MMFUSE_DYNAMIC_SHARED(float, chunk);
  const int tid = static_cast<int>(threadIdx.x), size = static_cast<int>(blockDim.x);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * size;
  chunk[tid] = base + tid < n ? x[base + tid] : 0.0f;
  __syncthreads();
  const int64_t dst = base + size - 1 - tid;
  if (dst < n) y[dst] = chunk[tid];
}

// What each block finds in shared memory before writing it, then writes: every block must see
// poison, not the previous block's values.
__global__ void shared_poison_kernel(unsigned* static_seen, unsigned* dynamic_seen) {
  __shared__ unsigned words[64];
  MMFUSE_DYNAMIC_SHARED(unsigned, dynamic_words);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  static_seen[i] = words[threadIdx.x];
  dynamic_seen[i] = dynamic_words[threadIdx.x];
  __syncthreads();
  words[threadIdx.x] = static_cast<unsigned>(i);
  dynamic_words[threadIdx.x] = static_cast<unsigned>(i);
}

// One warp per 16x16x16 tile: A (16, 16) row-major, B (16, 8) as B[k][n], C and D (16, 8), all
// loaded into and stored from fragments by the PTX layout.
template <typename T>
__global__ void mma_tiles_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  using L = MmaM16N8K16Layout;
  const int lane = static_cast<int>(threadIdx.x);
  const uint16_t* A = a + blockIdx.x * 256;
  const uint16_t* B = b + blockIdx.x * 128;
  uint32_t ra[4], rb[2];
  float rc[4], rd[4];
  for (int r = 0; r < 4; ++r) {
    const int lo = 2 * r, hi = 2 * r + 1;
    ra[r] = A[L::a_row(lane, lo) * 16 + L::a_col(lane, lo)] | uint32_t{A[L::a_row(lane, hi) * 16 + L::a_col(lane, hi)]} << 16;
  }
#ifdef EMU_TEST_WRONG_FRAGMENT
  const uint32_t swapped = ra[1];
  ra[1] = ra[2];
  ra[2] = swapped;
#endif
  for (int r = 0; r < 2; ++r) {
    const int lo = 2 * r, hi = 2 * r + 1;
    rb[r] = B[L::b_k(lane, lo) * 8 + L::b_n(lane, lo)] | uint32_t{B[L::b_k(lane, hi) * 8 + L::b_n(lane, hi)]} << 16;
  }
  for (int i = 0; i < 4; ++i) rc[i] = c[blockIdx.x * 128 + L::c_row(lane, i) * 8 + L::c_col(lane, i)];
  mmfuse::cuda::mma_m16n8k16<T>(rd, ra, rb, rc);
  for (int i = 0; i < 4; ++i) d[blockIdx.x * 128 + L::c_row(lane, i) * 8 + L::c_col(lane, i)] = rd[i];
}

// Four 8x8 16-bit matrices (4, 8, 8) staged in shared memory with padded rows; out is
// (6 variants: x1, x2, x4, x1.trans, x2.trans, x4.trans; 32 lanes; 4 registers).
constexpr int kLdmatrixStride = 24;  // elements per shared row: 48 bytes, rows stay 16-byte aligned

__global__ void ldmatrix_kernel(const uint16_t* matrices, uint32_t* out) {
  __shared__ __align__(16) uint16_t tile[32 * kLdmatrixStride];
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = lane; e < 256; e += 32) tile[(e / 8) * kLdmatrixStride + e % 8] = matrices[e];
  __syncthreads();
  const uint16_t* row = &tile[lane * kLdmatrixStride];  // lanes 8j..8j+7: rows of matrix j
  uint32_t* o = out + lane * 4;
  uint32_t r1, r2[2], r4[4];
  mmfuse::cuda::ldmatrix_x1(r1, row);
  o[0 * 128] = r1;
  mmfuse::cuda::ldmatrix_x2(r2, row);
  for (int j = 0; j < 2; ++j) o[1 * 128 + j] = r2[j];
  mmfuse::cuda::ldmatrix_x4(r4, row);
  for (int j = 0; j < 4; ++j) o[2 * 128 + j] = r4[j];
  mmfuse::cuda::ldmatrix_x1_trans(r1, row);
  o[3 * 128] = r1;
  mmfuse::cuda::ldmatrix_x2_trans(r2, row);
  for (int j = 0; j < 2; ++j) o[4 * 128 + j] = r2[j];
  mmfuse::cuda::ldmatrix_x4_trans(r4, row);
  for (int j = 0; j < 4; ++j) o[5 * 128 + j] = r4[j];
}

// Each thread copies two 16-byte chunks in two commit groups. `early`: its first chunk read
// before any wait; `mid`: the whole tile after cp_async_wait<1> and a barrier (first group only);
// `last`: the whole tile after cp_async_wait<0>.
constexpr int kCopyThreads = 48;

__global__ void cp_async_kernel(const uint4* src, uint4* early, uint4* mid, uint4* last) {
  __shared__ __align__(16) uint4 tile[2 * kCopyThreads];
  const int tid = static_cast<int>(threadIdx.x);
  mmfuse::cuda::cp_async_16(&tile[tid], &src[tid]);
  mmfuse::cuda::cp_async_commit();
  mmfuse::cuda::cp_async_16(&tile[kCopyThreads + tid], &src[kCopyThreads + tid]);
  mmfuse::cuda::cp_async_commit();
#ifndef EMU_TEST_NO_EARLY_READ
  early[tid] = tile[tid];
#endif
  mmfuse::cuda::cp_async_wait<1>();
  __syncthreads();
#ifdef EMU_TEST_NO_EARLY_READ  // the sanitizer: only what the wait and the barrier made visible
  (void)early;
  mid[tid] = tile[tid];
#else
  for (int k = tid; k < 2 * kCopyThreads; k += kCopyThreads) mid[k] = tile[k];
#endif
  mmfuse::cuda::cp_async_wait<0>();
  __syncthreads();
  for (int k = tid; k < 2 * kCopyThreads; k += kCopyThreads) last[k] = tile[k];
}

// Deliberate faults: each must end in an error, never a hang.
__global__ void warp_waits_for_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void shuffle_past_block_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(kFullMask, static_cast<int>(threadIdx.x), 16);
}

// Sanitizer checks (tests/test_emulator.py builds these with EMU_SANITIZE); `variant` picks one.
__device__ __forceinline__ void barrier_in_helper() { __syncthreads(); }

__global__ void sanitizer_kernel(int variant, const uint4* src, int* out) {
  __shared__ __align__(16) int words[64];
  __shared__ __align__(16) uint16_t rows[8 * 8 + 8];
  MMFUSE_DYNAMIC_SHARED(int, chunk);
  const int tid = static_cast<int>(threadIdx.x), lane = tid % 32;
  switch (variant) {
    case 0:  // a per-warp early return before a barrier
      if (tid >= 32) return;
      __syncthreads();
      break;
    case 1:  // two inlined calls of one helper's barrier, in divergent branches
      if (tid < 32) {
        barrier_in_helper();
      } else {
        barrier_in_helper();
      }
      break;
    case 2:  // one past the dynamic allocation (blockDim.x ints)
      chunk[tid + 1] = tid;
      break;
    case 3: {  // ldmatrix row addresses 2 bytes off 16-byte alignment
      uint32_t r;
      mmfuse::cuda::ldmatrix_x1(r, &rows[(lane % 8) * 8 + 1]);
      out[tid] = static_cast<int>(r);
      break;
    }
    case 4:  // a wait with the copy never committed
      mmfuse::cuda::cp_async_16(&words[4 * (tid % 16)], &src[tid % 16]);
      mmfuse::cuda::cp_async_wait<0>();
      break;
    case 5:  // lane 0 writes, __syncwarp, lane 1 reads: ordered
    case 6:  // the same through a shuffle, which orders no memory: a race
      if (lane == 0) words[tid / 32] = tid;
      if (variant == 5) {
        __syncwarp();
      } else {
        out[tid] = __shfl_sync(kFullMask, tid, 0);
      }
      if (lane == 1) out[tid] = words[tid / 32];
      break;
    case 7:  // one thread reads global memory one element past `out` (blockDim.x ints)
      if (tid == 0) out[0] = out[blockDim.x];
      break;
  }
}

unsigned blocks_for(int64_t n, int64_t block) { return static_cast<unsigned>((n + block - 1) / block); }

}  // namespace

extern "C" {

int block_sum(const float* x, float* sums, int64_t n, int64_t block) {
  return harness::run([&] { harness::launch(block_sum_kernel, dim3(blocks_for(n, block)), dim3(block), 0, x, sums, n); });
}

// n: a multiple of 64 (two warps per block)
int warp_collectives(const int* in, int* out, float* warp_sums, int64_t n) {
  return harness::run([&] { harness::launch(warp_collectives_kernel, dim3(blocks_for(n, 64)), dim3(64), 0, in, out, warp_sums, n); });
}

int reverse_chunks(const float* x, float* y, int64_t n, int64_t block) {
  return harness::run([&] {
    harness::launch(reverse_chunks_kernel, dim3(blocks_for(n, block)), dim3(block), block * sizeof(float), x, y, n);
  });
}

// blocks of 64 threads; both outputs (blocks * 64)
int shared_poison(unsigned* static_seen, unsigned* dynamic_seen, int64_t blocks) {
  return harness::run([&] {
    harness::launch(shared_poison_kernel, dim3(blocks), dim3(64), 64 * sizeof(unsigned), static_seen, dynamic_seen);
  });
}

int mma_tiles_f16(const uint16_t* a, const uint16_t* b, const float* c, float* d, int64_t tiles) {
  return harness::run([&] { harness::launch(mma_tiles_kernel<__half>, dim3(tiles), dim3(32), 0, a, b, c, d); });
}

int mma_tiles_bf16(const uint16_t* a, const uint16_t* b, const float* c, float* d, int64_t tiles) {
  return harness::run([&] { harness::launch(mma_tiles_kernel<__nv_bfloat16>, dim3(tiles), dim3(32), 0, a, b, c, d); });
}

int ldmatrix_all(const uint16_t* matrices, uint32_t* out) {
  return harness::run([&] { harness::launch(ldmatrix_kernel, dim3(1), dim3(32), 0, matrices, out); });
}

// src: (2 * 48) 16-byte chunks; early (48), mid and last (96)
int cp_async_tile(const void* src, void* early, void* mid, void* last) {
  return harness::run([&] {
    harness::launch(cp_async_kernel, dim3(1), dim3(kCopyThreads), 0, static_cast<const uint4*>(src),
                    static_cast<uint4*>(early), static_cast<uint4*>(mid), static_cast<uint4*>(last));
  });
}

int warp_waits_for_barrier() {
  return harness::run([&] { harness::launch(warp_waits_for_barrier_kernel, dim3(2), dim3(64), 0); });
}

int divergent_barrier() {
  return harness::run([&] { harness::launch(divergent_barrier_kernel, dim3(1), dim3(32), 0); });
}

// src: 16 chunks of 16 bytes; out: 64 ints; 64 threads, 64 ints of dynamic shared memory
int sanitizer_check(int64_t variant, const void* src, int* out) {
  return harness::run([&] {
    harness::launch(sanitizer_kernel, dim3(1), dim3(64), 64 * sizeof(int), static_cast<int>(variant),
                    static_cast<const uint4*>(src), out);
  });
}

// 40 threads: lanes 32..39 of the second warp read lanes 48..55, which do not exist
int shuffle_past_block(int* out) {
  return harness::run([&] { harness::launch(shuffle_past_block_kernel, dim3(1), dim3(40), 0, out); });
}

}  // extern "C"
