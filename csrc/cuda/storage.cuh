// Storage types of the kernel bodies: fp32 arithmetic for fp16/bf16/fp32 storage (fp64 for
// double), rounded once on the way out, and the 16-byte vector every lane moves when its
// pointers are aligned for it. Torch-free; included by csrc/cuda/*_kernel.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mmfuse {
namespace cuda {

constexpr int kMaxModalities = 8;  // inputs one launch reads through its own pointers

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T's precision and back: what storing in T and reloading gives.
template <typename T>
__device__ __forceinline__ typename Acc<T>::type round_to(typename Acc<T>::type x) {
  return to_acc(from_acc<T>(x));
}

// 16 bytes of T, the unit every lane moves when its pointers are aligned for it.
template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace cuda
}  // namespace mmfuse
