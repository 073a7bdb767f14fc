#include "kernels/cpu/row_kernels.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_codec.h"
#include "kernels/cpu/quant_math.h"

namespace spectrumkv {
namespace {

std::vector<const RowKernels*> AllKernels() {
  std::vector<const RowKernels*> k = {&ScalarRowKernels()};
  if (Avx2RowKernels() != nullptr) k.push_back(Avx2RowKernels());
  return k;
}

// Worked by hand: amax 2 -> 2/127 = 0.0157480... rounded up to fp16 is 0.0157623291015625
// (0x2409); codes 0.5/s = 31.72 -> 32, -1/s = -63.44 -> -63, 0.25/s -> 16, 2/s = 126.88 -> 127.
TEST(RowKernelsTest, KnownAnswerInt8) {
  std::vector<uint16_t> row(8, 0);
  row[0] = FloatToHalfRne(0.5f);
  row[1] = FloatToHalfRne(-1.0f);
  row[2] = FloatToHalfRne(0.25f);
  row[3] = FloatToHalfRne(2.0f);
  for (const RowKernels* k : AllKernels()) {
    std::vector<int8_t> codes(8);
    uint16_t scale = 0;
    ASSERT_TRUE(k->quantize_int8(DType::kFloat16, row.data(), 8, codes.data(), &scale));
    EXPECT_EQ(scale, 0x2409) << k->name;
    EXPECT_FLOAT_EQ(HalfToFloat(scale), 0.0157623291015625f);
    EXPECT_EQ(codes, (std::vector<int8_t>{32, -63, 16, 127, 0, 0, 0, 0})) << k->name;
    // INT4: 2/7 = 0.285714 rounded up to fp16 is 1171 * 2^-12 = 0.285888671875; codes
    // 0.5/s = 1.749 -> 2, -1/s = -3.498 -> -3, 0.25/s = 0.874 -> 1, 2/s = 6.996 -> 7.
    std::vector<uint8_t> nib(4);
    ASSERT_TRUE(k->quantize_int4(DType::kFloat16, row.data(), 8, nib.data(), &scale));
    EXPECT_EQ(scale, FromFloatUp(DType::kFloat16, 2.0f / 7.0f));
    EXPECT_EQ(quant::LowNibble(nib[0]), 2);
    EXPECT_EQ(quant::HighNibble(nib[0]), -3);
    EXPECT_EQ(quant::LowNibble(nib[1]), 1);
    EXPECT_EQ(quant::HighNibble(nib[1]), 7);
  }
}

TEST(RowKernelsTest, ZeroRowAndNonFiniteRows) {
  for (const RowKernels* k : AllKernels()) {
    for (DType d : {DType::kFloat16, DType::kBFloat16}) {
      std::vector<uint16_t> row(16, 0);
      std::vector<int8_t> codes(16, 5);
      uint16_t scale = 7;
      ASSERT_TRUE(k->quantize_int8(d, row.data(), 16, codes.data(), &scale));
      EXPECT_EQ(scale, 0);
      EXPECT_EQ(codes, std::vector<int8_t>(16, 0));
      row[9] = d == DType::kFloat16 ? 0x7C00 : 0x7F80;  // +inf
      EXPECT_FALSE(k->quantize_int8(d, row.data(), 16, codes.data(), &scale)) << k->name;
      std::vector<uint8_t> nib(8);
      row[9] = d == DType::kFloat16 ? 0xFE01 : 0xFFC1;  // NaN
      EXPECT_FALSE(k->quantize_int4(d, row.data(), 16, nib.data(), &scale)) << k->name;
      std::vector<float> lo(16, 1e30f), hi(16, -1e30f);
      EXPECT_FALSE(k->min_max(d, row.data(), 16, lo.data(), hi.data()));
    }
  }
}

// Every implementation gives the same bits as the scalar definition on fresh random rows, and
// the reconstruction is within half a step plus half an ulp.
TEST(RowKernelsTest, ImplementationsAgreeAndMeetTheBound) {
  const RowKernels* avx2 = Avx2RowKernels();
  if (avx2 == nullptr) GTEST_SKIP() << "no AVX2 on this CPU";
  const RowKernels& ref = ScalarRowKernels();
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> g;
  for (int trial = 0; trial < 4000; ++trial) {
    const DType d = trial % 2 ? DType::kBFloat16 : DType::kFloat16;
    const uint32_t dim = 8 * (1 + static_cast<uint32_t>(rng() % 40));
    // Magnitudes across many binades, kept finite in fp16.
    const float mag = std::exp(std::clamp(g(rng) * 3.0f, -14.0f, 8.0f));
    std::vector<uint16_t> row(dim);
    for (auto& x : row) x = FromFloatRne(d, g(rng) * mag);
    for (bool int4 : {false, true}) {
      std::vector<uint8_t> ca(dim), cb(dim);
      uint16_t sa = 0, sb = 0;
      if (int4) {
        ASSERT_TRUE(avx2->quantize_int4(d, row.data(), dim, ca.data(), &sa));
        ASSERT_TRUE(ref.quantize_int4(d, row.data(), dim, cb.data(), &sb));
      } else {
        ASSERT_TRUE(
            avx2->quantize_int8(d, row.data(), dim, reinterpret_cast<int8_t*>(ca.data()), &sa));
        ASSERT_TRUE(
            ref.quantize_int8(d, row.data(), dim, reinterpret_cast<int8_t*>(cb.data()), &sb));
      }
      ASSERT_EQ(sa, sb);
      ASSERT_EQ(ca, cb) << "dim " << dim << " int4 " << int4;
      std::vector<uint16_t> ya(dim), yb(dim);
      if (int4) {
        avx2->dequantize_int4(d, ca.data(), sa, dim, ya.data());
        ref.dequantize_int4(d, cb.data(), sb, dim, yb.data());
      } else {
        avx2->dequantize_int8(d, reinterpret_cast<int8_t*>(ca.data()), sa, dim, ya.data());
        ref.dequantize_int8(d, reinterpret_cast<int8_t*>(cb.data()), sb, dim, yb.data());
      }
      ASSERT_EQ(ya, yb);
      const float s = ToFloat(d, sa);
      for (uint32_t i = 0; i < dim; ++i) {
        const float x = ToFloat(d, row[i]), y = ToFloat(d, ya[i]);
        const uint16_t a = ya[i] & 0x7FFF;
        const float ulp = ToFloat(d, static_cast<uint16_t>(a + 1)) - ToFloat(d, a);
        ASSERT_LE(std::fabs(x - y), s * 0.50001f + ulp / 2) << i;
      }
    }
  }
}

// Destinations on a 64-byte line with head_dim a multiple of 32 take the streaming-store path of
// the AVX2 kernels; others the ordinary one. Both write exactly the scalar kernels' bits, touch
// nothing outside the row, and copy_row copies bit for bit.
TEST(RowKernelsTest, StreamingAndOrdinaryDestinationsAgree) {
  const RowKernels& ref = ScalarRowKernels();
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> g;
  for (const RowKernels* k : AllKernels()) {
    for (uint32_t dim : {8u, 24u, 32u, 64u, 128u, 136u, 256u}) {
      for (size_t offset_elems : {size_t{0}, size_t{8}, size_t{1}}) {  // 0: on a 64-byte line
        for (DType d : {DType::kFloat16, DType::kBFloat16}) {
          std::vector<uint16_t> row(dim);
          for (auto& x : row) x = FromFloatRne(d, g(rng) * 3.0f);
          std::vector<uint8_t> c8(dim), c4(dim / 2);
          uint16_t s8 = 0, s4 = 0;
          ASSERT_TRUE(
              ref.quantize_int8(d, row.data(), dim, reinterpret_cast<int8_t*>(c8.data()), &s8));
          ASSERT_TRUE(ref.quantize_int4(d, row.data(), dim, c4.data(), &s4));
          std::vector<float> offset(dim), factor(dim);
          for (uint32_t i = 0; i < dim; ++i) {
            offset[i] = static_cast<float>(i % 5) - 2.0f;
            factor[i] = 0.5f + static_cast<float>(i % 3);
          }
          // A guard element on each side of the row.
          alignas(64) uint16_t buf[kMaxNormalizedDim + 64];
          uint16_t* dst = buf + 32 + offset_elems;
          std::vector<uint16_t> want(dim);
          auto check = [&](const char* what) {
            EXPECT_EQ(buf[31 + offset_elems], 0xABCD) << what;
            EXPECT_EQ(dst[dim], 0xABCD) << what;
            EXPECT_TRUE(std::equal(want.begin(), want.end(), dst))
                << what << " " << k->name << " dim " << dim << " offset " << offset_elems;
          };
          auto reset = [&] { std::fill(std::begin(buf), std::end(buf), uint16_t{0xABCD}); };
          reset();
          ref.dequantize_int8(d, reinterpret_cast<int8_t*>(c8.data()), s8, dim, want.data());
          k->dequantize_int8(d, reinterpret_cast<int8_t*>(c8.data()), s8, dim, dst);
          k->store_fence();
          check("int8");
          reset();
          ref.dequantize_int4(d, c4.data(), s4, dim, want.data());
          k->dequantize_int4(d, c4.data(), s4, dim, dst);
          k->store_fence();
          check("int4");
          reset();
          ref.dequantize_int4_kcn(d, c4.data(), s4, offset.data(), factor.data(), dim, want.data());
          k->dequantize_int4_kcn(d, c4.data(), s4, offset.data(), factor.data(), dim, dst);
          k->store_fence();
          check("int4 kcn");
          reset();
          want = row;
          k->copy_row(row.data(), dim, dst);
          k->store_fence();
          check("copy");
        }
      }
    }
  }
}

TEST(RowKernelsTest, SelfTestPasses) {
  for (const RowKernels* k : AllKernels()) EXPECT_TRUE(CpuCodec::SelfTest(*k)) << k->name;
}

}  // namespace
}  // namespace spectrumkv
