// The attention mask of mmfuse::cross_attention_* as the additive bias every kernel reads, shared
// by the C++ CPU kernel (csrc/cpu/cross_attention.cpp) and the CUDA launcher
// (csrc/cuda/cross_attention.cu). Torch headers only (host code).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace mmfuse {

// attn_mask as a contiguous additive tensor of dtype `bias_type` on q's device (bool: True -> -inf,
// False -> 0; any float dtype converted), or undefined without one. Padded (varlen false): (Lq, Lk) or
// (B or 1, Hq or 1, Lq, Lk), returned 4-D; varlen: (total_q, W) or (Hq or 1, total_q, W) with W >=
// min_width (the longest key sequence), returned 3-D. Anything else is refused naming attn_mask.
inline at::Tensor attention_mask_bias(const char* op, const std::optional<at::Tensor>& attn_mask,
                                      const at::Tensor& q, const at::Tensor& k, bool varlen, int64_t min_width,
                                      at::ScalarType bias_type) {
  if (!attn_mask) return at::Tensor();
  const at::Tensor& m = *attn_mask;
  const bool type_ok = m.device() == q.device() && (m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()));
  at::Tensor full;
  if (varlen) {
    const int64_t H = q.size(1), total_q = q.size(0);
    const bool shape_ok = (m.dim() == 2 && m.size(0) == total_q && m.size(1) >= min_width) ||
                          (m.dim() == 3 && (m.size(0) == H || m.size(0) == 1) && m.size(1) == total_q &&
                           m.size(2) >= min_width);
    TORCH_CHECK(shape_ok && type_ok, op, ": attn_mask must be a bool or float (total_q, W) = (", total_q, ", >= ",
                min_width, ") or (Hq or 1, total_q, W) = (", H, " or 1, ", total_q, ", >= ", min_width,
                ") tensor on ", q.device(), " (W at least the longest key sequence), got ", m.sizes(), " ",
                m.scalar_type(), " on ", m.device());
    full = m.dim() == 2 ? m.unsqueeze(0) : m;
  } else {
    const int64_t B = q.size(0), H = q.size(2), Lq = q.size(1), Lk = k.size(1);
    const bool shape_ok = m.dim() == 2 ? (m.size(0) == Lq && m.size(1) == Lk)
                          : m.dim() == 4 ? ((m.size(0) == B || m.size(0) == 1) && (m.size(1) == H || m.size(1) == 1) &&
                                            m.size(2) == Lq && m.size(3) == Lk)
                                         : false;
    TORCH_CHECK(shape_ok && type_ok, op, ": attn_mask must be a bool or float (Lq, Lk) = (", Lq, ", ", Lk,
                ") or (B or 1, Hq or 1, Lq, Lk) = (", B, " or 1, ", H, " or 1, ", Lq, ", ", Lk, ") tensor on ",
                q.device(), ", got ", m.sizes(), " ", m.scalar_type(), " on ", m.device());
    full = m.dim() == 2 ? m.view({1, 1, Lq, Lk}) : m;
  }
  if (full.scalar_type() == at::kBool)
    return at::zeros(full.sizes(), q.options().dtype(bias_type))
        .masked_fill_(full, -std::numeric_limits<double>::infinity());
  return full.to(bias_type).contiguous();
}

}  // namespace mmfuse
