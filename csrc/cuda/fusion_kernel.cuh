// CUDA kernel bodies for mmfuse::combine_modalities / fused_concat_linear (forward and
// backward). CUDA headers only (no torch), so nvcc compile-checks it for sm_80 and sm_90a on
// machines without a CUDA torch, and the host emulator runs it (tests/emulator/fusion.cpp).
//
// combine_modalities: one elementwise pass over the M <= kMaxModalities inputs, read through
//   a params struct of pointers, in 16-byte vectors when every pointer is 16-byte aligned (a
//   scalar tail covers numel % vector width; a misaligned pointer takes the scalar kernel),
//   grid-stride. Arithmetic in fp32 (fp64 for double), rounded once into the output dtype,
//   as csrc/cpu/fusion.cpp does. The "sum" backward's grad_weights[m] = sum_e g_e * p_m[e]
//   is reduced deterministically: each block writes its partial sums (fp64) to a workspace,
//   then sum_partials_kernel adds them in block order. No float atomics.
// fused_concat_linear: the GEMMs run in cuBLAS (the launcher); here are the epilogue
//   (acc + bias -> preact, act(preact) -> out, in one pass) and the backward's elementwise pass
//   g = grad_out * act'(preact) fused with the bias gradient's column sums (per-row-block
//   partials, then sum_partials_kernel in row-block order).
//
// Activations match PyTorch's: gelu is the exact erf form, and the backward reads tanh/sigmoid
// of the pre-activation rounded to the storage dtype, as at::tanh_backward(grad, tanh(z)) does
// in the CPU kernel; g itself is rounded to the storage dtype, like the CPU kernel's
// activation_backward in that dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "storage.cuh"

