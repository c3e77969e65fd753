// CPU kernels for mmfuse::pack_modalities / unpack_modalities: one row copy per valid token,
// parallel over samples. Bit-identical to the per-sample torch.cat it replaces.
#include "../stable.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace mmfuse {
namespace {

struct Layout {
  int64_t num_modalities, batch, dim;
  const int32_t* lengths;     // (M, B)
  const int32_t* cu_seqlens;  // (B + 1)
  int32_t length(int64_t m, int64_t b) const { return lengths[m * batch + b]; }
  int64_t seqlen(int64_t b) const { return int64_t(cu_seqlens[b + 1]) - cu_seqlens[b]; }  // no int32 overflow
};

Layout check_layout(const Tensor& lengths, const Tensor& cu_seqlens, int64_t num_modalities,
                    int64_t dim) {
  MMFUSE_CHECK(lengths.dim() == 2 && lengths.size(0) == num_modalities,
              "pack_modalities: lengths must have shape (M=", num_modalities, ", B), got ", shape(lengths));
  MMFUSE_CHECK(lengths.scalar_type() == dtype::kInt && lengths.is_contiguous(),
              "pack_modalities: lengths must be contiguous int32, got ", lengths.scalar_type());
  const int64_t batch = lengths.size(1);
  MMFUSE_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) == batch + 1 && cu_seqlens.scalar_type() == dtype::kInt &&
                  cu_seqlens.is_contiguous(),
              "pack_modalities: cu_seqlens must be contiguous int32 of shape (B+1=", batch + 1, "), got ",
              shape(cu_seqlens), " ", cu_seqlens.scalar_type());
  Layout layout{num_modalities, batch, dim, ptr<int32_t>(lengths), ptr<int32_t>(cu_seqlens)};
  MMFUSE_CHECK(layout.cu_seqlens[0] == 0, "pack_modalities: cu_seqlens must start at 0, got ", layout.cu_seqlens[0]);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t sum = 0;
    for (int64_t m = 0; m < num_modalities; ++m) sum += layout.length(m, b);
    MMFUSE_CHECK(sum == layout.seqlen(b), "pack_modalities: cu_seqlens disagrees with lengths at sample ", b);
  }
  return layout;
}

int64_t max_seqlen(const Layout& layout) {
  int64_t best = 0;
  for (int64_t b = 0; b < layout.batch; ++b) best = std::max<int64_t>(best, layout.seqlen(b));
  return best;
}

// Row index of sample b's first token in the (rows, D) view of the packed or padded tokens.
int64_t first_row(const Layout& layout, int64_t b, bool padded, int64_t padded_len) {
  return padded ? b * padded_len : layout.cu_seqlens[b];
}

// Samples per task: enough bytes that a task outweighs waking a thread (~10 us), so small
// batches run on the calling thread and large ones on all of them.
constexpr int64_t kMinTaskBytes = 1 << 18;

int64_t sample_grain(const Tensor& tokens, int64_t batch) {
  const int64_t per_sample = batch > 0 ? nbytes(tokens) / batch : 0;
  return std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(per_sample, 1));
}

std::tuple<Tensor, Tensor> pack_modalities_cpu(const std::vector<Tensor>& features,
                                                       const Tensor& lengths, const Tensor& cu_seqlens,
                                                       const std::optional<Tensor>& type_embedding, bool padded,
                                                       std::optional<int64_t> out_len) {
  MMFUSE_CHECK(!features.empty(), "pack_modalities: features must hold at least one tensor");
  const int64_t num_modalities = static_cast<int64_t>(features.size());
  const auto& first = features[0];
  MMFUSE_CHECK(first.dim() == 3, "pack_modalities: features[0] must be (B, L, D), got ", shape(first));
  // every size and dtype read once: each read is a call into torch's C shim
  const IntArrayRef first_sizes = first.sizes();
  const int64_t batch = first_sizes[0], dim = first_sizes[2];
  const auto type = first.scalar_type();
  std::vector<int64_t> seq(num_modalities);  // L of each modality
  for (int64_t m = 0; m < num_modalities; ++m) {
    const auto& f = features[m];
    const IntArrayRef sizes = f.sizes();
    MMFUSE_CHECK(sizes.size() == 3 && sizes[0] == batch && sizes[2] == dim && f.is_contiguous() &&
                    f.scalar_type() == type && f.is_cpu(),
                "pack_modalities: features[", m, "] must be a contiguous CPU (B, L, D) tensor like features[0], got ",
                shape(f), " ", f.scalar_type());
    seq[m] = sizes[1];
  }
  const Layout layout = check_layout(lengths, cu_seqlens, num_modalities, dim);
  MMFUSE_CHECK(layout.batch == batch, "pack_modalities: lengths must have B=", batch,
              " columns (the features' batch), got ", shape(lengths));
  for (int64_t m = 0; m < num_modalities; ++m)
    for (int64_t b = 0; b < layout.batch; ++b)
      MMFUSE_CHECK(layout.length(m, b) >= 0 && layout.length(m, b) <= seq[m],
                  "pack_modalities: lengths[", m, "][", b, "] must lie in [0, ", seq[m], "]");
  if (type_embedding) {
    MMFUSE_CHECK(type_embedding->dim() == 2 && type_embedding->size(0) == num_modalities &&
                    type_embedding->size(1) == dim && type_embedding->is_contiguous() &&
                    type_embedding->scalar_type() == type,
                "pack_modalities: type_embedding must be contiguous (M, D) in the features' dtype, got ",
                shape(*type_embedding));
  }

  const int64_t needed = padded ? max_seqlen(layout) : layout.cu_seqlens[layout.batch];
  const int64_t rows_per = out_len.value_or(needed);
  MMFUSE_CHECK(padded ? rows_per >= needed : rows_per == needed, "pack_modalities: out_len (pack_modalities' max_seqlen when padded, its total when packed) must be ",
              padded ? "at least the longest packed sequence, " : "the total token count, ", needed, ", got ",
              rows_per);
  Tensor tokens, ids;
  if (padded) {
    tokens = zeros_like_as(first, {layout.batch, rows_per, dim});
    ids = full_like_as(first, {layout.batch, rows_per}, -1, dtype::kLong);
  } else {
    tokens = empty_like_as(first, {rows_per, dim});
    ids = empty_like_as(first, {rows_per}, dtype::kLong);
  }
  int64_t* ids_ptr = ptr<int64_t>(ids);

  MMFUSE_DISPATCH_FLOATING_AND_HALF(type, "pack_modalities", [&] {
    std::vector<const scalar_t*> src(num_modalities);
    for (int64_t m = 0; m < num_modalities; ++m) src[m] = ptr<scalar_t>(features[m]);
    const scalar_t* emb = type_embedding ? ptr<scalar_t>(*type_embedding) : nullptr;
    scalar_t* dst = ptr<scalar_t>(tokens);
    parallel_for(0, layout.batch, sample_grain(tokens, layout.batch), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t row = first_row(layout, b, padded, rows_per);
        for (int64_t m = 0; m < num_modalities; ++m) {
          const int64_t n = layout.length(m, b);
          const scalar_t* in = src[m] + b * seq[m] * dim;
          scalar_t* out = dst + row * dim;
          if (emb == nullptr) {
            // an empty tensor's data pointer may be null, and memcpy from null is undefined even for 0 bytes
            if (n * dim > 0) std::memcpy(out, in, sizeof(scalar_t) * n * dim);
          } else {
            const scalar_t* e = emb + m * dim;
            for (int64_t t = 0; t < n; ++t)
              for (int64_t d = 0; d < dim; ++d) out[t * dim + d] = in[t * dim + d] + e[d];
          }
          std::fill(ids_ptr + row, ids_ptr + row + n, m);
          row += n;
        }
      }
    });
  });
  return {tokens, ids};
}

