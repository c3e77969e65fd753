// Host emulator for CUDA kernel bodies: test-only, never a backend (DESIGN.md, "CUDA without a
// GPU"). A harness includes this header before a csrc/cuda/*_kernel.cuh, compiles with g++
// (-std=c++20 -fdata-sections -Wl,-T,csrc/emu/shared_memory.ld) and launches kernels with
// emu::launch(kernel, grid, block, shared_bytes, args...) on small cases.
//
// Execution model: every CUDA thread of a block is a fiber (ucontext) with its own stack; blocks
// run one after another. The scheduler resumes the runnable fibers in linear thread order, each
// until it waits (at __syncthreads or a warp collective) or exits, then releases whatever barrier
// is complete. So a thread that reads shared memory which a higher thread writes without a
// barrier in between reads the poison (0xFF bytes: NaN for floating types) that every block
// starts with, deterministically. A wait that can never complete throws emu::Error.
//
// Fibers switch only inside barriers and warp collectives, so atomics are plain read-modify-write
// and nothing else needs a lock. The toolkit's cuda_fp16.h / cuda_bf16.h work under g++ and are
// used as they are.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#define MMFUSE_CUDA_EMULATOR 1

#ifndef EMU_STACK_BYTES
#define EMU_STACK_BYTES (64 * 1024)
#endif

// Bounds of all static __shared__ variables, from csrc/emu/shared_memory.ld.
extern "C" unsigned char __emu_shared_begin[] __attribute__((visibility("hidden")));
extern "C" unsigned char __emu_shared_end[] __attribute__((visibility("hidden")));

namespace emu {

// A kernel fault the GPU would report as an error or a hang: deadlock, bad launch, misuse.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int kWarpSize = 32;
constexpr unsigned char kPoisonByte = 0xFF;  // NaN in fp32/fp16/bf16/fp64, -1 in integers

namespace detail {

enum class Wait { kRunnable, kBlockBarrier, kWarpBarrier, kExited };

struct PendingCopy {  // one cp.async: the source bytes, read at issue
  void* dst;
  unsigned char bytes[16];
};

struct Thread {
  uint3 thread_idx;
  int linear = 0;
  Wait wait = Wait::kRunnable;
  std::source_location barrier_site;  // of the __syncthreads being waited at
  unsigned warp_mask = 0;             // of the warp collective being waited at
  const char* warp_op = nullptr;
  const void* published = nullptr;    // this lane's operand during a warp exchange
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> committed;  // oldest first
  ucontext_t context;

  int lane() const { return linear % kWarpSize; }
  void complete_copies(size_t groups_left_pending) {
    while (committed.size() > groups_left_pending) {
      for (const PendingCopy& c : committed.front()) std::memcpy(c.dst, c.bytes, sizeof c.bytes);
      committed.pop_front();
    }
  }
};

// A fiber stack with a PROT_NONE guard page below it, so an overflow faults instead of
// silently corrupting the neighbouring stack.
class Stack {
 public:
  Stack() : page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    mapping_ = mmap(nullptr, page_ + EMU_STACK_BYTES, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping_ == MAP_FAILED) throw Error("emu: cannot map a fiber stack");
    mprotect(mapping_, page_, PROT_NONE);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(mapping_, page_ + EMU_STACK_BYTES); }
  void* base() const { return static_cast<unsigned char*>(mapping_) + page_; }

