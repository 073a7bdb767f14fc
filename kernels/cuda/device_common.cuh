// Device helpers of the CUDA backend: 16-bit conversions and the quantization arithmetic of
// docs/wire-format.md, bit-exact with common/half.h and kernels/cpu/quant_math.h, plus 16-byte
// chunk loads and stores and the paged-layout row addressing.
//
// Exactness: every float operation of the codec arithmetic is an explicit round-to-nearest
// intrinsic (no contraction into FMA, no fast-math); the target is also built with -fmad=false
// and -ftz=false. Rounding to an integer uses the 1.5 * 2^23 addition, which is round-half-even
// for |y| < 2^22 (the codes are within ±128 by construction).
#ifndef SPECTRUMKV_KERNELS_CUDA_DEVICE_COMMON_CUH_
#define SPECTRUMKV_KERNELS_CUDA_DEVICE_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/kernel_params.h"

namespace spectrumkv::cuda_kernels {

inline constexpr unsigned kFullMask = 0xFFFFFFFFu;
inline constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
inline constexpr int kRoundMagicBits = 0x4B400000;

template <bool kBf16>
__device__ __forceinline__ float ToF(uint32_t bits16) {
  if constexpr (kBf16) {
    return __uint_as_float(bits16 << 16);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
  }
}

// Round to nearest even into the dtype, as FromFloatRne (finite and infinite inputs).
template <bool kBf16>
__device__ __forceinline__ uint32_t FromFRne(float f) {
  if constexpr (kBf16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  } else {
    return __half_as_ushort(__float2half_rn(f));
  }
}

// Two floats into a packed pair of dtype values (low = a).
template <bool kBf16>
__device__ __forceinline__ uint32_t PackRne2(float a, float b) {
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// Smallest dtype value >= f, for finite f >= 0 (FromFloatUp).
template <bool kBf16>
__device__ __forceinline__ uint32_t FromFUp(float f) {
  uint32_t h = FromFRne<kBf16>(f);
  if (ToF<kBf16>(h) < f) ++h;
  return h;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t NonFiniteAbs() {
  return kBf16 ? 0x7F80u : 0x7C00u;
}

template <bool kBf16>
__device__ __forceinline__ uint32_t OneBits() {
  return kBf16 ? 0x3F80u : 0x3C00u;
}

// A row's scale (quant::MakeScale).
struct DevScale {
  uint32_t bits;
  float value;
  float inv;
  bool divide;
};

template <bool kBf16>
__device__ __forceinline__ DevScale MakeScaleDev(float amax, float qmax) {
  DevScale s;
  s.bits = FromFUp<kBf16>(__fdiv_rn(amax, qmax));
  if (amax > 0.0f && s.bits == 0) s.bits = 1;
  s.value = ToF<kBf16>(s.bits);
  s.inv = 0.0f;
  s.divide = false;
  if (s.value > 0.0f) {
    s.inv = __fdiv_rn(1.0f, s.value);
    s.divide = !isfinite(s.inv);
  }
  return s;
}

// quant::Quantize: clamp(rint(x / s), -qmax, qmax), 0 when s is 0.
__device__ __forceinline__ int QuantizeDev(float x, const DevScale& s, int qmax) {
  if (s.value == 0.0f) return 0;
  const float y = s.divide ? __fdiv_rn(x, s.value) : __fmul_rn(x, s.inv);
  int code = __float_as_int(__fadd_rn(y, kRoundMagic)) - kRoundMagicBits;
  code = min(max(code, -qmax), qmax);
  return code;
}

// Exact int -> float for |code| < 2^22.
__device__ __forceinline__ float CodeToF(int code) {
  return __fsub_rn(__int_as_float(kRoundMagicBits + code), kRoundMagic);
}

// 16-byte chunk of 8 elements from a row that may be only 2-byte aligned.
__device__ __forceinline__ uint4 LoadChunk(const uint8_t* p, bool aligned) {
  if (aligned) return *reinterpret_cast<const uint4*>(p);
  const auto* q = reinterpret_cast<const uint16_t*>(p);
  uint4 v;
  v.x = q[0] | (uint32_t{q[1]} << 16);
  v.y = q[2] | (uint32_t{q[3]} << 16);
  v.z = q[4] | (uint32_t{q[5]} << 16);
  v.w = q[6] | (uint32_t{q[7]} << 16);
  return v;
}

__device__ __forceinline__ void StoreChunk(uint8_t* p, const uint4& v, bool aligned) {
  if (aligned) {
    *reinterpret_cast<uint4*>(p) = v;
    return;
  }
  auto* q = reinterpret_cast<uint16_t*>(p);
  q[0] = static_cast<uint16_t>(v.x);
  q[1] = static_cast<uint16_t>(v.x >> 16);
  q[2] = static_cast<uint16_t>(v.y);
  q[3] = static_cast<uint16_t>(v.y >> 16);
  q[4] = static_cast<uint16_t>(v.z);
  q[5] = static_cast<uint16_t>(v.z >> 16);
  q[6] = static_cast<uint16_t>(v.w);
  q[7] = static_cast<uint16_t>(v.w >> 16);
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Start of the row of `token` (head 0) of a placement.
__device__ __forceinline__ uint8_t* TokenBase(const DevPlacement& p, const uint32_t* block_table,
                                              uint32_t block_size, uint32_t token) {
  const uint32_t block = block_table[token / block_size];
  return p.base + uint64_t{block} * p.block_stride + uint64_t{token % block_size} * p.token_stride;
}

__device__ __forceinline__ uint32_t WarpXor(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v ^= __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Index of the last entry with first <= item in an array sorted by `first` (binary search).
template <typename T>
__device__ __forceinline__ uint32_t FindByFirst(const T* entries, uint32_t count, uint64_t item) {
  uint32_t lo = 0, hi = count;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (entries[mid].first_range <= item) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace spectrumkv::cuda_kernels

#endif  // SPECTRUMKV_KERNELS_CUDA_DEVICE_COMMON_CUH_
