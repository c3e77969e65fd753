// CUDA launchers for mmfuse::pack_modalities / unpack_modalities; the kernel body is
// pack_modalities_kernel.cuh (one launch moves every modality). Same contract as the CPU kernels
// in csrc/cpu/pack_modalities.cpp.
//
// The lengths live on the GPU, and a wrong one would make the kernel read or write out of
// bounds, so the launcher validates them on the device and reads back one small summary (the
// layout's size and whether it is consistent): one host sync per call, the price of never
// faulting on bad input. Pass out_len to skip nothing else: the summary also checks it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/pack_modalities_kernel.cuh"

namespace mmfuse {
namespace {

using cuda::kMaxModalities;
using cuda::PackParams;

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ",
              t.device());
}

// Validated on the device, read back in one sync: {needed rows, ok}. needed is the longest
// sequence (padded) or the total (packed); ok is 0 when a length is outside [0, L_m] or
// cu_seqlens disagrees with the per-sample sum of the lengths.
std::pair<int64_t, bool> layout_summary(const at::Tensor& lengths, const at::Tensor& cu_seqlens,
                                        at::IntArrayRef sizes, bool padded) {
  const auto opts = lengths.options().dtype(at::kLong);
  const at::Tensor lens = lengths.to(at::kLong);
  const at::Tensor limits = at::tensor(std::vector<int64_t>(sizes.begin(), sizes.end()), opts.device(at::kCPU))
                                .to(lengths.device(), /*non_blocking=*/true)
                                .unsqueeze(1);
  const at::Tensor cu = cu_seqlens.to(at::kLong);
  const at::Tensor seqlens = cu.slice(0, 1) - cu.slice(0, 0, -1);
  const at::Tensor ok = lens.ge(0).all() & lens.le(limits).all() & seqlens.eq(lens.sum(0)).all() & cu[0].eq(0);
  const at::Tensor needed = padded ? (seqlens.numel() > 0 ? seqlens.max() : at::zeros({}, opts)) : cu[-1];
  const at::Tensor summary = at::stack({needed, ok.to(at::kLong)}).cpu();
  return {summary[0].item<int64_t>(), summary[1].item<int64_t>() != 0};
}

void check_layout_tensors(const at::Tensor& lengths, const at::Tensor& cu_seqlens, int64_t num_modalities,
                          const at::Tensor& like, const char* op) {
  check_cuda(lengths, like, "lengths", op);
  check_cuda(cu_seqlens, like, "cu_seqlens", op);
  TORCH_CHECK(lengths.dim() == 2 && lengths.size(0) == num_modalities && lengths.scalar_type() == at::kInt &&
                  lengths.is_contiguous(),
              op, ": lengths must be contiguous int32 of shape (M=", num_modalities, ", B), got ", lengths.sizes(), " ",
              lengths.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) == lengths.size(1) + 1 &&
                  cu_seqlens.scalar_type() == at::kInt && cu_seqlens.is_contiguous(),
              op, ": cu_seqlens must be contiguous int32 of shape (B+1=", lengths.size(1) + 1, "), got ",
              cu_seqlens.sizes(), " ", cu_seqlens.scalar_type());
  TORCH_CHECK(num_modalities >= 1 && num_modalities <= kMaxModalities, op, ": the CUDA kernel takes 1 to ",
              kMaxModalities, " modalities, got ", num_modalities);
  TORCH_CHECK(lengths.size(1) <= std::numeric_limits<int>::max(), op, ": batch size too large: ", lengths.size(1));
}

template <typename T>
PackParams<T> params(const std::vector<at::Tensor>& features, const at::Tensor& lengths, const at::Tensor& cu_seqlens,
                     const at::Tensor& tokens, int64_t padded_len) {
  PackParams<T> p{};
  for (size_t m = 0; m < features.size(); ++m) {
    p.features[m] = static_cast<T*>(features[m].data_ptr());
    p.feature_len[m] = features[m].size(1);
  }
  p.lengths = lengths.data_ptr<int32_t>();
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.tokens = static_cast<T*>(tokens.data_ptr());
  p.rows = tokens.numel() / std::max<int64_t>(tokens.size(-1), 1);
  p.padded_len = padded_len;
  p.dim = tokens.size(-1);
  p.num_modalities = static_cast<int>(features.size());
  p.batch = static_cast<int>(lengths.size(1));
  return p;
}