 private:
  size_t page_;
  void* mapping_;
};

struct alignas(128) SharedChunk {
  unsigned char bytes[128];
};

// One kernel launch: its geometry, its block's threads, and the scheduler's context.
struct Launch {
  dim3 grid_dim, block_dim;
  uint3 block_idx;
  std::function<void()> body;  // calls the kernel with this launch's arguments
  std::vector<Thread> threads;
  std::vector<SharedChunk> dynamic_shared;
  ucontext_t scheduler;
  std::exception_ptr error;
};

inline thread_local Launch* g_launch = nullptr;
inline thread_local Thread* g_thread = nullptr;
inline thread_local std::vector<std::unique_ptr<Stack>> g_stacks;  // reused by every launch
inline thread_local std::string g_last_error;

inline Launch& launch_state() {
  if (g_launch == nullptr) throw Error("emu: a device function ran outside emu::launch");
  return *g_launch;
}
inline Thread& thread_state() {
  launch_state();
  return *g_thread;
}

// "0-15,17": thread ids for messages.
inline std::string id_ranges(const std::vector<int>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(ids[i]);
    if (j > i) out += '-' + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

inline std::string block_name(const Launch& l) {
  return "block (" + std::to_string(l.block_idx.x) + "," + std::to_string(l.block_idx.y) + "," +
         std::to_string(l.block_idx.z) + ")";
}

inline void yield_to_scheduler(Thread& t) { swapcontext(&t.context, &launch_state().scheduler); }

inline void fiber_main() {
  Launch& l = *g_launch;
  Thread& t = *g_thread;
  try {
    l.body();
  } catch (...) {
    l.error = std::current_exception();
  }
  t.complete_copies(0);  // copies in flight at exit still land, as on the GPU
  t.uncommitted.clear();
  t.wait = Wait::kExited;
}  // returns to l.scheduler through uc_link

// Waits until every live lane named in `mask` waits at the same collective (phase of an exchange).
inline void warp_wait(unsigned mask, const char* op) {
  Thread& t = thread_state();
  if ((mask >> t.lane() & 1u) == 0) {
    throw Error(std::string("emu: ") + op + " with mask that omits the calling lane " + std::to_string(t.lane()));
  }
  t.wait = Wait::kWarpBarrier;
  t.warp_mask = mask;
  t.warp_op = op;
  yield_to_scheduler(t);
}

// The operand that `lane` published in the current exchange; throws when that lane takes no part.
inline const void* published_by(unsigned mask, int lane, const char* op) {
  Launch& l = launch_state();
  const Thread& self = *g_thread;
  const size_t linear = static_cast<size_t>(self.linear - self.lane() + lane);
  const void* p = (mask >> lane & 1u) && linear < l.threads.size() ? l.threads[linear].published : nullptr;
  if (p == nullptr) {
    throw Error("emu: " + std::string(op) + " in " + block_name(l) + ": lane " + std::to_string(self.lane()) +
                " of warp " + std::to_string(self.linear / kWarpSize) + " reads lane " + std::to_string(lane) +
                ", which is not in the mask or has exited");
  }
  return p;
}

// Releases every warp group whose named live lanes all wait at the same collective.
inline bool release_warps(Launch& l) {
  bool released = false;
  const int n = static_cast<int>(l.threads.size());
  for (int warp = 0; warp * kWarpSize < n; ++warp) {
    const int first = warp * kWarpSize, last = std::min(n, first + kWarpSize);
    for (int i = first; i < last; ++i) {
      const Thread& lead = l.threads[i];
      if (lead.wait != Wait::kWarpBarrier) continue;
      bool complete = true;
      for (int j = first; j < last && complete; ++j) {
        const Thread& other = l.threads[j];
        if ((lead.warp_mask >> (j - first) & 1u) == 0 || other.wait == Wait::kExited) continue;
        complete = other.wait == Wait::kWarpBarrier && other.warp_mask == lead.warp_mask &&
                   std::strcmp(other.warp_op, lead.warp_op) == 0;
      }
      if (!complete) continue;
      const unsigned mask = lead.warp_mask;
      for (int j = first; j < last; ++j) {
        Thread& other = l.threads[j];
        if ((mask >> (j - first) & 1u) && other.wait == Wait::kWarpBarrier) other.wait = Wait::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

inline std::string site_name(const std::source_location& s) {
  return std::string(s.file_name()) + ":" + std::to_string(s.line());
}

// Releases the block barrier when every live thread waits at it; a thread that exited counts as
// arrived (undefined in CUDA inside divergent code, hence the check that all wait at one call).
inline bool release_block_barrier(Launch& l) {
  const Thread* first = nullptr;
  for (const Thread& t : l.threads) {
    if (t.wait == Wait::kExited) continue;
    if (t.wait != Wait::kBlockBarrier) return false;
    if (first == nullptr) {
      first = &t;
    } else if (!same_site(t.barrier_site, first->barrier_site)) {
      throw Error("emu: " + block_name(l) + ": thread " + std::to_string(first->linear) + " waits at __syncthreads " +
                  site_name(first->barrier_site) + " while thread " + std::to_string(t.linear) +
                  " waits at __syncthreads " + site_name(t.barrier_site) + " (divergent barrier)");
    }
  }
  for (Thread& t : l.threads) {
    if (t.wait == Wait::kBlockBarrier) t.wait = Wait::kRunnable;
  }
  return first != nullptr;
}

[[noreturn]] inline void report_deadlock(const Launch& l) {
  std::vector<int> at_block;
  std::string message = "emu: deadlock in " + block_name(l) + ":";
  for (const Thread& t : l.threads) {
    if (t.wait == Wait::kBlockBarrier) at_block.push_back(t.linear);
  }
  if (!at_block.empty()) message += " threads " + id_ranges(at_block) + " wait at __syncthreads;";
  const int n = static_cast<int>(l.threads.size());
  for (int warp = 0; warp * kWarpSize < n; ++warp) {
    std::vector<int> lanes;
    const Thread* any = nullptr;
    for (int i = warp * kWarpSize; i < std::min(n, (warp + 1) * kWarpSize); ++i) {
      if (l.threads[i].wait != Wait::kWarpBarrier) continue;
      lanes.push_back(i);
      any = &l.threads[i];
    }
    if (any == nullptr) continue;
    char mask[16];
    std::snprintf(mask, sizeof mask, "0x%08x", any->warp_mask);
    message += " threads " + id_ranges(lanes) + " wait at " + any->warp_op + " (mask " + mask + ");";
  }
  message += " no barrier can complete";
  throw Error(message);
}

inline void run_block(Launch& l) {
  std::memset(l.dynamic_shared.data(), kPoisonByte, l.dynamic_shared.size() * sizeof(SharedChunk));
  std::memset(__emu_shared_begin, kPoisonByte, static_cast<size_t>(__emu_shared_end - __emu_shared_begin));
  const unsigned bx = l.block_dim.x, by = l.block_dim.y;
  for (size_t i = 0; i < l.threads.size(); ++i) {
    Thread& t = l.threads[i];
    t = Thread{};
    t.linear = static_cast<int>(i);
    t.thread_idx = make_uint3(static_cast<unsigned>(i % bx), static_cast<unsigned>(i / bx % by),
                              static_cast<unsigned>(i / (bx * by)));
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = g_stacks[i]->base();
    t.context.uc_stack.ss_size = EMU_STACK_BYTES;
    t.context.uc_link = &l.scheduler;
    makecontext(&t.context, fiber_main, 0);
  }
  for (;;) {
    bool live = false;
    for (Thread& t : l.threads) {
      if (t.wait != Wait::kRunnable) {
        live = live || t.wait != Wait::kExited;
        continue;
      }
      g_thread = &t;
      swapcontext(&l.scheduler, &t.context);
      if (l.error) std::rethrow_exception(l.error);
      live = live || t.wait != Wait::kExited;
    }
    if (!live) return;
    if (!release_warps(l) && !release_block_barrier(l)) report_deadlock(l);
  }
}

// Restores the emulator's thread-local state when a launch ends, normally or by an exception.
struct LaunchScope {
  explicit LaunchScope(Launch* l) { g_launch = l; }
  ~LaunchScope() { g_launch = nullptr, g_thread = nullptr; }
};

}  // namespace detail

// Runs kernel<<<grid, block, shared_bytes>>>(args...) on the host; throws emu::Error on a launch
// the GPU would reject and on any fault inside the kernel.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    throw Error("emu::launch: invalid configuration grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                "," + std::to_string(grid.z) + ") block (" + std::to_string(block.x) + "," +
                std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  }
  if (shared_bytes > 227 * 1024) {  // the opt-in maximum per block on sm_90
    throw Error("emu::launch: " + std::to_string(shared_bytes) + " bytes of dynamic shared memory exceed 227 KiB");
  }
  if (detail::g_launch != nullptr) throw Error("emu::launch: called from inside a kernel");

  std::tuple<std::decay_t<Args>...> arguments(std::forward<Args>(args)...);
  detail::Launch l;
  l.grid_dim = grid;
  l.block_dim = block;
  l.body = [&] { std::apply([&](auto&... a) { kernel(a...); }, arguments); };  // by value per thread, as on the GPU
  l.threads.resize(threads);
  l.dynamic_shared.resize((shared_bytes + sizeof(detail::SharedChunk) - 1) / sizeof(detail::SharedChunk) + 1);
  while (detail::g_stacks.size() < threads) detail::g_stacks.push_back(std::make_unique<detail::Stack>());

  detail::LaunchScope scope(&l);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        l.block_idx = make_uint3(x, y, z);
        detail::run_block(l);
      }
    }
  }
}

