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

// The progressive INT8 tier: every implementation writes the scalar definition's cells and
// reconstruction on fresh random rows (also rows with elements exactly on a cell's edge, and
// the INT4 step's halfway points, where the cell clamps to 15), and the reconstruction is within
// a 32nd of the INT4 scale plus half an ulp; a zero row reconstructs to zeros, a non-finite row
// is refused.
TEST(RowKernelsTest, RefinementAgreesAndMeetsItsBound) {
  const RowKernels& ref = ScalarRowKernels();
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> g;
  for (const RowKernels* k : AllKernels()) {
    for (int trial = 0; trial < 3000; ++trial) {
      const DType d = trial % 2 ? DType::kBFloat16 : DType::kFloat16;
      const uint32_t dim = 8 * (1 + static_cast<uint32_t>(rng() % 40));
      const float mag = std::exp(std::clamp(g(rng) * 3.0f, -14.0f, 8.0f));
      std::vector<uint16_t> row(dim);
      for (auto& x : row) x = FromFloatRne(d, g(rng) * mag);
      if (trial % 3 == 0) {
        // Elements on edges: amax 7 gives scale 1 exactly, so y = x.
        row[0] = FromFloatRne(d, 7.0f);
        for (uint32_t i = 1; i < dim; ++i) {
          row[i] = FromFloatRne(d, static_cast<float>(static_cast<int>(rng() % 225) - 112) / 16.0f);
        }
      }
      std::vector<uint8_t> nib(dim / 2), cells_a(dim / 2), cells_b(dim / 2);
      uint16_t scale = 0;
      ASSERT_TRUE(ref.quantize_int4(d, row.data(), dim, nib.data(), &scale));
      ASSERT_TRUE(k->refine_int4(d, row.data(), dim, cells_a.data()));
      ASSERT_TRUE(ref.refine_int4(d, row.data(), dim, cells_b.data()));
      ASSERT_EQ(cells_a, cells_b) << k->name << " dim " << dim;
      std::vector<uint16_t> ya(dim), yb(dim);
      k->dequantize_refined(d, nib.data(), cells_a.data(), scale, dim, ya.data());
      k->store_fence();
      ref.dequantize_refined(d, nib.data(), cells_b.data(), scale, dim, yb.data());
      ASSERT_EQ(ya, yb) << k->name;
      const float s = ToFloat(d, scale);
      for (uint32_t i = 0; i < dim; ++i) {
        const float x = ToFloat(d, row[i]), y = ToFloat(d, ya[i]);
        const uint16_t a = ya[i] & 0x7FFF;
        const float ulp = ToFloat(d, static_cast<uint16_t>(a + 1)) - ToFloat(d, a);
        ASSERT_LE(std::fabs(x - y), s * (1.0f / 32) * 1.00001f + ulp / 2)
            << k->name << " element " << i << " x " << x << " cell "
            << (i % 2 ? cells_a[i / 2] >> 4 : cells_a[i / 2] & 15);
      }
    }
    for (DType d : {DType::kFloat16, DType::kBFloat16}) {
      std::vector<uint16_t> row(16, 0), y(16, 0xFFFF);
      std::vector<uint8_t> nib(8), cells(8);
      uint16_t scale = 1;
      ASSERT_TRUE(k->quantize_int4(d, row.data(), 16, nib.data(), &scale));
      ASSERT_TRUE(k->refine_int4(d, row.data(), 16, cells.data()));
      EXPECT_EQ(cells, std::vector<uint8_t>(8, 0x88)) << k->name;
      k->dequantize_refined(d, nib.data(), cells.data(), scale, 16, y.data());
      k->store_fence();
      EXPECT_EQ(y, std::vector<uint16_t>(16, 0)) << k->name;
      row[3] = d == DType::kFloat16 ? 0x7C00 : 0x7F80;
      EXPECT_FALSE(k->refine_int4(d, row.data(), 16, cells.data())) << k->name;
    }
  }
}

// Worked by hand: amax 7 (scale 1 exactly); x = 2.3: q 2, cell floor((0.3 + 0.5) * 16) = 12,
// back (64 + 24 - 15) / 32 = 2.28125; x = -0.5 (a tie: q 0, even): cell 0, back -15/32;
// x = 0.5: q 0, cell 16 clamped to 15, back 15/32.
TEST(RowKernelsTest, KnownAnswerRefinement) {
  std::vector<uint16_t> row(8, 0);
  row[0] = FloatToHalfRne(7.0f);
  row[1] = FloatToHalfRne(2.3f);
  row[2] = FloatToHalfRne(-0.5f);
  row[3] = FloatToHalfRne(0.5f);
  for (const RowKernels* k : AllKernels()) {
    std::vector<uint8_t> nib(4), cells(4);
    uint16_t scale = 0;
    ASSERT_TRUE(k->quantize_int4(DType::kFloat16, row.data(), 8, nib.data(), &scale));
    ASSERT_EQ(HalfToFloat(scale), 1.0f);
    ASSERT_TRUE(k->refine_int4(DType::kFloat16, row.data(), 8, cells.data()));
    EXPECT_EQ(quant::HighCell(cells[0]), 12) << k->name;
    EXPECT_EQ(quant::LowCell(cells[1]), 0) << k->name;
    EXPECT_EQ(quant::HighCell(cells[1]), 15) << k->name;
    std::vector<uint16_t> y(8);
    k->dequantize_refined(DType::kFloat16, nib.data(), cells.data(), scale, 8, y.data());
    k->store_fence();
    EXPECT_EQ(HalfToFloat(y[1]), HalfToFloat(FloatToHalfRne(2.28125f))) << k->name;
    EXPECT_EQ(HalfToFloat(y[2]), -15.0f / 32) << k->name;
    EXPECT_EQ(HalfToFloat(y[3]), 15.0f / 32) << k->name;
    // 7 itself: q 7, cell 8, back (224 + 1) / 32.
    EXPECT_EQ(HalfToFloat(y[0]), 225.0f / 32) << k->name;
  }
}

TEST(RowKernelsTest, SelfTestPasses) {
  for (const RowKernels* k : AllKernels()) EXPECT_TRUE(CpuCodec::SelfTest(*k)) << k->name;
}

}  // namespace
}  // namespace spectrumkv
