// Dynamic shared memory for kernel bodies that must also run on the host emulator.
//
// MMFUSE_SHARED_DEAD(ptr, bytes): the bytes' old contents are dead from here on (a tile buffer
// about to be refilled). Nothing on the GPU; the emulator poisons them and its sanitizer counts
// them as never written, so a read of a row the refill skipped is reported even when an older
// tile left valid-looking data there.
//
// MMFUSE_DYNAMIC_SHARED(T, name) declares `T* name` at the start of the launch's dynamic shared
// memory (16-byte aligned): `extern __shared__` on the GPU. The emulator cannot take the literal
// `extern __shared__ T name[];` (a block-scope extern declaration names a symbol that nothing
// defines on the host), so kernel bodies use this macro instead.
#pragma once

#include <cuda_runtime.h>

#ifdef MMFUSE_CUDA_EMULATOR
#define MMFUSE_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::dynamic_shared_memory())
#define MMFUSE_SHARED_DEAD(ptr, bytes) ::emu::shared_dead(ptr, bytes)
#else
#define MMFUSE_SHARED_DEAD(ptr, bytes) static_cast<void>(0)
#define MMFUSE_DYNAMIC_SHARED(T, name)                                       \
  extern __shared__ __align__(16) unsigned char mmfuse_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(mmfuse_dynamic_shared_)
#endif
