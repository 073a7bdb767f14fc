// Tests of the codec's C API against the C++ codec path it wraps: same payload bytes, same
// reconstruction, the documented dense layout, dropped rows left alone, and errors as codes.
#include "kernels/capi/spectrumkv_codec.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/api/codec.h"
#include "kernels/registry/codec_registry.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv {
namespace {

// A dense [L][2][n][H][D] array described independently of the C API, following its header.
struct Dense {
  ModelShape shape;
  DType dtype;
  uint32_t n;
  std::vector<uint16_t> data;
  KvLayout layout;
  std::vector<MemoryRegion> regions;
  std::vector<uint32_t> table{0};

  Dense(ModelShape s, DType d, uint32_t tokens)
      : shape(s),
        dtype(d),
        n(tokens),
        data(uint64_t{s.num_layers} * 2 * tokens * s.num_kv_heads * s.head_dim) {
    layout.shape = s;
    layout.dtype = d;
    layout.block_size = n;
    layout.num_blocks = 1;
    const uint64_t row = uint64_t{s.head_dim} * 2, token = row * s.num_kv_heads;
    for (uint32_t l = 0; l < s.num_layers; ++l) {
      layout.keys.push_back({0, (2 * l) * token * n, token * n, token, row});
      layout.values.push_back({0, (2 * l + 1) * token * n, token * n, token, row});
    }
    regions.push_back({data.data(), data.size() * 2});
  }
  KvBuffer View() const { return KvBuffer{&layout, regions, MemoryKind::kHost, table, n}; }
  uint16_t At(uint32_t l, uint32_t kind, uint32_t t, uint32_t h, uint32_t c) const {
    return data[(((uint64_t{l} * 2 + kind) * n + t) * shape.num_kv_heads + h) * shape.head_dim + c];
  }
};

class CapiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char error[256];
    ASSERT_EQ(skv_codec_create("cpu", &codec_, error, sizeof(error)), SKV_OK) << error;
    seed_ = testing::FreshSeed();
    rng_.seed(seed_);
  }
  void TearDown() override { skv_codec_destroy(codec_); }

  skv_dense_kv Desc(const Dense& src, void* dst) const {
    skv_dense_kv kv{};
    kv.num_layers = src.shape.num_layers;
    kv.num_kv_heads = src.shape.num_kv_heads;
    kv.head_dim = src.shape.head_dim;
    kv.num_tokens = src.n;
    kv.dtype = src.dtype == DType::kFloat16 ? "fp16" : "bf16";
    kv.memory_kind = SKV_MEMORY_HOST;
    kv.src = src.data.data();
    kv.dst = dst;
    return kv;
  }

  skv_codec* codec_ = nullptr;
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

constexpr ModelShape kShape{3, 2, 64};

