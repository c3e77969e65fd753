// CUDA launchers for mmfuse::combine_modalities / fused_concat_linear (forward and backward);
// the kernel bodies are fusion_kernel.cuh. Same contract as the CPU kernels in
// csrc/cpu/fusion.cpp: same outputs, dtypes and edge cases.
//
// fused_concat_linear runs its GEMMs in cuBLAS through ATen (the dispatcher's aten::mm, on the
// stable ABI), one per input block, on W_i = weight.narrow(1, offset_i, D_i) (a strided view:
// cuBLAS takes the leading dimension, no copy) and never builds the concatenation. Accumulation
// is fp32 for fp16/bf16 inputs, rounded once, as the CPU kernel does: aten::mm.dtype(x_i, W_i^T,
// out_dtype=fp32) (cuBLAS with fp32 output, torch >= 2.8) per block, added into one fp32 buffer.
// (addmm_ in half would round the running sum to half after every block.) fp32/fp64 inputs
// accumulate the same way, one add per block after the first: addmm/addmm_ take Scalar beta and
// alpha, which the dispatcher's stable boxed call cannot pass (csrc/cuda/stable_cuda.h). The
// epilogue kernel then adds the bias and applies the activation, writing out and the saved
// pre-activation in one pass.
#include <algorithm>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../cpu/activation.h"
#include "fusion_kernel.cuh"
#include "stable_cuda.h"

namespace mmfuse {
namespace {

using cuda::kMaxModalities;

constexpr int64_t kBlocksPerSm = 8;  // grid-stride kernels: enough resident blocks to hide latency

// cuda::Act follows mmfuse::Activation's order (csrc/cpu/activation.h parses the names, with its message)
static_assert(static_cast<int>(cuda::Act::kNone) == static_cast<int>(Activation::kNone) &&
                  static_cast<int>(cuda::Act::kRelu) == static_cast<int>(Activation::kRelu) &&
                  static_cast<int>(cuda::Act::kGelu) == static_cast<int>(Activation::kGelu) &&
                  static_cast<int>(cuda::Act::kSilu) == static_cast<int>(Activation::kSilu) &&
                  static_cast<int>(cuda::Act::kTanh) == static_cast<int>(Activation::kTanh) &&
                  static_cast<int>(cuda::Act::kSigmoid) == static_cast<int>(Activation::kSigmoid),
              "cuda::Act and mmfuse::Activation must list the activations in one order");
cuda::Act act_code(std::string_view name) { return static_cast<cuda::Act>(parse_activation(name)); }

cuda::CombineMode parse_mode(std::string_view mode) {
  if (mode == "sum") return cuda::CombineMode::kSum;
  if (mode == "product") return cuda::CombineMode::kProduct;
  if (mode == "gated") return cuda::CombineMode::kGated;
  detail::fail("combine_modalities: mode must be sum, product or gated, got ", std::string(mode));
}

ScalarType acc_type(ScalarType t) { return t == dtype::kDouble ? dtype::kDouble : dtype::kFloat; }

int64_t max_blocks(const Tensor& like) {
  int sms = 0;
  MMFUSE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device_index()));
  return std::max<int64_t>(1, sms * kBlocksPerSm);
}

// f(T*) with T the CUDA storage type of `dtype` (a null pointer, only its type matters).
template <typename F>
void dispatch_storage(ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case ScalarType::Float: return f(static_cast<float*>(nullptr));
    case ScalarType::Double: return f(static_cast<double*>(nullptr));
    case ScalarType::Half: return f(static_cast<__half*>(nullptr));
    case ScalarType::BFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: detail::fail(op, ": the CUDA kernel takes float16, bfloat16, float32 and float64, got ", dtype);
  }
}

// The element pointer, or null for an undefined or empty tensor.
template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mutable_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

void check_cuda_like(const Tensor& t, const Tensor& like, const std::string& name, const char* op) {
  const Device device = t.device(), want = like.device();
  MMFUSE_CHECK(t.is_cuda() && device == want, op, ": ", name, " must be on ", device_str(want), ", got ",
               device_str(device));
  MMFUSE_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
               ", got ", t.scalar_type());
}

