// Host tests of device planning's sort key (kernels/cuda/rank_key.h): a stable sort by it gives
// RankTokens' order on stress scores (ties, both zeros, NaNs, infinities). Needs no GPU.
#include "kernels/cuda/rank_key.h"

#include <algorithm>
#include <cfloat>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/api/plan.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv::cuda_kernels {
namespace {

TEST(RankKeyTest, OrdersScoresDescendingWithNanLast) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float descending[] = {kInf,  FLT_MAX,
                              1.0f,  std::numeric_limits<float>::denorm_min(),
                              0.0f,  -std::numeric_limits<float>::denorm_min(),
                              -1.0f, -FLT_MAX,
                              -kInf};
  for (size_t i = 1; i < std::size(descending); ++i) {
    EXPECT_LT(RankKey(descending[i - 1]), RankKey(descending[i])) << i;
  }
  EXPECT_EQ(RankKey(-0.0f), RankKey(0.0f));
  EXPECT_EQ(RankKey(std::numeric_limits<float>::quiet_NaN()), 0xFFFFFFFFu);
  EXPECT_EQ(RankKey(-std::numeric_limits<float>::quiet_NaN()), 0xFFFFFFFFu);
  EXPECT_LT(RankKey(-kInf), RankKey(std::numeric_limits<float>::quiet_NaN()));
}

TEST(RankKeyTest, StableSortByKeyIsRankTokens) {
  const uint64_t seed = testing::FreshSeed();
  std::mt19937_64 rng(seed);
  for (int iter = 0; iter < 300; ++iter) {
    const uint32_t n = 1 + static_cast<uint32_t>(rng() % 3000);
    const uint32_t sinks = static_cast<uint32_t>(rng() % 8);
    const std::vector<float> scores =
        testing::StressScores(n, static_cast<int>(rng() % testing::kScoreKinds), rng);
    std::vector<uint32_t> order(n);
    std::iota(order.begin(), order.end(), 0u);
    const uint32_t s = std::min(sinks, n);
    std::stable_sort(order.begin() + s, order.end(), [&](uint32_t a, uint32_t b) {
      return RankKey(scores[a]) < RankKey(scores[b]);
    });
    ASSERT_EQ(order, RankTokens(scores, sinks)) << "seed " << seed << " iter " << iter;
  }
}

}  // namespace
}  // namespace spectrumkv::cuda_kernels
