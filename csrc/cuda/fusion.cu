// CUDA launchers for mmfuse::combine_modalities / fused_concat_linear (forward and backward);
// the kernel bodies are fusion_kernel.cuh. Same contract as the CPU kernels in
// csrc/cpu/fusion.cpp: same outputs, dtypes and edge cases.
//
// fused_concat_linear runs its GEMMs in cuBLAS through ATen, one per input block, on
// W_i = weight.narrow(1, offset_i, D_i) (a strided view: cuBLAS takes the leading dimension, no
// copy) and never builds the concatenation. Accumulation is fp32 for fp16/bf16 inputs, rounded
// once, as the CPU kernel does: at::mm(x_i, W_i^T, out_dtype=fp32) (cuBLAS with fp32 output,
// torch >= 2.8) per block, added into one fp32 buffer. (addmm_ in half would round the running
// sum to half after every block; addmm's out_dtype overload takes an fp32 `self` only in newer
// torch, so the blocks after the first cost one fp32 add each.) fp32/fp64 inputs accumulate
// in place with addmm_. The epilogue kernel then adds the bias and applies the activation,
// writing out and the saved pre-activation in one pass.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <type_traits>
#include <vector>

#include "../cpu/activation.h"
#include "fusion_kernel.cuh"

namespace mmfuse {
namespace {

using cuda::kMaxModalities;

static_assert(static_cast<int>(Activation::kNone) == static_cast<int>(cuda::Act::kNone) &&
                  static_cast<int>(Activation::kRelu) == static_cast<int>(cuda::Act::kRelu) &&
                  static_cast<int>(Activation::kGelu) == static_cast<int>(cuda::Act::kGelu) &&
                  static_cast<int>(Activation::kSilu) == static_cast<int>(cuda::Act::kSilu) &&
                  static_cast<int>(Activation::kTanh) == static_cast<int>(cuda::Act::kTanh) &&
                  static_cast<int>(Activation::kSigmoid) == static_cast<int>(cuda::Act::kSigmoid),
              "cuda::Act must list the activations in mmfuse::Activation's order");

constexpr int64_t kBlocksPerSm = 8;  // grid-stride kernels: enough resident blocks to hide latency

cuda::Act act_code(c10::string_view name) { return static_cast<cuda::Act>(parse_activation(name)); }

cuda::CombineMode parse_mode(c10::string_view mode) {
  if (mode == "sum") return cuda::CombineMode::kSum;
  if (mode == "product") return cuda::CombineMode::kProduct;
  if (mode == "gated") return cuda::CombineMode::kGated;
  TORCH_CHECK(false, "combine_modalities: mode must be sum, product or gated, got ", std::string(mode));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

int64_t max_blocks(const at::Tensor& like) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, like.get_device()));
  return std::max<int64_t>(1, sms * kBlocksPerSm);
}

// f(T*) with T the CUDA storage type of `dtype` (a null pointer, only its type matters).
template <typename F>
void dispatch_storage(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kDouble: return f(static_cast<double*>(nullptr));
    case at::kHalf: return f(static_cast<__half*>(nullptr));
    case at::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: TORCH_CHECK(false, op, ": the CUDA kernel takes float16, bfloat16, float32 and float64, got ", dtype);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

void check_cuda_like(const at::Tensor& t, const at::Tensor& like, const std::string& name, const char* op) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(), ", got ",
              t.scalar_type());
}

// t checked against `like` (device, dtype) and `shape`, made contiguous (no copy when it is).
at::Tensor checked_contiguous(const at::Tensor& t, const at::Tensor& like, at::IntArrayRef shape,
                              const std::string& name, const char* op) {
  check_cuda_like(t, like, name, op);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  return t.contiguous();
}

// ---- combine_modalities -----------------------------------------------------------------------