// t checked against `like` (device, dtype) and `shape`, made contiguous (no copy when it is).
Tensor checked_contiguous(const Tensor& t, const Tensor& like, IntArrayRef shape_want, const std::string& name,
                          const char* op) {
  check_cuda_like(t, like, name, op);
  MMFUSE_CHECK(t.sizes().equals(shape_want), op, ": ", name, " must have shape ", shape_str(shape_want), ", got ",
               shape(t));
  return mmfuse::contiguous(t);
}

// ---- combine_modalities -----------------------------------------------------------------------

void check_combine(const std::vector<Tensor>& projected, cuda::CombineMode mode, const std::optional<Tensor>& weights,
                   const std::vector<Tensor>& gate_logits, const char* op) {
  const int64_t num = static_cast<int64_t>(projected.size());
  MMFUSE_CHECK(num >= 1 && num <= kMaxModalities, op, ": the CUDA kernel takes 1 to ", kMaxModalities,
               " projected tensors, got ", num);
  const std::vector<int64_t> sizes = sizes_of(projected[0]);
  for (int64_t m = 0; m < num; ++m) {
    const std::string name = "projected[" + std::to_string(m) + "]";
    check_cuda_like(projected[m], projected[0], name, op);
    MMFUSE_CHECK(projected[m].is_contiguous() && projected[m].sizes().equals(sizes), op, ": ", name,
                 " must be contiguous with shape ", shape_str(sizes), ", got ", shape(projected[m]));
  }
  if (mode == cuda::CombineMode::kSum) {
    MMFUSE_CHECK(weights && weights->numel() == num, op, ": mode sum needs weights of shape (", num, ",)");
    MMFUSE_CHECK(weights->device() == projected[0].device(), op, ": weights must be on ",
                 device_str(projected[0].device()));
  }
  if (mode == cuda::CombineMode::kGated) {
    MMFUSE_CHECK(static_cast<int64_t>(gate_logits.size()) == num, op, ": mode gated needs ", num,
                 " gate_logits, got ", gate_logits.size());
    for (int64_t m = 0; m < num; ++m) {
      const std::string name = "gate_logits[" + std::to_string(m) + "]";
      check_cuda_like(gate_logits[m], projected[0], name, op);
      MMFUSE_CHECK(gate_logits[m].is_contiguous() && gate_logits[m].sizes().equals(sizes), op, ": ", name,
                   " must be contiguous with shape ", shape_str(sizes), ", got ", shape(gate_logits[m]));
    }
  }
}

template <typename T>
cuda::CombineParams<T> combine_params(const std::vector<Tensor>& projected, cuda::CombineMode mode,
                                      const Tensor& weights_acc, const std::vector<Tensor>& gate_logits, cuda::Act act) {
  cuda::CombineParams<T> p{};
  for (size_t m = 0; m < projected.size(); ++m) p.projected[m] = data_or_null<T>(projected[m]);
  for (size_t m = 0; m < gate_logits.size(); ++m) p.gate_logits[m] = data_or_null<T>(gate_logits[m]);
  p.weights = data_or_null<typename cuda::Acc<T>::type>(weights_acc);
  p.numel = projected[0].numel();
  p.num_modalities = static_cast<int>(projected.size());
  p.mode = mode;
  p.act = act;
  return p;
}

// The "sum" weights in the accumulation type, on the device (no host sync), as the CPU kernel
// reads them; undefined for the other modes.
Tensor weights_in_acc_type(const std::optional<Tensor>& weights, cuda::CombineMode mode, const Tensor& like) {
  if (mode != cuda::CombineMode::kSum) return Tensor();
  return mmfuse::contiguous(to_dtype(*weights, acc_type(like.scalar_type())));
}

Tensor combine_modalities_cuda(const std::vector<Tensor>& projected, const std::string& mode_name,
                               const std::optional<Tensor>& weights, const std::vector<Tensor>& gate_logits,
                               const std::string& activation) {
  const char* op = "combine_modalities";
  const cuda::CombineMode mode = parse_mode(mode_name);
  const cuda::Act act = act_code(activation);
  check_combine(projected, mode, weights, gate_logits, op);
  const Tensor& first = projected[0];
  const DeviceGuard guard(first.get_device_index());
  Tensor out = torch::stable::empty_like(first);
  if (first.numel() == 0) return out;
  const Tensor weights_acc = weights_in_acc_type(weights, mode, first);
  dispatch_storage(first.scalar_type(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda::CombineParams<T> p = combine_params<T>(projected, mode, weights_acc, gate_logits, act);
    p.out = mutable_or_null<T>(out);
    cuda::KernelLaunch launch;
    MMFUSE_CUDA_CHECK(cuda::combine_launch_config(p, /*backward=*/false, max_blocks(first), &launch));
    MMFUSE_CUDA_CHECK(
        cuda::launch_combine(p, /*backward=*/false, launch, current_stream(first.get_device_index())));
  });
  return out;
}