namespace mmfuse {
namespace cuda {

// Same codes, same order as mmfuse::Activation (csrc/cpu/activation.h); the launcher checks it.
enum class Act : int { kNone, kRelu, kGelu, kSilu, kTanh, kSigmoid };
enum class CombineMode : int { kSum, kProduct, kGated };

constexpr int kElementwiseThreads = 256;
constexpr int kColumnTile = 32;  // linear kernels: a warp spans 32 consecutive columns
constexpr int kRowTile = 8;      // ... and a block 8 rows at a time

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float erf_of(float x) { return erff(x); }
__device__ __forceinline__ double erf_of(double x) { return erf(x); }
__device__ __forceinline__ float tanh_of(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_of(double x) { return tanh(x); }

template <typename A>
__device__ __forceinline__ A sigmoid_of(A x) {
  return A(1) / (A(1) + exp_of(-x));
}

template <typename A>
__device__ __forceinline__ A activate(A x, Act act) {
  switch (act) {
    case Act::kNone: return x;
    case Act::kRelu: return x < A(0) ? A(0) : x;  // NaN passes through, as in at::relu
    case Act::kGelu: return x * A(0.5) * (A(1) + erf_of(x * A(0.70710678118654752440)));
    case Act::kTanh: return tanh_of(x);
    case Act::kSilu:
    case Act::kSigmoid:
      // one division for both (each inlined IEEE division brings a slow-path call, around which
      // ptxas spilled on sm_100a and sm_120)
      return (act == Act::kSilu ? x : A(1)) / (A(1) + exp_of(-x));
  }
  return x;
}

// grad * act'(z) for the pre-activation z (a value of T), rounded to T: ATen's backward formulas
// (threshold_backward, gelu_backward, silu_backward, tanh_backward/sigmoid_backward of the
// forward output in T).
template <typename T>
__device__ __forceinline__ typename Acc<T>::type activation_grad(typename Acc<T>::type grad,
                                                                 typename Acc<T>::type z, Act act) {
  using A = typename Acc<T>::type;
  A g = grad;
  switch (act) {
    case Act::kNone: return grad;
    case Act::kRelu: g = z <= A(0) ? A(0) : grad; break;
    case Act::kGelu: {
      const A cdf = A(0.5) * (A(1) + erf_of(z * A(0.70710678118654752440)));
      const A pdf = A(0.39894228040143267794) * exp_of(A(-0.5) * z * z);  // 1/sqrt(2 pi)
      g = grad * (cdf + z * pdf);
      break;
    }
    case Act::kTanh: {
      const A t = round_to<T>(tanh_of(z));
      g = grad * (A(1) - t * t);
      break;
    }
    case Act::kSilu:
    case Act::kSigmoid: {  // one division for both, as in activate
      const A sig = sigmoid_of(z);
      if (act == Act::kSilu) {
        g = grad * sig * (A(1) + z * (A(1) - sig));
      } else {
        const A s = round_to<T>(sig);  // the forward's output in T
        g = grad * (A(1) - s) * s;
      }
      break;
    }
  }
  return round_to<T>(g);
}

// kWidth consecutive elements of T: one 16-byte load/store when kWidth == Vec<T>::kSize.
template <typename T, int kWidth>
struct alignas(kWidth * sizeof(T)) Chunk {
  T v[kWidth];
};

template <typename T, int kWidth>
__device__ __forceinline__ Chunk<T, kWidth> load_chunk(const T* ptr) {
  return *reinterpret_cast<const Chunk<T, kWidth>*>(ptr);
}

template <typename T, int kWidth>
__device__ __forceinline__ void store_chunk(T* ptr, const typename Acc<T>::type (&x)[kWidth]) {
  Chunk<T, kWidth> c;
#pragma unroll
  for (int j = 0; j < kWidth; ++j) c.v[j] = from_acc<T>(x[j]);
  *reinterpret_cast<Chunk<T, kWidth>*>(ptr) = c;
}

template <typename T, int kWidth>
__device__ __forceinline__ void load_acc(const T* ptr, typename Acc<T>::type (&x)[kWidth]) {
  const Chunk<T, kWidth> c = load_chunk<T, kWidth>(ptr);
#pragma unroll
  for (int j = 0; j < kWidth; ++j) x[j] = to_acc(c.v[j]);
}

// ---- combine_modalities -----------------------------------------------------------------------

template <typename T>
struct CombineParams {
  using A = typename Acc<T>::type;
  const T* projected[kMaxModalities];     // p_m: numel elements each, contiguous
  const T* gate_logits[kMaxModalities];   // "gated": M tensors like p_m
  const A* weights;                       // "sum": (M,) normalised modality weights
  T* out;                                 // forward: act(y), numel
  const T* grad_out;                      // backward: numel
  T* grad_projected[kMaxModalities];      // backward: numel each
  T* grad_gate_logits[kMaxModalities];    // backward, "gated": numel each
  double* weight_partials;                // backward, "sum": (gridDim.x, M) per-block sums of g * p_m
  int64_t numel;
  int num_modalities;
  CombineMode mode;
  Act act;
};

// y = sum_m w_m p_m | prod_m p_m | sum_m sigmoid(z_m) p_m for kWidth elements from element e,
// in the accumulation type.
template <typename T, CombineMode kMode, int kWidth>
__device__ __forceinline__ void combine_chunk(const CombineParams<T>& p, int64_t e, typename Acc<T>::type (&y)[kWidth]) {
  using A = typename Acc<T>::type;
#pragma unroll
  for (int j = 0; j < kWidth; ++j) y[j] = kMode == CombineMode::kProduct ? A(1) : A(0);
  for (int m = 0; m < p.num_modalities; ++m) {
    A x[kWidth];
    load_acc<T, kWidth>(p.projected[m] + e, x);
    if (kMode == CombineMode::kSum) {
      const A w = p.weights[m];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y[j] += w * x[j];
    } else if (kMode == CombineMode::kProduct) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y[j] *= x[j];
    } else {
      A z[kWidth];
      load_acc<T, kWidth>(p.gate_logits[m] + e, z);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) y[j] += sigmoid_of(z[j]) * x[j];
    }
  }
}

// Forward of kWidth elements from element e: out = act(y rounded to T) rounded to T. No
// pre-activation is stored: the backward recomputes it from the inputs it reads anyway.
template <typename T, CombineMode kMode, int kWidth>
__device__ __forceinline__ void combine_forward_chunk(const CombineParams<T>& p, int64_t e) {
  using A = typename Acc<T>::type;
  A y[kWidth];
  combine_chunk<T, kMode, kWidth>(p, e, y);
  if (p.act == Act::kNone) {
    store_chunk<T, kWidth>(p.out + e, y);
    return;
  }
#pragma unroll
  for (int j = 0; j < kWidth; ++j) y[j] = activate(round_to<T>(y[j]), p.act);
  store_chunk<T, kWidth>(p.out + e, y);
}

// Backward of kWidth elements from element e; "sum" adds g * p_m into dot[m].
template <typename T, CombineMode kMode, int kWidth>
__device__ __forceinline__ void combine_backward_chunk(const CombineParams<T>& p, int64_t e,
                                                       typename Acc<T>::type (&dot)[kMaxModalities]) {
  using A = typename Acc<T>::type;
  A g[kWidth];
  load_acc<T, kWidth>(p.grad_out + e, g);
  if (p.act != Act::kNone) {
    // the pre-activation, recomputed as the forward rounded it (its inputs are read below anyway)
    A z[kWidth];
    combine_chunk<T, kMode, kWidth>(p, e, z);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) g[j] = activation_grad<T>(g[j], round_to<T>(z[j]), p.act);
  }
  if constexpr (kMode == CombineMode::kSum) {
    // unrolled so that dot[m] has a constant index and stays in registers
#pragma unroll
    for (int m = 0; m < kMaxModalities; ++m) {
      if (m >= p.num_modalities) break;
      A x[kWidth], grad_p[kWidth];
      load_acc<T, kWidth>(p.projected[m] + e, x);
      const A w = p.weights[m];
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        grad_p[j] = g[j] * w;
        dot[m] += g[j] * x[j];
      }
      store_chunk<T, kWidth>(p.grad_projected[m] + e, grad_p);
    }
  } else {
    for (int m = 0; m < p.num_modalities; ++m) {
      A x[kWidth], grad_p[kWidth];
      if (kMode == CombineMode::kProduct) {
        // the product of the other modalities, not out / p_m: exact when some p_j == 0
#pragma unroll
        for (int j = 0; j < kWidth; ++j) grad_p[j] = g[j];
        for (int k = 0; k < p.num_modalities; ++k) {
          if (k == m) continue;
          load_acc<T, kWidth>(p.projected[k] + e, x);
#pragma unroll
          for (int j = 0; j < kWidth; ++j) grad_p[j] *= x[j];
        }
      } else {
        A s[kWidth], grad_z[kWidth];
        load_acc<T, kWidth>(p.projected[m] + e, x);
        load_acc<T, kWidth>(p.gate_logits[m] + e, s);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          s[j] = sigmoid_of(s[j]);
          grad_p[j] = g[j] * s[j];
          grad_z[j] = g[j] * x[j] * s[j] * (A(1) - s[j]);
        }
        store_chunk<T, kWidth>(p.grad_gate_logits[m] + e, grad_z);
      }
      store_chunk<T, kWidth>(p.grad_projected[m] + e, grad_p);
    }
  }
}

