// Host emulator for CUDA kernel bodies: test-only, never a backend (DESIGN.md, "CUDA without a
// GPU"). A harness includes this header before a csrc/cuda/*_kernel.cuh, compiles with g++
// (-std=c++20 -fdata-sections -Wl,-T,csrc/emu/shared_memory.ld) and launches kernels with
// emu::launch(kernel, grid, block, shared_bytes, args...) on small cases.
//
// Execution model: every CUDA thread of a block is a fiber (ucontext) with its own stack; blocks
// run one after another. The scheduler runs one warp at a time: each runnable lane of it until
// it waits (at __syncthreads or a warp collective) or exits, then releases the warp's collective
// as soon as its lanes all wait there, so a warp runs ahead through its own collectives up to the
// next block barrier. The next warp is the lowest runnable one, or with MMFUSE_EMU_SEED=n a
// seeded random one, lanes in a seeded random order too. Every block's shared memory starts
// poisoned (0xFF bytes: NaN for floating types, -1 for integers); dynamic shared memory is an
// allocation of exactly the launch's size between poisoned redzones. A wait that can never
// complete, divergent barriers (told apart by source line and inlined call site) and a thread
// that exits while others wait at __syncthreads throw emu::Error.
//
// Built with -DEMU_SANITIZE and g++'s -fsanitize=thread instrumentation (tests/emulator_build.py,
// MMFUSE_EMU_SANITIZE=1), the emulator also reports races on shared memory, out-of-bounds shared
// and global accesses, misaligned cp.async/ldmatrix operands, reads of shared memory never
// written, cp.async group misuse, and counts bank passes and sectors per warp-wide request: see
// "sanitizer" below.
//
// Fibers switch only inside barriers and warp collectives, so atomics are plain read-modify-write
// and nothing else needs a lock. The toolkit's cuda_fp16.h / cuda_bf16.h work under g++ and are
// used as they are.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cxxabi.h>
#include <dlfcn.h>
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
#include <map>
#include <memory>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#define MMFUSE_CUDA_EMULATOR 1

#ifndef EMU_STACK_BYTES
#define EMU_STACK_BYTES (64 * 1024)
#endif

// Bounds of all static __shared__ variables, from csrc/emu/shared_memory.ld.
extern "C" unsigned char __emu_shared_begin[] __attribute__((visibility("hidden")));
extern "C" unsigned char __emu_shared_end[] __attribute__((visibility("hidden")));

namespace emu {

// A kernel fault the GPU would report as an error or a hang: deadlock, bad launch, misuse, and
// under EMU_SANITIZE a race, an out-of-bounds, misaligned or uninitialised access.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int kWarpSize = 32;
constexpr unsigned char kPoisonByte = 0xFF;  // NaN in fp32/fp16/bf16/fp64, -1 in integers
constexpr size_t kSharedRedzone = 4096;      // poisoned bytes on each side of dynamic shared memory

namespace detail {

enum class Wait { kRunnable, kBlockBarrier, kWarpBarrier, kExited };

struct PendingCopy {  // one cp.async: the source bytes, read at issue
  void* dst;
  unsigned char bytes[16];
  uint32_t site;  // the issuing instruction (sanitizer)
};

struct Thread {
  uint3 thread_idx;
  int linear = 0;
  Wait wait = Wait::kRunnable;
  std::source_location barrier_site;  // of the __syncthreads being waited at
  const void* barrier_pc = nullptr;   // its call instruction: tells apart the inlined copies of one helper
  unsigned warp_mask = 0;             // of the warp collective being waited at
  const char* warp_op = nullptr;
  const void* published = nullptr;    // this lane's operand during a warp exchange
  std::vector<PendingCopy> uncommitted;
  std::deque<std::vector<PendingCopy>> committed;  // oldest first
  // Happens-before state for the race detector: `gen` counts the block barriers passed (a value
  // shared by the whole block after each one); clock[l] is what this thread knows of lane l's
  // clock through __syncwarp, its own entry its current epoch (a vector clock per warp, after
  // Lamport 1978 and FastTrack, Flanagan & Freund, PLDI 2009).
  uint32_t gen = 0;
  uint32_t clock[kWarpSize] = {};
  ucontext_t context;