std::tuple<std::vector<Tensor>, Tensor, std::vector<Tensor>> combine_modalities_bwd_cuda(
    const Tensor& grad_out_in, const std::vector<Tensor>& projected, const std::string& mode_name,
    const std::optional<Tensor>& weights, const std::vector<Tensor>& gate_logits, const std::string& activation) {
  const char* op = "combine_modalities_bwd";
  const cuda::CombineMode mode = parse_mode(mode_name);
  const cuda::Act act = act_code(activation);
  check_combine(projected, mode, weights, gate_logits, op);
  const Tensor& first = projected[0];
  const DeviceGuard guard(first.get_device_index());
  const Tensor grad_out = checked_contiguous(grad_out_in, first, first.sizes(), "grad_out", op);
  const int64_t num = static_cast<int64_t>(projected.size());
  std::vector<Tensor> grad_p, grad_z;
  for (int64_t m = 0; m < num; ++m) grad_p.push_back(torch::stable::empty_like(first));
  if (mode == cuda::CombineMode::kGated)
    for (int64_t m = 0; m < num; ++m) grad_z.push_back(torch::stable::empty_like(first));
  const bool sum = mode == cuda::CombineMode::kSum;
  Tensor grad_w64 = sum ? zeros_like_as(first, {num}, dtype::kDouble) : Tensor();
  const int64_t numel = first.numel();
  if (numel > 0) {
    const Tensor weights_acc = weights_in_acc_type(weights, mode, first);
    dispatch_storage(first.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      cuda::CombineParams<T> p = combine_params<T>(projected, mode, weights_acc, gate_logits, act);
      p.grad_out = data_or_null<T>(grad_out);
      for (int64_t m = 0; m < num; ++m) p.grad_projected[m] = mutable_or_null<T>(grad_p[m]);
      for (size_t m = 0; m < grad_z.size(); ++m) p.grad_gate_logits[m] = mutable_or_null<T>(grad_z[m]);
      cuda::KernelLaunch launch;
      MMFUSE_CUDA_CHECK(cuda::combine_launch_config(p, /*backward=*/true, max_blocks(first), &launch));
      const cudaStream_t stream = current_stream(first.get_device_index());
      // per-block partial sums of g * p_m, then summed in block order: deterministic
      const Tensor partials =
          sum ? empty_like_as(grad_w64, {static_cast<int64_t>(launch.grid.x) * num}) : Tensor();
      double* partials_ptr = sum ? ptr<double>(partials) : nullptr;
      p.weight_partials = partials_ptr;
      MMFUSE_CUDA_CHECK(cuda::launch_combine(p, /*backward=*/true, launch, stream));
      if (sum) {
        MMFUSE_CUDA_CHECK(
            cuda::launch_sum_partials<double>(partials_ptr, launch.grid.x, num, ptr<double>(grad_w64), stream));
      }
    });
  }
  Tensor grad_w = sum ? torch::stable::to(grad_w64, weights->scalar_type()) : empty_like_as(first, {0});
  return {grad_p, grad_w, grad_z};
}

// ---- fused_concat_linear ----------------------------------------------------------------------

void check_linear_inputs(const std::vector<Tensor>& xs, const Tensor& weight, const char* op) {
  MMFUSE_CHECK(!xs.empty(), op, ": needs at least one input");
  const int64_t rows = xs[0].size(0);
  int64_t width = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string name = "xs[" + std::to_string(i) + "]";
    check_cuda_like(xs[i], xs[0], name, op);
    MMFUSE_CHECK(xs[i].dim() == 2 && xs[i].is_contiguous() && xs[i].size(0) == rows, op, ": ", name,
                 " must be a contiguous (N=", rows, ", D_i) tensor, got ", shape(xs[i]));
    width += xs[i].size(1);
  }
  check_cuda_like(weight, xs[0], "weight", op);
  MMFUSE_CHECK(weight.dim() == 2 && weight.size(1) == width, op, ": weight must be (out, ", width, "), got ",
               shape(weight));
}

