#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/cpu/quant_math.h"
#include "kernels/cpu/row_kernels.h"

namespace spectrumkv {
namespace {

// Max of |x| over a row as the 16-bit pattern with the sign cleared; for both fp16 and bf16 the
// order of such patterns is the order of the magnitudes.
uint16_t AbsMaxBits(const uint16_t* src, uint32_t dim) {
  uint16_t m = 0;
  for (uint32_t i = 0; i < dim; ++i) m = std::max<uint16_t>(m, src[i] & 0x7FFFu);
  return m;
}

bool QuantizeInt8(DType dtype, const uint16_t* src, uint32_t dim, int8_t* codes, uint16_t* scale) {
  const uint16_t amax = AbsMaxBits(src, dim);
  if (amax >= NonFiniteAbsBits(dtype)) return false;
  const quant::RowScale s = quant::MakeScale(dtype, ToFloat(dtype, amax), quant::kInt8Max);
  for (uint32_t i = 0; i < dim; ++i) {
    codes[i] = static_cast<int8_t>(quant::Quantize(ToFloat(dtype, src[i]), s, quant::kInt8Max));
  }
  *scale = s.bits;
  return true;
}

bool QuantizeInt4(DType dtype, const uint16_t* src, uint32_t dim, uint8_t* nibbles,
                  uint16_t* scale) {
  const uint16_t amax = AbsMaxBits(src, dim);
  if (amax >= NonFiniteAbsBits(dtype)) return false;
  const quant::RowScale s = quant::MakeScale(dtype, ToFloat(dtype, amax), quant::kInt4Max);
  for (uint32_t i = 0; i < dim; i += 2) {
    nibbles[i / 2] =
        quant::PackNibbles(quant::Quantize(ToFloat(dtype, src[i]), s, quant::kInt4Max),
                           quant::Quantize(ToFloat(dtype, src[i + 1]), s, quant::kInt4Max));
  }
  *scale = s.bits;
  return true;
}

bool QuantizeInt4Kcn(DType dtype, const uint16_t* src, uint32_t dim, const float* offset,
                     const float* inv_factor, uint8_t* nibbles, uint16_t* scale) {
  if (AbsMaxBits(src, dim) >= NonFiniteAbsBits(dtype)) return false;
  float norm[kMaxNormalizedDim];
  float amax = 0.0f;
  for (uint32_t i = 0; i < dim; ++i) {
    float x = ToFloat(dtype, src[i]) - offset[i];
    x = x * inv_factor[i];
    norm[i] = x;
    amax = std::max(amax, std::fabs(x));
  }
  const quant::RowScale s = quant::MakeScale(dtype, amax, quant::kInt4Max);
  for (uint32_t i = 0; i < dim; i += 2) {
    nibbles[i / 2] = quant::PackNibbles(quant::Quantize(norm[i], s, quant::kInt4Max),
                                        quant::Quantize(norm[i + 1], s, quant::kInt4Max));
  }
  *scale = s.bits;
  return true;
}

bool RefineInt4(DType dtype, const uint16_t* src, uint32_t dim, uint8_t* cells) {
  const uint16_t amax = AbsMaxBits(src, dim);
  if (amax >= NonFiniteAbsBits(dtype)) return false;
  const quant::RowScale s = quant::MakeScale(dtype, ToFloat(dtype, amax), quant::kInt4Max);
  for (uint32_t i = 0; i < dim; i += 2) {
    cells[i / 2] = static_cast<uint8_t>(quant::RefineCell(ToFloat(dtype, src[i]), s) |
                                        (quant::RefineCell(ToFloat(dtype, src[i + 1]), s) << 4));
  }
  return true;
}

void DequantizeRefined(DType dtype, const uint8_t* nibbles, const uint8_t* cells, uint16_t scale,
                       uint32_t dim, uint16_t* dst) {
  const float s = ToFloat(dtype, scale);
  for (uint32_t i = 0; i < dim; i += 2) {
    dst[i] = quant::DequantizeRefined(dtype, quant::LowNibble(nibbles[i / 2]),
                                      quant::LowCell(cells[i / 2]), s);
    dst[i + 1] = quant::DequantizeRefined(dtype, quant::HighNibble(nibbles[i / 2]),
                                          quant::HighCell(cells[i / 2]), s);
  }
}

void DequantizeInt8(DType dtype, const int8_t* codes, uint16_t scale, uint32_t dim, uint16_t* dst) {
  const float s = ToFloat(dtype, scale);
  for (uint32_t i = 0; i < dim; ++i) dst[i] = quant::Dequantize(dtype, codes[i], s);
}

void DequantizeInt4(DType dtype, const uint8_t* nibbles, uint16_t scale, uint32_t dim,
                    uint16_t* dst) {
  const float s = ToFloat(dtype, scale);
  for (uint32_t i = 0; i < dim; i += 2) {
    dst[i] = quant::Dequantize(dtype, quant::LowNibble(nibbles[i / 2]), s);
    dst[i + 1] = quant::Dequantize(dtype, quant::HighNibble(nibbles[i / 2]), s);
  }
}

void DequantizeInt4Kcn(DType dtype, const uint8_t* nibbles, uint16_t scale, const float* offset,
                       const float* factor, uint32_t dim, uint16_t* dst) {
  const float s = ToFloat(dtype, scale);
  for (uint32_t i = 0; i < dim; i += 2) {
    dst[i] = quant::DequantizeKcn(dtype, quant::LowNibble(nibbles[i / 2]), s, factor[i], offset[i]);
    dst[i + 1] = quant::DequantizeKcn(dtype, quant::HighNibble(nibbles[i / 2]), s, factor[i + 1],
                                      offset[i + 1]);
  }
}

float SumRowNorms(DType dtype, const uint16_t* first_row, uint64_t head_stride_bytes,
                  uint32_t heads, uint32_t dim) {
  float sum = 0.0f;
  for (uint32_t h = 0; h < heads; ++h) {
    const auto* src = reinterpret_cast<const uint16_t*>(reinterpret_cast<const char*>(first_row) +
                                                        h * head_stride_bytes);
    float acc = 0.0f;
    for (uint32_t i = 0; i < dim; ++i) {
      const float x = ToFloat(dtype, src[i]);
      acc += x * x;
    }
    sum += std::sqrt(acc);
  }
  return sum;
}

bool MinMax(DType dtype, const uint16_t* src, uint32_t dim, float* lo, float* hi) {
  if (AbsMaxBits(src, dim) >= NonFiniteAbsBits(dtype)) return false;
  for (uint32_t i = 0; i < dim; ++i) {
    const float x = ToFloat(dtype, src[i]);
    lo[i] = std::min(lo[i], x);
    hi[i] = std::max(hi[i], x);
  }
  return true;
}

void DotMany(DType dtype, const uint16_t* row, uint32_t dim, const float* queries,
             uint32_t num_queries, float* out) {
  float k[kMaxNormalizedDim];
  for (uint32_t i = 0; i < dim; ++i) k[i] = ToFloat(dtype, row[i]);
  for (uint32_t q = 0; q < num_queries; ++q) {
    const float* qv = queries + uint64_t{q} * dim;
    float acc = 0.0f;
    for (uint32_t i = 0; i < dim; ++i) acc += qv[i] * k[i];
    out[q] = acc;
  }
}

void CopyRow(const uint16_t* src, uint32_t dim, uint16_t* dst) {
  std::memcpy(dst, src, uint64_t{dim} * 2);
}

void NoFence() {}

}  // namespace

const RowKernels& ScalarRowKernels() {
  static const RowKernels kKernels = {
      "scalar",        &QuantizeInt8,   &QuantizeInt4,      &QuantizeInt4Kcn,   &RefineInt4,
      &DequantizeInt8, &DequantizeInt4, &DequantizeInt4Kcn, &DequantizeRefined, &SumRowNorms,
      &MinMax,         &DotMany,        &CopyRow,           &NoFence,
  };
  return kKernels;
}

}  // namespace spectrumkv
