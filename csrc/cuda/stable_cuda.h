// What the CUDA launchers (csrc/cuda/*.cu) use beyond csrc/stable.h, on the LibTorch stable ABI
// only: the current CUDA stream and the device guard through the stable C shims, CUDA error
// checks in place of C10_CUDA_CHECK / C10_CUDA_KERNEL_LAUNCH_CHECK, and the few ATen ops of their
// host-side validation and masking, each a dispatcher call with its full schema argument list.
//
// The dispatcher's boxed call (torch_call_dispatcher) converts every argument by its schema type,
// and a `Scalar` is not among the types it converts (torch/csrc/shim_common.cpp, to_ivalue: "Not
// yet supported conversion"), defaults included: so no op here has a Scalar argument. Scalars
// become 0-dim tensors on the operand's device (`scalar_like`), `x.ge(0)` is `ge(x, scalar_like(...))`,
// and integer addition, whose ATen ops all take a Scalar alpha (and the stable `subtract` shim a
// floating one, which ATen refuses for integer tensors), is a sum over the stacked operands.
#pragma once

#ifndef MMFUSE_WITH_CUDA
#error "csrc/cuda/stable_cuda.h is for the CUDA launchers (MMFUSE_WITH_CUDA)"
#endif

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../stable.h"

#ifndef USE_CUDA
#error "aoti_torch_get_current_cuda_stream is declared under USE_CUDA: compile the CUDA launchers with -DUSE_CUDA"
#endif

namespace mmfuse {
namespace cuda_detail {
[[noreturn]] inline void cuda_fail(cudaError_t err, const char* expr, const char* file, int line) {
  cudaGetLastError();  // clear a sticky launch error so the next call starts clean
  detail::fail("CUDA error: ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ") from ", expr, " at ", file, ":",
               line);
}
}  // namespace cuda_detail

