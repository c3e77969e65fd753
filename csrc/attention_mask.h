// The attention mask of mmfuse::cross_attention_*: its checks and the view every kernel's additive
// bias is built from, shared by the C++ CPU kernel (csrc/cpu/cross_attention.cpp, which builds the
// bias with its own loops) and the CUDA launcher (csrc/cuda/cross_attention.cu, through the
// dispatcher). Stable ABI only (host code).
#pragma once

#include "stable.h"

#include <optional>

namespace mmfuse {

// attn_mask checked against q and k and returned as a view: padded (varlen false): (Lq, Lk) or
// (B or 1, Hq or 1, Lq, Lk), returned 4-D; varlen: (total_q, W) or (Hq or 1, total_q, W) with W >=
// min_width (the longest key sequence), returned 3-D. Bool (True = hidden) or any float dtype, on q's
// device. Anything else is refused naming attn_mask. Undefined without a mask.
inline Tensor attention_mask_view(const char* op, const std::optional<Tensor>& attn_mask, const Tensor& q,
                                  const Tensor& k, bool varlen, int64_t min_width) {
  if (!attn_mask) return Tensor();
  const Tensor& m = *attn_mask;
  const Device q_device = q.device(), m_device = m.device();
  const ScalarType m_type = m.scalar_type();
  const bool type_ok = m_device == q_device && (m_type == dtype::kBool || is_floating_type(m_type));
  const int64_t mdim = m.dim();
  if (varlen) {
    const int64_t H = q.size(1), total_q = q.size(0);
    const bool shape_ok = (mdim == 2 && m.size(0) == total_q && m.size(1) >= min_width) ||
                          (mdim == 3 && (m.size(0) == H || m.size(0) == 1) && m.size(1) == total_q &&
                           m.size(2) >= min_width);
    MMFUSE_CHECK(shape_ok && type_ok, op, ": attn_mask must be a bool or float (total_q, W) = (", total_q, ", >= ",
                 min_width, ") or (Hq or 1, total_q, W) = (", H, " or 1, ", total_q, ", >= ", min_width,
                 ") tensor on ", device_str(q_device), " (W at least the longest key sequence), got ", shape(m), " ",
                 m_type, " on ", device_str(m_device));
    return mdim == 2 ? torch::stable::unsqueeze(m, 0) : m;
  }
  const int64_t B = q.size(0), H = q.size(2), Lq = q.size(1), Lk = k.size(1);
  const bool shape_ok = mdim == 2 ? (m.size(0) == Lq && m.size(1) == Lk)
                        : mdim == 4 ? ((m.size(0) == B || m.size(0) == 1) && (m.size(1) == H || m.size(1) == 1) &&
                                       m.size(2) == Lq && m.size(3) == Lk)
                                    : false;
  MMFUSE_CHECK(shape_ok && type_ok, op, ": attn_mask must be a bool or float (Lq, Lk) = (", Lq, ", ", Lk,
               ") or (B or 1, Hq or 1, Lq, Lk) = (", B, " or 1, ", H, " or 1, ", Lq, ", ", Lk, ") tensor on ",
               device_str(q_device), ", got ", shape(m), " ", m_type, " on ", device_str(m_device));
  return mdim == 2 ? torch::stable::view(m, {1, 1, Lq, Lk}) : m;
}

}  // namespace mmfuse
