// The scalar definition of the codec's quantization arithmetic (docs/wire-format.md,
// "Quantization"). Every backend's kernels must produce exactly these bits; the vector kernels
// and the CUDA kernels are checked against these functions.
#ifndef SPECTRUMKV_KERNELS_CPU_QUANT_MATH_H_
#define SPECTRUMKV_KERNELS_CPU_QUANT_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/half.h"

namespace spectrumkv::quant {

inline constexpr float kInt8Max = 127.0f;
inline constexpr float kInt4Max = 7.0f;

// A row's scale: stored bits, its float value, and how codes are computed from it.
struct RowScale {
  uint16_t bits = 0;
  float value = 0.0f;
  float inv = 0.0f;     // 1 / value in float
  bool divide = false;  // 1 / value overflowed: divide by value instead of multiplying by inv
};

// scale = amax / qmax in float, rounded up to the dtype (so no element exceeds qmax), never 0
// for a non-zero amax.
inline RowScale MakeScale(DType dtype, float amax, float qmax) {
  RowScale s;
  s.bits = FromFloatUp(dtype, amax / qmax);
  if (amax > 0.0f && s.bits == 0) s.bits = 1;  // smallest subnormal
  s.value = ToFloat(dtype, s.bits);
  if (s.value > 0.0f) {
    s.inv = 1.0f / s.value;
    s.divide = !std::isfinite(s.inv);
  }
  return s;
}

// The integer code of x: round half to even of x / scale, clamped to ±qmax; 0 when scale is 0.
inline int Quantize(float x, const RowScale& s, float qmax) {
  if (s.value == 0.0f) return 0;
  float y = s.divide ? x / s.value : x * s.inv;
  y = std::nearbyint(y);
  y = std::min(std::max(y, -qmax), qmax);
  return static_cast<int>(y);
}

// Reconstruction: code * scale in float, rounded to nearest even in the dtype.
inline uint16_t Dequantize(DType dtype, int code, float scale) {
  return FromFloatRne(dtype, static_cast<float>(code) * scale);
}

// Key-channel-normalized reconstruction: ((code * scale) * factor + offset), no FMA.
inline uint16_t DequantizeKcn(DType dtype, int code, float scale, float factor, float offset) {
  float y = static_cast<float>(code) * scale;
  y = y * factor;
  y = y + offset;
  return FromFloatRne(dtype, y);
}

// The progressive INT8 tier (docs/wire-format.md, "Progressive payloads"): a row's INT4 code q
// (scale s, qmax 7) plus a 4-bit cell c that places x within q's step: with y = x / s,
// c = clamp(floor((y - q + 0.5) * 16), 0, 15) (y - q is exact, Sterbenz), and 8 when s is 0.
// A NaN y gives 0 (never produced from a finite row; the sender rejects the others).
inline int RefineCell(float x, const RowScale& s) {
  if (s.value == 0.0f) return 8;
  const float y = s.divide ? x / s.value : x * s.inv;
  const float q = std::min(std::max(std::nearbyint(y), -kInt4Max), kInt4Max);
  float c = std::floor((y - q + 0.5f) * 16.0f);
  if (!(c >= 0.0f)) c = 0.0f;
  if (c > 15.0f) c = 15.0f;
  return static_cast<int>(c);
}

// Its reconstruction, the middle of the cell: ((32q + 2c - 15) * s) / 32 in float, exact (the
// product has at most 19 significant bits), then rounded to nearest even in the dtype.
inline uint16_t DequantizeRefined(DType dtype, int code, int cell, float scale) {
  const float k = static_cast<float>(32 * code + 2 * cell - 15);
  return FromFloatRne(dtype, (k * scale) * 0.03125f);
}

inline uint8_t PackNibbles(int even, int odd) {
  return static_cast<uint8_t>((even & 0xF) | ((odd & 0xF) << 4));
}
inline int LowNibble(uint8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4; }
inline int HighNibble(uint8_t b) { return static_cast<int8_t>(b) >> 4; }
// Unsigned nibbles (refinement cells).
inline int LowCell(uint8_t b) { return b & 0xF; }
inline int HighCell(uint8_t b) { return b >> 4; }

}  // namespace spectrumkv::quant

#endif  // SPECTRUMKV_KERNELS_CPU_QUANT_MATH_H_
