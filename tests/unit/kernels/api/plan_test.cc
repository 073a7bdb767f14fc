#include "kernels/api/plan.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv {
namespace {

constexpr ModelShape kLlama{32, 8, 128};

std::vector<float> Scores(uint32_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> s(n);
  for (auto& x : s) x = u(rng);
  return s;
}

TierCounts CountsOf(const TierPlan& p) { return p.layout.total_counts; }

// Element cost in quarter-token units of map m.
uint64_t Units(const TierPlan& p, uint32_t m) {
  const TierCounts& c = p.layout.map_counts[m];
  return 4ull * c[Tier::kFp16] + 2ull * c[Tier::kInt8] + c[Tier::kInt4];
}

// The paper's table (paper.md §3.1): realized 3-tier fractions at b = 0.25 ... 0.75.
TEST(PlanTest, ThreeTierFractionsMatchThePaper) {
  const double f16[] = {0, 0, 0, 0, 0, 0, 0.10, 0.20, 0.30, 0.40, 0.50};
  const double f8[] = {0, 0.20, 0.40, 0.60, 0.80, 1.00, 0.90, 0.80, 0.70, 0.60, 0.50};
  const double f4[] = {1.00, 0.80, 0.60, 0.40, 0.20, 0, 0, 0, 0, 0, 0};
  std::mt19937_64 rng(testing::FreshSeed());
  for (uint32_t n : {1000u, 2000u, 4000u}) {
    const std::vector<float> scores = Scores(n, rng);
    for (int i = 0; i <= 10; ++i) {
      PlanOptions o;
      o.budget = 0.25 + 0.05 * i;
      auto plan = PlanTiers(kLlama, DType::kFloat16, n, scores, o);
      ASSERT_TRUE(plan.ok()) << plan.status();
      const TierCounts c = CountsOf(*plan);
      EXPECT_EQ(c[Tier::kFp16], std::lround(f16[i] * n)) << "b=" << o.budget;
      EXPECT_EQ(c[Tier::kInt8], std::lround(f8[i] * n)) << "b=" << o.budget;
      EXPECT_EQ(c[Tier::kInt4], std::lround(f4[i] * n)) << "b=" << o.budget;
      EXPECT_EQ(c[Tier::kDrop], 0u);
      EXPECT_NEAR(plan->ElementBudget(), o.budget, 1e-12);
    }
  }
}

// The progressive quantizer plans the tiers absmax plans; its payloads are progressive where a
// ranked plan has INT8 and INT4 tokens and no others (3tier between 0.25 and 0.5), absmax
// payloads elsewhere (one tier needs no ranking).
TEST(PlanTest, ProgressivePlansInt8AndInt4Only) {
  std::mt19937_64 rng(testing::FreshSeed());
  const uint32_t n = 1000;
  const std::vector<float> scores = Scores(n, rng);
  const std::pair<double, bool> cases[] = {{0.3, true},   {0.42, true}, {0.48, true}, {0.2, false},
                                           {0.25, false}, {0.5, false}, {0.6, false}};
  for (const auto& [b, progressive] : cases) {
    PlanOptions o;
    o.budget = b;
    const TierPlan absmax = *PlanTiers(kLlama, DType::kFloat16, n, scores, o);
    o.quantizer = Quantizer::kProgressive;
    auto plan = PlanTiers(kLlama, DType::kFloat16, n, scores, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->desc.progressive(), progressive) << "b=" << b;
    EXPECT_EQ(plan->tiers, absmax.tiers) << "b=" << b;
    EXPECT_EQ(plan->layout.total_bytes, absmax.layout.total_bytes) << "b=" << b;
  }
  std::vector<uint8_t> tiers(n, static_cast<uint8_t>(Tier::kInt4));
  EXPECT_FALSE(
      PlanFromTiers(kLlama, DType::kFloat16, n, tiers, Policy::k3Tier, Quantizer::kProgressive)
          ->desc.progressive());
  tiers[3] = static_cast<uint8_t>(Tier::kInt8);
  EXPECT_TRUE(
      PlanFromTiers(kLlama, DType::kFloat16, n, tiers, Policy::k3Tier, Quantizer::kProgressive)
          ->desc.progressive());
  tiers[7] = static_cast<uint8_t>(Tier::kFp16);
  EXPECT_FALSE(
      PlanFromTiers(kLlama, DType::kFloat16, n, tiers, Policy::k3Tier, Quantizer::kProgressive)
          ->desc.progressive());
}

TEST(PlanTest, GreedyFollowsTheRanking) {
  const uint32_t n = 200;
  std::vector<float> scores(n);
  for (uint32_t i = 0; i < n; ++i) scores[i] = static_cast<float>((i * 37) % n);
  PlanOptions o;
  o.budget = 0.6;  // 20% FP16, 80% INT8
  o.sink_tokens = 4;
  const TierPlan p = *PlanTiers(kLlama, DType::kFloat16, n, scores, o);
  const std::vector<uint32_t> rank = RankTokens(scores, 4);
  for (uint32_t i = 0; i < n; ++i) {
    const Tier expect = i < 40 ? Tier::kFp16 : Tier::kInt8;
    EXPECT_EQ(p.tiers[rank[i]], static_cast<uint8_t>(expect)) << i;
  }
  // Sinks rank first even with the lowest scores.
  EXPECT_EQ(rank[0], 0u);
  EXPECT_EQ(rank[3], 3u);
}

TEST(PlanTest, RankingPutsNanLastAndBreaksTiesByPosition) {
  const std::vector<float> s = {0.5f, NAN, 0.9f, 0.5f, NAN, 1.0f};
  EXPECT_EQ(RankTokens(s, 0), (std::vector<uint32_t>{5, 2, 0, 3, 1, 4}));
  EXPECT_EQ(RankTokens(s, 2), (std::vector<uint32_t>{0, 1, 5, 2, 3, 4}));
}

TEST(PlanTest, PoliciesDoWhatTheySay) {
  const uint32_t n = 1000;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::vector<float> scores = Scores(n, rng);
  auto plan = [&](Policy p, double b) {
    PlanOptions o;
    o.policy = p;
    o.budget = b;
    auto r = PlanTiers(kLlama, DType::kFloat16, n, scores, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return *r;
  };
  // 2-tier below 0.5: top 2b INT8, the rest dropped, sinks kept.
  TierPlan p = plan(Policy::k2Tier, 0.3);
  EXPECT_EQ(CountsOf(p)[Tier::kInt8], 600u);
  EXPECT_EQ(CountsOf(p)[Tier::kDrop], 400u);
  for (int s = 0; s < 4; ++s) EXPECT_NE(p.tiers[s], static_cast<uint8_t>(Tier::kDrop));
  // 2-tier above 0.5 equals 3-tier.
  EXPECT_EQ(plan(Policy::k2Tier, 0.7).tiers, plan(Policy::k3Tier, 0.7).tiers);
  // Uniform INT8 and INT4.
  EXPECT_EQ(CountsOf(plan(Policy::kUniformInt8, 0.5))[Tier::kInt8], n);
  EXPECT_EQ(CountsOf(plan(Policy::kUniformInt4, 0.9))[Tier::kInt4], n);
  EXPECT_EQ(CountsOf(plan(Policy::kUniformInt8, 0.4))[Tier::kDrop], 200u);
  // SinkProtect: sinks FP16 and the budget still holds.
  p = plan(Policy::kSinkProtect, 0.3);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(p.tiers[s], static_cast<uint8_t>(Tier::kFp16));
  EXPECT_LE(Units(p, 0), 1200u);
  // pdtrim with first_ratio 0: sinks + the most recent tokens at FP16.
  p = plan(Policy::kPdTrim, 0.5);
  EXPECT_EQ(CountsOf(p)[Tier::kFp16], 500u);
  for (uint32_t t = 0; t < n; ++t) {
    const bool kept = t < 4 || t >= n - 496;
    EXPECT_EQ(p.tiers[t], static_cast<uint8_t>(kept ? Tier::kFp16 : Tier::kDrop)) << t;
  }
  // pdtrim with first_ratio 0.5: half front, half back.
  PlanOptions o;
  o.policy = Policy::kPdTrim;
  o.budget = 0.5;
  o.first_ratio = 0.5;
  p = *PlanTiers(kLlama, DType::kFloat16, n, scores, o);
  for (uint32_t t = 0; t < n; ++t) {
    const bool kept = t < 250 || t >= n - 250;
    EXPECT_EQ(p.tiers[t], static_cast<uint8_t>(kept ? Tier::kFp16 : Tier::kDrop)) << t;
  }
  // random_tier: greedy's counts, other positions, sinks on top, reproducible by seed.
  const TierPlan greedy = plan(Policy::k3Tier, 0.4);
  const TierPlan random = plan(Policy::kRandomTier, 0.4);
  EXPECT_EQ(CountsOf(random), CountsOf(greedy));
  EXPECT_NE(random.tiers, greedy.tiers);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(random.tiers[s], static_cast<uint8_t>(Tier::kInt8));
  EXPECT_EQ(plan(Policy::kRandomTier, 0.4).tiers, random.tiers);
}

TEST(PlanTest, UnreachableBudgetDropsOrRejects) {
  const uint32_t n = 400;
  std::mt19937_64 rng(testing::FreshSeed());
  const std::vector<float> scores = Scores(n, rng);
  PlanOptions o;
  o.budget = 0.1;  // below all-INT4
  TierPlan p = *PlanTiers(kLlama, DType::kFloat16, n, scores, o);
  EXPECT_EQ(CountsOf(p)[Tier::kInt4], 160u);
  EXPECT_EQ(CountsOf(p)[Tier::kDrop], 240u);
  const std::vector<uint32_t> rank = RankTokens(scores, 4);
  for (uint32_t i = 0; i < n; ++i) {  // the lowest-ranked are the dropped ones
    EXPECT_EQ(p.tiers[rank[i]] == static_cast<uint8_t>(Tier::kDrop), i >= 160) << i;
  }
  o.on_unreachable = OnUnreachable::kReject;
  auto rejected = PlanTiers(kLlama, DType::kFloat16, n, scores, o);
  EXPECT_EQ(rejected.status().code(), absl::StatusCode::kInvalidArgument);
  // A budget that cannot even hold the sinks is an error whatever the mode.
  o.on_unreachable = OnUnreachable::kDrop;
  o.budget = 1e-9;
  EXPECT_EQ(PlanTiers(kLlama, DType::kFloat16, n, scores, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (double bad : {0.0, -0.5, 1.5, double(NAN)}) {
    o.budget = bad;
    EXPECT_FALSE(PlanTiers(kLlama, DType::kFloat16, n, scores, o).ok()) << bad;
  }
}

TEST(PlanTest, BudgetIsNeverExceededOnRandomDraws) {
  const uint64_t seed = testing::FreshSeed();
  std::mt19937_64 rng(seed);
  const Policy policies[] = {Policy::k3Tier,       Policy::k2Tier,       Policy::kSinkProtect,
                             Policy::kUniformInt8, Policy::kUniformInt4, Policy::kPdTrim,
                             Policy::kRandomTier};
  const ModelShape shapes[] = {kLlama, {28, 4, 128}, {42, 8, 256}, {2, 2, 64}};
  int planned = 0;
  for (int draw = 0; draw < 3000; ++draw) {
    const ModelShape shape = shapes[rng() % 4];
    const uint32_t n = 1 + static_cast<uint32_t>(rng() % 5000);
    PlanOptions o;
    o.policy = policies[rng() % 7];
    o.budget = std::uniform_real_distribution<double>(1e-4, 1.0)(rng);
    o.budget_kind = rng() % 2 ? BudgetKind::kWire : BudgetKind::kElement;
    o.quantizer = rng() % 2 ? Quantizer::kKeyChannelNorm : Quantizer::kAbsmax;
    o.sink_tokens = static_cast<uint32_t>(rng() % 9);
    o.first_ratio = std::uniform_real_distribution<double>(0, 1)(rng);
    o.seed = rng();
    if (rng() % 4 == 0) {
      o.per_layer = true;
      o.layer_slope = std::uniform_real_distribution<double>(-0.01, 0.01)(rng);
    }
    const std::vector<float> scores = Scores(n, rng);
    auto plan = PlanTiers(shape, DType::kFloat16, n, scores, o);
    const std::string ctx = "seed " + std::to_string(seed) + " draw " + std::to_string(draw);
    if (!plan.ok()) {
      EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << ctx;
      continue;
    }
    ++planned;
    const double fp16 = double(n) * double(shape.Fp16BytesPerToken());
    if (o.budget_kind == BudgetKind::kWire) {
      EXPECT_LE(double(plan->layout.total_bytes), o.budget * fp16 * (1 + 1e-9)) << ctx;
    } else {
      EXPECT_LE(plan->ElementBudget(), o.budget + 1e-9) << ctx;
    }
    // Sinks are never dropped.
    for (uint32_t m = 0; m < plan->desc.num_maps(); ++m) {
      for (uint32_t s = 0; s < std::min(o.sink_tokens, n); ++s) {
        if (o.policy == Policy::kPdTrim) break;
        EXPECT_NE(plan->MapTiers(m)[s], static_cast<uint8_t>(Tier::kDrop)) << ctx;
      }
    }
  }
  EXPECT_GT(planned, 2000);
}

TEST(PlanTest, WireBudgetCountsMetadata) {
  // The acceptance case, planned by element budget and by wire budget.
  std::mt19937_64 rng(testing::FreshSeed());
  const std::vector<float> scores = Scores(4096, rng);
  PlanOptions o;
  o.budget = 0.5;
  TierPlan p = *PlanTiers(kLlama, DType::kFloat16, 4096, scores, o);
  EXPECT_DOUBLE_EQ(p.ElementBudget(), 0.5);
  EXPECT_LE(p.WireBudget(), 0.51);
  EXPECT_GT(p.WireBudget(), 0.5);
  o.budget_kind = BudgetKind::kWire;
  p = *PlanTiers(kLlama, DType::kFloat16, 4096, scores, o);
  EXPECT_LE(p.WireBudget(), 0.5);
  EXPECT_GT(p.WireBudget(), 0.499);
  EXPECT_LT(p.ElementBudget(), 0.5);
}

TEST(PlanTest, PerLayerBudgetsFollowTheSlope) {
  std::mt19937_64 rng(testing::FreshSeed());
  const std::vector<float> scores = Scores(1000, rng);
  PlanOptions o;
  o.budget = 0.5;
  o.per_layer = true;
  o.layer_slope = 0.01;
  const TierPlan p = *PlanTiers(kLlama, DType::kFloat16, 1000, scores, o);
  ASSERT_EQ(p.desc.num_maps(), 32u);
  for (uint32_t l = 1; l < 32; ++l) EXPECT_GE(Units(p, l), Units(p, l - 1));
  EXPECT_LT(Units(p, 0), Units(p, 31));
  EXPECT_LE(p.ElementBudget(), 0.5 + 1e-12);
  o.layer_slope = 0.5;  // layer 0 would get a negative budget
  EXPECT_EQ(PlanTiers(kLlama, DType::kFloat16, 1000, scores, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PlanTest, PlanFromTiersValidates) {
  EXPECT_TRUE(
      PlanFromTiers(kLlama, DType::kFloat16, 3, {0, 1, 2}, Policy::k3Tier, Quantizer::kAbsmax)
          .ok());
  EXPECT_FALSE(
      PlanFromTiers(kLlama, DType::kFloat16, 3, {0, 1}, Policy::k3Tier, Quantizer::kAbsmax).ok());
  EXPECT_FALSE(
      PlanFromTiers(kLlama, DType::kFloat16, 3, {0, 1, 7}, Policy::k3Tier, Quantizer::kAbsmax)
          .ok());
}

// The device planner ranks on its own and assigns from the skeleton; the skeleton must therefore
// reproduce PlanTiers exactly: same errors, same layout, and with RankTokens the same tiers.
TEST(PlanSkeletonTest, RankedSkeletonIsPlanTiers) {
  const uint64_t seed = testing::FreshSeed();
  std::mt19937_64 rng(seed);
  int ranked = 0;  // cases that rank (the device planner's path), so the test cannot be vacuous
  for (int iter = 0; iter < 600; ++iter) {
    const ModelShape shape{1 + static_cast<uint32_t>(rng() % 6),
                           1 + static_cast<uint32_t>(rng() % 4), 64};
    constexpr uint32_t kSizes[] = {1, 2, 3, 4, 5, 9, 64, 257, 1000, 3001};
    const uint32_t n = kSizes[rng() % std::size(kSizes)];
    const std::vector<float> scores =
        testing::StressScores(n, static_cast<int>(rng() % testing::kScoreKinds), rng);
    const PlanOptions o = testing::RandomPlanOptions(rng);
    const absl::StatusOr<TierPlan> expect = PlanTiers(shape, DType::kFloat16, n, scores, o);
    absl::StatusOr<PlanSkeleton> skeleton = PlanSkeletonFor(shape, DType::kFloat16, n, o);
    ASSERT_EQ(skeleton.status().code(), expect.status().code())
        << "seed " << seed << " iter " << iter << ": " << skeleton.status();
    if (!expect.ok()) continue;
    EXPECT_EQ(skeleton->plan.layout.total_bytes, expect->layout.total_bytes) << seed;
    EXPECT_EQ(skeleton->plan.layout.map_counts, expect->layout.map_counts) << seed;
    ASSERT_EQ(skeleton->segments.size(), skeleton->ranked ? expect->desc.num_maps() : 0u);
    if (skeleton->ranked) {
      ++ranked;
      AssignByRank(*skeleton, RankTokens(scores, o.sink_tokens));
    }
    EXPECT_EQ(testing::ComparePlans(skeleton->plan, expect), "")
        << "seed " << seed << " iter " << iter << " policy " << PolicyName(o.policy);
    for (const MapSegments& m : skeleton->segments) {
      EXPECT_EQ(m.back().end_rank, n);
      for (int i = 1; i < kMaxRankSegments; ++i) EXPECT_LE(m[i - 1].end_rank, m[i].end_rank);
    }
  }
  EXPECT_GT(ranked, 600 / 4) << seed;
}

}  // namespace
}  // namespace spectrumkv