// Grid-stride over the elements: step(e, width) handles `width` elements from e. kVectorized
// kernels move Vec<T>::kSize elements per step and finish the numel % kSize tail one element
// per thread.
template <bool kVectorized, typename T, typename Step>
__device__ __forceinline__ void for_each_chunk(int64_t numel, Step&& step) {
  constexpr int kWidth = kVectorized ? Vec<T>::kSize : 1;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t chunks = numel / kWidth;
  for (int64_t c = thread; c < chunks; c += stride) step(c * kWidth, std::integral_constant<int, kWidth>());
  if (kVectorized && chunks * kWidth + thread < numel) step(chunks * kWidth + thread, std::integral_constant<int, 1>());
}

template <typename T, CombineMode kMode, bool kVectorized>
__global__ void __launch_bounds__(kElementwiseThreads) combine_forward_kernel(CombineParams<T> p) {
  for_each_chunk<kVectorized, T>(p.numel, [&](int64_t e, auto width) {
    combine_forward_chunk<T, kMode, decltype(width)::value>(p, e);
  });
}

template <typename T, CombineMode kMode, bool kVectorized>
__global__ void __launch_bounds__(kElementwiseThreads) combine_backward_kernel(CombineParams<T> p) {
  using A = typename Acc<T>::type;
  A dot[kMaxModalities];
#pragma unroll
  for (int m = 0; m < kMaxModalities; ++m) dot[m] = A(0);
  for_each_chunk<kVectorized, T>(p.numel, [&](int64_t e, auto width) {
    combine_backward_chunk<T, kMode, decltype(width)::value>(p, e, dot);
  });
  if (kMode != CombineMode::kSum) return;

  // this block's sum of dot[m]: warp shuffle tree, then the warps in order (fp64 from here on)
  constexpr int kWarps = kElementwiseThreads / 32;
  __shared__ double warp_sums[kWarps][kMaxModalities];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int m = 0; m < kMaxModalities; ++m) {
    if (m >= p.num_modalities) break;  // uniform: every lane stays in the shuffles
    double v = static_cast<double>(dot[m]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][m] = v;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < p.num_modalities) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    p.weight_partials[static_cast<int64_t>(blockIdx.x) * p.num_modalities + threadIdx.x] = total;
  }
}

