// Dynamic shared memory for kernel bodies that must also run on the host emulator.
//
// MMFUSE_DYNAMIC_SHARED(T, name) declares `T* name` at the start of the launch's dynamic shared
// memory (16-byte aligned): `extern __shared__` on the GPU. The emulator cannot take the literal
// `extern __shared__ T name[];` (a block-scope extern declaration names a symbol that nothing
// defines on the host), so kernel bodies use this macro instead.
#pragma once

#include <cuda_runtime.h>

#ifdef MMFUSE_CUDA_EMULATOR
#define MMFUSE_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::dynamic_shared_memory())
#else
#define MMFUSE_DYNAMIC_SHARED(T, name)                                       \
  extern __shared__ __align__(16) unsigned char mmfuse_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(mmfuse_dynamic_shared_)
#endif