template <typename F>
void dispatch(at::ScalarType dtype, const char* op, F&& launch) {
  switch (dtype) {
    case at::kFloat: return launch(float{});
    case at::kDouble: return launch(double{});
    case at::kHalf: return launch(__half{});
    case at::kBFloat16: return launch(__nv_bfloat16{});
    default: TORCH_CHECK(false, op, ": features must be float16, bfloat16, float32 or float64, got ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> pack_modalities_cuda(const std::vector<at::Tensor>& features,
                                                        const at::Tensor& lengths, const at::Tensor& cu_seqlens,
                                                        const std::optional<at::Tensor>& type_embedding, bool padded,
                                                        std::optional<int64_t> out_len) {
  constexpr const char* op = "pack_modalities";
  TORCH_CHECK(!features.empty(), op, ": features must hold at least one tensor");
  const at::Tensor& first = features[0];
  TORCH_CHECK(first.is_cuda(), op, ": features[0] must be a CUDA tensor, got ", first.device());
  TORCH_CHECK(first.dim() == 3, op, ": features[0] must be (B, L, D), got ", first.sizes());
  const int64_t num_modalities = static_cast<int64_t>(features.size());
  const int64_t dim = first.size(2);
  std::vector<int64_t> sizes;
  for (int64_t m = 0; m < num_modalities; ++m) {
    const at::Tensor& f = features[m];
    check_cuda(f, first, "features[m]", op);
    TORCH_CHECK(f.dim() == 3 && f.size(0) == first.size(0) && f.size(2) == dim && f.is_contiguous() &&
                    f.scalar_type() == first.scalar_type(),
                op, ": features[", m, "] must be a contiguous (B, L, D) tensor like features[0], got ", f.sizes(), " ",
                f.scalar_type());
    sizes.push_back(f.size(1));
  }
  check_layout_tensors(lengths, cu_seqlens, num_modalities, first, op);
  TORCH_CHECK(lengths.size(1) == first.size(0), op, ": lengths must have B=", first.size(0), " columns, got ",
              lengths.size(1));
  if (type_embedding) {
    check_cuda(*type_embedding, first, "type_embedding", op);
    TORCH_CHECK(type_embedding->dim() == 2 && type_embedding->size(0) == num_modalities &&
                    type_embedding->size(1) == dim && type_embedding->is_contiguous() &&
                    type_embedding->scalar_type() == first.scalar_type(),
                op, ": type_embedding must be contiguous (M, D) in the features' dtype, got ", type_embedding->sizes());
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const auto [needed, ok] = layout_summary(lengths, cu_seqlens, sizes, padded);
  TORCH_CHECK(ok, op, ": lengths must lie in [0, L_m] per modality and sum per sample to cu_seqlens' steps");
  const int64_t rows_per = out_len.value_or(needed);
  TORCH_CHECK(padded ? rows_per >= needed : rows_per == needed, op, ": out_len (pack_modalities' max_seqlen when padded, its total when packed) must be ",
              padded ? "at least the longest packed sequence, " : "the total token count, ", needed, ", got ",
              rows_per);

  const int64_t batch = lengths.size(1);
  // padded rows are written by the kernel (zeros, id -1), so no fill is needed
  at::Tensor tokens = padded ? at::empty({batch, rows_per, dim}, first.options()) : at::empty({rows_per, dim}, first.options());
  at::Tensor ids = padded ? at::empty({batch, rows_per}, first.options().dtype(at::kLong))
                          : at::empty({rows_per}, first.options().dtype(at::kLong));
  if (tokens.numel() == 0 && ids.numel() == 0) return {tokens, ids};
  if (dim == 0) {  // no features to move; the ids still say which modality each row is
    ids.fill_(-1);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(first.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    PackParams<T> p = params<T>(features, lengths, cu_seqlens, tokens, padded ? rows_per : 0);
    p.rows = padded ? batch * rows_per : rows_per;
    p.type_embedding = type_embedding ? static_cast<const T*>(type_embedding->data_ptr()) : nullptr;
    p.modality_ids = ids.data_ptr<int64_t>();
    C10_CUDA_CHECK((cuda::launch_move_rows<T, true>(p, stream)));
  });
  return {tokens, ids};
}

std::vector<at::Tensor> unpack_modalities_cuda(const at::Tensor& tokens, const at::Tensor& lengths,
                                               const at::Tensor& cu_seqlens, at::IntArrayRef sizes) {
  constexpr const char* op = "unpack_modalities";
  TORCH_CHECK(tokens.is_cuda(), op, ": tokens must be a CUDA tensor, got ", tokens.device());
  TORCH_CHECK(tokens.dim() == 2 || tokens.dim() == 3, op, ": tokens must be (total, D) or (B, L, D), got ",
              tokens.sizes());
  TORCH_CHECK(tokens.is_contiguous(), op, ": tokens must be contiguous");
  const int64_t num_modalities = static_cast<int64_t>(sizes.size());
  check_layout_tensors(lengths, cu_seqlens, num_modalities, tokens, op);
  const bool padded = tokens.dim() == 3;
  const int64_t batch = lengths.size(1);
  const int64_t dim = tokens.size(-1);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const auto [needed, ok] = layout_summary(lengths, cu_seqlens, sizes, padded);
  TORCH_CHECK(ok, op, ": lengths must lie in [0, sizes[m]] per modality and sum per sample to cu_seqlens' steps");
  if (padded) {
    TORCH_CHECK(tokens.size(0) == batch && tokens.size(1) >= needed, op,
                ": padded tokens must be (B, L >= longest sequence ", needed, ", D), got ", tokens.sizes());
  } else {
    TORCH_CHECK(tokens.size(0) == needed, op, ": tokens must have cu_seqlens[-1] = ", needed, " rows, got ",
                tokens.size(0));
  }
  std::vector<at::Tensor> outs;
  for (int64_t m = 0; m < num_modalities; ++m) outs.push_back(at::zeros({batch, sizes[m], dim}, tokens.options()));
  if (tokens.numel() == 0) return outs;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(tokens.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    PackParams<T> p = params<T>(outs, lengths, cu_seqlens, tokens, padded ? tokens.size(1) : 0);
    C10_CUDA_CHECK((cuda::launch_move_rows<T, false>(p, stream)));
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("pack_modalities", &pack_modalities_cuda);
  m.impl("unpack_modalities", &unpack_modalities_cuda);
}

}  // namespace mmfuse