// out[c] = sum over k of partials[k][c], k in order (the second, fixed-order step of both
// deterministic reductions); partials (parts, width) in Acc<T>, out (width) in T.
template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads)
sum_partials_kernel(const typename Acc<T>::type* partials, int64_t parts, int64_t width, T* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= width) return;
  typename Acc<T>::type total = 0;
  for (int64_t k = 0; k < parts; ++k) total += partials[k * width + c];
  out[c] = from_acc<T>(total);
}

// ---- fused_concat_linear ----------------------------------------------------------------------

template <typename T>
struct LinearEpilogueParams {
  using A = typename Acc<T>::type;
  const A* acc;   // (rows, cols) sum_i x_i @ W_i^T, contiguous; may be the same memory as preact
  const T* bias;  // (cols) or nullptr
  T* preact;      // (rows, cols): acc + bias rounded to T; nullptr when act is kNone
  T* out;         // (rows, cols): act(preact), or acc + bias when act is kNone
  int64_t rows;
  int64_t cols;
  Act act;
};

template <typename T>
struct LinearGradParams {
  using A = typename Acc<T>::type;
  const T* grad_out;  // (rows, cols)
  const T* preact;    // (rows, cols); nullptr when act is kNone
  T* grad;            // (rows, cols): g = grad_out * act'(preact) rounded to T; nullptr when act is kNone
  A* bias_partials;   // (gridDim.y, cols): per-row-block column sums of g, or nullptr (no bias)
  int64_t rows;
  int64_t cols;
  Act act;
};

