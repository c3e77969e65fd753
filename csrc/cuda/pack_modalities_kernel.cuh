// CUDA kernel body for mmfuse::pack_modalities / unpack_modalities. CUDA headers only (no
// torch), so nvcc compile-checks it for sm_80 and sm_90a on machines without a CUDA torch.
//
// One launch moves every modality: the grid walks the rows of the token tensor (packed
// (total, D), or padded (B * L_pad, D)); each row finds its sample (binary search in
// cu_seqlens, or a division when padded) and its modality (a scan of at most kMaxModalities
// lengths), then a warp copies the row in 16-byte vectors. Packing adds the type embedding in
// fp32 (fp64 for double) and rounds once, bit-identical to PyTorch's add; padded rows get
// zeros and modality id -1, so no memset is needed. Unpacking writes the valid rows back;
// its launcher zero-fills the per-modality outputs first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "storage.cuh"

namespace mmfuse {
namespace cuda {

constexpr int kRowsPerBlock = 8;  // one warp per row, 8 warps per block

template <typename T>
struct PackParams {
  T* features[kMaxModalities];           // modality m: (B, feature_len[m], D), contiguous
  int64_t feature_len[kMaxModalities];   // L_m
  const T* type_embedding;               // (M, D) contiguous, or nullptr
  const int32_t* lengths;                // (M, B): valid tokens of modality m in sample b
  const int32_t* cu_seqlens;             // (B + 1): prefix sum of per-sample token counts
  T* tokens;                             // (rows, D) contiguous
  int64_t* modality_ids;                 // (rows): written when packing
  int64_t rows;                          // total (packed) or B * padded_len
  int64_t padded_len;                    // 0 for the packed layout
  int64_t dim;                           // D
  int num_modalities;
  int batch;
};

// Sample whose rows [cu[b], cu[b+1]) hold `row`; empty samples are skipped by upper_bound.
__device__ __forceinline__ int sample_of_row(const int32_t* cu_seqlens, int batch, int64_t row) {
  int lo = 0, hi = batch;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu_seqlens[mid] <= row) lo = mid; else hi = mid;
  }
  return lo;
}

template <typename T, bool kPack, bool kVectorized>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
move_rows_kernel(PackParams<T> p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= p.rows) return;

  int b;
  int64_t t;  // position of this row within its sample's sequence
  if (p.padded_len > 0) {
    b = static_cast<int>(row / p.padded_len);
    t = row - static_cast<int64_t>(b) * p.padded_len;
  } else {
    b = sample_of_row(p.cu_seqlens, p.batch, row);
    t = row - p.cu_seqlens[b];
  }
  const int64_t seqlen = p.cu_seqlens[b + 1] - p.cu_seqlens[b];
  T* out_row = p.tokens + row * p.dim;

  if (t >= seqlen) {  // padding row of the padded layout
    if (kPack) {
      for (int64_t d = threadIdx.x; d < p.dim; d += 32) out_row[d] = from_acc<T>(0);
      if (threadIdx.x == 0) p.modality_ids[row] = -1;
    }
    return;
  }
  int m = 0;
  for (; m < p.num_modalities - 1; ++m) {
    const int32_t n = p.lengths[static_cast<int64_t>(m) * p.batch + b];
    if (t < n) break;
    t -= n;
  }
  T* feature_row = p.features[m] + (static_cast<int64_t>(b) * p.feature_len[m] + t) * p.dim;
  if (kPack && threadIdx.x == 0) p.modality_ids[row] = m;

  const T* emb = p.type_embedding != nullptr ? p.type_embedding + static_cast<int64_t>(m) * p.dim : nullptr;
  if (kVectorized) {
    using V = Vec<T>;
    const int64_t nvec = p.dim / V::kSize;
    for (int64_t i = threadIdx.x; i < nvec; i += 32) {
      if (!kPack) {
        reinterpret_cast<V*>(feature_row)[i] = reinterpret_cast<const V*>(out_row)[i];
        continue;
      }
      V x = reinterpret_cast<const V*>(feature_row)[i];
      if (emb != nullptr) {
        const V e = reinterpret_cast<const V*>(emb)[i];
#pragma unroll
        for (int j = 0; j < V::kSize; ++j) x.v[j] = from_acc<T>(to_acc(x.v[j]) + to_acc(e.v[j]));
      }
      reinterpret_cast<V*>(out_row)[i] = x;
    }
  } else {
    for (int64_t d = threadIdx.x; d < p.dim; d += 32) {
      if (!kPack) {
        feature_row[d] = out_row[d];
      } else {
        out_row[d] = emb != nullptr ? from_acc<T>(to_acc(feature_row[d]) + to_acc(emb[d])) : feature_row[d];
      }
    }
  }
}

// Vectorised when every row start is 16-byte aligned: D * sizeof(T) a multiple of 16 and
// 16-byte aligned base pointers (the launcher checks the pointers).
template <typename T>
inline bool rows_vectorizable(const PackParams<T>& p) {
  bool ok = (p.dim * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned16(p.tokens) &&
            (p.type_embedding == nullptr || aligned16(p.type_embedding));
  for (int m = 0; m < p.num_modalities; ++m) ok = ok && aligned16(p.features[m]);
  return ok;
}

// Grid, block and path of a move_rows launch: the one formula shared by the CUDA launcher and
// the host-emulator tests (tests/test_pack_modalities_emulator.py).
struct MoveRowsLaunch {
  dim3 grid;
  dim3 block;
  bool vectorized;
};

// cudaSuccess with *launch filled in, or the error the launch must return. Needs p.rows > 0.
template <typename T>
inline cudaError_t move_rows_launch_config(const PackParams<T>& p, MoveRowsLaunch* launch) {
  if (p.num_modalities < 1 || p.num_modalities > kMaxModalities) return cudaErrorInvalidValue;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  launch->grid = dim3(static_cast<unsigned>(blocks));
  launch->block = dim3(32, kRowsPerBlock);
  launch->vectorized = rows_vectorizable(p);
  return cudaSuccess;
}

#ifdef __CUDACC__  // the host emulator launches through emu::launch instead
template <typename T, bool kPack>
cudaError_t launch_move_rows(const PackParams<T>& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  MoveRowsLaunch launch;
  const cudaError_t status = move_rows_launch_config(p, &launch);
  if (status != cudaSuccess) return status;
  if (launch.vectorized) {
    move_rows_kernel<T, kPack, true><<<launch.grid, launch.block, 0, stream>>>(p);
  } else {
    move_rows_kernel<T, kPack, false><<<launch.grid, launch.block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace mmfuse

#ifdef MMFUSE_KERNEL_COMPILE_CHECK
// Instantiated only by the nvcc compile check (tests/test_build.py): every dtype, both directions.
#define MMFUSE_INSTANTIATE_PACK(T)                                                                   \
  template cudaError_t mmfuse::cuda::launch_move_rows<T, true>(const mmfuse::cuda::PackParams<T>&,  \
                                                               cudaStream_t);                        \
  template cudaError_t mmfuse::cuda::launch_move_rows<T, false>(const mmfuse::cuda::PackParams<T>&, \
                                                                cudaStream_t);
MMFUSE_INSTANTIATE_PACK(float)
MMFUSE_INSTANTIATE_PACK(double)
MMFUSE_INSTANTIATE_PACK(__half)
MMFUSE_INSTANTIATE_PACK(__nv_bfloat16)
#undef MMFUSE_INSTANTIATE_PACK
#endif