// Start of the launch's dynamic shared memory (`extern __shared__` on the GPU), 128-byte aligned.
inline void* dynamic_shared_memory() { return detail::launch_state().dynamic_shared.data(); }

// Calls f() and turns any exception into a nonzero return, its message kept for last_error(),
// so C entry points called through ctypes report faults instead of crashing the interpreter.
template <typename F>
int guarded(F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    detail::g_last_error = e.what();
  } catch (...) {
    detail::g_last_error = "emu: unknown exception";
  }
  return 1;
}

inline const char* last_error() { return detail::g_last_error.c_str(); }

// The calling thread's lane: threads 32w .. 32w+31 in linear threadIdx order (x fastest) form warp w.
inline int lane_id() { return detail::thread_state().lane(); }

// Warp exchange, the core of every warp collective: each lane named in `mask` publishes `mine`
// and waits for the others (phase 1); then read(value_of) runs, where value_of(lane) is that
// lane's published T; then the lane waits until every lane has read (phase 2), so no lane can
// overwrite an operand that another is still reading.
template <typename T, typename Read>
auto warp_exchange(unsigned mask, const T& mine, const char* op, Read&& read) {
  detail::Thread& self = detail::thread_state();
  self.published = &mine;
  detail::warp_wait(mask, op);
  auto value_of = [&](int lane) -> const T& { return *static_cast<const T*>(detail::published_by(mask, lane, op)); };
  auto result = read(value_of);
  detail::warp_wait(mask, op);
  self.published = nullptr;
  return result;
}