  int lane() const { return linear % kWarpSize; }
  int warp() const { return linear / kWarpSize; }
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
  const void* kernel = nullptr;  // for messages
  std::function<void()> body;    // calls the kernel with this launch's arguments
  std::vector<Thread> threads;
  // dynamic shared memory: exactly dynamic_bytes at dynamic_base, poisoned redzones on each side
  std::vector<SharedChunk> dynamic_storage;
  unsigned char* dynamic_base = nullptr;
  size_t dynamic_bytes = 0;
  ucontext_t scheduler;
  std::exception_ptr error;
  bool shuffle = false;  // MMFUSE_EMU_SEED set: warps and lanes run in a seeded random order
  std::mt19937_64 rng;
};

inline thread_local Launch* g_launch = nullptr;
inline thread_local Thread* g_thread = nullptr;
inline thread_local std::vector<std::unique_ptr<Stack>> g_stacks;  // reused by every launch
inline thread_local std::string g_last_error;
inline thread_local int g_internal = 0;  // > 0 while the emulator itself touches shared memory
inline thread_local bool g_in_fiber = false;  // a CUDA thread runs (not the scheduler)

// Marks the emulator's own accesses (copies landing, ldmatrix gathering rows) as not the kernel's.
struct InternalScope {
  InternalScope() { ++g_internal; }
  ~InternalScope() { --g_internal; }
};

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

inline std::string thread_name(int linear) {
  return "thread " + std::to_string(linear) + " (warp " + std::to_string(linear / kWarpSize) + ", lane " +
         std::to_string(linear % kWarpSize) + ")";
}

// ---- source lines of code addresses, for messages (needs -g; addr2line from binutils) -------

inline std::string basename_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// addr2line's (function, file:line) pairs for the instruction before return address `pc`,
// innermost inlined frame first.
inline std::vector<std::pair<std::string, std::string>> source_frames(const void* pc) {
  std::vector<std::pair<std::string, std::string>> frames;
  Dl_info info;
  if (pc == nullptr || dladdr(pc, &info) == 0 || info.dli_fname == nullptr) return frames;
  char command[4096];
  std::snprintf(command, sizeof command, "addr2line -C -f -i -e '%s' 0x%zx 2>/dev/null", info.dli_fname,
                static_cast<size_t>(static_cast<const char*>(pc) - static_cast<const char*>(info.dli_fbase)) - 1);
  FILE* pipe = popen(command, "r");
  if (pipe == nullptr) return frames;
  char function[2048], where[2048];
  while (std::fgets(function, sizeof function, pipe) != nullptr && std::fgets(where, sizeof where, pipe) != nullptr) {
    std::string f(function), w(where);
    while (!f.empty() && f.back() == '\n') f.pop_back();
    while (!w.empty() && w.back() == '\n') w.pop_back();
    const size_t paren = w.find(" (discriminator");
    if (paren != std::string::npos) w.resize(paren);
    if (w.rfind("??", 0) == 0) continue;
    frames.emplace_back(f, basename_of(w));
  }
  pclose(pipe);
  return frames;
}

// "mmfuse::cuda::attention::load_rows<__half, 64, 64>(...)" -> "load_rows<__half, 64, 64>".
inline std::string short_function_name(std::string name) {
  for (const std::string anon = "(anonymous namespace)::"; name.find(anon) != std::string::npos;) {
    name.erase(name.find(anon), anon.size());
  }
  int depth = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    depth += name[i] == '<' ? 1 : name[i] == '>' ? -1 : 0;
    if (depth == 0 && name[i] == '(') {
      name.resize(i);
      break;
    }
  }
  const size_t template_start = name.find('<');
  const size_t scope = name.rfind("::", template_start);
  if (scope != std::string::npos) name = name.substr(scope + 2);
  return name.size() > 60 ? name.substr(0, 57) + "..." : name;
}

// "file.cuh:198 (load_rows) <- file.cuh:215 (load_kv_tile) <- ...", or the address without -g.
// The emulator's own frames (cuda_emu.h, mma.cuh's emulation) are left out.
inline std::string site_name(const void* pc) {
  std::string out;
  for (const auto& [function, where] : source_frames(pc)) {
    if (where.rfind("cuda_emu.h", 0) == 0) continue;
    const std::string name = short_function_name(function);
    out += (out.empty() ? "" : " <- ") + where + " (" + name + ")";
  }
  if (out.empty()) {
    char hex[32];
    std::snprintf(hex, sizeof hex, "pc %p", pc);
    out = hex;
  }
  return out;
}

inline std::string kernel_name(const Launch& l) {
  Dl_info info;
  std::string name;
  if (l.kernel != nullptr && dladdr(l.kernel, &info) != 0 && info.dli_sname != nullptr &&
      info.dli_saddr == l.kernel) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
  } else {
    const auto frames = source_frames(static_cast<const char*>(l.kernel) + 1);  // its first instruction
    name = frames.empty() ? "kernel" : frames.back().first;
  }
  return short_function_name(name);
}

inline std::string where_in(const Launch& l) { return "kernel " + kernel_name(l) + ", " + block_name(l); }

[[noreturn]] inline void fail(const std::string& what) { throw Error("emu: " + what); }

}  // namespace detail

// ---- sanitizer: races, bounds, alignment, initcheck, cp.async groups (EMU_SANITIZE) -----------
//
// Every load and store of the kernel bodies reaches the emulator: the harness is compiled with
// g++'s -fsanitize=thread instrumentation, but linked against the __tsan_* entry points defined
// below instead of libtsan (the Linux kernel's KCSAN uses the compiler's TSan instrumentation
// with its own runtime the same way). Real TSan or ASan would have to be LD_PRELOADed into the
// uninstrumented Python that dlopens the harness, be told about every fiber switch, and would
// still know nothing of CUDA's ordering rules (a cp.async lands asynchronously even for its own
// thread; warp collectives other than __syncwarp order nothing); this runtime models those rules
// and names kernel, block, warp and lane.
//
// Shadow memory: one Cell per byte of static and dynamic shared memory: the last write and up to
// two reads since it, each stamped (thread, barrier generation, lane clock, code address).
// Two accesses to a byte by different threads, at least one a write, race unless a __syncthreads
// lies between them (their generations differ) or a __syncwarp naming both lanes does (the
// reader's clock of the writer's lane has caught up). A cp.async's write lands anywhere between
// its issue and the cp_async_wait that retires its group, so until then every access to its
// bytes races with it, its own thread's included.
namespace san {

enum class Kind { kLoad, kStore, kCpAsync, kLdmatrix };

struct Stamp {
  uint32_t gen = 0;  // 0: no access in this block (generations start at 1 and never repeat)
  uint32_t clock = 0;
  uint32_t site = 0;  // code address - library base
  uint16_t tid = 0;
  uint8_t async = 0;  // a cp.async in flight
  uint8_t kind = 0;
};

struct Cell {
  Stamp write;
  Stamp read[2];  // the latest read, and the latest from a different warp than it
};

struct Region {
  uintptr_t lo = 0, hi = 0;            // shadowed bytes, redzones included
  uintptr_t data_lo = 0, data_hi = 0;  // the allocation
  std::vector<Cell> cells;
  const char* name = "";
  bool contains(uintptr_t a) const { return a - lo < hi - lo; }
};

// Per warp-wide request statistics, keyed by code address (bank conflicts and sectors).
struct SiteCounts {
  uint64_t requests = 0;
  uint64_t wavefronts = 0;  // shared: passes through the banks (ideal: one per 128 bytes of a request)
  uint64_t ideal = 0;
  uint64_t sectors = 0;  // global: 32-byte sectors touched
  uint64_t ideal_sectors = 0;
  bool shared = true;
};

inline bool g_enabled = false;
inline Region g_static, g_dynamic;
inline uint32_t g_gen = 0;              // last barrier generation handed out
inline uint32_t g_block_first_gen = 0;  // generation at which the current block started
inline uintptr_t g_base = 0;            // load address of this library (sites are offsets from it)

inline const void* pc_of(uint32_t site) { return reinterpret_cast<const void*>(g_base + site); }
inline uint32_t site_of(const void* pc) { return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(pc) - g_base); }

