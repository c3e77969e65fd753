// Host-emulator harness for csrc/cuda/fusion_kernel.cuh: launches the fusion kernels the way
// csrc/cuda/fusion.cu does (same launch-config helpers, same two-step deterministic
// reductions), on CPU buffers. Used by tests/test_fusion_emulator.py.
#include "harness.h"

#include "cuda/fusion_kernel.cuh"

namespace {

namespace fc = mmfuse::cuda;

template <typename T>
using AccOf = typename fc::Acc<T>::type;

// Pointers arrive as int64 arrays of M data_ptr()s (0 for none); launch_info (2, host memory)
// receives {vectorized, grid.x} of the main kernel. partials: the "sum" backward's workspace,
// room for grid.x * M doubles (the caller sizes it for ceil(numel / 256) blocks).
template <typename T>
int combine(int64_t backward, int64_t mode, int64_t act, const int64_t* projected, const int64_t* gate_logits,
            const void* weights, void* out, const void* grad_out, const int64_t* grad_projected, const int64_t* grad_gate_logits, double* partials, double* grad_weights,
            int64_t numel, int64_t num_modalities, int64_t max_blocks, int64_t* launch_info) {
  return harness::run([&] {
    fc::CombineParams<T> p{};
    const int num = static_cast<int>(num_modalities);
    for (int m = 0; m < num && m < fc::kMaxModalities; ++m) {
      p.projected[m] = reinterpret_cast<const T*>(projected[m]);
      p.gate_logits[m] = reinterpret_cast<const T*>(gate_logits[m]);
      if (backward != 0) {
        p.grad_projected[m] = reinterpret_cast<T*>(grad_projected[m]);
        p.grad_gate_logits[m] = reinterpret_cast<T*>(grad_gate_logits[m]);
      }
    }
    p.weights = static_cast<const AccOf<T>*>(weights);
    p.out = static_cast<T*>(out);
    p.grad_out = static_cast<const T*>(grad_out);
    p.numel = numel;
    p.num_modalities = num;
    p.mode = static_cast<fc::CombineMode>(mode);
    p.act = static_cast<fc::Act>(act);
    if (numel == 0) return;  // as the launcher: nothing to launch
    fc::KernelLaunch launch;
    if (fc::combine_launch_config(p, backward != 0, max_blocks, &launch) != cudaSuccess) {
      throw emu::Error("invalid combine parameters");
    }
    launch_info[0] = launch.vectorized;
    launch_info[1] = launch.grid.x;
    p.weight_partials = partials;
    // the kernel launch_combine picks: mode and path are template arguments
    auto pick = [&](auto mode_tag) {
      constexpr fc::CombineMode kMode = decltype(mode_tag)::value;
      using fc::combine_backward_kernel;
      using fc::combine_forward_kernel;
      if (backward != 0) {
        return launch.vectorized ? combine_backward_kernel<T, kMode, true> : combine_backward_kernel<T, kMode, false>;
      }
      return launch.vectorized ? combine_forward_kernel<T, kMode, true> : combine_forward_kernel<T, kMode, false>;
    };
    using Sum = std::integral_constant<fc::CombineMode, fc::CombineMode::kSum>;
    using Product = std::integral_constant<fc::CombineMode, fc::CombineMode::kProduct>;
    using Gated = std::integral_constant<fc::CombineMode, fc::CombineMode::kGated>;
    auto kernel = p.mode == fc::CombineMode::kSum       ? pick(Sum())
                  : p.mode == fc::CombineMode::kProduct ? pick(Product())
                                                        : pick(Gated());
    harness::launch(kernel, launch.grid, launch.block, 0, p);
    if (backward != 0 && p.mode == fc::CombineMode::kSum) {
      const fc::KernelLaunch sum = fc::sum_partials_launch_config(num);
      harness::launch(fc::sum_partials_kernel<double>, sum.grid, sum.block, 0,
                      static_cast<const double*>(partials), static_cast<int64_t>(launch.grid.x),
                      static_cast<int64_t>(num), grad_weights);
    }
  });
}

// acc (rows, cols) in the accumulation type; bias may be null; preact null for act none.
template <typename T>
int linear_epilogue(const void* acc, const void* bias, void* preact, void* out, int64_t rows, int64_t cols,
                    int64_t act, int64_t max_row_blocks, int64_t* launch_info) {
  return harness::run([&] {
    fc::LinearEpilogueParams<T> p{static_cast<const AccOf<T>*>(acc), static_cast<const T*>(bias),
                                  static_cast<T*>(preact), static_cast<T*>(out), rows, cols, static_cast<fc::Act>(act)};
    fc::KernelLaunch launch;
    if (fc::linear_launch_config(rows, cols, max_row_blocks, &launch) != cudaSuccess) {
      throw emu::Error("invalid epilogue parameters");
    }
    launch_info[0] = launch.grid.x;
    launch_info[1] = launch.grid.y;
    harness::launch(fc::linear_epilogue_kernel<T>, launch.grid, launch.block, 0, p);
  });
}

// grad (rows, cols) written unless act is none; grad_bias (cols) null for no bias; partials:
// room for grid.y * cols values of the accumulation type (ceil(rows / 8) row blocks).
template <typename T>
int linear_grad(const void* grad_out, const void* preact, void* grad, void* grad_bias, void* partials, int64_t rows,
                int64_t cols, int64_t act, int64_t max_row_blocks, int64_t* launch_info) {
  return harness::run([&] {
    fc::KernelLaunch launch;
    if (fc::linear_launch_config(rows, cols, max_row_blocks, &launch) != cudaSuccess) {
      throw emu::Error("invalid activation-grad parameters");
    }
    launch_info[0] = launch.grid.x;
    launch_info[1] = launch.grid.y;
    fc::LinearGradParams<T> p{static_cast<const T*>(grad_out), static_cast<const T*>(preact), static_cast<T*>(grad),
                              grad_bias != nullptr ? static_cast<AccOf<T>*>(partials) : nullptr, rows, cols,
                              static_cast<fc::Act>(act)};
    harness::launch(fc::linear_grad_kernel<T>, launch.grid, launch.block, 0, p);
    if (grad_bias != nullptr) {
      const fc::KernelLaunch sum = fc::sum_partials_launch_config(cols);
      harness::launch(fc::sum_partials_kernel<T>, sum.grid, sum.block, 0, static_cast<const AccOf<T>*>(partials),
                      static_cast<int64_t>(launch.grid.y), cols, static_cast<T*>(grad_bias));
    }
  });
}

}  // namespace