// cp.async under the emulator: the source is read at issue, the destination written only when
// a wait retires the copy's commit group, so a read before the wait sees the old (poisoned) bytes.
inline void cp_async(void* dst, const void* src, size_t bytes) {
  detail::PendingCopy c;
  if (bytes != sizeof c.bytes) throw Error("emu: cp.async copies 16 bytes here");
  c.dst = dst;
  std::memcpy(c.bytes, src, bytes);
  detail::thread_state().uncommitted.push_back(c);
}
inline void cp_async_commit() {
  detail::Thread& t = detail::thread_state();
  t.committed.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}
inline void cp_async_wait(int pending_groups) { detail::thread_state().complete_copies(static_cast<size_t>(pending_groups)); }

}  // namespace emu

// ---- CUDA built-ins ---------------------------------------------------------------------------

// cuda_runtime.h under g++ declares these as extern variables; the macros route each use to the
// current fiber or launch instead.
#define threadIdx (static_cast<const uint3&>(::emu::detail::thread_state().thread_idx))
#define blockIdx (static_cast<const uint3&>(::emu::detail::launch_state().block_idx))
#define blockDim (static_cast<const dim3&>(::emu::detail::launch_state().block_dim))
#define gridDim (static_cast<const dim3&>(::emu::detail::launch_state().grid_dim))
#define warpSize ::emu::kWarpSize

