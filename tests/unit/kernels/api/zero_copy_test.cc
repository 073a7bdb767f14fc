#include "kernels/api/zero_copy.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/api/codec.h"
#include "kernels/cpu/cpu_codec.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv {
namespace {

using ::spectrumkv::testing::FillRandom;
using ::spectrumkv::testing::MakePool;
using ::spectrumkv::testing::TestPool;

constexpr ModelShape kShape{5, 4, 64};

TierPlan PlanAt(double budget, uint32_t tokens, Quantizer quantizer = Quantizer::kAbsmax) {
  std::vector<float> scores(tokens);
  for (uint32_t i = 0; i < tokens; ++i) scores[i] = static_cast<float>((i * 37) % 101);
  PlanOptions po;
  po.budget = budget;
  po.quantizer = quantizer;
  return *PlanTiers(kShape, DType::kFloat16, tokens, scores, po);
}

std::vector<uint8_t> Concat(const std::vector<std::span<const uint8_t>>& ranges) {
  std::vector<uint8_t> out;
  for (const auto& r : ranges) out.insert(out.end(), r.begin(), r.end());
  return out;
}

TEST(ZeroCopyTest, PlainFp16OnlyForUncompressedPlansWithoutKeyFactors) {
  EXPECT_TRUE(IsPlainFp16Plan(PlanAt(1.0, 40)));
  EXPECT_FALSE(IsPlainFp16Plan(PlanAt(0.5, 40)));
  EXPECT_FALSE(IsPlainFp16Plan(PlanAt(0.3, 40)));
}

// The ranges, concatenated, are the bytes PackLayers writes, for every layer range, for layouts
// whose rows are contiguous in long runs (NHD) and in short ones (HND), with shuffled blocks.
TEST(ZeroCopyTest, RangesCarryExactlyThePackedBytes) {
  const uint64_t seed = ::spectrumkv::testing::FreshSeed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  auto codec = CpuCodec::CreateBest();
  for (kvgen::PoolLayoutKind kind :
       {kvgen::PoolLayoutKind::kVllmNhd, kvgen::PoolLayoutKind::kVllmHnd,
        kvgen::PoolLayoutKind::kTrtllm}) {
    for (uint32_t tokens : {1u, 37u, 96u}) {
      TestPool pool = MakePool(kind, kShape, DType::kFloat16, 16, tokens, rng());
      FillRandom(pool.View(), rng);
      const TierPlan plan = PlanAt(1.0, tokens);
      ASSERT_TRUE(IsPlainFp16Plan(plan));
      std::vector<uint8_t> packed(plan.layout.total_bytes, 0xAB);
      ASSERT_TRUE(PackPayloadInto(*codec, pool.View(), plan, packed).ok());
      for (auto [first, last] : {std::pair{0u, 5u}, std::pair{0u, 1u}, std::pair{2u, 4u}}) {
        std::vector<uint8_t> payload(plan.layout.total_bytes, 0xCD);
        std::vector<std::span<const uint8_t>> ranges;
        ASSERT_TRUE(DescribeFp16Layers(pool.View(), plan, first, last, payload, &ranges).ok());
        const uint64_t begin = plan.layout.layers[first].begin;
        const uint64_t end = plan.layout.layers[last - 1].end;
        const std::vector<uint8_t> sent = Concat(ranges);
        ASSERT_EQ(sent.size(), end - begin);
        EXPECT_TRUE(std::equal(sent.begin(), sent.end(), packed.begin() + begin))
            << "layout " << static_cast<int>(kind) << " tokens " << tokens << " layers [" << first
            << ", " << last << ")";
        // Only the trailers were written into the payload buffer.
        for (uint64_t i = 0; i < payload.size(); ++i) {
          bool in_trailer = false;
          for (uint32_t l = first; l < last; ++l) {
            in_trailer |= i >= plan.layout.layers[l].crc_offset && i < plan.layout.layers[l].end;
          }
          if (!in_trailer) {
            ASSERT_EQ(payload[i], 0xCD) << "byte " << i;
          }
        }
      }
    }
  }
}

TEST(ZeroCopyTest, NhdRowsMergeIntoOneRunPerBlock) {
  TestPool pool = MakePool(kvgen::PoolLayoutKind::kVllmNhd, kShape, DType::kFloat16, 16, 64, 1);
  // 64 tokens in 4 blocks of 16; shuffled blocks may still happen to be adjacent.
  const uint64_t runs = Fp16RunCount(pool.View(), 0);
  EXPECT_GE(runs, 1u);
  EXPECT_LE(runs, 4u);
  TestPool hnd = MakePool(kvgen::PoolLayoutKind::kVllmHnd, kShape, DType::kFloat16, 16, 64, 1);
  EXPECT_GT(Fp16RunCount(hnd.View(), 0), 4u * kShape.num_kv_heads - 1);
}

TEST(ZeroCopyTest, RefusesCompressedPlansAndWrongSizes) {
  TestPool pool = MakePool(kvgen::PoolLayoutKind::kVllmNhd, kShape, DType::kFloat16, 16, 40, 3);
  std::vector<std::span<const uint8_t>> ranges;
  const TierPlan half = PlanAt(0.5, 40);
  std::vector<uint8_t> payload(half.layout.total_bytes);
  EXPECT_EQ(DescribeFp16Layers(pool.View(), half, 0, 5, payload, &ranges).code(),
            absl::StatusCode::kInvalidArgument);
  const TierPlan full = PlanAt(1.0, 40);
  std::vector<uint8_t> short_payload(full.layout.total_bytes - 1);
  EXPECT_EQ(DescribeFp16Layers(pool.View(), full, 0, 5, short_payload, &ranges).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> ok_payload(full.layout.total_bytes);
  EXPECT_EQ(DescribeFp16Layers(pool.View(), full, 3, 6, ok_payload, &ranges).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ranges.empty());
  // An empty layer range describes nothing.
  EXPECT_TRUE(DescribeFp16Layers(pool.View(), full, 3, 3, ok_payload, &ranges).ok());
  EXPECT_TRUE(ranges.empty());
}

}  // namespace
}  // namespace spectrumkv
