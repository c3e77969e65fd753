// Tensor-core and async-copy instructions of sm_80+, behind our own inline wrappers so that kernel
// bodies use them one way: inline PTX on the GPU, and under the host emulator
// (csrc/emu/cuda_emu.h) computed from the fragment layouts of the PTX ISA through the emulator's
// warp exchange. Torch-free; included by csrc/cuda/*_kernel.cuh.
//
// Fragments are 32-bit registers holding two 16-bit elements; the lower-indexed element is in
// the low half (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "mma.cuh needs sm_80 or newer (mma.sync m16n8k16 bf16, ldmatrix, cp.async)"
#endif

namespace mmfuse {
namespace cuda {

// Fragment coordinates of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type"), for lane = 0..31, groupID g = lane >> 2, threadID_in_group t = lane % 4.
// A (16 x 16, row-major), elements a0..a7 in 4 registers:
//   row = g for a0, a1, a4, a5 and g + 8 for a2, a3, a6, a7;
//   col = 2t + (i & 1) for a0..a3 and 2t + (i & 1) + 8 for a4..a7.
// B (16 x 8, "col": element i of the fragment is B[k][n]), elements b0..b3 in 2 registers:
//   k = 2t + (i & 1) for b0, b1 and 2t + (i & 1) + 8 for b2, b3;  n = g.
// C and D (16 x 8, fp32), c0..c3:
//   row = g for c0, c1 and g + 8 for c2, c3;  col = 2t + (i & 1).
struct MmaM16N8K16Layout {
  static constexpr __host__ __device__ int a_row(int lane, int i) { return (lane >> 2) + ((i >> 1) & 1) * 8; }
  static constexpr __host__ __device__ int a_col(int lane, int i) { return 2 * (lane & 3) + (i & 1) + (i >> 2) * 8; }
  static constexpr __host__ __device__ int b_k(int lane, int i) { return 2 * (lane & 3) + (i & 1) + (i >> 1) * 8; }
  static constexpr __host__ __device__ int b_n(int lane, int) { return lane >> 2; }
  static constexpr __host__ __device__ int c_row(int lane, int i) { return (lane >> 2) + (i >> 1) * 8; }
  static constexpr __host__ __device__ int c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }
};

#ifdef MMFUSE_CUDA_EMULATOR
namespace emulated {

inline float to_float(uint16_t bits, __half) { return __half2float(__ushort_as_half(bits)); }
inline float to_float(uint16_t bits, __nv_bfloat16) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
inline uint16_t element(uint32_t reg, int i) { return static_cast<uint16_t>(reg >> (16 * (i & 1))); }

struct MmaOperands {
  uint32_t a[4];
  uint32_t b[2];
};

}  // namespace emulated
#endif

// D = A * B + C for one 16 x 16 x 16 tile per warp, fp16 or bf16 inputs, fp32 accumulation
// (mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32). T: __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16: fp16 or bf16");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#elif defined(MMFUSE_CUDA_EMULATOR)
  // Gather the whole A and B from the 32 lanes' fragments, then this lane's D elements with fp32
  // accumulation. fp16/bf16 products are exact in fp32, but the hardware's summation order is
  // unspecified: results agree with the GPU to fp32 rounding, not bit for bit.
  using L = MmaM16N8K16Layout;
  const emulated::MmaOperands mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const int lane = emu::lane_id();
  emu::warp_exchange(0xffffffffu, mine, "mma_m16n8k16", [&](auto value_of) {
    float A[16][16], B[16][8];
    for (int src = 0; src < 32; ++src) {
      const emulated::MmaOperands& op = value_of(src);
      for (int i = 0; i < 8; ++i) A[L::a_row(src, i)][L::a_col(src, i)] = emulated::to_float(emulated::element(op.a[i / 2], i), T());
      for (int i = 0; i < 4; ++i) B[L::b_k(src, i)][L::b_n(src, i)] = emulated::to_float(emulated::element(op.b[i / 2], i), T());
    }
    for (int i = 0; i < 4; ++i) {
      float acc = c[i];
      for (int k = 0; k < 16; ++k) acc += A[L::c_row(lane, i)][k] * B[k][L::c_col(lane, i)];
      d[i] = acc;
    }
    return 0;
  });
#endif
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"): loads 1, 2 or 4 matrices of 8 x 8 16-bit elements from shared memory.
// Lanes 8j .. 8j+7 give the addresses of rows 0..7 of matrix j (16-byte aligned); register j of
// lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j, or with .trans
// rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the matrix transposed on the way).
#ifdef MMFUSE_CUDA_EMULATOR
namespace emulated {

// Not inlined: its return address is the kernel's ldmatrix, for the sanitizer's messages. The
// lanes that give row addresses (8 per matrix) check and record their 16-byte row.
template <int kMatrices, bool kTrans>
__attribute__((noinline)) void ldmatrix(uint32_t* r, const void* row_address) {
  const void* pc = __builtin_return_address(0);
  const char* op = kTrans ? "ldmatrix.trans" : "ldmatrix";
  if (emu::lane_id() < 8 * kMatrices) emu::detail::shared_operand(op, row_address, emu::san::Kind::kLdmatrix, pc);
  const unsigned char* mine = static_cast<const unsigned char*>(row_address);
  emu::warp_exchange(0xffffffffu, mine, op, [&](auto value_of) {
    const emu::detail::InternalScope internal;
    const int lane = emu::lane_id();
    auto at = [&](int matrix, int row, int col) {
      uint16_t bits;
      std::memcpy(&bits, value_of(8 * matrix + row) + 2 * col, sizeof bits);
      return static_cast<uint32_t>(bits);
    };
    for (int j = 0; j < kMatrices; ++j) {
      const int g = lane >> 2, t2 = 2 * (lane & 3);
      r[j] = kTrans ? at(j, t2, g) | at(j, t2 + 1, g) << 16 : at(j, g, t2) | at(j, g, t2 + 1) << 16;
    }
    return 0;
  });
}

}  // namespace emulated
#endif

#if defined(__CUDA_ARCH__)
#define MMFUSE_SHARED_ADDRESS(p) static_cast<unsigned>(__cvta_generic_to_shared(p))
#endif

__device__ __forceinline__ void ldmatrix_x1(uint32_t& r, const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(MMFUSE_SHARED_ADDRESS(row_address)));
#elif defined(MMFUSE_CUDA_EMULATOR)
  emulated::ldmatrix<1, false>(&r, row_address);
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(MMFUSE_SHARED_ADDRESS(row_address)));
#elif defined(MMFUSE_CUDA_EMULATOR)
  emulated::ldmatrix<2, false>(r, row_address);
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(MMFUSE_SHARED_ADDRESS(row_address)));
#elif defined(MMFUSE_CUDA_EMULATOR)
  emulated::ldmatrix<4, false>(r, row_address);