void check_combine(const std::vector<at::Tensor>& projected, cuda::CombineMode mode,
                   const std::optional<at::Tensor>& weights, const std::vector<at::Tensor>& gate_logits,
                   const char* op) {
  const int64_t num = static_cast<int64_t>(projected.size());
  TORCH_CHECK(num >= 1 && num <= kMaxModalities, op, ": the CUDA kernel takes 1 to ", kMaxModalities,
              " projected tensors, got ", num);
  for (int64_t m = 0; m < num; ++m) {
    const std::string name = "projected[" + std::to_string(m) + "]";
    check_cuda_like(projected[m], projected[0], name, op);
    TORCH_CHECK(projected[m].is_contiguous() && projected[m].sizes() == projected[0].sizes(), op, ": ", name,
                " must be contiguous with shape ", projected[0].sizes(), ", got ", projected[m].sizes());
  }
  if (mode == cuda::CombineMode::kSum) {
    TORCH_CHECK(weights && weights->numel() == num, op, ": mode sum needs weights of shape (", num, ",)");
    TORCH_CHECK(weights->device() == projected[0].device(), op, ": weights must be on ", projected[0].device());
  }
  if (mode == cuda::CombineMode::kGated) {
    TORCH_CHECK(static_cast<int64_t>(gate_logits.size()) == num, op, ": mode gated needs ", num, " gate_logits, got ",
                gate_logits.size());
    for (int64_t m = 0; m < num; ++m) {
      const std::string name = "gate_logits[" + std::to_string(m) + "]";
      check_cuda_like(gate_logits[m], projected[0], name, op);
      TORCH_CHECK(gate_logits[m].is_contiguous() && gate_logits[m].sizes() == projected[0].sizes(), op, ": ", name,
                  " must be contiguous with shape ", projected[0].sizes(), ", got ", gate_logits[m].sizes());
    }
  }
}

template <typename T>
cuda::CombineParams<T> combine_params(const std::vector<at::Tensor>& projected, cuda::CombineMode mode,
                                      const at::Tensor& weights_acc, const std::vector<at::Tensor>& gate_logits,
                                      cuda::Act act) {
  cuda::CombineParams<T> p{};
  for (size_t m = 0; m < projected.size(); ++m) p.projected[m] = ptr<T>(projected[m]);
  for (size_t m = 0; m < gate_logits.size(); ++m) p.gate_logits[m] = ptr<T>(gate_logits[m]);
  p.weights = ptr<typename cuda::Acc<T>::type>(weights_acc);
  p.numel = projected[0].numel();
  p.num_modalities = static_cast<int>(projected.size());
  p.mode = mode;
  p.act = act;
  return p;
}

// The "sum" weights in the accumulation type, on the device (no host sync), as the CPU kernel
// reads them; undefined for the other modes.
at::Tensor weights_in_acc_type(const std::optional<at::Tensor>& weights, cuda::CombineMode mode,
                               const at::Tensor& like) {
  if (mode != cuda::CombineMode::kSum) return at::Tensor();
  return weights->to(acc_type(like.scalar_type())).contiguous();
}