inline std::string access_name(Kind k, bool write) {
  switch (k) {
    case Kind::kCpAsync: return "cp.async write";
    case Kind::kLdmatrix: return "ldmatrix read";
    default: return write ? "write" : "read";
  }
}

inline std::string offset_name(const Region& r, uintptr_t a) {
  const long long off = static_cast<long long>(a) - static_cast<long long>(r.data_lo);
  return std::string(r.name) + " shared byte " + std::to_string(off) + " (of " +
         std::to_string(r.data_hi - r.data_lo) + ")";
}

[[noreturn]] inline void report_race(const Region& r, uintptr_t a, const Stamp& earlier, bool earlier_write, Kind kind,
                                     bool write, const void* pc) {
  const detail::Launch& l = *detail::g_launch;
  const detail::Thread& t = *detail::g_thread;
  const std::string before = earlier.async ? "cp.async write still in flight" :
                             access_name(static_cast<Kind>(earlier.kind), earlier_write);
  std::string why = earlier.tid == t.linear ? "its own cp.async has not been retired by cp_async_wait"
                                            : "no __syncthreads (or __syncwarp naming both lanes, or the writer's "
                                              "cp_async_wait then a barrier) orders them";
  detail::fail("race on shared memory in " + detail::where_in(l) + ": " + access_name(kind, write) + " by " +
               detail::thread_name(t.linear) + " at " + detail::site_name(pc) + " conflicts with the " + before +
               " by " + detail::thread_name(earlier.tid) + " at " + detail::site_name(pc_of(earlier.site)) + "; " +
               offset_name(r, a) + "; " + why);
}

inline bool ordered(const Stamp& s, const detail::Thread& t) {
  if (s.gen < t.gen) return true;  // a __syncthreads lies between
  if (s.tid == t.linear) return true;
  return s.tid / kWarpSize == t.warp() && t.clock[s.tid % kWarpSize] >= s.clock;
}

inline void check_byte(const Region& r, Cell& c, uintptr_t a, Kind kind, bool write, const void* pc) {
  const detail::Thread& t = *detail::g_thread;
  const Stamp me{t.gen, t.clock[t.lane()], site_of(pc), static_cast<uint16_t>(t.linear),
                 static_cast<uint8_t>(kind == Kind::kCpAsync), static_cast<uint8_t>(kind)};
  const bool written = c.write.gen >= g_block_first_gen;
  if (written && (c.write.async || !ordered(c.write, t))) report_race(r, a, c.write, true, kind, write, pc);
  if (!write) {
    if (!written) {
      detail::fail("initcheck: " + access_name(kind, false) + " of shared memory never written in this block, in " +
                   detail::where_in(*detail::g_launch) + ", by " + detail::thread_name(t.linear) + " at " +
                   detail::site_name(pc) + "; " + offset_name(r, a));
    }
    Stamp& latest = c.read[0];
    if (latest.gen >= g_block_first_gen && latest.tid / kWarpSize != t.warp()) c.read[1] = latest;
    latest = me;
    return;
  }
  for (const Stamp& read : c.read) {
    if (read.gen >= g_block_first_gen && !ordered(read, t)) report_race(r, a, read, false, kind, write, pc);
  }
  c.write = me;
  c.read[0].gen = c.read[1].gen = 0;
}

[[noreturn]] inline void report_bounds(const Region& r, uintptr_t a, size_t n, Kind kind, bool write, const void* pc) {
  detail::fail("out-of-bounds " + access_name(kind, write) + " of " + std::to_string(n) + " bytes in " +
               detail::where_in(*detail::g_launch) + " by " + detail::thread_name(detail::g_thread->linear) + " at " +
               detail::site_name(pc) + ": " + offset_name(r, a) + ", outside the " +
               std::to_string(r.data_hi - r.data_lo) + "-byte " + r.name + " shared allocation");
}

// The region of shared memory holding [a, a + n), or null.
inline Region* region_of(uintptr_t a) {
  if (g_dynamic.contains(a)) return &g_dynamic;
  if (g_static.contains(a)) return &g_static;
  return nullptr;
}

inline void shared_access(Region& r, uintptr_t a, size_t n, Kind kind, bool write, const void* pc) {
  if (a < r.data_lo || a + n > r.data_hi) report_bounds(r, a, n, kind, write, pc);
  for (size_t i = 0; i < n; ++i) check_byte(r, r.cells[a + i - r.lo], a + i, kind, write, pc);
}

// ---- per-request counters: bank conflicts and sectors -----------------------------------------

// The addresses one warp-wide request touches: lane i's k-th execution of an instruction joins
// the warp's k-th request of it (lanes of a warp run the same code between collectives).
struct Access {
  uintptr_t address;
  uint32_t bytes;
  int lane;
  bool operator<(const Access& o) const { return address < o.address; }
};

struct Request {
  uint32_t site;
  bool shared;
  std::vector<Access> accesses;
};

inline uint64_t request_key(uint32_t site, bool shared) { return uint64_t{site} * 2 + shared; }

