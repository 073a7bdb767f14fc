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

inline uint8_t PackNibbles(int even, int odd) {
  return static_cast<uint8_t>((even & 0xF) | ((odd & 0xF) << 4));
}
inline int LowNibble(uint8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4; }
inline int HighNibble(uint8_t b) { return static_cast<int8_t>(b) >> 4; }

}  // namespace spectrumkv::quant

#endif  // SPECTRUMKV_KERNELS_CPU_QUANT_MATH_H_
