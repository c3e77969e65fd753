// The C ABI of a kernel test harness, so one source builds two ways: with g++ against the host
// emulator (tests/emulator_build.py, load_harness) and with nvcc for a real GPU
// (load_gpu_harness), and the two runs can be compared.
//
// Entry points are `extern "C" int name(pointers..., int64_t sizes...)`: they wrap their launches
// in harness::run and return 0, or nonzero with harness_last_error() saying why. A harness is
// one translation unit.
#pragma once

#include <cstddef>

#ifdef __CUDACC__
#include <cuda_runtime.h>

#include <string>
#else
#include "emu/cuda_emu.h"
#endif

namespace harness {

// kernel<<<grid, block, shared_bytes>>>(args...) on the GPU, emu::launch under the emulator.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
#ifdef __CUDACC__
  kernel<<<grid, block, shared_bytes>>>(args...);
#else
  emu::launch(kernel, grid, block, shared_bytes, args...);
#endif
}

#ifdef __CUDACC__
inline std::string g_last_error;

template <typename F>
int run(F&& launches) {
  launches();
  cudaError_t status = cudaGetLastError();
  if (status == cudaSuccess) status = cudaDeviceSynchronize();
  if (status == cudaSuccess) return 0;
  g_last_error = cudaGetErrorString(status);
  return 1;
}

inline const char* last_error() { return g_last_error.c_str(); }
#else
template <typename F>
int run(F&& launches) {
  return emu::guarded(launches);
}

inline const char* last_error() { return emu::last_error(); }
#endif

}  // namespace harness

extern "C" const char* harness_last_error() { return harness::last_error(); }