std::vector<Tensor> unpack_modalities_cpu(const Tensor& tokens, const Tensor& lengths,
                                              const Tensor& cu_seqlens, std::vector<int64_t> sizes) {
  MMFUSE_CHECK(tokens.dim() == 2 || tokens.dim() == 3,
              "unpack_modalities: tokens must be (total, D) or (B, L, D), got ", shape(tokens));
  MMFUSE_CHECK(tokens.is_contiguous() && tokens.is_cpu(), "unpack_modalities: tokens must be contiguous CPU");
  const bool padded = tokens.dim() == 3;
  const int64_t dim = tokens.size(-1);
  const int64_t num_modalities = static_cast<int64_t>(sizes.size());
  const Layout layout = check_layout(lengths, cu_seqlens, num_modalities, dim);
  const int64_t padded_len = padded ? tokens.size(1) : 0;
  if (padded) {
    MMFUSE_CHECK(tokens.size(0) == layout.batch && max_seqlen(layout) <= padded_len,
                "unpack_modalities: padded tokens must be (B, L >= longest sequence, D), got ", shape(tokens));
  } else {
    MMFUSE_CHECK(tokens.size(0) == layout.cu_seqlens[layout.batch],
                "unpack_modalities: packed tokens must have sum(lengths) = cu_seqlens[-1] = ",
                layout.cu_seqlens[layout.batch], " rows, got ", tokens.size(0));
  }
  for (int64_t m = 0; m < num_modalities; ++m)
    for (int64_t b = 0; b < layout.batch; ++b)
      MMFUSE_CHECK(layout.length(m, b) >= 0 && layout.length(m, b) <= sizes[m],
                  "unpack_modalities: lengths[", m, "][", b, "] must lie in [0, sizes[", m, "]=", sizes[m], "]");

  // each output row is written once: the valid ones copied, the rest zeroed
  std::vector<Tensor> outs;
  for (int64_t m = 0; m < num_modalities; ++m) outs.push_back(empty_like_as(tokens, {layout.batch, sizes[m], dim}));
  MMFUSE_DISPATCH_FLOATING_AND_HALF(tokens.scalar_type(), "unpack_modalities", [&] {
    const scalar_t* src = ptr<scalar_t>(tokens);
    std::vector<scalar_t*> dst(num_modalities);  // one data-pointer call per output, not per sample
    for (int64_t m = 0; m < num_modalities; ++m) dst[m] = sizes[m] * dim == 0 ? nullptr : ptr<scalar_t>(outs[m]);
    parallel_for(0, layout.batch, sample_grain(tokens, layout.batch), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t row = first_row(layout, b, padded, padded_len);
        for (int64_t m = 0; m < num_modalities; ++m) {
          const int64_t n = layout.length(m, b);
          if (sizes[m] * dim == 0) {  // an empty output (its data pointer may be null): nothing to write
            row += n;
            continue;
          }
          scalar_t* out = dst[m] + b * sizes[m] * dim;
          if (n * dim > 0) std::memcpy(out, src + row * dim, sizeof(scalar_t) * n * dim);
          std::memset(static_cast<void*>(out + n * dim), 0, sizeof(scalar_t) * (sizes[m] - n) * dim);
          row += n;
        }
      }
    });
  });
  return outs;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(mmfuse, CPU, m) {
  m.impl("pack_modalities", MMFUSE_BOX(&pack_modalities_cpu));
  m.impl("unpack_modalities", MMFUSE_BOX(&unpack_modalities_cpu));
}

}  // namespace mmfuse