// C10_CUDA_CHECK's role: a failed CUDA runtime call (or kernel launch) throws std::runtime_error,
// which Python sees as RuntimeError starting "CUDA error: <cudaGetErrorString>".
#define MMFUSE_CUDA_CHECK(...)                                                                      \
  do {                                                                                              \
    const cudaError_t _mmfuse_err = (__VA_ARGS__);                                                  \
    if (__builtin_expect(_mmfuse_err != cudaSuccess, 0))                                            \
      ::mmfuse::cuda_detail::cuda_fail(_mmfuse_err, #__VA_ARGS__, __FILE__, __LINE__);              \
  } while (0)

// C10_CUDA_KERNEL_LAUNCH_CHECK's role: the launch error of the kernel just launched, if any.
#define MMFUSE_CUDA_KERNEL_LAUNCH_CHECK() MMFUSE_CUDA_CHECK(cudaGetLastError())

using DeviceGuard = torch::stable::accelerator::DeviceGuard;  // c10::cuda::CUDAGuard's role

// The current CUDA stream of the device (torch's, so the launches order with torch's own work).
inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

inline std::vector<int64_t> sizes_of(const Tensor& t) { return t.sizes().vec(); }

// ---- ATen ops without a Scalar argument, through the dispatcher (full argument lists) ----------
namespace op {

template <typename... Args>
inline std::vector<Tensor> call_op_list(const char* name, const char* overload, const Args&... args) {
  constexpr size_t n = sizeof...(Args) > 0 ? sizeof...(Args) : 1;
  std::array<StableIValue, n> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<std::vector<Tensor>>(stack[0]);
}

// a 0-dim tensor holding value, on like's device (the Scalar operand of the ops below)
inline Tensor scalar_like(const Tensor& like, double value, ScalarType type) {
  return torch::stable::full({}, value, type, std::nullopt, like.device());
}
inline Tensor scalar_like(const Tensor& like, double value) { return scalar_like(like, value, like.scalar_type()); }

// comparisons (Tensor, Tensor), broadcasting
inline Tensor eq(const Tensor& a, const Tensor& b) { return call_op("aten::eq", "Tensor", a, b); }
inline Tensor ne(const Tensor& a, const Tensor& b) { return call_op("aten::ne", "Tensor", a, b); }
inline Tensor ge(const Tensor& a, const Tensor& b) { return call_op("aten::ge", "Tensor", a, b); }
inline Tensor gt(const Tensor& a, const Tensor& b) { return call_op("aten::gt", "Tensor", a, b); }
inline Tensor le(const Tensor& a, const Tensor& b) { return call_op("aten::le", "Tensor", a, b); }
inline Tensor lt(const Tensor& a, const Tensor& b) { return call_op("aten::lt", "Tensor", a, b); }
// with a number: x.ge(v) etc., v in x's dtype
inline Tensor eq(const Tensor& a, double v) { return eq(a, scalar_like(a, v)); }
inline Tensor ne(const Tensor& a, double v) { return ne(a, scalar_like(a, v)); }
inline Tensor ge(const Tensor& a, double v) { return ge(a, scalar_like(a, v)); }
inline Tensor gt(const Tensor& a, double v) { return gt(a, scalar_like(a, v)); }
inline Tensor le(const Tensor& a, double v) { return le(a, scalar_like(a, v)); }
inline Tensor lt(const Tensor& a, double v) { return lt(a, scalar_like(a, v)); }

inline Tensor logical_and(const Tensor& a, const Tensor& b) { return call_op("aten::logical_and", "", a, b); }
inline Tensor logical_or(const Tensor& a, const Tensor& b) { return call_op("aten::logical_or", "", a, b); }
inline Tensor logical_not(const Tensor& a) { return call_op("aten::logical_not", "", a); }

// reductions
inline Tensor all(const Tensor& a) { return call_op("aten::all", "", a); }
inline Tensor any(const Tensor& a, int64_t dim, bool keepdim = false) { return call_op("aten::any", "dim", a, dim, keepdim); }
inline Tensor max(const Tensor& a) { return call_op("aten::max", "", a); }
inline Tensor cumsum(const Tensor& a, int64_t dim) {
  return call_op("aten::cumsum", "", a, dim, std::optional<ScalarType>());
}
// a[1:] - a[:-1] along dim (x.diff(dim=dim))
inline Tensor diff(const Tensor& a, int64_t dim = -1) {
  return call_op("aten::diff", "", a, int64_t(1), dim, std::optional<Tensor>(), std::optional<Tensor>());
}

// arithmetic. add/sub are exact for integer tensors (their ATen ops take a Scalar alpha)
inline Tensor neg(const Tensor& a) { return call_op("aten::neg", "", a); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return call_op("aten::mul", "Tensor", a, b); }
inline Tensor minimum(const Tensor& a, const Tensor& b) { return call_op("aten::minimum", "", a, b); }
inline Tensor maximum(const Tensor& a, const Tensor& b) { return call_op("aten::maximum", "", a, b); }
inline Tensor stack(const std::vector<Tensor>& ts, int64_t dim = 0) { return call_op("aten::stack", "", ts, dim); }
inline Tensor add(const Tensor& a, const Tensor& b) {
  if (is_floating(a.scalar_type()) && a.scalar_type() == b.scalar_type()) return torch::stable::subtract(a, b, -1.0);
  return torch::stable::sum(stack(call_op_list("aten::broadcast_tensors", "", std::vector<Tensor>{a, b})),
                            std::vector<int64_t>{0});
}
inline Tensor sub(const Tensor& a, const Tensor& b) {
  if (is_floating(a.scalar_type()) && a.scalar_type() == b.scalar_type()) return torch::stable::subtract(a, b, 1.0);
  return add(a, neg(b));
}
inline Tensor add(const Tensor& a, double v) { return add(a, scalar_like(a, v)); }
inline Tensor mul(const Tensor& a, double v) { return mul(a, scalar_like(a, v)); }
inline Tensor clamp(const Tensor& a, double lo, double hi) {
  return call_op("aten::clamp", "Tensor", a, std::optional<Tensor>(scalar_like(a, lo)),
                 std::optional<Tensor>(scalar_like(a, hi)));
}
inline Tensor clamp_min(const Tensor& a, double lo) { return call_op("aten::clamp_min", "Tensor", a, scalar_like(a, lo)); }

// 0, 1, ..., n - 1 (int64) on like's device
inline Tensor arange(int64_t n, const Tensor& like) {
  Tensor ones = torch::stable::full({n}, 1.0, ScalarType::Long, std::nullopt, like.device());
  if (n > 0) {
    Tensor first = torch::stable::narrow(ones, 0, 0, 1);
    torch::stable::fill_(first, 0.0);
  }
  return cumsum(ones, 0);
}

// views and indexing
inline Tensor expand(const Tensor& a, const std::vector<int64_t>& size) {
  return call_op("aten::expand", "", a, size, false);
}
inline Tensor index_select(const Tensor& a, int64_t dim, const Tensor& index) {
  return call_op("aten::index_select", "", a, dim, index);
}
inline Tensor masked_fill(const Tensor& a, const Tensor& mask, double value) {
  return call_op("aten::masked_fill", "Tensor", a, mask, scalar_like(a, value));
}
inline void masked_fill_(const Tensor& a, const Tensor& mask, double value) {
  (void)call_op("aten::masked_fill_", "Tensor", a, mask, scalar_like(a, value));
}
inline void scatter_add_(const Tensor& a, int64_t dim, const Tensor& index, const Tensor& src) {
  (void)call_op("aten::scatter_add_", "", a, dim, index, src);
}
// torch.searchsorted(sorted, values, right=right), int64
inline Tensor searchsorted(const Tensor& sorted, const Tensor& values, bool right) {
  return call_op("aten::searchsorted", "Tensor", sorted, values, false, right, std::optional<std::string>(),
                 std::optional<Tensor>());
}

// reading back (one host sync each)
inline Tensor to_cpu(const Tensor& a) { return torch::stable::to(a, Device(DeviceType::CPU)); }

}  // namespace op
}  // namespace mmfuse