// x_i's column block of the weight: a strided view, no copy.
std::vector<Tensor> weight_blocks(const std::vector<Tensor>& xs, const Tensor& weight) {
  std::vector<Tensor> blocks;
  Tensor w = weight;
  int64_t col = 0;
  for (const auto& x : xs) {
    const int64_t width = x.size(1);
    blocks.push_back(torch::stable::narrow(w, 1, col, width));
    col += width;
  }
  return blocks;
}

Tensor transposed(const Tensor& t) { return torch::stable::transpose(t, 0, 1); }

// a @ b through the dispatcher; with out_dtype, aten::mm.dtype (cuBLAS writing out_dtype: fp32 for fp16/bf16 inputs)
Tensor mm(const Tensor& a, const Tensor& b) { return call_op("aten::mm", "", a, b); }
Tensor mm(const Tensor& a, const Tensor& b, ScalarType out_dtype) { return call_op("aten::mm", "dtype", a, b, out_dtype); }

int64_t max_row_blocks(const Tensor& like, int64_t cols) {
  const int64_t col_blocks = (cols + cuda::kColumnTile - 1) / cuda::kColumnTile;
  return std::max<int64_t>(1, max_blocks(like) / std::max<int64_t>(col_blocks, 1));
}

std::tuple<Tensor, Tensor> fused_concat_linear_cuda(const std::vector<Tensor>& xs, const Tensor& weight,
                                                    const std::optional<Tensor>& bias_in,
                                                    const std::string& activation) {
  const char* op = "fused_concat_linear";
  const cuda::Act act = act_code(activation);
  check_linear_inputs(xs, weight, op);
  const Tensor& first = xs[0];
  const DeviceGuard guard(first.get_device_index());
  const int64_t n = first.size(0), out_features = weight.size(0);
  const Tensor bias = bias_in ? checked_contiguous(*bias_in, first, {out_features}, "bias", op) : Tensor();
  const bool has_bias = bias_in.has_value();
  const ScalarType dtype = first.scalar_type();
  const ScalarType acc = acc_type(dtype);
  const std::vector<Tensor> blocks = weight_blocks(xs, weight);

  Tensor sum;  // (N, out) in the accumulation type, bias not yet added
  if (dtype == acc) {
    sum = mm(xs[0], transposed(blocks[0]));
    for (size_t i = 1; i < xs.size(); ++i) sum = op::add(sum, mm(xs[i], transposed(blocks[i])));
  } else {
    sum = mm(xs[0], transposed(blocks[0]), acc);
    for (size_t i = 1; i < xs.size(); ++i) sum = op::add(sum, mm(xs[i], transposed(blocks[i]), acc));
  }
  const bool none = act == cuda::Act::kNone;
  if (none && dtype == acc && !has_bias) return {sum, empty_like_as(first, {0})};

  // fp32/fp64: the epilogue adds the bias in place, and the accumulator is the pre-activation
  Tensor preact = none ? empty_like_as(first, {0}) : (dtype == acc ? sum : empty_like_as(sum, {n, out_features}, dtype));
  Tensor out = none && dtype == acc ? sum : empty_like_as(first, {n, out_features});
  if (n > 0 && out_features > 0) {
    dispatch_storage(dtype, op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const cuda::LinearEpilogueParams<T> p{data_or_null<typename cuda::Acc<T>::type>(sum),
                                            has_bias ? data_or_null<T>(bias) : nullptr, mutable_or_null<T>(preact),
                                            mutable_or_null<T>(out), n, out_features, act};
      cuda::KernelLaunch launch;
      MMFUSE_CUDA_CHECK(cuda::linear_launch_config(n, out_features, max_row_blocks(first, out_features), &launch));
      MMFUSE_CUDA_CHECK(cuda::launch_linear_epilogue(p, launch, current_stream(first.get_device_index())));
    });
  }
  return {out, preact};
}

