// GF(2) arithmetic behind the CUDA backend's parallel CRC32C, shared by host and device code.
//
// A CRC32C over a long section cannot be computed byte after byte on a GPU. It is linear over
// GF(2), so it is computed in pieces and combined: with F(r, M) the CRC register after feeding
// message M into register r (no pre- or post-inversion), F(0, A ‖ B) = S_|B|(F(0, A)) ^ F(0, B),
// where S_k shifts a register through k zero bytes, i.e. multiplies it by x^(8k) modulo the
// polynomial. The standard CRC32C of an n-byte message M is F(0, M) ^ ZeroCrc(n), ZeroCrc(n)
// being the CRC32C of n zero bytes.
//
// Registers use the reflected representation of zlib's crc32_combine: bit 31 holds x^0, bit 0
// holds x^31. Everything here is pure and thread-safe; none of it allocates.
//
// This header is plain C++ when not compiled by nvcc, so host tests exercise the same code the
// kernels run.
#ifndef SPECTRUMKV_KERNELS_CUDA_CRC_GF2_H_
#define SPECTRUMKV_KERNELS_CUDA_CRC_GF2_H_

#include <cstdint>

#if defined(__CUDACC__)
#define SPECTRUMKV_HD __host__ __device__ __forceinline__
#else
#define SPECTRUMKV_HD inline
#endif

namespace spectrumkv::cuda_crc {

inline constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial
inline constexpr uint32_t kOne = 0x80000000u;   // x^0
inline constexpr uint32_t kX = 0x40000000u;     // x^1
// x^-1: the y with x * y = 1 mod P, i.e. (y >> 1) ^ kPoly = kOne with y odd.
inline constexpr uint32_t kXInverse = ((kOne ^ kPoly) << 1) | 1u;

// a * b mod P. Branch-free so that a warp runs it in lock step.
SPECTRUMKV_HD uint32_t MulMod(uint32_t a, uint32_t b) {
  uint32_t p = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 8
#endif
  for (int i = 0; i < 32; ++i) {
    p ^= b & (0u - ((a >> (31 - i)) & 1u));
    b = (b >> 1) ^ (kPoly & (0u - (b & 1u)));
  }
  return p;
}

// base^e mod P by square and multiply.
SPECTRUMKV_HD uint32_t PowMod(uint32_t base, uint64_t e) {
  uint32_t r = kOne;
  while (e != 0) {
    if (e & 1u) r = MulMod(r, base);
    base = MulMod(base, base);
    e >>= 1;
  }
  return r;
}

// x^(8k) mod P: the operator S_k as a multiplier (slow path; the kernels use digit tables).
SPECTRUMKV_HD uint32_t XPowBytes(uint64_t k) { return PowMod(kX, 8 * k); }

// x^(-8k) mod P.
SPECTRUMKV_HD uint32_t XPowNegBytes(uint64_t k) { return PowMod(kXInverse, 8 * k); }

// The byte table of the reflected CRC32C: F(0, [b]).
SPECTRUMKV_HD uint32_t ByteCrc(uint32_t b) {
  uint32_t c = b;
  for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
  return c;
}

// Feeds one byte into register r (no inversion).
SPECTRUMKV_HD uint32_t FeedByte(uint32_t r, uint8_t b, const uint32_t* table0) {
  return (r >> 8) ^ table0[(r ^ b) & 0xFFu];
}

// CRC32C of n zero bytes (standard parameters): S_n(~0) ^ ~0.
SPECTRUMKV_HD uint32_t ZeroCrc(uint64_t n) {
  return MulMod(XPowBytes(n), 0xFFFFFFFFu) ^ 0xFFFFFFFFu;
}

// Number of base-256 digits of a byte distance the kernels' digit tables cover (2^40 bytes).
inline constexpr int kShiftDigits = 5;

// S_k(r) using digit tables: digits[d * 256 + v] = x^(8 * v * 256^d) mod P.
SPECTRUMKV_HD uint32_t ShiftBytes(uint32_t r, uint64_t k, const uint32_t* digits) {
  uint32_t m = digits[k & 0xFFu];
  for (int d = 1; d < kShiftDigits; ++d) {
    const uint32_t v = static_cast<uint32_t>((k >> (8 * d)) & 0xFFu);
    if (v != 0) m = MulMod(m, digits[d * 256 + v]);
  }
  return MulMod(m, r);
}

}  // namespace spectrumkv::cuda_crc

#endif  // SPECTRUMKV_KERNELS_CUDA_CRC_GF2_H_
