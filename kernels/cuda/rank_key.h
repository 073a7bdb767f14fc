// The sort key of device planning, shared by host and device code (plain C++ outside nvcc, so host
// tests check the key the kernels sort by).
//
// RankTokens (plan.h) orders non-sink tokens by descending score, NaN last, ties by ascending
// position. A stable ascending sort of (RankKey(score), position) gives exactly that order:
// the key is monotone decreasing in the score, -0.0 and +0.0 share a key (the host comparator
// calls them equal), and every NaN, whatever its sign and payload, gets the largest key, which
// no other float reaches.
#ifndef SPECTRUMKV_KERNELS_CUDA_RANK_KEY_H_
#define SPECTRUMKV_KERNELS_CUDA_RANK_KEY_H_

#include <cstdint>
#include <cstring>

#include "kernels/cuda/crc_gf2.h"  // SPECTRUMKV_HD

namespace spectrumkv::cuda_kernels {

SPECTRUMKV_HD uint32_t RankKey(float x) {
  if (x != x) return 0xFFFFFFFFu;  // NaN: last
  if (x == 0.0f) x = 0.0f;         // -0.0 == +0.0
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  // Ascending in the score: flip negatives entirely, set the sign bit of positives.
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

}  // namespace spectrumkv::cuda_kernels

#endif  // SPECTRUMKV_KERNELS_CUDA_RANK_KEY_H_
