// Reading and writing KV caches as NumPy .npy files of shape [layers, 2, tokens, kv_heads,
// head_dim] (index 0 = K, 1 = V), C order. dtype '<f2' is fp16; '<u2' or '<i2' holds bfloat16
// bit patterns (NumPy has no bfloat16), which the caller must say (dtype argument).
#ifndef SPECTRUMKV_CLIENT_KVGEN_NPY_H_
#define SPECTRUMKV_CLIENT_KVGEN_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/api/layout.h"

namespace spectrumkv::kvgen {

struct DenseKv {
  ModelShape shape;
  DType dtype = DType::kFloat16;
  uint32_t num_tokens = 0;
  std::vector<uint16_t> data;  // [L][2][n][H][D]
};

// Reads `path`. `bf16_bits` says that an integer '<u2'/'<i2' array holds bfloat16 bits.
// INVALID_ARGUMENT for anything that is not a 5-D little-endian 16-bit C-order array, NOT_FOUND
// if the file cannot be opened, DATA_LOSS if it is shorter than its header says.
absl::StatusOr<DenseKv> ReadNpy(const std::string& path, bool bf16_bits);

// Writes `kv` as '<f2' (fp16) or '<u2' (bf16 bits).
absl::Status WriteNpy(const std::string& path, const DenseKv& kv);

// Copies every row between a dense array and a validated host KV buffer of the same shape.
void CopyDenseToBuffer(const DenseKv& dense, const KvBuffer& kv);
void CopyBufferToDense(const KvBuffer& kv, DenseKv* dense);

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_NPY_H_
