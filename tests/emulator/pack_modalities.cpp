// Host-emulator harness for csrc/cuda/pack_modalities_kernel.cuh: launches move_rows_kernel the
// way launch_move_rows does (same launch config), on CPU buffers. Used by
// tests/test_pack_modalities_emulator.py.
#include "harness.h"

#include "cuda/pack_modalities_kernel.cuh"

namespace {

using mmfuse::cuda::PackParams;

// features: M pointers, as int64; feature_len (M); type_embedding may be null; lengths (M, B)
// int32; cu_seqlens (B + 1) int32; tokens (rows, D); modality_ids (rows), written when packing.
template <typename T>
int move_rows(int64_t pack, const int64_t* features, const int64_t* feature_len, const void* type_embedding,
              const int32_t* lengths, const int32_t* cu_seqlens, void* tokens, int64_t* modality_ids, int64_t rows,
              int64_t padded_len, int64_t dim, int64_t num_modalities, int64_t batch) {
  return harness::run([&] {
    PackParams<T> p{};
    for (int64_t m = 0; m < num_modalities && m < mmfuse::cuda::kMaxModalities; ++m) {
      p.features[m] = reinterpret_cast<T*>(features[m]);
      p.feature_len[m] = feature_len[m];
    }
    p.type_embedding = static_cast<const T*>(type_embedding);
    p.lengths = lengths;
    p.cu_seqlens = cu_seqlens;
    p.tokens = static_cast<T*>(tokens);
    p.modality_ids = modality_ids;
    p.rows = rows;
    p.padded_len = padded_len;
    p.dim = dim;
    p.num_modalities = static_cast<int>(num_modalities);
    p.batch = static_cast<int>(batch);
    if (p.rows == 0) return;
    mmfuse::cuda::MoveRowsLaunch launch;
    if (mmfuse::cuda::move_rows_launch_config(p, &launch) != cudaSuccess) throw emu::Error("invalid pack parameters");
    using mmfuse::cuda::move_rows_kernel;
    if (pack != 0) {
      harness::launch(launch.vectorized ? move_rows_kernel<T, true, true> : move_rows_kernel<T, true, false>,
                      launch.grid, launch.block, 0, p);
    } else {
      harness::launch(launch.vectorized ? move_rows_kernel<T, false, true> : move_rows_kernel<T, false, false>,
                      launch.grid, launch.block, 0, p);
    }
  });
}

}  // namespace

#define MOVE_ROWS_ENTRY(name, T)                                                                                 \
  extern "C" int name(int64_t pack, const int64_t* features, const int64_t* feature_len, const void* type_embedding, \
                      const int32_t* lengths, const int32_t* cu_seqlens, void* tokens, int64_t* modality_ids,       \
                      int64_t rows, int64_t padded_len, int64_t dim, int64_t num_modalities, int64_t batch) {       \
    return move_rows<T>(pack, features, feature_len, type_embedding, lengths, cu_seqlens, tokens, modality_ids,   \
                        rows, padded_len, dim, num_modalities, batch);                                           \
  }
MOVE_ROWS_ENTRY(move_rows_float32, float)
MOVE_ROWS_ENTRY(move_rows_float64, double)
MOVE_ROWS_ENTRY(move_rows_float16, __half)
MOVE_ROWS_ENTRY(move_rows_bfloat16, __nv_bfloat16)
#undef MOVE_ROWS_ENTRY