// The C API writes the payload and the reconstruction that the C++ path writes for the same
// input and options, for every policy, every quantizer, both dtypes and every scoring mode.
TEST_F(CapiTest, MatchesTheCppCodecPath) {
  auto cpp = CreateCodec(BackendChoice::kCpu);
  ASSERT_TRUE(cpp.ok()) << cpp.status();
  const uint32_t n = 97;
  const uint32_t window = 8, q_heads = 4;
  std::vector<float> queries(uint64_t{kShape.num_layers} * window * q_heads * kShape.head_dim);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (float& q : queries) q = gauss(rng_);
  std::vector<float> external(n);
  for (float& s : external) s = gauss(rng_);

  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    Dense src(kShape, dtype, n);
    testing::FillRandom(src.View(), rng_);
    for (const char* policy : {"3tier", "2tier", "sinkprotect", "uniform_int8", "uniform_int4",
                               "pdtrim", "random_tier"}) {
      for (const char* quantizer : {"absmax", "kcn", "progressive"}) {
        for (const char* scoring : {"attention", "key_norm", "external", "positional"}) {
          SCOPED_TRACE(std::string(policy) + "/" + quantizer + "/" + scoring +
                       " seed=" + std::to_string(seed_));
          skv_options o;
          skv_options_init(&o);
          o.policy = policy;
          o.quantizer = quantizer;
          o.scoring = scoring;
          o.budget = 0.35;
          o.budget_kind = "wire";
          o.seed = 7;
          o.window_queries = queries.data();
          o.window = window;
          o.num_q_heads = q_heads;
          o.external_scores = external.data();
          Dense dst(kShape, dtype, n);
          std::vector<uint8_t> tiers(n), payload(1 << 20);
          std::vector<float> scores(n);
          std::vector<uint32_t> dropped(n);
          skv_outputs out{};
          out.tiers = tiers.data();
          out.scores = scores.data();
          out.dropped = dropped.data();
          out.payload = payload.data();
          out.payload_capacity = payload.size();
          const skv_dense_kv kv = Desc(src, dst.data.data());
          char error[256];
          ASSERT_EQ(skv_round_trip(codec_, &kv, &o, &out, error, sizeof(error)), SKV_OK) << error;

          // The same through the C++ API on an independently built layout.
          ScoreOptions so;
          so.mode = *ParseScoringMode(scoring);
          so.window_queries = queries;
          so.window = window;
          so.num_q_heads = q_heads;
          so.external_scores = external;
          std::vector<float> cpp_scores(n);
          ASSERT_TRUE(cpp->codec->Score(src.View(), so, cpp_scores).ok());
          PlanOptions po;
          po.policy = *ParsePolicy(policy);
          po.quantizer = *ParseQuantizer(quantizer);
          po.budget = 0.35;
          po.budget_kind = BudgetKind::kWire;
          po.seed = 7;
          po.scoring = static_cast<uint8_t>(so.mode);
          auto plan = PlanTiers(kShape, dtype, n, cpp_scores, po);
          ASSERT_TRUE(plan.ok()) << plan.status();
          auto cpp_payload = PackPayload(*cpp->codec, src.View(), *plan);
          ASSERT_TRUE(cpp_payload.ok());
          Dense cpp_dst(kShape, dtype, n);
          ASSERT_TRUE(
              UnpackPayload(*cpp->codec, *cpp_payload, cpp_dst.View(), cpp_payload->size()).ok());

          EXPECT_EQ(scores, cpp_scores);
          EXPECT_EQ(tiers, plan->tiers);
          ASSERT_EQ(out.payload_bytes, cpp_payload->size());
          EXPECT_EQ(0, std::memcmp(payload.data(), cpp_payload->data(), cpp_payload->size()));
          EXPECT_EQ(dst.data, cpp_dst.data);
          EXPECT_DOUBLE_EQ(out.element_budget, plan->ElementBudget());
          EXPECT_DOUBLE_EQ(out.wire_budget, plan->WireBudget());
          EXPECT_LE(out.wire_budget, 0.35);
          EXPECT_EQ(out.fp16_bytes, uint64_t{n} * kShape.Fp16BytesPerToken());
          EXPECT_EQ(out.num_maps, 1u);
          uint32_t total = 0;
          for (uint32_t c : out.counts) total += c;
          EXPECT_EQ(total, n);
        }
      }
    }
  }
}