#define FUSION_ENTRIES(suffix, T)                                                                                   \
  extern "C" int combine_##suffix(int64_t backward, int64_t mode, int64_t act, const int64_t* projected,             \
                                  const int64_t* gate_logits, const void* weights, void* out,                         \
                                  const void* grad_out, const int64_t* grad_projected,                               \
                                  const int64_t* grad_gate_logits, double* partials, double* grad_weights,           \
                                  int64_t numel, int64_t num_modalities, int64_t max_blocks, int64_t* launch_info) { \
    return combine<T>(backward, mode, act, projected, gate_logits, weights, out, grad_out,                           \
                      grad_projected, grad_gate_logits, partials, grad_weights, numel, num_modalities, max_blocks,   \
                      launch_info);                                                                                  \
  }                                                                                                                  \
  extern "C" int linear_epilogue_##suffix(const void* acc, const void* bias, void* preact, void* out, int64_t rows,  \
                                          int64_t cols, int64_t act, int64_t max_row_blocks, int64_t* launch_info) { \
    return linear_epilogue<T>(acc, bias, preact, out, rows, cols, act, max_row_blocks, launch_info);                 \
  }                                                                                                                  \
  extern "C" int linear_grad_##suffix(const void* grad_out, const void* preact, void* grad, void* grad_bias,         \
                                      void* partials, int64_t rows, int64_t cols, int64_t act,                       \
                                      int64_t max_row_blocks, int64_t* launch_info) {                                \
    return linear_grad<T>(grad_out, preact, grad, grad_bias, partials, rows, cols, act, max_row_blocks,              \
                          launch_info);                                                                              \
  }
FUSION_ENTRIES(float32, float)
FUSION_ENTRIES(float64, double)
FUSION_ENTRIES(float16, __half)
FUSION_ENTRIES(bfloat16, __nv_bfloat16)
#undef FUSION_ENTRIES