inline bool g_counting = false;
inline std::map<std::string, std::map<uint64_t, SiteCounts>> g_counts;  // kernel -> request key -> counts
inline std::map<uint64_t, SiteCounts>* g_kernel_counts = nullptr;     // the running kernel's
inline std::vector<std::unordered_map<uint64_t, std::vector<Request>>> g_pending;  // per warp: by key, in order
inline std::vector<std::unordered_map<uint64_t, uint32_t>> g_seen;                 // per thread: executions by key

// A lane's latest counted access: g++ lowers one 16-byte store of the source (a uint4) to four
// 4-byte stores at consecutive instructions, which count as the one access the GPU makes.
struct LastAccess {
  uint32_t site = 0;
  uintptr_t start = 0, end = 0;
  Access* access = nullptr;
};
inline std::vector<LastAccess> g_last;  // per thread

inline SiteCounts& counts_for(uint32_t site, bool shared) {
  SiteCounts& c = (*g_kernel_counts)[request_key(site, shared)];
  c.shared = shared;
  return c;
}

// Shared memory: 32 banks of 4 bytes; a request is served in wavefronts of at most 128 bytes
// each, and within one the distinct 4-byte words that fall in one bank are served one per pass
// (the same word is broadcast). So: passes = max over banks of distinct words, summed over the
// 128-byte phases that the request's width implies (16-byte accesses: 8 lanes per phase).
// Global: distinct 32-byte sectors against the minimum for the bytes requested.
// Distinct bytes a request touches (lanes reading the same word are served once).
inline uint64_t distinct_bytes(std::vector<Access> accesses) {
  std::sort(accesses.begin(), accesses.end());
  uint64_t bytes = 0;
  uintptr_t covered = 0;
  for (const auto& [a, n, lane] : accesses) {
    const uintptr_t lo = std::max(a, covered), hi = a + n;
    if (hi > lo) bytes += hi - lo;
    covered = std::max(covered, hi);
  }
  return bytes;
}

inline void retire(Request& q) {
  // phases are formed by lane (lanes 0-7 first for 16-byte accesses), whatever order they ran in
  std::sort(q.accesses.begin(), q.accesses.end(), [](const Access& a, const Access& b) { return a.lane < b.lane; });
  SiteCounts& c = counts_for(q.site, q.shared);
  ++c.requests;
  if (q.accesses.empty()) return;
  const uint64_t bytes = distinct_bytes(q.accesses);
  if (q.shared) {
    const size_t per_phase = std::max<size_t>(1, 128 / std::max<uint32_t>(1, q.accesses.front().bytes));
    uint64_t passes = 0;
    for (size_t p0 = 0; p0 < q.accesses.size(); p0 += per_phase) {
      std::vector<uintptr_t> words[32];
      for (size_t i = p0; i < std::min(q.accesses.size(), p0 + per_phase); ++i) {
        const auto [a, n, lane] = q.accesses[i];
        for (uintptr_t w = a / 4; w <= (a + n - 1) / 4; ++w) {
          auto& bank = words[w % 32];
          if (std::find(bank.begin(), bank.end(), w) == bank.end()) bank.push_back(w);
        }
      }
      size_t worst = 1;
      for (const auto& bank : words) worst = std::max(worst, bank.size());
      passes += worst;
    }
    c.wavefronts += passes;
    c.ideal += std::max<uint64_t>(1, (bytes + 127) / 128);
  } else {
    std::vector<uintptr_t> sectors;
    for (const auto& [a, n, lane] : q.accesses) {
      for (uintptr_t s = a / 32; s <= (a + n - 1) / 32; ++s) {
        if (std::find(sectors.begin(), sectors.end(), s) == sectors.end()) sectors.push_back(s);
      }
    }
    c.sectors += sectors.size();
    c.ideal_sectors += (bytes + 31) / 32;
  }
}

inline void retire_warp(int warp) {
  if (!g_counting || warp >= static_cast<int>(g_pending.size())) return;
  for (auto& [key, requests] : g_pending[warp]) {
    for (Request& q : requests) retire(q);
  }
  g_pending[warp].clear();
  const detail::Launch& l = *detail::g_launch;
  for (int i = warp * kWarpSize; i < std::min<int>(l.threads.size(), (warp + 1) * kWarpSize); ++i) {
    g_seen[i].clear();
    g_last[i] = {};
  }
}

inline void count(uintptr_t a, size_t n, bool shared, const void* pc) {
  const detail::Thread& t = *detail::g_thread;
  const uint32_t site = site_of(pc);
  LastAccess& last = g_last[t.linear];
  if (last.access != nullptr && site > last.site && site - last.site < 48 && a == last.end &&
      last.end + n - last.start <= 16 && last.start % 16 == 0) {
    last.access->bytes += static_cast<uint32_t>(n);
    last.end += n;
    last.site = site;
    return;
  }
  const uint64_t key = request_key(site, shared);
  const uint32_t k = g_seen[t.linear][key]++;
  std::vector<Request>& requests = g_pending[t.warp()][key];
  if (requests.size() <= k) requests.resize(k + 1, Request{site, shared, {}});
  requests[k].accesses.push_back(Access{a, static_cast<uint32_t>(n), t.lane()});
  last = {site, a, a + n, &requests[k].accesses.back()};
}

// Global memory that the harness registered (tensors with redzones around them): any access
// inside a redzone is out of bounds.
inline std::vector<std::pair<uintptr_t, uintptr_t>> g_redzones;  // [lo, hi)
inline uintptr_t g_redzone_lo = 0, g_redzone_hi = 0;             // their hull
inline std::vector<std::pair<uintptr_t, uintptr_t>> g_tensors;  // (start, bytes) of the tensors between them