// Threads (x, y) of block (bx, by) take column bx * 32 + x and rows by * 8 + y, stepping by
// gridDim.y * 8: a warp reads 32 consecutive elements of a row.
template <typename T>
__global__ void __launch_bounds__(kColumnTile * kRowTile) linear_epilogue_kernel(LinearEpilogueParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  if (col >= p.cols) return;
  const A b = p.bias != nullptr ? to_acc(p.bias[col]) : A(0);
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kRowTile + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.y) * kRowTile) {
    const int64_t i = row * p.cols + col;
    const A z = p.acc[i] + b;
    if (p.act == Act::kNone) {
      p.out[i] = from_acc<T>(z);
    } else {
      const T zt = from_acc<T>(z);
      p.preact[i] = zt;
      p.out[i] = from_acc<T>(activate(to_acc(zt), p.act));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kColumnTile * kRowTile) linear_grad_kernel(LinearGradParams<T> p) {
  using A = typename Acc<T>::type;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  A column_sum = A(0);
  if (col < p.cols) {
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kRowTile + threadIdx.y; row < p.rows;
         row += static_cast<int64_t>(gridDim.y) * kRowTile) {
      const int64_t i = row * p.cols + col;
      A g = to_acc(p.grad_out[i]);
      if (p.act != Act::kNone) {
        g = activation_grad<T>(g, to_acc(p.preact[i]), p.act);
        p.grad[i] = from_acc<T>(g);
      }
      column_sum += g;
    }
  }
  if (p.bias_partials == nullptr) return;  // uniform over the grid

  // the block's 8 row-partial sums of each column, added in row order
  __shared__ A sums[kRowTile][kColumnTile];
  sums[threadIdx.y][threadIdx.x] = column_sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.cols) {
    A total = A(0);
    for (int y = 0; y < kRowTile; ++y) total += sums[y][threadIdx.x];
    p.bias_partials[static_cast<int64_t>(blockIdx.y) * p.cols + col] = total;
  }
}

// ---- launch configuration (shared by the launchers and the emulator harness) ------------------

struct KernelLaunch {
  dim3 grid;
  dim3 block;
  bool vectorized;  // the 16-byte path (combine kernels)
};

// The combine kernels: at most max_blocks blocks of kElementwiseThreads (grid-stride beyond);
// vectorized when every pointer the pass touches is 16-byte aligned. Needs p.numel > 0. For the
// "sum" backward, weight_partials must hold grid.x * M doubles.
template <typename T>
inline cudaError_t combine_launch_config(const CombineParams<T>& p, bool backward, int64_t max_blocks,
                                         KernelLaunch* launch) {
  const int num = p.num_modalities;
  if (num < 1 || num > kMaxModalities || p.numel <= 0 || max_blocks < 1) return cudaErrorInvalidValue;
  bool aligned = true;
  auto check = [&](const void* ptr) { aligned = aligned && (ptr == nullptr || aligned16(ptr)); };
  for (int m = 0; m < num; ++m) {
    check(p.projected[m]);
    if (p.mode == CombineMode::kGated) check(p.gate_logits[m]);
    if (backward) check(p.grad_projected[m]);
    if (backward && p.mode == CombineMode::kGated) check(p.grad_gate_logits[m]);
  }
  check(backward ? p.grad_out : p.out);
  const int64_t width = aligned ? Vec<T>::kSize : 1;
  const int64_t steps = p.numel / width > 0 ? p.numel / width : 1;  // the tail fits in one block
  int64_t blocks = (steps + kElementwiseThreads - 1) / kElementwiseThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(blocks));
  launch->block = dim3(kElementwiseThreads);
  launch->vectorized = aligned;
  return cudaSuccess;
}

