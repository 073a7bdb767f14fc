#include "common/half.h"

#include <cmath>
#include <cstring>
#include <random>

#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

bool IsNanBits(DType d, uint16_t b) {
  return (b & 0x7FFFu) > (d == DType::kFloat16 ? 0x7C00u : 0x7F80u);
}

TEST(HalfTest, EveryFp16RoundTripsExactly) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const auto h = static_cast<uint16_t>(b);
    if (IsNanBits(DType::kFloat16, h)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(h)));
      continue;
    }
    EXPECT_EQ(FloatToHalfRne(HalfToFloat(h)), h) << std::hex << b;
  }
}

TEST(HalfTest, EveryBf16RoundTripsExactly) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const auto h = static_cast<uint16_t>(b);
    if (IsNanBits(DType::kBFloat16, h)) continue;
    EXPECT_EQ(FloatToBFloat16Rne(BFloat16ToFloat(h)), h) << std::hex << b;
  }
}

// Independent check of round-to-nearest-even: the result is at least as close as both
// neighbours, and on a tie it is the even one.
void ExpectNearestEven(DType d, float x) {
  const uint16_t h = FromFloatRne(d, x);
  const uint16_t max_finite = d == DType::kFloat16 ? 0x7BFF : 0x7F7F;
  const uint16_t mag = h & 0x7FFFu;
  if (mag > max_finite) {  // rounded to infinity: x must be beyond max + half ulp
    const double maxv = ToFloat(d, max_finite);
    const double ulp = maxv - ToFloat(d, max_finite - 1);
    EXPECT_GE(std::fabs(double(x)), maxv + ulp / 2) << x;
    return;
  }
  const double v = ToFloat(d, h);
  const double err = std::fabs(double(x) - v);
  const uint16_t sign = h & 0x8000u;
  for (int delta : {-1, 1}) {
    const int nb = int(mag) + delta;
    if (nb < 0 || nb > max_finite) continue;
    const double w = ToFloat(d, static_cast<uint16_t>(sign | nb));
    const double e2 = std::fabs(double(x) - w);
    EXPECT_LE(err, e2) << "x=" << x << " got " << v << " neighbour " << w;
    if (err == e2) {
      EXPECT_EQ(h & 1u, 0u) << "tie not to even for x=" << x;
    }
  }
}

TEST(HalfTest, RoundingIsNearestEvenOnRandomFloats) {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_int_distribution<uint32_t> bits;
  for (DType d : {DType::kFloat16, DType::kBFloat16}) {
    for (int i = 0; i < 200000; ++i) {
      // Random bit patterns cover every binade; rescale most into the dtype's range.
      float x;
      uint32_t u = bits(rng);
      std::memcpy(&x, &u, 4);
      if (!std::isfinite(x)) continue;
      if (d == DType::kFloat16 && i % 4 != 0) {
        int e = 0;
        x = std::ldexp(std::frexp(x, &e), int(u % 44) - 26);
      }
      ExpectNearestEven(d, x);
    }
    // Ties: midpoints between consecutive values.
    for (uint32_t b = 0; b + 1 < (d == DType::kFloat16 ? 0x7BFFu : 0x7F7Fu); b += 97) {
      const double mid = (double(ToFloat(d, uint16_t(b))) + ToFloat(d, uint16_t(b + 1))) / 2;
      ExpectNearestEven(d, static_cast<float>(mid));
    }
  }
}

TEST(HalfTest, RoundUpNeverBelowAndTight) {
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<float> mant(0.0f, 1.0f);
  for (DType d : {DType::kFloat16, DType::kBFloat16}) {
    for (int i = 0; i < 100000; ++i) {
      const float x = std::ldexp(mant(rng), int(rng() % 30) - 20);
      const uint16_t up = FromFloatUp(d, x);
      EXPECT_GE(ToFloat(d, up), x);
      if (up > 0) {
        EXPECT_LT(ToFloat(d, static_cast<uint16_t>(up - 1)), x);
      }
    }
  }
  EXPECT_EQ(FromFloatUp(DType::kFloat16, 70000.0f), 0x7C00);  // beyond max: infinity
}

}  // namespace
}  // namespace spectrumkv