inline void global_access(uintptr_t a, size_t n, Kind kind, bool write, const void* pc) {
  if (a + n <= g_redzone_lo || a >= g_redzone_hi) return;
  for (const auto& [lo, hi] : g_redzones) {
    if (a < hi && a + n > lo) {
      detail::fail("out-of-bounds global " + access_name(kind, write) + " of " + std::to_string(n) + " bytes in " +
                   detail::where_in(*detail::g_launch) + " by " + detail::thread_name(detail::g_thread->linear) +
                   " at " + detail::site_name(pc) + ": inside the redzone around a tensor argument");
    }
  }
}

inline bool in_kernel() { return g_enabled && detail::g_in_fiber && detail::g_internal == 0; }

// Every instrumented load and store of the harness.
inline void access(const void* p, size_t n, bool write, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!in_kernel()) return;
  Region* r = region_of(a);
  if (r != nullptr) {
    shared_access(*r, a, n, write ? Kind::kStore : Kind::kLoad, write, pc);
    if (g_counting) count(a, n, true, pc);
    return;
  }
  global_access(a, n, write ? Kind::kStore : Kind::kLoad, write, pc);
  // global requests: those into the harness's tensor arguments
  if (g_counting && std::any_of(g_tensors.begin(), g_tensors.end(), [&](auto t) { return a - t.first < t.second; })) {
    count(a, n, false, pc);
  }
}

}  // namespace san