// The linear kernels: column tiles of 32 in grid.x, at most max_row_blocks row blocks of 8 in
// grid.y (grid-stride over the rest). Needs rows > 0 and cols > 0. With a bias gradient,
// bias_partials must hold grid.y * cols values.
inline cudaError_t linear_launch_config(int64_t rows, int64_t cols, int64_t max_row_blocks, KernelLaunch* launch) {
  if (rows <= 0 || cols <= 0 || max_row_blocks < 1) return cudaErrorInvalidValue;
  const int64_t col_blocks = (cols + kColumnTile - 1) / kColumnTile;
  int64_t row_blocks = (rows + kRowTile - 1) / kRowTile;
  if (row_blocks > max_row_blocks) row_blocks = max_row_blocks;
  if (row_blocks > 65535) row_blocks = 65535;
  if (col_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  launch->block = dim3(kColumnTile, kRowTile);
  launch->vectorized = false;
  return cudaSuccess;
}

// sum_partials_kernel over `width` outputs.
inline KernelLaunch sum_partials_launch_config(int64_t width) {
  const int64_t blocks = (width + kElementwiseThreads - 1) / kElementwiseThreads;
  return {dim3(static_cast<unsigned>(blocks > 0 ? blocks : 1)), dim3(kElementwiseThreads), false};
}

#ifdef __CUDACC__  // the host emulator launches through harness::launch instead
template <typename T, CombineMode kMode>
cudaError_t launch_combine(const CombineParams<T>& p, bool backward, const KernelLaunch& launch, cudaStream_t stream) {
  if (backward) {
    if (launch.vectorized) {
      combine_backward_kernel<T, kMode, true><<<launch.grid, launch.block, 0, stream>>>(p);
    } else {
      combine_backward_kernel<T, kMode, false><<<launch.grid, launch.block, 0, stream>>>(p);
    }
  } else if (launch.vectorized) {
    combine_forward_kernel<T, kMode, true><<<launch.grid, launch.block, 0, stream>>>(p);
  } else {
    combine_forward_kernel<T, kMode, false><<<launch.grid, launch.block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_combine(const CombineParams<T>& p, bool backward, const KernelLaunch& launch, cudaStream_t stream) {
  switch (p.mode) {
    case CombineMode::kSum: return launch_combine<T, CombineMode::kSum>(p, backward, launch, stream);
    case CombineMode::kProduct: return launch_combine<T, CombineMode::kProduct>(p, backward, launch, stream);
    case CombineMode::kGated: return launch_combine<T, CombineMode::kGated>(p, backward, launch, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_sum_partials(const typename Acc<T>::type* partials, int64_t parts, int64_t width, T* out,
                                cudaStream_t stream) {
  const KernelLaunch launch = sum_partials_launch_config(width);
  sum_partials_kernel<T><<<launch.grid, launch.block, 0, stream>>>(partials, parts, width, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_linear_epilogue(const LinearEpilogueParams<T>& p, const KernelLaunch& launch, cudaStream_t stream) {
  linear_epilogue_kernel<T><<<launch.grid, launch.block, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_linear_grad(const LinearGradParams<T>& p, const KernelLaunch& launch, cudaStream_t stream) {
  linear_grad_kernel<T><<<launch.grid, launch.block, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace mmfuse

#ifdef MMFUSE_KERNEL_COMPILE_CHECK
// Instantiated only by the nvcc compile check (tests/test_build.py): every dtype, every kernel.
#define MMFUSE_INSTANTIATE_FUSION(T)                                                                           \
  template cudaError_t mmfuse::cuda::launch_combine<T>(const mmfuse::cuda::CombineParams<T>&, bool,             \
                                                       const mmfuse::cuda::KernelLaunch&, cudaStream_t);        \
  template cudaError_t mmfuse::cuda::launch_sum_partials<T>(const mmfuse::cuda::Acc<T>::type*, int64_t, int64_t, \
                                                            T*, cudaStream_t);                                  \
  template cudaError_t mmfuse::cuda::launch_linear_epilogue<T>(const mmfuse::cuda::LinearEpilogueParams<T>&,    \
                                                               const mmfuse::cuda::KernelLaunch&, cudaStream_t); \
  template cudaError_t mmfuse::cuda::launch_linear_grad<T>(const mmfuse::cuda::LinearGradParams<T>&,            \
                                                           const mmfuse::cuda::KernelLaunch&, cudaStream_t);
MMFUSE_INSTANTIATE_FUSION(float)
MMFUSE_INSTANTIATE_FUSION(double)
MMFUSE_INSTANTIATE_FUSION(__half)
MMFUSE_INSTANTIATE_FUSION(__nv_bfloat16)
#undef MMFUSE_INSTANTIATE_FUSION
#endif
