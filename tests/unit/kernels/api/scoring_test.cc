#include "kernels/api/scoring.h"

#include <atomic>
#include <cmath>
#include <random>
#include <thread>
#include <vector>

#include "client/kvgen/synthetic.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_codec.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv {
namespace {

TEST(ScoringTest, PositionalHeuristicShape) {
  std::vector<float> s(1000);
  PositionalScores(s);
  for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(s[i], 1.0f);
  EXPECT_GT(s[4], s[100]);    // decays from the front
  EXPECT_GT(s[999], s[500]);  // recent 20% boosted
  EXPECT_GE(s[800], s[799]);
  EXPECT_FLOAT_EQ(*std::min_element(s.begin(), s.end()), 0.0f);
}

TEST(ScoringTest, PoolAndDecay) {
  std::vector<float> s = {0, 0, 5, 0, 0, 0, 0, 1};
  PoolAndDecay(s, 3, 0.0);
  EXPECT_EQ(s, (std::vector<float>{0, 5, 5, 5, 0, 0, 1, 1}));
  std::vector<float> d = {1, 1, 1};
  PoolAndDecay(d, 1, std::log(2.0));
  EXPECT_FLOAT_EQ(d[0], 0.25f);
  EXPECT_FLOAT_EQ(d[2], 1.0f);
}

TEST(ScoringTest, OptionsAreValidated) {
  const ModelShape shape{2, 2, 64};
  ScoreOptions o;
  o.mode = ScoringMode::kExternal;
  std::vector<float> ext(9);
  o.external_scores = ext;
  EXPECT_FALSE(ValidateScoreOptions(o, shape, 10).ok());
  o.mode = ScoringMode::kAttention;
  std::vector<float> q(2 * 4 * 6 * 64);
  o.window_queries = q;
  o.window = 4;
  o.num_q_heads = 6;
  EXPECT_TRUE(ValidateScoreOptions(o, shape, 10).ok());
  o.num_q_heads = 5;
  EXPECT_FALSE(ValidateScoreOptions(o, shape, 10).ok());
  o.num_q_heads = 6;
  o.window = 11;
  EXPECT_FALSE(ValidateScoreOptions(o, shape, 10).ok());
  o.window = 4;
  o.pool_kernel = 4;
  EXPECT_FALSE(ValidateScoreOptions(o, shape, 10).ok());
  o.pool_kernel = 5;
  q[3] = NAN;
  EXPECT_FALSE(ValidateScoreOptions(o, shape, 10).ok());
}

class CpuScoringTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pool_ = testing::MakePool(kvgen::PoolLayoutKind::kVllmNhd, shape_, DType::kFloat16, 8, 50, 1);
    std::mt19937_64 rng(testing::FreshSeed());
    testing::FillRandom(pool_.View(), rng);
  }
  const ModelShape shape_{2, 2, 64};
  testing::TestPool pool_;
};

// Σ over layers, K and V, heads of the row norms, / (layers * heads), in double.
void ExpectKeyNormScores(const KvBuffer& kv, std::span<const float> scores) {
  const ModelShape& shape = kv.layout->shape;
  for (uint32_t t = 0; t < kv.num_tokens; ++t) {
    double expect = 0;
    for (uint32_t l = 0; l < shape.num_layers; ++l) {
      for (bool v : {false, true}) {
        for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
          double ss = 0;
          const uint16_t* row = HostRowPtr(kv, l, v, t, h);
          for (uint32_t c = 0; c < shape.head_dim; ++c) {
            ss += double(HalfToFloat(row[c])) * HalfToFloat(row[c]);
          }
          expect += std::sqrt(ss);
        }
      }
    }
    expect /= shape.num_layers * shape.num_kv_heads;
    EXPECT_NEAR(scores[t], expect, 1e-4 * expect + 1e-6) << t;
  }
}

TEST_F(CpuScoringTest, KeyNormIsTheMeanOfRowNorms) {
  for (auto* kernels : {&ScalarRowKernels(), Avx2RowKernels()}) {
    if (kernels == nullptr) continue;
    CpuCodec codec(*kernels);
    std::vector<float> scores(50);
    ASSERT_TRUE(codec.Score(pool_.View(), ScoreOptions{}, scores).ok());
    ExpectKeyNormScores(pool_.View(), scores);
  }
}