namespace detail {

inline void complete_copies(Thread& t, size_t groups_left_pending) {
  InternalScope internal;
  while (t.committed.size() > groups_left_pending) {
    for (const PendingCopy& c : t.committed.front()) {
      std::memcpy(c.dst, c.bytes, sizeof c.bytes);
      if (!san::g_enabled) continue;
      const uintptr_t a = reinterpret_cast<uintptr_t>(c.dst);
      san::Region* r = san::region_of(a);
      for (uintptr_t b = a; r != nullptr && b < a + sizeof c.bytes; ++b) {
        san::Stamp& w = r->cells[b - r->lo].write;
        if (w.async && w.tid == t.linear && w.site == c.site) w = {t.gen, t.clock[t.lane()], w.site, w.tid, 0, w.kind};
      }
    }
    t.committed.pop_front();
  }
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
  complete_copies(t, 0);  // copies in flight at exit still land, as on the GPU
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

// Releases warp `warp`'s collective when all its named live lanes wait at it. Only __syncwarp
// orders memory between the lanes (CUDA C++ Programming Guide: shuffles and votes "do not imply
// a memory barrier"), so only it merges their clocks.
inline bool release_warp(Launch& l, int warp) {
  const int n = static_cast<int>(l.threads.size());
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
    const bool orders = std::strcmp(lead.warp_op, "__syncwarp") == 0;
    uint32_t joined[kWarpSize] = {};
    for (int j = first; j < last && orders; ++j) {
      const Thread& other = l.threads[j];
      if ((mask >> (j - first) & 1u) == 0 || other.wait != Wait::kWarpBarrier) continue;
      for (int k = 0; k < kWarpSize; ++k) joined[k] = std::max(joined[k], other.clock[k]);
    }
    for (int j = first; j < last; ++j) {
      Thread& other = l.threads[j];
      if ((mask >> (j - first) & 1u) == 0 || other.wait != Wait::kWarpBarrier) continue;
      other.wait = Wait::kRunnable;
      if (orders) {
        std::copy(joined, joined + kWarpSize, other.clock);
        ++other.clock[other.lane()];
      }
    }
    san::retire_warp(warp);
    return true;
  }
  return false;
}

inline bool same_barrier(const Thread& a, const Thread& b) {
  return a.barrier_pc == b.barrier_pc && a.barrier_site.line() == b.barrier_site.line() &&
         a.barrier_site.column() == b.barrier_site.column() &&
         std::strcmp(a.barrier_site.file_name(), b.barrier_site.file_name()) == 0;
}

inline std::string barrier_name(const Thread& t) {
  const std::string here = basename_of(t.barrier_site.file_name()) + ":" + std::to_string(t.barrier_site.line());
  const std::string chain = site_name(t.barrier_pc);
  return chain.rfind("pc ", 0) == 0 ? here : here + " [" + chain + "]";
}

// Releases the block barrier when every thread waits at it, at the same call: the same source
// line and the same inlined copy of it, so two calls of one helper do not pass for one barrier.
// A thread that exited while others wait is a fault (CUDA allows __syncthreads in conditional
// code only when the condition is uniform across the block).
inline bool release_block_barrier(Launch& l) {
  const Thread* first = nullptr;
  std::vector<int> exited;
  for (const Thread& t : l.threads) {
    if (t.wait == Wait::kExited) {
      exited.push_back(t.linear);
      continue;
    }
    if (t.wait != Wait::kBlockBarrier) return false;
    if (first == nullptr) {
      first = &t;
    } else if (!same_barrier(t, *first)) {
      throw Error("emu: " + block_name(l) + ": thread " + std::to_string(first->linear) + " waits at __syncthreads " +
                  barrier_name(*first) + " while thread " + std::to_string(t.linear) + " waits at __syncthreads " +
                  barrier_name(t) + " (divergent barrier)");
    }
  }
  if (first == nullptr) return false;
  if (!exited.empty()) {
    throw Error("emu: " + where_in(l) + ": threads " + id_ranges(exited) + " exited while the others wait at __syncthreads " +
                barrier_name(*first) + " (an early return before a barrier)");
  }
  const uint32_t gen = ++san::g_gen;
  for (Thread& t : l.threads) {
    t.wait = Wait::kRunnable;
    t.gen = gen;
  }
  for (int w = 0; w * kWarpSize < static_cast<int>(l.threads.size()); ++w) san::retire_warp(w);
  return true;
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

// Runs one warp's runnable lanes, each until it waits or exits (in a seeded random order when
// the launch shuffles), then releases the warp's collective if it is complete.
inline void run_warp(Launch& l, int warp) {
  const int n = static_cast<int>(l.threads.size());
  int order[kWarpSize], count = 0;
  for (int i = warp * kWarpSize; i < std::min(n, (warp + 1) * kWarpSize); ++i) order[count++] = i;
  if (l.shuffle) std::shuffle(order, order + count, l.rng);
  for (int k = 0; k < count; ++k) {
    Thread& t = l.threads[order[k]];
    if (t.wait != Wait::kRunnable) continue;
    g_thread = &t;
    g_in_fiber = true;
    swapcontext(&l.scheduler, &t.context);
    g_in_fiber = false;
    if (l.error) std::rethrow_exception(l.error);
  }
}

// Warps run one at a time, each as far as it can (through its own collectives, which release as
// soon as its lanes all wait), so warps drift apart between block barriers as they may on a GPU.
// The next warp is the lowest runnable one, or a seeded random one.
inline void run_block(Launch& l) {
  std::memset(l.dynamic_storage.data(), kPoisonByte, l.dynamic_storage.size() * sizeof(SharedChunk));
  std::memset(__emu_shared_begin, kPoisonByte, static_cast<size_t>(__emu_shared_end - __emu_shared_begin));
  const unsigned bx = l.block_dim.x, by = l.block_dim.y;
  const uint32_t gen = ++san::g_gen;
  san::g_block_first_gen = gen;
  for (size_t i = 0; i < l.threads.size(); ++i) {
    Thread& t = l.threads[i];
    t = Thread{};
    t.linear = static_cast<int>(i);
    t.thread_idx = make_uint3(static_cast<unsigned>(i % bx), static_cast<unsigned>(i / bx % by),
                              static_cast<unsigned>(i / (bx * by)));
    t.gen = gen;
    t.clock[t.lane()] = 1;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = g_stacks[i]->base();
    t.context.uc_stack.ss_size = EMU_STACK_BYTES;
    t.context.uc_link = &l.scheduler;
    makecontext(&t.context, fiber_main, 0);
  }
  const int warps = static_cast<int>((l.threads.size() + kWarpSize - 1) / kWarpSize);
  if (san::g_counting) {
    san::g_pending.assign(warps, {});
    san::g_seen.assign(l.threads.size(), {});
    san::g_last.assign(l.threads.size(), {});
  }
  std::vector<int> runnable;
  for (;;) {
    runnable.clear();
    bool live = false;
    for (int w = 0; w < warps; ++w) {
      bool any = false;
      for (int i = w * kWarpSize; i < std::min<int>(l.threads.size(), (w + 1) * kWarpSize); ++i) {
        any = any || l.threads[i].wait == Wait::kRunnable;
        live = live || l.threads[i].wait != Wait::kExited;
      }
      if (any) runnable.push_back(w);
    }
    if (!live) break;
    if (!runnable.empty()) {
      const int warp = l.shuffle ? runnable[l.rng() % runnable.size()] : runnable.front();
      run_warp(l, warp);
      release_warp(l, warp);
      continue;
    }
    bool released = false;
    for (int w = 0; w < warps && !released; ++w) released = release_warp(l, w);
    if (!released && !release_block_barrier(l)) report_deadlock(l);
  }
  for (int w = 0; w < warps; ++w) san::retire_warp(w);
}

// Restores the emulator's thread-local state when a launch ends, normally or by an exception.
struct LaunchScope {
  explicit LaunchScope(Launch* l) { g_launch = l; }
  ~LaunchScope() {
    g_launch = nullptr, g_thread = nullptr;
    san::g_dynamic = san::Region{};
  }
};

// The seed of MMFUSE_EMU_SEED, or -1 when it is unset (linear order).
inline long long seed_from_environment() {
  const char* text = std::getenv("MMFUSE_EMU_SEED");
  return text != nullptr && *text != '\0' ? std::atoll(text) : -1;
}

inline thread_local uint64_t g_launches = 0;

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
  l.kernel = reinterpret_cast<const void*>(kernel);
  l.body = [&] { std::apply([&](auto&... a) { kernel(a...); }, arguments); };  // by value per thread, as on the GPU
  l.threads.resize(threads);
  constexpr size_t chunk = sizeof(detail::SharedChunk), redzone_chunks = kSharedRedzone / chunk;
  l.dynamic_storage.resize(2 * redzone_chunks + (shared_bytes + chunk - 1) / chunk);
  l.dynamic_base = l.dynamic_storage[redzone_chunks].bytes;
  l.dynamic_bytes = shared_bytes;
  const long long seed = detail::seed_from_environment();
  l.shuffle = seed >= 0;
  l.rng.seed(static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ull + ++detail::g_launches);
  while (detail::g_stacks.size() < threads) detail::g_stacks.push_back(std::make_unique<detail::Stack>());

  detail::LaunchScope scope(&l);
  if (san::g_enabled) {
    san::Region& d = san::g_dynamic;
    d.name = "dynamic";
    d.lo = reinterpret_cast<uintptr_t>(l.dynamic_storage.data());
    d.hi = d.lo + l.dynamic_storage.size() * chunk;
    d.data_lo = reinterpret_cast<uintptr_t>(l.dynamic_base);
    d.data_hi = d.data_lo + shared_bytes;
    d.cells.assign(d.hi - d.lo, san::Cell{});
    if (san::g_counting) san::g_kernel_counts = &san::g_counts[detail::kernel_name(l)];
  }
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
inline void* dynamic_shared_memory() { return detail::launch_state().dynamic_base; }

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
  auto result = [&] {
    const detail::InternalScope internal;  // operands, not memory the kernel addresses
    return read(value_of);
  }();
  detail::warp_wait(mask, op);
  self.published = nullptr;
  return result;
}

namespace detail {

[[noreturn]] inline void report_misaligned(const char* op, const char* what, const void* address, const void* pc) {
  char hex[32];
  std::snprintf(hex, sizeof hex, "%p", address);
  fail(std::string(op) + ": " + what + " address " + hex + " is not 16-byte aligned, in " + where_in(*g_launch) +
       ", " + thread_name(g_thread->linear) + " at " + site_name(pc));
}

// A 16-byte shared-memory operand of cp.async or ldmatrix: aligned, inside an allocation, and
// checked and recorded as one access (sanitizer).
inline void shared_operand(const char* op, const void* address, san::Kind kind, const void* pc) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) report_misaligned(op, "shared", address, pc);
  if (!san::g_enabled) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  san::Region* r = san::region_of(a);
  if (r == nullptr) fail(std::string(op) + ": address is not in shared memory, in " + where_in(*g_launch) + " at " + site_name(pc));
  san::shared_access(*r, a, 16, kind, kind == san::Kind::kCpAsync, pc);
  if (san::g_counting) san::count(a, 16, true, pc);
}

}  // namespace detail

