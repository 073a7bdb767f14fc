// Per-row kernels of the CPU codec. A row is the head_dim contiguous 16-bit elements of one
// (layer, K|V, token, head); head_dim is a multiple of 8. Two implementations exist (portable
// scalar and AVX2/F16C); both produce identical codes, scales and reconstructions (quant_math.h).
// The floating-point sums used for scoring (sum_row_norms, dot_many) may differ in the last bits.
#ifndef SPECTRUMKV_KERNELS_CPU_ROW_KERNELS_H_
#define SPECTRUMKV_KERNELS_CPU_ROW_KERNELS_H_

#include <cstdint>

#include "common/half.h"

namespace spectrumkv {

struct RowKernels {
  const char* name;
  // Symmetric absmax quantization of one row. Return false (writing nothing useful) if the row
  // holds Inf or NaN.
  bool (*quantize_int8)(DType dtype, const uint16_t* src, uint32_t dim, int8_t* codes,
                        uint16_t* scale);
  bool (*quantize_int4)(DType dtype, const uint16_t* src, uint32_t dim, uint8_t* nibbles,
                        uint16_t* scale);
  // INT4 of (x - offset[c]) * inv_factor[c].
  bool (*quantize_int4_kcn)(DType dtype, const uint16_t* src, uint32_t dim, const float* offset,
                            const float* inv_factor, uint8_t* nibbles, uint16_t* scale);
  // The progressive INT8 tier's refinement cells of a row (quant::RefineCell with the row's
  // INT4 scale, the one quantize_int4 writes; unsigned nibbles, even element low). False if the
  // row holds Inf or NaN.
  bool (*refine_int4)(DType dtype, const uint16_t* src, uint32_t dim, uint8_t* cells);
  void (*dequantize_int8)(DType dtype, const int8_t* codes, uint16_t scale, uint32_t dim,
                          uint16_t* dst);
  void (*dequantize_int4)(DType dtype, const uint8_t* nibbles, uint16_t scale, uint32_t dim,
                          uint16_t* dst);
  void (*dequantize_int4_kcn)(DType dtype, const uint8_t* nibbles, uint16_t scale,
                              const float* offset, const float* factor, uint32_t dim,
                              uint16_t* dst);
  // A progressive INT8 row from its INT4 base and refinement cells (quant::DequantizeRefined).
  void (*dequantize_refined)(DType dtype, const uint8_t* nibbles, const uint8_t* cells,
                             uint16_t scale, uint32_t dim, uint16_t* dst);
  // Σ over h < heads of the L2 norm of the row at (const char*)first_row + h * head_stride_bytes:
  // one token's rows of one (layer, K|V), the key_norm score's inner sum.
  float (*sum_row_norms)(DType dtype, const uint16_t* first_row, uint64_t head_stride_bytes,
                         uint32_t heads, uint32_t dim);
  // Per channel: lo[c] = min(lo[c], x[c]), hi[c] = max(hi[c], x[c]). False on Inf/NaN.
  bool (*min_max)(DType dtype, const uint16_t* src, uint32_t dim, float* lo, float* hi);
  // out[i] = dot(queries[i*dim, (i+1)*dim), row) for i < num_queries.
  void (*dot_many)(DType dtype, const uint16_t* row, uint32_t dim, const float* queries,
                   uint32_t num_queries, float* out);
  // dst = src (an FP16 row, bit-exact).
  void (*copy_row)(const uint16_t* src, uint32_t dim, uint16_t* dst);
  // The dequantize and copy_row kernels may write rows that fill whole 64-byte lines with
  // streaming (non-temporal) stores, which skip the read-for-ownership of every destination line
  // (the decode pool is not read back by the codec). Such stores are weakly ordered: store_fence
  // must run before the rows are handed to anyone else (UnpackLayers calls it before returning).
  void (*store_fence)();
};

// Largest head_dim the kernels accept (kMaxHeadDim in kernels/api/types.h).
inline constexpr uint32_t kMaxNormalizedDim = 1024;

// The portable implementation; always available.
const RowKernels& ScalarRowKernels();

// The AVX2/F16C/FMA implementation, or nullptr if this CPU lacks those instructions.
const RowKernels* Avx2RowKernels();

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_CPU_ROW_KERNELS_H_
