// A 64-bit linear congruential generator (Knuth's MMIX constants): tiny, fast and the same on
// every platform. For self-tests, benchmarks and seeded stand-in data, where a reproducible
// sequence matters and statistical quality does not. Not for anything a peer could predict.
#ifndef SPECTRUMKV_COMMON_LCG_H_
#define SPECTRUMKV_COMMON_LCG_H_

#include <cstdint>

namespace spectrumkv {

class Lcg {
 public:
  explicit Lcg(uint64_t seed) : state_(seed) {}

  // Advances and returns the whole 64-bit state.
  uint64_t NextState() {
    state_ = state_ * 6364136223846793005ull + 1442695040888963407ull;
    return state_;
  }
  // 31 well-mixed bits (the state's top bits; the low bits of an LCG are weak).
  uint32_t Next() { return static_cast<uint32_t>(NextState() >> 33); }
  // Uniform in [0, 1) from the state's top 24 bits.
  float Unit() { return static_cast<float>(NextState() >> 40) / static_cast<float>(1 << 24); }

 private:
  uint64_t state_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_COMMON_LCG_H_