// MMFUSE_SHARED_DEAD (csrc/cuda/shared_memory.cuh): poisons [p, p + bytes) and, under the
// sanitizer, checks it as a write (the refill must be ordered after the old contents' last
// reads) and then marks it never written.
__attribute__((noinline)) inline void shared_dead(void* p, size_t bytes) {
  const void* pc = __builtin_return_address(0);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  san::Region* r = san::g_enabled ? san::region_of(a) : nullptr;
  if (r != nullptr && san::in_kernel()) {
    san::shared_access(*r, a, bytes, san::Kind::kStore, true, pc);
    for (size_t i = 0; i < bytes; ++i) r->cells[a + i - r->lo] = san::Cell{};
  }
  const detail::InternalScope internal;
  std::memset(p, kPoisonByte, bytes);
}

// cp.async under the emulator: the source is read at issue, the destination written only when
// a wait retires the copy's commit group, so a read before the wait sees the old (poisoned)
// bytes; the sanitizer reports any access to those bytes before then.
__attribute__((noinline)) inline void cp_async(void* dst, const void* src, size_t bytes) {
  const void* pc = __builtin_return_address(0);
  detail::PendingCopy c;
  if (bytes != sizeof c.bytes) throw Error("emu: cp.async copies 16 bytes here");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) detail::report_misaligned("cp.async", "global", src, pc);
  detail::shared_operand("cp.async", dst, san::Kind::kCpAsync, pc);
  if (san::in_kernel()) {
    san::global_access(reinterpret_cast<uintptr_t>(src), bytes, san::Kind::kLoad, false, pc);
    if (san::g_counting) san::count(reinterpret_cast<uintptr_t>(src), bytes, false, pc);
  }
  c.dst = dst;
  c.site = san::site_of(pc);
  std::memcpy(c.bytes, src, bytes);
  detail::thread_state().uncommitted.push_back(c);
}
inline void cp_async_commit() {
  detail::Thread& t = detail::thread_state();
  t.committed.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}
// cp.async.wait_group N retires committed groups only: copies issued since the last commit are
// not waited for, which the sanitizer reports (a missing commit).
__attribute__((noinline)) inline void cp_async_wait(int pending_groups) {
  const void* pc = __builtin_return_address(0);
  detail::Thread& t = detail::thread_state();
  if (san::g_enabled && !t.uncommitted.empty()) {
    detail::fail("cp_async_wait<" + std::to_string(pending_groups) + "> with " + std::to_string(t.uncommitted.size()) +
                 " cp.async not committed to any group, in " + detail::where_in(*detail::g_launch) + ", " +
                 detail::thread_name(t.linear) + " at " + detail::site_name(pc) +
                 " (cp_async_commit missing: the wait does not cover them)");
  }
  detail::complete_copies(t, static_cast<size_t>(pending_groups));
}

}  // namespace emu

// The instrumentation's entry points (g++ -fsanitize=thread): this library's own, hidden, so
// that two harnesses loaded in one process never call each other's.
#ifdef EMU_SANITIZE
#define EMU_TSAN_ENTRY extern "C" __attribute__((visibility("hidden"))) void
namespace emu::san {
inline bool g_in_hook = false;  // the runtime's own accesses (instrumented too) are not the kernel's

// The fast path, itself not instrumented: only shared memory, registered redzones and counting
// go on to access().
__attribute__((no_sanitize_thread, always_inline)) inline void hook(void* p, size_t n, bool write, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (g_in_hook || !g_enabled) return;
  if (a - g_dynamic.lo >= g_dynamic.hi - g_dynamic.lo && a - g_static.lo >= g_static.hi - g_static.lo &&
      (a + n <= g_redzone_lo || a >= g_redzone_hi)) {
    return;
  }
  g_in_hook = true;
  try {
    access(p, n, write, pc);
  } catch (...) {
    // The instrumented caller was compiled as if this never throws: end the launch from here
    // instead. The fiber is abandoned (never resumed) and the scheduler rethrows.
    g_in_hook = false;
    detail::Launch& l = *detail::g_launch;
    l.error = std::current_exception();
    swapcontext(&detail::g_thread->context, &l.scheduler);
  }
  g_in_hook = false;
}
}  // namespace emu::san
#define EMU_TSAN_HOOK(name, n, write)                                        \
  extern "C" __attribute__((visibility("hidden"), no_sanitize_thread)) void name(void* a) { \
    ::emu::san::hook(a, n, write, __builtin_return_address(0));                \
  }