std::tuple<std::vector<Tensor>, Tensor, Tensor> fused_concat_linear_bwd_cuda(
    const Tensor& grad_out_in, const std::vector<Tensor>& xs, const Tensor& weight, const Tensor& preact_in,
    const std::string& activation, bool has_bias) {
  const char* op = "fused_concat_linear_bwd";
  const cuda::Act act = act_code(activation);
  check_linear_inputs(xs, weight, op);
  const Tensor& first = xs[0];
  const DeviceGuard guard(first.get_device_index());
  const int64_t n = first.size(0), out_features = weight.size(0);
  const std::vector<int64_t> out_shape{n, out_features};
  const Tensor grad_out = checked_contiguous(grad_out_in, first, out_shape, "grad_out", op);
  const bool none = act == cuda::Act::kNone;
  const Tensor preact = none ? Tensor() : checked_contiguous(preact_in, first, out_shape, "preact", op);

  // g = grad_out * act'(preact) and the bias gradient's column sums of g, in one pass
  Tensor g = none ? grad_out : torch::stable::empty_like(grad_out);
  Tensor grad_bias = has_bias ? zeros_like_as(weight, {out_features}) : empty_like_as(weight, {0});
  if (n > 0 && out_features > 0 && (!none || has_bias)) {
    dispatch_storage(first.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = typename cuda::Acc<T>::type;
      cuda::KernelLaunch launch;
      MMFUSE_CUDA_CHECK(cuda::linear_launch_config(n, out_features, max_row_blocks(first, out_features), &launch));
      const Tensor partials =
          has_bias ? empty_like_as(first, {static_cast<int64_t>(launch.grid.y) * out_features},
                                   acc_type(first.scalar_type()))
                   : Tensor();
      const cuda::LinearGradParams<T> p{data_or_null<T>(grad_out), none ? nullptr : data_or_null<T>(preact),
                                        none ? nullptr : mutable_or_null<T>(g),
                                        has_bias ? mutable_or_null<A>(partials) : nullptr, n, out_features, act};
      const cudaStream_t stream = current_stream(first.get_device_index());
      MMFUSE_CUDA_CHECK(cuda::launch_linear_grad(p, launch, stream));
      if (has_bias) {
        MMFUSE_CUDA_CHECK(cuda::launch_sum_partials<T>(data_or_null<A>(partials), launch.grid.y, out_features,
                                                       mutable_or_null<T>(grad_bias), stream));
      }
    });
  }

  // grad_x_i = g @ W_i, and g^T @ x_i written into grad_weight's column block (a strided view).
  // fp16/bf16: the products come out in fp32 and are rounded once, as the CPU kernel rounds them
  // (a half-precision cuBLAS output may reduce split-K partial sums in half precision).
  const ScalarType dtype = first.scalar_type();
  const ScalarType acc = acc_type(dtype);
  Tensor grad_weight = empty_like_as(weight, weight.sizes());  // contiguous, as at::empty(weight.sizes())
  const std::vector<Tensor> blocks = weight_blocks(xs, weight), grad_blocks = weight_blocks(xs, grad_weight);
  const Tensor g_t = transposed(g);
  std::vector<Tensor> grad_xs;
  for (size_t i = 0; i < xs.size(); ++i) {
    Tensor grad_block = grad_blocks[i];
    if (dtype == acc) {
      grad_xs.push_back(mm(g, blocks[i]));
      (void)call_op("aten::mm", "out", g_t, xs[i], grad_block);  // mm_out(grad_block, g^T, x_i)
    } else {
      grad_xs.push_back(torch::stable::to(mm(g, blocks[i], acc), dtype));
      torch::stable::copy_(grad_block, mm(g_t, xs[i], acc));
    }
  }
  return {grad_xs, grad_weight, grad_bias};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("fused_concat_linear", MMFUSE_BOX(&fused_concat_linear_cuda));
  m.impl("fused_concat_linear_bwd", MMFUSE_BOX(&fused_concat_linear_bwd_cuda));
  m.impl("combine_modalities", MMFUSE_BOX(&combine_modalities_cuda));
  m.impl("combine_modalities_bwd", MMFUSE_BOX(&combine_modalities_bwd_cuda));
}

}  // namespace mmfuse