// FP16 tokens come back bit-exact; dropped tokens are reported and their destination rows keep
// the caller's contents.
TEST_F(CapiTest, KeepsFp16ExactAndLeavesDroppedRowsAlone) {
  const uint32_t n = 200;
  Dense src(kShape, DType::kFloat16, n);
  testing::FillRandom(src.View(), rng_);
  Dense dst(kShape, DType::kFloat16, n);
  std::fill(dst.data.begin(), dst.data.end(), uint16_t{0x7BFF});  // sentinel
  skv_options o;
  skv_options_init(&o);
  o.policy = "pdtrim";
  o.budget = 0.3;
  std::vector<uint8_t> tiers(n);
  std::vector<uint32_t> dropped(n);
  skv_outputs out{};
  out.tiers = tiers.data();
  out.dropped = dropped.data();
  const skv_dense_kv kv = Desc(src, dst.data.data());
  char error[256];
  ASSERT_EQ(skv_round_trip(codec_, &kv, &o, &out, error, sizeof(error)), SKV_OK) << error;
  EXPECT_EQ(out.counts[0], 60u);  // floor(0.3 * 200) kept at FP16
  EXPECT_EQ(out.counts[3], 140u);
  ASSERT_EQ(out.num_dropped, 140u);
  std::vector<uint32_t> expected_dropped;
  for (uint32_t t = 0; t < n; ++t) {
    if (tiers[t] == 3) expected_dropped.push_back(t);
  }
  dropped.resize(out.num_dropped);
  EXPECT_EQ(dropped, expected_dropped);
  EXPECT_EQ(tiers[0], 0);      // a sink
  EXPECT_EQ(tiers[n - 1], 0);  // the most recent token
  for (uint32_t l = 0; l < kShape.num_layers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < n; ++t) {
        for (uint32_t h = 0; h < kShape.num_kv_heads; ++h) {
          for (uint32_t c = 0; c < kShape.head_dim; ++c) {
            const uint16_t want = tiers[t] == 3 ? uint16_t{0x7BFF} : src.At(l, kind, t, h, c);
            ASSERT_EQ(dst.At(l, kind, t, h, c), want) << l << " " << kind << " " << t;
          }
        }
      }
    }
  }
}

// In place (dst == src) and with precomputed scores gives what a fresh call gives.
TEST_F(CapiTest, InPlaceAndPrecomputedScores) {
  const uint32_t n = 150;
  Dense src(kShape, DType::kBFloat16, n);
  testing::FillRandom(src.View(), rng_);
  skv_options o;
  skv_options_init(&o);
  o.policy = "3tier";
  o.budget = 0.4;
  o.quantizer = "kcn";
  o.scoring = "key_norm";
  std::vector<float> scores(n);
  char error[256];
  skv_dense_kv kv = Desc(src, nullptr);
  ASSERT_EQ(skv_score(codec_, &kv, &o, scores.data(), error, sizeof(error)), SKV_OK) << error;

  Dense fresh(kShape, DType::kBFloat16, n);
  kv = Desc(src, fresh.data.data());
  ASSERT_EQ(skv_round_trip(codec_, &kv, &o, nullptr, error, sizeof(error)), SKV_OK) << error;

  Dense in_place = src;
  in_place.regions[0].base = in_place.data.data();
  kv = Desc(in_place, in_place.data.data());
  o.precomputed_scores = scores.data();
  ASSERT_EQ(skv_round_trip(codec_, &kv, &o, nullptr, error, sizeof(error)), SKV_OK) << error;
  EXPECT_EQ(in_place.data, fresh.data);
  EXPECT_NE(in_place.data, src.data);  // INT8/INT4 rows did change

  // Attention scores computed once, then reused without the queries; the header still says
  // the plan was attention-scored.
  const uint32_t window = 4, q_heads = 4;
  std::vector<float> queries(uint64_t{kShape.num_layers} * window * q_heads * kShape.head_dim);
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (float& q : queries) q = gauss(rng_);
  skv_options_init(&o);
  o.scoring = "attention";
  o.window_queries = queries.data();
  o.window = window;
  o.num_q_heads = q_heads;
  kv = Desc(src, nullptr);
  ASSERT_EQ(skv_score(codec_, &kv, &o, scores.data(), error, sizeof(error)), SKV_OK) << error;
  o.window_queries = nullptr;
  Dense with_queries(kShape, DType::kBFloat16, n), reused(kShape, DType::kBFloat16, n);
  std::vector<uint8_t> payload(1 << 20);
  skv_outputs out{};
  out.payload = payload.data();
  out.payload_capacity = payload.size();
  kv = Desc(src, reused.data.data());
  EXPECT_EQ(skv_round_trip(codec_, &kv, &o, &out, error, sizeof(error)), SKV_INVALID_ARGUMENT);
  o.precomputed_scores = scores.data();
  ASSERT_EQ(skv_round_trip(codec_, &kv, &o, &out, error, sizeof(error)), SKV_OK) << error;
  EXPECT_EQ(payload[14], static_cast<uint8_t>(ScoringMode::kAttention));  // header scoring byte
  o.precomputed_scores = nullptr;
  o.window_queries = queries.data();
  kv = Desc(src, with_queries.data.data());
  ASSERT_EQ(skv_round_trip(codec_, &kv, &o, nullptr, error, sizeof(error)), SKV_OK) << error;
  EXPECT_EQ(reused.data, with_queries.data);
}

