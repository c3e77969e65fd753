// CUDA launchers for mmfuse::pack_modalities / unpack_modalities; the kernel body is
// pack_modalities_kernel.cuh (one launch moves every modality). Same contract as the CPU kernels
// in csrc/cpu/pack_modalities.cpp.
//
// The lengths live on the GPU, and a wrong one would make the kernel read or write out of
// bounds, so the launcher validates them on the device and reads back one small summary (the
// layout's size and whether it is consistent): one host sync per call, the price of never
// faulting on bad input. Pass out_len to skip nothing else: the summary also checks it.
#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda/pack_modalities_kernel.cuh"
#include "cuda/stable_cuda.h"

namespace mmfuse {
namespace {

using cuda::kMaxModalities;
using cuda::PackParams;

void check_cuda(const Tensor& t, const Tensor& like, const char* name, const char* op) {
  const Device device = t.device(), want = like.device();
  MMFUSE_CHECK(t.is_cuda() && device == want, op, ": ", name, " must be on ", device_str(want), ", got ",
               device_str(device));
}

// Validated on the device, read back in one sync: {needed rows, ok}. needed is the longest
// sequence (padded) or the total (packed); ok is 0 when a length is outside [0, L_m] or
// cu_seqlens disagrees with the per-sample sum of the lengths.
std::pair<int64_t, bool> layout_summary(const Tensor& lengths, const Tensor& cu_seqlens,
                                        const std::vector<int64_t>& sizes, bool padded) {
  const Tensor lens = to_dtype(lengths, dtype::kLong);
  Tensor limits_cpu = torch::stable::empty({static_cast<int64_t>(sizes.size())}, dtype::kLong, std::nullopt,
                                           Device(DeviceType::CPU));
  std::copy(sizes.begin(), sizes.end(), ptr<int64_t>(limits_cpu));
  const Tensor limits = torch::stable::unsqueeze(torch::stable::to(limits_cpu, lengths.device()), 1);
  const Tensor cu = to_dtype(cu_seqlens, dtype::kLong);
  const Tensor seqlens = op::diff(cu, 0);
  const Tensor ok = op::logical_and(
      op::logical_and(op::all(op::ge(lens, 0)), op::all(op::le(lens, limits))),
      op::logical_and(op::all(op::eq(seqlens, torch::stable::sum(lens, std::vector<int64_t>{0}))),
                      op::eq(torch::stable::select(cu, 0, 0), 0)));
  const Tensor needed = padded ? (seqlens.numel() > 0 ? op::max(seqlens) : zeros_like_as(lens, {}))
                               : torch::stable::select(cu, 0, -1);
  const Tensor summary = op::to_cpu(op::stack({needed, to_dtype(ok, dtype::kLong)}));
  const int64_t* got = summary.const_data_ptr<int64_t>();
  return {got[0], got[1] != 0};
}

void check_layout_tensors(const Tensor& lengths, const Tensor& cu_seqlens, int64_t num_modalities,
                          const Tensor& like, const char* op) {
  check_cuda(lengths, like, "lengths", op);
  check_cuda(cu_seqlens, like, "cu_seqlens", op);
  const int64_t batch = lengths.dim() == 2 ? lengths.size(1) : -1;
  MMFUSE_CHECK(lengths.dim() == 2 && lengths.size(0) == num_modalities && lengths.scalar_type() == dtype::kInt &&
                   lengths.is_contiguous(),
               op, ": lengths must be contiguous int32 of shape (M=", num_modalities, ", B), got ", shape(lengths), " ",
               lengths.scalar_type());
  MMFUSE_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) == batch + 1 && cu_seqlens.scalar_type() == dtype::kInt &&
                   cu_seqlens.is_contiguous(),
               op, ": cu_seqlens must be contiguous int32 of shape (B+1=", batch + 1, "), got ", shape(cu_seqlens), " ",
               cu_seqlens.scalar_type());
  MMFUSE_CHECK(num_modalities >= 1 && num_modalities <= kMaxModalities, op, ": the CUDA kernel takes 1 to ",
               kMaxModalities, " modalities, got ", num_modalities);
  MMFUSE_CHECK(batch <= std::numeric_limits<int>::max(), op, ": batch size too large: ", batch);
}