TEST(CpuKeyNormTest, HeadCountsAndDimsOffTheVectorWidths) {
  // 11 heads: a group of 8 and a group of 3 in the AVX2 kernel; head_dim 40: a 32-wide step
  // and an 8-wide one. HND layout: heads strided by a whole block of tokens. 600 tokens: two
  // threads when three are allowed (one per 256 tokens at most).
  std::mt19937_64 rng(testing::FreshSeed());
  for (auto kind : {kvgen::PoolLayoutKind::kVllmNhd, kvgen::PoolLayoutKind::kVllmHnd}) {
    testing::TestPool pool =
        testing::MakePool(kind, ModelShape{3, 11, 40}, DType::kFloat16, 16, 600, rng());
    testing::FillRandom(pool.View(), rng);
    for (auto* kernels : {&ScalarRowKernels(), Avx2RowKernels()}) {
      if (kernels == nullptr) continue;
      for (uint32_t threads : {1u, 3u}) {
        CpuCodec codec(*kernels);
        codec.set_score_threads(threads);
        std::vector<float> scores(pool.View().num_tokens);
        ASSERT_TRUE(codec.Score(pool.View(), ScoreOptions{}, scores).ok());
        ExpectKeyNormScores(pool.View(), scores);
      }
    }
  }
}

TEST(CpuKeyNormTest, PassesFromSeveralThreadsAtOnce) {
  // One codec scoring on 4, 1 and 3 threads, four callers at once, each pass run twice (the
  // daemon's workers share one codec). Every pass must see its own buffer and its own ranges.
  std::mt19937_64 rng(testing::FreshSeed());
  std::vector<testing::TestPool> pools;
  for (int i = 0; i < 4; ++i) {
    pools.push_back(testing::MakePool(kvgen::PoolLayoutKind::kVllmNhd, ModelShape{2, 4, 32},
                                      DType::kFloat16, 16, 1000 + 100 * i, rng()));
    testing::FillRandom(pools.back().View(), rng);
  }
  CpuCodec codec(ScalarRowKernels());
  for (uint32_t threads : {4u, 1u, 3u}) {
    codec.set_score_threads(threads);
    std::vector<std::vector<float>> scores(pools.size());
    std::vector<std::thread> callers;
    std::atomic<int> failures{0};
    for (size_t i = 0; i < pools.size(); ++i) {
      callers.emplace_back([&, i] {
        scores[i].resize(pools[i].View().num_tokens);
        for (int rep = 0; rep < 2; ++rep) {
          if (!codec.Score(pools[i].View(), ScoreOptions{}, scores[i]).ok()) ++failures;
        }
      });
    }
    for (std::thread& t : callers) t.join();
    ASSERT_EQ(failures.load(), 0);
    for (size_t i = 0; i < pools.size(); ++i) ExpectKeyNormScores(pools[i].View(), scores[i]);
  }
}

TEST_F(CpuScoringTest, AttentionFindsTheKeyTheQueriesLookFor) {
  const KvBuffer kv = pool_.View();
  kvgen::SyntheticOptions syn;
  syn.sink_scale = 1.0f;
  syn.token_spread = 0.0f;
  syn.outlier_channels = 0;
  kvgen::FillSynthetic(kv, syn);
  for (uint32_t l = 0; l < 2; ++l) {  // token 17's keys: a ±1 pattern
    for (uint32_t h = 0; h < 2; ++h) {
      uint16_t* key = HostRowPtr(kv, l, false, 17, h);
      for (int c = 0; c < 64; ++c) key[c] = FloatToHalfRne((c * 7 + h) % 3 ? 1.0f : -1.0f);
    }
  }
  // Every window query of every head points at token 17's key: its score must dominate.
  const uint32_t w = 4, hq = 4;
  std::vector<float> q(2 * w * hq * 64);
  for (uint32_t l = 0; l < 2; ++l) {
    for (uint32_t i = 0; i < w; ++i) {
      for (uint32_t h = 0; h < hq; ++h) {
        const uint16_t* key = HostRowPtr(kv, l, false, 17, h / 2);
        for (int c = 0; c < 64; ++c) {
          q[((l * w + i) * hq + h) * 64 + c] = 4.0f * HalfToFloat(key[c]);
        }
      }
    }
  }
  ScoreOptions o;
  o.mode = ScoringMode::kAttention;
  o.window_queries = q;
  o.window = w;
  o.num_q_heads = hq;
  o.pool_kernel = 1;
  CpuCodec codec(*(Avx2RowKernels() ? Avx2RowKernels() : &ScalarRowKernels()));
  std::vector<float> scores(50);
  ASSERT_TRUE(codec.Score(kv, o, scores).ok());
  const auto best = std::max_element(scores.begin(), scores.end()) - scores.begin();
  EXPECT_EQ(best, 17);
  // Total mass = layers * q heads * window queries (each softmax sums to 1).
  double total = 0;
  for (float s : scores) total += s;
  EXPECT_NEAR(total, 2.0 * hq * w, 1e-3);
}

}  // namespace
}  // namespace spectrumkv
