// Scalar conversions between float and the two 16-bit KV dtypes, bit-exact with the F16C
// instructions and with CUDA's __float2half_rn / __float2bfloat16_rn.
//
// The codec's numerics are defined by these functions: every backend must produce the same bits.
// "Up" conversions round toward +infinity and are used for quantization scales, so that
// max|x| / scale never exceeds the integer range (no clamping error on the largest element).
#ifndef SPECTRUMKV_COMMON_HALF_H_
#define SPECTRUMKV_COMMON_HALF_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace spectrumkv {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// IEEE binary16 -> float, exact for every input (NaN payloads are kept, quietened).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return BitsFloat(sign | 0x7F800000u | (mant << 13) | (mant ? 0x400000u : 0));
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24, exact in float.
  const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -v : v;
}

// float -> IEEE binary16, round to nearest even; overflow gives infinity, NaN stays NaN.
inline uint16_t FloatToHalfRne(float f) {
  uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= 0x7F800000u) {  // Inf or NaN
    return sign | (u > 0x7F800000u ? static_cast<uint16_t>(0x7E00u | ((u >> 13) & 0x3FFu))
                                   : uint16_t{0x7C00});
  }
  if (u >= 0x477FF000u) return sign | 0x7C00u;  // rounds to >= 65520: infinity
  if (u < 0x38800000u) {                        // below the smallest normal half (2^-14)
    // Exact scaling by 2^24 puts the subnormal unit at 1; rint gives round-half-even.
    const float scaled = BitsFloat(u) * 16777216.0f;
    return sign | static_cast<uint16_t>(std::nearbyint(scaled));
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + mant_odd;
  return sign | static_cast<uint16_t>(u >> 13);
}

// bfloat16 -> float, exact.
inline float BFloat16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even; NaN stays a quiet NaN.
inline uint16_t FloatToBFloat16Rne(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

enum class DType : uint8_t {
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* DTypeName(DType d) { return d == DType::kFloat16 ? "fp16" : "bf16"; }

inline float ToFloat(DType d, uint16_t bits) {
  return d == DType::kFloat16 ? HalfToFloat(bits) : BFloat16ToFloat(bits);
}
inline uint16_t FromFloatRne(DType d, float f) {
  return d == DType::kFloat16 ? FloatToHalfRne(f) : FloatToBFloat16Rne(f);
}

// Smallest value of dtype `d` that is >= f, for finite f >= 0 (scales). May return +infinity
// when f exceeds the dtype's largest finite value.
inline uint16_t FromFloatUp(DType d, float f) {
  uint16_t h = FromFloatRne(d, f);
  if (ToFloat(d, h) < f) ++h;  // positive values: the next bit pattern is the next value up
  return h;
}

// Bit pattern (after clearing the sign) at or above which a 16-bit value is Inf or NaN.
inline uint16_t NonFiniteAbsBits(DType d) { return d == DType::kFloat16 ? 0x7C00u : 0x7F80u; }

}  // namespace spectrumkv

#endif  // SPECTRUMKV_COMMON_HALF_H_