template <typename T>
PackParams<T> params(const std::vector<Tensor>& features, const Tensor& lengths, const Tensor& cu_seqlens,
                     const Tensor& tokens, int64_t padded_len) {
  PackParams<T> p{};
  for (size_t m = 0; m < features.size(); ++m) {
    p.features[m] = static_cast<T*>(features[m].data_ptr());
    p.feature_len[m] = features[m].size(1);
  }
  p.lengths = ptr<int32_t>(lengths);
  p.cu_seqlens = ptr<int32_t>(cu_seqlens);
  p.tokens = static_cast<T*>(tokens.data_ptr());
  const int64_t dim = tokens.size(-1);
  p.rows = tokens.numel() / std::max<int64_t>(dim, 1);
  p.padded_len = padded_len;
  p.dim = dim;
  p.num_modalities = static_cast<int>(features.size());
  p.batch = static_cast<int>(lengths.size(1));
  return p;
}

template <typename F>
void dispatch(ScalarType dtype, const char* op, F&& launch) {
  switch (dtype) {
    case ScalarType::Float: return launch(float{});
    case ScalarType::Double: return launch(double{});
    case ScalarType::Half: return launch(__half{});
    case ScalarType::BFloat16: return launch(__nv_bfloat16{});
    default: detail::fail(op, ": features must be float16, bfloat16, float32 or float64, got ", dtype);
  }
}

std::tuple<Tensor, Tensor> pack_modalities_cuda(const std::vector<Tensor>& features, const Tensor& lengths,
                                                const Tensor& cu_seqlens, const std::optional<Tensor>& type_embedding,
                                                bool padded, std::optional<int64_t> out_len) {
  constexpr const char* op = "pack_modalities";
  MMFUSE_CHECK(!features.empty(), op, ": features must hold at least one tensor");
  const Tensor& first = features[0];
  MMFUSE_CHECK(first.is_cuda(), op, ": features[0] must be a CUDA tensor, got ", device_str(first.device()));
  MMFUSE_CHECK(first.dim() == 3, op, ": features[0] must be (B, L, D), got ", shape(first));
  const int64_t num_modalities = static_cast<int64_t>(features.size());
  const std::vector<int64_t> first_sizes = sizes_of(first);
  const int64_t dim = first_sizes[2];
  const ScalarType type = first.scalar_type();
  std::vector<int64_t> sizes;
  for (int64_t m = 0; m < num_modalities; ++m) {
    const Tensor& f = features[m];
    check_cuda(f, first, "features[m]", op);
    MMFUSE_CHECK(f.dim() == 3 && f.size(0) == first_sizes[0] && f.size(2) == dim && f.is_contiguous() &&
                     f.scalar_type() == type,
                 op, ": features[", m, "] must be a contiguous (B, L, D) tensor like features[0], got ", shape(f), " ",
                 f.scalar_type());
    sizes.push_back(f.size(1));
  }
  check_layout_tensors(lengths, cu_seqlens, num_modalities, first, op);
  const int64_t batch = lengths.size(1);
  MMFUSE_CHECK(batch == first_sizes[0], op, ": lengths must have B=", first_sizes[0], " columns, got ", batch);
  if (type_embedding) {
    check_cuda(*type_embedding, first, "type_embedding", op);
    MMFUSE_CHECK(type_embedding->dim() == 2 && type_embedding->size(0) == num_modalities &&
                     type_embedding->size(1) == dim && type_embedding->is_contiguous() &&
                     type_embedding->scalar_type() == type,
                 op, ": type_embedding must be contiguous (M, D) in the features' dtype, got ", shape(*type_embedding));
  }
  const DeviceGuard guard(first.get_device_index());
  const auto [needed, ok] = layout_summary(lengths, cu_seqlens, sizes, padded);
  MMFUSE_CHECK(ok, op, ": lengths must lie in [0, L_m] per modality and sum per sample to cu_seqlens' steps");
  const int64_t rows_per = out_len.value_or(needed);
  MMFUSE_CHECK(padded ? rows_per >= needed : rows_per == needed, op, ": out_len (pack_modalities' max_seqlen when padded, its total when packed) must be ",
               padded ? "at least the longest packed sequence, " : "the total token count, ", needed, ", got ",
               rows_per);

  // padded rows are written by the kernel (zeros, id -1), so no fill is needed
  Tensor tokens = padded ? empty_like_as(first, {batch, rows_per, dim}) : empty_like_as(first, {rows_per, dim});
  Tensor ids = padded ? empty_like_as(first, {batch, rows_per}, dtype::kLong) : empty_like_as(first, {rows_per}, dtype::kLong);
  if (tokens.numel() == 0 && ids.numel() == 0) return {tokens, ids};
  if (dim == 0) {  // no features to move; the ids still say which modality each row is
    torch::stable::fill_(ids, -1.0);
  }
  const cudaStream_t stream = current_stream(first.get_device_index());
  dispatch(type, op, [&](auto tag) {
    using T = decltype(tag);
    PackParams<T> p = params<T>(features, lengths, cu_seqlens, tokens, padded ? rows_per : 0);
    p.rows = padded ? batch * rows_per : rows_per;
    p.type_embedding = type_embedding ? static_cast<const T*>(type_embedding->data_ptr()) : nullptr;
    p.modality_ids = ptr<int64_t>(ids);
    MMFUSE_CUDA_CHECK((cuda::launch_move_rows<T, true>(p, stream)));
  });
  return {tokens, ids};
}