// cuda_runtime.h already maps __global__, __device__, __host__ to nothing and __forceinline__
// to an always_inline inline under g++; __restrict__ is native.
#undef __shared__
#define __shared__ static  // one instance shared by the fibers; see csrc/emu/shared_memory.ld
#define __launch_bounds__(...)

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  emu::detail::Thread& t = emu::detail::thread_state();
  t.wait = emu::detail::Wait::kBlockBarrier;
  t.barrier_site = site;
  emu::detail::yield_to_scheduler(t);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::detail::warp_wait(mask, "__syncwarp"); }

// Memory fences order nothing extra here: fibers see each other's writes at once.
inline void __threadfence() {}
inline void __threadfence_block() {}

// Shuffles follow the CUDA C++ Programming Guide, "Warp Shuffle Functions": `width` splits the
// warp into segments; a source outside the caller's segment (past it, for xor) returns `var`.
namespace emu::detail {
template <typename T>
T shuffle_from(unsigned mask, T var, int src, const char* op) {
  const int lane = thread_state().lane();
  return warp_exchange(mask, var, op, [&](auto value_of) { return src == lane ? var : value_of(src); });
}
inline int segment_base(int width) { return thread_state().lane() & ~(width - 1); }
}  // namespace emu::detail

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return emu::detail::shuffle_from(mask, var, emu::detail::segment_base(width) + (src_lane & (width - 1)), "__shfl_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = emu::detail::thread_state().lane(), src = lane - static_cast<int>(delta);
  return emu::detail::shuffle_from(mask, var, src >= emu::detail::segment_base(width) ? src : lane, "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = emu::detail::thread_state().lane(), src = lane + static_cast<int>(delta);
  return emu::detail::shuffle_from(mask, var, src < emu::detail::segment_base(width) + width ? src : lane,
                                   "__shfl_down_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  const int lane = emu::detail::thread_state().lane(), src = lane ^ lane_mask;
  return emu::detail::shuffle_from(mask, var, src < emu::detail::segment_base(width) + width ? src : lane,
                                   "__shfl_xor_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int mine = predicate != 0;
  return emu::warp_exchange(mask, mine, "__ballot_sync", [&](auto value_of) {
    unsigned bits = 0;
    for (int lane = 0; lane < warpSize; ++lane) {
      if ((mask >> lane & 1u) && value_of(lane)) bits |= 1u << lane;
    }
    return bits;
  });
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// Atomics: fibers never switch inside one, so a plain read-modify-write is atomic.
#define EMU_ATOMIC(name, T, update)            \
  inline T name(T* address, T val) {            \
    const T old = *address;                     \
    *address = (update);                        \
    return old;                                 \
  }
EMU_ATOMIC(atomicAdd, int, old + val)
EMU_ATOMIC(atomicAdd, unsigned, old + val)
EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
EMU_ATOMIC(atomicAdd, float, old + val)
EMU_ATOMIC(atomicAdd, double, old + val)
EMU_ATOMIC(atomicMax, int, old > val ? old : val)
EMU_ATOMIC(atomicMax, unsigned, old > val ? old : val)
EMU_ATOMIC(atomicMin, int, old < val ? old : val)
EMU_ATOMIC(atomicMin, unsigned, old < val ? old : val)
EMU_ATOMIC(atomicExch, int, val)
EMU_ATOMIC(atomicExch, unsigned, val)
EMU_ATOMIC(atomicExch, float, val)
#undef EMU_ATOMIC
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  const T old = *address;
  if (old == compare) *address = val;
  return old;
}

// Math intrinsics: the fast approximations are computed exactly here; tests of kernels that use
// them compare with tolerances that cover the GPU's approximation error.
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
// CUDA's device-side min/max overloads (the host has only std::min/std::max).
#define EMU_MIN_MAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }       \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
#undef EMU_MIN_MAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