#endif
}

__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r, const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r)
               : "r"(MMFUSE_SHARED_ADDRESS(row_address)));
#elif defined(MMFUSE_CUDA_EMULATOR)
  emulated::ldmatrix<1, true>(&r, row_address);
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(MMFUSE_SHARED_ADDRESS(row_address)));
#elif defined(MMFUSE_CUDA_EMULATOR)
  emulated::ldmatrix<2, true>(r, row_address);
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(MMFUSE_SHARED_ADDRESS(row_address)));
#elif defined(MMFUSE_CUDA_EMULATOR)
  emulated::ldmatrix<4, true>(r, row_address);
#endif
}

// cp.async.cg.shared.global [dst], [src], 16 (PTX ISA, "Data Movement and Conversion
// Instructions: cp.async"): 16 bytes from global to shared memory, bypassing L1, both addresses
// 16-byte aligned. The copy is only guaranteed to have landed after cp_async_wait<N> retires its
// commit group (cp.async.commit_group / cp.async.wait_group N: wait until at most N of this
// thread's most recent groups are pending); other threads see it only after a barrier as well.
// The emulator writes the destination at the wait, so a read before the wait sees poison.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(MMFUSE_SHARED_ADDRESS(smem_dst)), "l"(gmem_src)
               : "memory");
#elif defined(MMFUSE_CUDA_EMULATOR)
  emu::cp_async(smem_dst, gmem_src, 16);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(MMFUSE_CUDA_EMULATOR)
  emu::cp_async_commit();
#endif
}

template <int kPendingGroups>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(kPendingGroups >= 0, "cp_async_wait<N>: N >= 0");
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPendingGroups) : "memory");
#elif defined(MMFUSE_CUDA_EMULATOR)
  emu::cp_async_wait(kPendingGroups);
#endif
}

#ifdef MMFUSE_SHARED_ADDRESS
#undef MMFUSE_SHARED_ADDRESS
#endif

}  // namespace cuda
}  // namespace mmfuse