std::vector<Tensor> unpack_modalities_cuda(const Tensor& tokens, const Tensor& lengths, const Tensor& cu_seqlens,
                                           std::vector<int64_t> sizes) {
  constexpr const char* op = "unpack_modalities";
  MMFUSE_CHECK(tokens.is_cuda(), op, ": tokens must be a CUDA tensor, got ", device_str(tokens.device()));
  const int64_t ndim = tokens.dim();
  MMFUSE_CHECK(ndim == 2 || ndim == 3, op, ": tokens must be (total, D) or (B, L, D), got ", shape(tokens));
  MMFUSE_CHECK(tokens.is_contiguous(), op, ": tokens must be contiguous");
  const int64_t num_modalities = static_cast<int64_t>(sizes.size());
  check_layout_tensors(lengths, cu_seqlens, num_modalities, tokens, op);
  const bool padded = ndim == 3;
  const int64_t batch = lengths.size(1);
  const std::vector<int64_t> token_sizes = sizes_of(tokens);
  const int64_t dim = token_sizes.back();
  const DeviceGuard guard(tokens.get_device_index());
  const auto [needed, ok] = layout_summary(lengths, cu_seqlens, sizes, padded);
  MMFUSE_CHECK(ok, op, ": lengths must lie in [0, sizes[m]] per modality and sum per sample to cu_seqlens' steps");
  if (padded) {
    MMFUSE_CHECK(token_sizes[0] == batch && token_sizes[1] >= needed, op,
                 ": padded tokens must be (B, L >= longest sequence ", needed, ", D), got ", shape_str(token_sizes));
  } else {
    MMFUSE_CHECK(token_sizes[0] == needed, op, ": tokens must have cu_seqlens[-1] = ", needed, " rows, got ",
                 token_sizes[0]);
  }
  std::vector<Tensor> outs;
  for (int64_t m = 0; m < num_modalities; ++m) outs.push_back(zeros_like_as(tokens, {batch, sizes[m], dim}));
  if (tokens.numel() == 0) return outs;
  const cudaStream_t stream = current_stream(tokens.get_device_index());
  dispatch(tokens.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    PackParams<T> p = params<T>(outs, lengths, cu_seqlens, tokens, padded ? token_sizes[1] : 0);
    MMFUSE_CUDA_CHECK((cuda::launch_move_rows<T, false>(p, stream)));
  });
  return outs;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CUDA, m) {
  m.impl("pack_modalities", MMFUSE_BOX(&pack_modalities_cuda));
  m.impl("unpack_modalities", MMFUSE_BOX(&unpack_modalities_cuda));
}

}  // namespace mmfuse