#define EMU_TSAN_ACCESS(n)                                \
  EMU_TSAN_HOOK(__tsan_read##n, n, false)                 \
  EMU_TSAN_HOOK(__tsan_write##n, n, true)                 \
  EMU_TSAN_HOOK(__tsan_unaligned_read##n, n, false)       \
  EMU_TSAN_HOOK(__tsan_unaligned_write##n, n, true)       \
  EMU_TSAN_HOOK(__tsan_volatile_read##n, n, false)        \
  EMU_TSAN_HOOK(__tsan_volatile_write##n, n, true)
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
#undef EMU_TSAN_ACCESS
#undef EMU_TSAN_HOOK
extern "C" __attribute__((visibility("hidden"), no_sanitize_thread)) void __tsan_read_range(void* a, unsigned long n) {
  ::emu::san::hook(a, n, false, __builtin_return_address(0));
}
extern "C" __attribute__((visibility("hidden"), no_sanitize_thread)) void __tsan_write_range(void* a, unsigned long n) {
  ::emu::san::hook(a, n, true, __builtin_return_address(0));
}
EMU_TSAN_ENTRY __tsan_init() {}
EMU_TSAN_ENTRY __tsan_func_entry(void*) {}
EMU_TSAN_ENTRY __tsan_func_exit() {}
EMU_TSAN_ENTRY __tsan_vptr_update(void**, void*) {}
EMU_TSAN_ENTRY __tsan_vptr_read(void**) {}
// Atomics of the host code (static-local guards): plain atomics, not instrumented themselves.
#define EMU_TSAN_ATOMIC(bits, T)                                                                          \
  extern "C" __attribute__((visibility("hidden"), no_sanitize_thread)) T __tsan_atomic##bits##_load(       \
      const volatile T* a, int) {                                                                         \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                          \
  }                                                                                                       \
  extern "C" __attribute__((visibility("hidden"), no_sanitize_thread)) void __tsan_atomic##bits##_store(   \
      volatile T* a, T v, int) {                                                                          \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                             \
  }
EMU_TSAN_ATOMIC(8, uint8_t)
EMU_TSAN_ATOMIC(16, uint16_t)
EMU_TSAN_ATOMIC(32, uint32_t)
EMU_TSAN_ATOMIC(64, uint64_t)
#undef EMU_TSAN_ATOMIC
#undef EMU_TSAN_ENTRY

namespace emu::san {
// Turns the sanitizer on for this library: static shared memory's shadow, the library's base.
inline const bool g_installed = [] {
  Dl_info info;
  if (dladdr(reinterpret_cast<const void*>(&access), &info) != 0) g_base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  g_static.name = "static";
  g_static.lo = g_static.data_lo = reinterpret_cast<uintptr_t>(__emu_shared_begin);
  g_static.hi = g_static.data_hi = reinterpret_cast<uintptr_t>(__emu_shared_end);
  g_static.cells.assign(g_static.hi - g_static.lo, Cell{});
  g_enabled = true;
  return true;
}();
}  // namespace emu::san

// Harness controls (ctypes): counting per warp-wide request on or off, its report, and global
// redzones around tensor arguments.
extern "C" void emu_set_counting(int on) {
  emu::san::g_counting = on != 0;
  emu::san::g_counts.clear();
}
// One line per (kernel, code address, shared or global) of the kernels' own code:
// "kernel\tsite\tshared|global\trequests\tpasses or sectors\tideal".
// (Namespace-scope, not function-local statics: those are gathered with the static __shared__
// variables by csrc/emu/shared_memory.ld and poisoned before every block.)
namespace emu::san {
inline std::string g_counts_text;
inline std::unordered_map<uint32_t, std::string> g_site_names;  // addr2line once per site
}  // namespace emu::san
extern "C" const char* emu_counts() {
  std::string& text = emu::san::g_counts_text;
  auto& names = emu::san::g_site_names;
  text.clear();
  for (const auto& [kernel, sites] : emu::san::g_counts) {
    for (const auto& [key, c] : sites) {
      const uint32_t site = static_cast<uint32_t>(key / 2);
      if (!names.contains(site)) {
        // the kernel's own accesses only: not the emulator's bookkeeping or the C++ library's
        const auto frames = emu::detail::source_frames(emu::san::pc_of(site));
        const std::string inner = frames.empty() ? "" : frames.front().second;
        const std::string file = inner.substr(0, inner.rfind(':'));
        const bool ours = file != "cuda_emu.h" && (file.ends_with(".cuh") || file.ends_with(".cu") || file.ends_with(".cpp"));
        names[site] = ours ? emu::detail::site_name(emu::san::pc_of(site)) : "";
      }
      if (names[site].empty()) continue;
      text += kernel + "\t" + names[site] + "\t" + (c.shared ? "shared" : "global") + "\t" + std::to_string(c.requests) +
              "\t" + std::to_string(c.shared ? c.wavefronts : c.sectors) + "\t" +
              std::to_string(c.shared ? c.ideal : c.ideal_sectors) + "\n";
    }
  }
  return text.c_str();
}
extern "C" void emu_add_redzone(const void* lo, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(lo);
  emu::san::g_redzones.emplace_back(a, a + static_cast<uintptr_t>(bytes));
  emu::san::g_redzone_lo = emu::san::g_redzone_lo == 0 ? a : std::min(emu::san::g_redzone_lo, a);
  emu::san::g_redzone_hi = std::max(emu::san::g_redzone_hi, a + static_cast<uintptr_t>(bytes));
}
extern "C" void emu_add_tensor(const void* start, int64_t bytes) {
  emu::san::g_tensors.emplace_back(reinterpret_cast<uintptr_t>(start), static_cast<uintptr_t>(bytes));
}
extern "C" void emu_clear_redzones() {
  emu::san::g_redzones.clear();
  emu::san::g_tensors.clear();
  emu::san::g_redzone_lo = emu::san::g_redzone_hi = 0;
}
#endif

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

// Not inlined, so that its return address names the inlined copy of a helper it was called from.
__attribute__((noinline)) inline void __syncthreads(std::source_location site = std::source_location::current()) {
  emu::detail::Thread& t = emu::detail::thread_state();
  t.wait = emu::detail::Wait::kBlockBarrier;
  t.barrier_site = site;
  t.barrier_pc = __builtin_return_address(0);
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