at::Tensor combine_modalities_cuda(const std::vector<at::Tensor>& projected, c10::string_view mode_name,
                                   const std::optional<at::Tensor>& weights, const std::vector<at::Tensor>& gate_logits,
                                   c10::string_view activation) {
  const char* op = "combine_modalities";
  const cuda::CombineMode mode = parse_mode(mode_name);
  const cuda::Act act = act_code(activation);
  check_combine(projected, mode, weights, gate_logits, op);
  const at::Tensor& first = projected[0];
  const c10::cuda::CUDAGuard guard(first.device());
  at::Tensor out = at::empty_like(first);
  if (first.numel() == 0) return out;
  const at::Tensor weights_acc = weights_in_acc_type(weights, mode, first);
  dispatch_storage(first.scalar_type(), op, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cuda::CombineParams<T> p = combine_params<T>(projected, mode, weights_acc, gate_logits, act);
    p.out = mutable_ptr<T>(out);
    cuda::KernelLaunch launch;
    C10_CUDA_CHECK(cuda::combine_launch_config(p, /*backward=*/false, max_blocks(first), &launch));
    C10_CUDA_CHECK(cuda::launch_combine(p, /*backward=*/false, launch, c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>> combine_modalities_bwd_cuda(
    const at::Tensor& grad_out_in, const std::vector<at::Tensor>& projected, c10::string_view mode_name,
    const std::optional<at::Tensor>& weights, const std::vector<at::Tensor>& gate_logits,
    c10::string_view activation) {
  const char* op = "combine_modalities_bwd";
  const cuda::CombineMode mode = parse_mode(mode_name);
  const cuda::Act act = act_code(activation);
  check_combine(projected, mode, weights, gate_logits, op);
  const at::Tensor& first = projected[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor grad_out = checked_contiguous(grad_out_in, first, first.sizes(), "grad_out", op);
  const int64_t num = static_cast<int64_t>(projected.size());
  std::vector<at::Tensor> grad_p, grad_z;
  for (int64_t m = 0; m < num; ++m) grad_p.push_back(at::empty_like(first));
  if (mode == cuda::CombineMode::kGated)
    for (int64_t m = 0; m < num; ++m) grad_z.push_back(at::empty_like(first));
  const bool sum = mode == cuda::CombineMode::kSum;
  at::Tensor grad_w64 = sum ? at::zeros({num}, first.options().dtype(at::kDouble)) : at::Tensor();
  if (first.numel() > 0) {
    const at::Tensor weights_acc = weights_in_acc_type(weights, mode, first);
    dispatch_storage(first.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      cuda::CombineParams<T> p = combine_params<T>(projected, mode, weights_acc, gate_logits, act);
      p.grad_out = ptr<T>(grad_out);
      for (int64_t m = 0; m < num; ++m) p.grad_projected[m] = mutable_ptr<T>(grad_p[m]);
      for (size_t m = 0; m < grad_z.size(); ++m) p.grad_gate_logits[m] = mutable_ptr<T>(grad_z[m]);
      cuda::KernelLaunch launch;
      C10_CUDA_CHECK(cuda::combine_launch_config(p, /*backward=*/true, max_blocks(first), &launch));
      const auto stream = c10::cuda::getCurrentCUDAStream();
      // per-block partial sums of g * p_m, then summed in block order: deterministic
      const at::Tensor partials =
          sum ? at::empty({static_cast<int64_t>(launch.grid.x) * num}, grad_w64.options()) : at::Tensor();
      p.weight_partials = sum ? partials.data_ptr<double>() : nullptr;
      C10_CUDA_CHECK(cuda::launch_combine(p, /*backward=*/true, launch, stream));
      if (sum) {
        C10_CUDA_CHECK(cuda::launch_sum_partials<double>(partials.data_ptr<double>(), launch.grid.x, num,
                                                         grad_w64.data_ptr<double>(), stream));
      }
    });
  }
  at::Tensor grad_w = sum ? grad_w64.to(weights->scalar_type()) : at::empty({0}, first.options());
  return {grad_p, grad_w, grad_z};
}

// ---- fused_concat_linear ----------------------------------------------------------------------

void check_linear_inputs(const std::vector<at::Tensor>& xs, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": needs at least one input");
  int64_t width = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string name = "xs[" + std::to_string(i) + "]";
    check_cuda_like(xs[i], xs[0], name, op);
    TORCH_CHECK(xs[i].dim() == 2 && xs[i].is_contiguous() && xs[i].size(0) == xs[0].size(0), op, ": ", name,
                " must be a contiguous (N=", xs[0].size(0), ", D_i) tensor, got ", xs[i].sizes());
    width += xs[i].size(1);
  }
  check_cuda_like(weight, xs[0], "weight", op);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == width, op, ": weight must be (out, ", width, "), got ",
              weight.sizes());
}

// x_i's column block of the weight: a strided view, no copy.
std::vector<at::Tensor> weight_blocks(const std::vector<at::Tensor>& xs, const at::Tensor& weight) {
  std::vector<at::Tensor> blocks;
  int64_t col = 0;
  for (const auto& x : xs) {
    blocks.push_back(weight.narrow(1, col, x.size(1)));
    col += x.size(1);
  }
  return blocks;
}

int64_t max_row_blocks(const at::Tensor& like, int64_t cols) {
  const int64_t col_blocks = (cols + cuda::kColumnTile - 1) / cuda::kColumnTile;
  return std::max<int64_t>(1, max_blocks(like) / std::max<int64_t>(col_blocks, 1));
}

std::tuple<at::Tensor, at::Tensor> fused_concat_linear_cuda(const std::vector<at::Tensor>& xs,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias_in,
                                                            c10::string_view activation) {
  const char* op = "fused_concat_linear";
  const cuda::Act act = act_code(activation);
  check_linear_inputs(xs, weight, op);
  const at::Tensor& first = xs[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const int64_t n = first.size(0), out_features = weight.size(0);
  const at::Tensor bias = bias_in ? checked_contiguous(*bias_in, first, {out_features}, "bias", op) : at::Tensor();
  const auto dtype = first.scalar_type();
  const auto acc = acc_type(dtype);
  const std::vector<at::Tensor> blocks = weight_blocks(xs, weight);

  at::Tensor sum;  // (N, out) in the accumulation type, bias not yet added
  if (dtype == acc) {
    sum = at::mm(xs[0], blocks[0].t());
    for (size_t i = 1; i < xs.size(); ++i) sum.addmm_(xs[i], blocks[i].t());
  } else {
    sum = at::mm(xs[0], blocks[0].t(), acc);
    for (size_t i = 1; i < xs.size(); ++i) sum.add_(at::mm(xs[i], blocks[i].t(), acc));
  }
  const bool none = act == cuda::Act::kNone;
  if (none && dtype == acc && !bias.defined()) return {sum, at::empty({0}, first.options())};

  // fp32/fp64: the epilogue adds the bias in place, and the accumulator is the pre-activation
  at::Tensor preact = none ? at::empty({0}, first.options()) : (dtype == acc ? sum : at::empty_like(sum, dtype));
  at::Tensor out = none && dtype == acc ? sum : at::empty({n, out_features}, first.options());
  if (n > 0 && out_features > 0) {
    dispatch_storage(dtype, op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      const cuda::LinearEpilogueParams<T> p{ptr<typename cuda::Acc<T>::type>(sum), ptr<T>(bias),
                                            mutable_ptr<T>(preact), mutable_ptr<T>(out), n, out_features, act};
      cuda::KernelLaunch launch;
      C10_CUDA_CHECK(cuda::linear_launch_config(n, out_features, max_row_blocks(first, out_features), &launch));
      C10_CUDA_CHECK(cuda::launch_linear_epilogue(p, launch, c10::cuda::getCurrentCUDAStream()));
    });
  }
  return {out, preact};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fused_concat_linear_bwd_cuda(
    const at::Tensor& grad_out_in, const std::vector<at::Tensor>& xs, const at::Tensor& weight,
    const at::Tensor& preact_in, c10::string_view activation, bool has_bias) {
  const char* op = "fused_concat_linear_bwd";
  const cuda::Act act = act_code(activation);
  check_linear_inputs(xs, weight, op);
  const at::Tensor& first = xs[0];
  const c10::cuda::CUDAGuard guard(first.device());
  const int64_t n = first.size(0), out_features = weight.size(0);
  const std::vector<int64_t> shape{n, out_features};
  const at::Tensor grad_out = checked_contiguous(grad_out_in, first, shape, "grad_out", op);
  const bool none = act == cuda::Act::kNone;
  const at::Tensor preact = none ? at::Tensor() : checked_contiguous(preact_in, first, shape, "preact", op);

  // g = grad_out * act'(preact) and the bias gradient's column sums of g, in one pass
  at::Tensor g = none ? grad_out : at::empty_like(grad_out);
  at::Tensor grad_bias = has_bias ? at::zeros({out_features}, weight.options()) : at::empty({0}, weight.options());
  if (n > 0 && out_features > 0 && (!none || has_bias)) {
    dispatch_storage(first.scalar_type(), op, [&](auto* tag) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using A = typename cuda::Acc<T>::type;
      cuda::KernelLaunch launch;
      C10_CUDA_CHECK(cuda::linear_launch_config(n, out_features, max_row_blocks(first, out_features), &launch));
      const at::Tensor partials =
          has_bias ? at::empty({static_cast<int64_t>(launch.grid.y) * out_features},
                               first.options().dtype(acc_type(first.scalar_type())))
                   : at::Tensor();
      const cuda::LinearGradParams<T> p{ptr<T>(grad_out), ptr<T>(preact), none ? nullptr : mutable_ptr<T>(g),
                                        mutable_ptr<A>(partials), n, out_features, act};
      const auto stream = c10::cuda::getCurrentCUDAStream();
      C10_CUDA_CHECK(cuda::launch_linear_grad(p, launch, stream));
      if (has_bias) {
        C10_CUDA_CHECK(cuda::launch_sum_partials<T>(ptr<A>(partials), launch.grid.y, out_features,
                                                    mutable_ptr<T>(grad_bias), stream));
      }
    });
  }

  // grad_x_i = g @ W_i, and g^T @ x_i written into grad_weight's column block (a strided view).
  // fp16/bf16: the products come out in fp32 and are rounded once, as the CPU kernel rounds them
  // (a half-precision cuBLAS output may reduce split-K partial sums in half precision).
  const auto dtype = first.scalar_type();
  const auto acc = acc_type(dtype);
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  const std::vector<at::Tensor> blocks = weight_blocks(xs, weight), grad_blocks = weight_blocks(xs, grad_weight);
  std::vector<at::Tensor> grad_xs;
  for (size_t i = 0; i < xs.size(); ++i) {
    at::Tensor grad_block = grad_blocks[i];
    if (dtype == acc) {
      grad_xs.push_back(at::mm(g, blocks[i]));
      at::mm_out(grad_block, g.t(), xs[i]);
    } else {
      grad_xs.push_back(at::mm(g, blocks[i], acc).to(dtype));
      grad_block.copy_(at::mm(g.t(), xs[i], acc));
    }
  }
  return {grad_xs, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("fused_concat_linear", &fused_concat_linear_cuda);
  m.impl("fused_concat_linear_bwd", &fused_concat_linear_bwd_cuda);
  m.impl("combine_modalities", &combine_modalities_cuda);
  m.impl("combine_modalities_bwd", &combine_modalities_bwd_cuda);
}

}  // namespace mmfuse