TEST_F(CapiTest, ErrorsAreCodesWithMessages) {
  const uint32_t n = 32;
  Dense src(kShape, DType::kFloat16, n);
  testing::FillRandom(src.View(), rng_);
  std::vector<uint16_t> dst(src.data.size());
  skv_options o;
  skv_options_init(&o);
  char error[256];
  skv_dense_kv kv = Desc(src, dst.data());

  auto expect = [&](skv_status want, const char* fragment) {
    error[0] = '\0';
    EXPECT_EQ(skv_round_trip(codec_, &kv, &o, nullptr, error, sizeof(error)), want) << error;
    EXPECT_NE(std::string(error).find(fragment), std::string::npos) << error;
    kv = Desc(src, dst.data());
    skv_options_init(&o);
  };
  o.policy = "4tier";
  expect(SKV_INVALID_ARGUMENT, "policy");
  o.quantizer = "int3";
  expect(SKV_INVALID_ARGUMENT, "quantizer");
  o.budget_kind = "bytes";
  expect(SKV_INVALID_ARGUMENT, "budget_kind");
  o.scoring = "attention";  // no queries
  expect(SKV_INVALID_ARGUMENT, "window_queries");
  o.struct_size = 8;
  expect(SKV_INVALID_ARGUMENT, "struct_size");
  o.budget = 0.1;
  o.on_unreachable = "reject";
  expect(SKV_INVALID_ARGUMENT, "budget");
  o.budget = 1.5;
  expect(SKV_INVALID_ARGUMENT, "budget");
  kv.head_dim = 60;
  expect(SKV_INVALID_ARGUMENT, "head_dim");
  kv.dtype = "fp8";
  expect(SKV_INVALID_ARGUMENT, "dtype");
  kv.dst = nullptr;
  expect(SKV_INVALID_ARGUMENT, "kv.dst");
  kv.memory_kind = SKV_MEMORY_DEVICE;
  expect(SKV_INVALID_ARGUMENT, "host memory");
  kv.num_tokens = 0;
  expect(SKV_INVALID_ARGUMENT, "num_tokens");

  EXPECT_EQ(skv_round_trip(nullptr, &kv, &o, nullptr, error, sizeof(error)), SKV_INVALID_ARGUMENT);
  EXPECT_EQ(skv_round_trip(codec_, &kv, &o, nullptr, nullptr, 0), SKV_OK);  // no error buffer
  // A tiny error buffer gets a truncated, terminated message.
  o.policy = "4tier";
  char tiny[6];
  EXPECT_EQ(skv_round_trip(codec_, &kv, &o, nullptr, tiny, sizeof(tiny)), SKV_INVALID_ARGUMENT);
  EXPECT_EQ(std::strlen(tiny), 5u);

  skv_codec* other = nullptr;
  EXPECT_EQ(skv_codec_create("tpu", &other, error, sizeof(error)), SKV_INVALID_ARGUMENT);
  EXPECT_EQ(other, nullptr);
  EXPECT_NE(std::string(error).find("tpu"), std::string::npos);
}

TEST_F(CapiTest, DescribesItsBackend) {
  EXPECT_EQ(skv_capi_version(), SKV_CAPI_VERSION);
  EXPECT_EQ(std::string(skv_codec_name(codec_)).rfind("cpu-", 0), 0u);
  EXPECT_FALSE(std::string(skv_codec_reason(codec_)).empty());
  EXPECT_EQ(skv_codec_memory_kind(codec_), SKV_MEMORY_HOST);
  skv_codec* automatic = nullptr;
  char error[256];
  ASSERT_EQ(skv_codec_create("auto", &automatic, error, sizeof(error)), SKV_OK) << error;
  EXPECT_EQ(skv_codec_memory_kind(automatic), SKV_MEMORY_HOST);
  skv_codec_destroy(automatic);
}

}  // namespace
}  // namespace spectrumkv
