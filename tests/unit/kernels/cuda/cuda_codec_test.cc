// Tests specific to the CUDA backend, beyond the conformance suite: shapes that exercise every
// warp geometry, many layers with few tokens (one launch for all of them), multi-range segments,
// 2-byte aligned rows, corruption in the middle of a layer range, concurrent calls, both
// attention paths, the self-test and the registry. They skip where no GPU exists.
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_codec.h"
#include "kernels/cuda/cuda_codec.h"
#include "kernels/cuda/device.h"
#include "kernels/registry/codec_registry.h"
#include "tests/conformance/backend_harness.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv::testing {
namespace {

using kvgen::PoolLayoutKind;

class CudaCodecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    harness_ = CudaHarnesses().at(0).second();
    const std::string why = harness_->Unavailable();
    if (!why.empty()) GTEST_SKIP() << "cuda unavailable: " << why;
    seed_ = FreshSeed();
    rng_.seed(seed_);
  }

  CudaCodec& cuda() { return static_cast<CudaCodec&>(harness_->codec()); }

  absl::StatusOr<std::vector<uint8_t>> Pack(const KvBuffer& src, const TierPlan& plan) {
    const KvBuffer dev = harness_->Upload(src);
    std::span<uint8_t> payload = harness_->AllocPayload(plan.layout.total_bytes);
    std::vector<uint8_t> prelude(plan.layout.prelude_bytes);
    WritePrelude(plan.layout, plan.tiers, prelude);
    harness_->PayloadFromHost(prelude, payload.first(prelude.size()));
    SPECTRUMKV_RETURN_IF_ERROR(
        harness_->codec().PackLayers(dev, plan, 0, plan.desc.shape.num_layers, payload));
    return harness_->PayloadToHost(payload);
  }

  absl::Status Unpack(const std::vector<uint8_t>& bytes, const KvBuffer& dst, uint32_t first,
                      uint32_t last, VerifyMode mode = VerifyMode::kVerify) {
    SPECTRUMKV_ASSIGN_OR_RETURN(ParsedPrelude prelude, ParsePrelude(bytes, bytes.size()));
    const KvBuffer dev = harness_->Upload(dst);
    std::span<uint8_t> payload = harness_->AllocPayload(bytes.size());
    harness_->PayloadFromHost(bytes, payload);
    const absl::Status s = harness_->codec().UnpackLayers(prelude, payload, dev, first, last, mode);
    harness_->Download(dev, dst);
    return s;
  }

  // Packs with both backends and compares bytes, then unpacks the payload with both (into a
  // different layout) and compares bits.
  void ExpectLikeTheReference(const KvBuffer& src, const TierPlan& plan, const std::string& what,
                              PoolLayoutKind dst_kind = PoolLayoutKind::kVllmHnd) {
    auto got = Pack(src, plan);
    ASSERT_TRUE(got.ok()) << what << ": " << got.status();
    auto expect = PackPayload(reference_, src, plan);
    ASSERT_TRUE(expect.ok()) << expect.status();
    ASSERT_EQ(got->size(), expect->size()) << what;
    for (size_t i = 0; i < got->size(); ++i) {
      ASSERT_EQ((*got)[i], (*expect)[i]) << what << " seed " << seed_ << ": byte " << i;
    }
    const ModelShape& shape = plan.desc.shape;
    TestPool ours = MakePool(dst_kind, shape, plan.desc.dtype, 8, plan.desc.num_tokens, 3);
    TestPool theirs = MakePool(dst_kind, shape, plan.desc.dtype, 8, plan.desc.num_tokens, 3);
    ASSERT_TRUE(Unpack(*expect, ours.View(), 0, shape.num_layers).ok()) << what;
    ASSERT_TRUE(UnpackPayload(reference_, *expect, theirs.View(), expect->size()).ok());
    for (size_t r = 0; r < ours.pool->regions().size(); ++r) {
      const MemoryRegion& a = ours.pool->regions()[r];
      const MemoryRegion& b = theirs.pool->regions()[r];
      ASSERT_EQ(std::memcmp(a.base, b.base, a.size_bytes), 0) << what << " region " << r;
    }
  }

  std::unique_ptr<BackendHarness> harness_;
  CpuCodec reference_{ScalarRowKernels()};
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

TEST_F(CudaCodecTest, EveryWarpGeometry) {
  // head_dim 8 (32 rows per warp step), 24 (4 lanes a row, one idle), 72, 256 (a warp a row),
  // 264 and 520 (two chunks a lane), 1024 (four).
  for (uint32_t dim : {8u, 24u, 72u, 256u, 264u, 520u, 1024u}) {
    for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
      for (Quantizer q : {Quantizer::kAbsmax, Quantizer::kKeyChannelNorm}) {
        const ModelShape shape{2, 3, dim};
        const uint32_t n = 29 + static_cast<uint32_t>(rng_() % 40);
        TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, dtype, 16, n, rng_());
        FillRandom(src.View(), rng_);
        const TierPlan plan =
            *PlanFromTiers(shape, dtype, n, RandomTiers(2, n, rng_), Policy::k3Tier, q);
        ExpectLikeTheReference(
            src.View(), plan,
            absl::StrFormat("dim %u %s %s", dim, DTypeName(dtype), QuantizerName(q)));
      }
    }
  }
}

TEST_F(CudaCodecTest, ManyLayersFewTokensInOneCall) {
  const ModelShape shape{80, 8, 128};
  for (uint32_t n : {1u, 7u, 300u}) {
    TestPool src = MakePool(PoolLayoutKind::kTrtllm, shape, DType::kBFloat16, 32, n, rng_());
    FillRandom(src.View(), rng_);
    const TierPlan plan = *PlanFromTiers(shape, DType::kBFloat16, n, RandomTiers(80, n, rng_),
                                         Policy::k3Tier, Quantizer::kKeyChannelNorm);
    ExpectLikeTheReference(src.View(), plan, absl::StrFormat("80 layers, %u tokens", n));
  }
}

TEST_F(CudaCodecTest, PlannedLargeTransferSpansManyRanges) {
  const ModelShape shape{4, 8, 128};
  const uint32_t n = 6000;
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
  FillRandom(src.View(), rng_);
  std::vector<float> scores(n);
  ASSERT_TRUE(reference_.Score(src.View(), ScoreOptions{}, scores).ok());
  for (double b : {0.3, 0.5, 0.8}) {
    PlanOptions o;
    o.budget = b;
    o.quantizer = b == 0.3 ? Quantizer::kKeyChannelNorm : Quantizer::kAbsmax;
    const TierPlan plan = *PlanTiers(shape, DType::kFloat16, n, scores, o);
    ExpectLikeTheReference(src.View(), plan, absl::StrFormat("b %g", b), PoolLayoutKind::kSglang);
  }
}

// A layout whose rows are only 2-byte aligned: one region per layer and part, a 2-byte gap
// between tokens and a 2-byte offset.
struct UnalignedKv {
  KvLayout layout;
  std::vector<std::vector<uint8_t>> memory;
  std::vector<MemoryRegion> regions;
  std::vector<uint32_t> table;
  KvBuffer View(uint32_t n) const { return {&layout, regions, MemoryKind::kHost, table, n}; }
};

UnalignedKv MakeUnaligned(const ModelShape& shape, DType dtype, uint32_t n) {
  UnalignedKv kv;
  kv.layout.shape = shape;
  kv.layout.dtype = dtype;
  kv.layout.block_size = 4;
  kv.layout.num_blocks = (n + 3) / 4;
  const uint64_t token = uint64_t{shape.num_kv_heads} * shape.head_dim * 2 + 2;
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    for (int p = 0; p < 2; ++p) {
      TensorPlacement t;
      t.region = 2 * l + p;
      t.offset_bytes = 2;
      t.block_stride_bytes = 4 * token;
      t.token_stride_bytes = token;
      t.head_stride_bytes = uint64_t{shape.head_dim} * 2;
      (p == 0 ? kv.layout.keys : kv.layout.values).push_back(t);
      kv.memory.emplace_back(2 + kv.layout.num_blocks * 4 * token, 0);
    }
  }
  for (auto& m : kv.memory) kv.regions.push_back({m.data(), m.size()});
  for (uint32_t b = 0; b < kv.layout.num_blocks; ++b) {
    kv.table.push_back(static_cast<uint32_t>((b * 7 + 3) % kv.layout.num_blocks));
  }
  return kv;
}

TEST_F(CudaCodecTest, TwoByteAlignedRows) {
  const ModelShape shape{2, 3, 64};
  const uint32_t n = 50;
  UnalignedKv src = MakeUnaligned(shape, DType::kFloat16, n);
  FillRandom(src.View(n), rng_);
  const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, n, RandomTiers(1, n, rng_),
                                       Policy::k3Tier, Quantizer::kKeyChannelNorm);
  ExpectLikeTheReference(src.View(n), plan, "2-byte aligned source");
  // Unpack into 2-byte aligned rows too.
  const std::vector<uint8_t> payload = *PackPayload(reference_, src.View(n), plan);
  UnalignedKv ours = MakeUnaligned(shape, DType::kFloat16, n);
  UnalignedKv theirs = MakeUnaligned(shape, DType::kFloat16, n);
  ASSERT_TRUE(Unpack(payload, ours.View(n), 0, 2).ok());
  ASSERT_TRUE(UnpackPayload(reference_, payload, theirs.View(n), payload.size()).ok());
  EXPECT_EQ(ours.memory, theirs.memory);
  // Scores on the CUDA-core attention path (the tensor-core path needs 16-byte rows), on KV of
  // moderate magnitudes (see FillGaussian).
  FillGaussian(src.View(n), rng_, 2.0f);
  std::vector<float> queries(2 * 8 * 6 * 64);
  std::normal_distribution<float> g;
  for (float& q : queries) q = g(rng_);
  ScoreOptions o;
  o.mode = ScoringMode::kAttention;
  o.window_queries = queries;
  o.window = 8;
  o.num_q_heads = 6;
  std::vector<float> got(n), expect(n);
  ASSERT_TRUE(cuda().Score(harness_->Upload(src.View(n)), o, got).ok());
  EXPECT_FALSE(cuda().last_attention_used_tensor_cores());
  ASSERT_TRUE(reference_.Score(src.View(n), o, expect).ok());
  for (uint32_t t = 0; t < n; ++t) {
    EXPECT_NEAR(got[t], expect[t], 1e-4 * std::fabs(expect[t]) + 1e-6) << "token " << t;
  }
}

TEST_F(CudaCodecTest, CorruptLayerStopsTheRangeThere) {
  const ModelShape shape{4, 2, 64};
  const uint32_t n = 40;
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
  FillRandom(src.View(), rng_);
  const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, n, RandomTiers(1, n, rng_),
                                       Policy::k3Tier, Quantizer::kAbsmax);
  std::vector<uint8_t> payload = *PackPayload(reference_, src.View(), plan);
  const LayerSection& bad = plan.layout.layers[2];
  payload[bad.begin + rng_() % (bad.crc_offset - bad.begin)] ^= 0x10;
  TestPool ours = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, 5);
  const absl::Status s = Unpack(payload, ours.View(), 0, 4);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_NE(s.message().find("layer 2"), std::string::npos) << s;
  // Layers 0 and 1 are written as the reference writes them; 2 and 3 are untouched.
  TestPool theirs = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, 5);
  ParsedPrelude prelude = *ParsePrelude(payload, payload.size());
  ASSERT_TRUE(
      reference_.UnpackLayers(prelude, payload, theirs.View(), 0, 2, VerifyMode::kVerify).ok());
  for (size_t r = 0; r < ours.pool->regions().size(); ++r) {
    const MemoryRegion& a = ours.pool->regions()[r];
    const MemoryRegion& b = theirs.pool->regions()[r];
    EXPECT_EQ(std::memcmp(a.base, b.base, a.size_bytes), 0) << "region " << r;
  }
  // Trailer padding that is not zero is refused too.
  std::vector<uint8_t> padded = *PackPayload(reference_, src.View(), plan);
  padded[plan.layout.layers[1].crc_offset + 9] = 1;
  EXPECT_EQ(Unpack(padded, ours.View(), 1, 2).code(), absl::StatusCode::kDataLoss);
  // Already verified: written as given.
  EXPECT_TRUE(Unpack(payload, ours.View(), 3, 4, VerifyMode::kAlreadyVerified).ok());
}

TEST_F(CudaCodecTest, RefusesNonFiniteKcnKeys) {
  const ModelShape shape{2, 2, 64};
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kBFloat16, 16, 12, rng_());
  FillRandom(src.View(), rng_);
  HostRowPtr(src.View(), 1, false, 6, 1)[9] = 0xFF80;  // -inf in K of token 6, layer 1
  std::vector<uint8_t> tiers(12, 0);
  TierPlan plan = *PlanFromTiers(shape, DType::kBFloat16, 12, tiers, Policy::k3Tier,
                                 Quantizer::kKeyChannelNorm);
  EXPECT_TRUE(Pack(src.View(), plan).ok());  // FP16: sent as is
  tiers[6] = 2;
  plan = *PlanFromTiers(shape, DType::kBFloat16, 12, tiers, Policy::k3Tier,
                        Quantizer::kKeyChannelNorm);
  const auto got = Pack(src.View(), plan);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(got.status().message().find("layer 1 K token 6 head 1"), std::string::npos)
      << got.status();
}

TEST_F(CudaCodecTest, ConcurrentCallsOnDifferentData) {
  const ModelShape shape{3, 4, 128};
  const uint32_t n = 500;
  std::vector<TestPool> pools;
  std::vector<TierPlan> plans;
  for (int i = 0; i < 4; ++i) {
    pools.push_back(MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_()));
    FillRandom(pools.back().View(), rng_);
    plans.push_back(*PlanFromTiers(shape, DType::kFloat16, n, RandomTiers(1, n, rng_),
                                   Policy::k3Tier, Quantizer::kKeyChannelNorm));
  }
  std::vector<KvBuffer> dev;
  std::vector<std::span<uint8_t>> payloads;
  for (int i = 0; i < 4; ++i) {
    dev.push_back(harness_->Upload(pools[i].View()));
    payloads.push_back(harness_->AllocPayload(plans[i].layout.total_bytes));
    std::vector<uint8_t> prelude(plans[i].layout.prelude_bytes);
    WritePrelude(plans[i].layout, plans[i].tiers, prelude);
    harness_->PayloadFromHost(prelude, payloads[i].first(prelude.size()));
  }
  std::vector<absl::Status> status(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int rep = 0; rep < 5 && status[i].ok(); ++rep) {
        status[i] = cuda().PackLayers(dev[i], plans[i], 0, 3, payloads[i]);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(status[i].ok()) << status[i];
    EXPECT_EQ(harness_->PayloadToHost(payloads[i]),
              *PackPayload(reference_, pools[i].View(), plans[i]))
        << "thread " << i;
  }
}

TEST_F(CudaCodecTest, AttentionScoresOnBothPaths) {
  // head_dim 128 and 256 run on tensor cores; 320 on CUDA cores. GQA groups of 4 and 7.
  struct AttnCase {
    ModelShape shape;
    DType dtype;
    uint32_t n, window, group;
    bool tensor;
  };
  const AttnCase cases[] = {
      {{2, 4, 128}, DType::kFloat16, 900, 32, 4, true},
      {{2, 2, 128}, DType::kBFloat16, 700, 32, 7, true},
      {{1, 2, 256}, DType::kFloat16, 333, 16, 2, true},
      {{1, 1, 320}, DType::kBFloat16, 200, 8, 3, false},
  };
  for (const AttnCase& c : cases) {
    TestPool src = MakePool(PoolLayoutKind::kVllmNhd, c.shape, c.dtype, 16, c.n, rng_());
    FillGaussian(src.View(), rng_, 2.0f);
    std::vector<float> queries(uint64_t{c.shape.num_layers} * c.window * c.group *
                               c.shape.num_kv_heads * c.shape.head_dim);
    std::normal_distribution<float> g;
    for (float& q : queries) q = g(rng_);
    ScoreOptions o;
    o.mode = ScoringMode::kAttention;
    o.window_queries = queries;
    o.window = c.window;
    o.num_q_heads = c.group * c.shape.num_kv_heads;
    o.recency_decay = 0.001;
    std::vector<float> got(c.n), expect(c.n);
    ASSERT_TRUE(cuda().Score(harness_->Upload(src.View()), o, got).ok());
    EXPECT_EQ(cuda().last_attention_used_tensor_cores(), c.tensor) << c.shape.head_dim;
    ASSERT_TRUE(reference_.Score(src.View(), o, expect).ok());
    for (uint32_t t = 0; t < c.n; ++t) {
      ASSERT_NEAR(got[t], expect[t], 1e-4 * std::fabs(expect[t]) + 1e-6)
          << "dim " << c.shape.head_dim << " token " << t << " seed " << seed_;
    }
  }
}

// Device planning from device-resident scores equals the host planner on the same scores, at
// sizes around the list kernels' 2048-token chunks and large ones, with stress scores (ties,
// -0.0, NaNs, infinities) and random options (every policy, per-layer budgets, sinks beyond n).
TEST_F(CudaCodecTest, DevicePlanEqualsHostPlan) {
  constexpr uint32_t kSizes[] = {1, 3, 4, 5, 31, 1000, 2047, 2048, 2049, 4100, 40000, 131075};
  int ranked = 0, total = 0;  // plans ranked on the device (the rest fail or need no ranking)
  for (uint32_t n : kSizes) {
    cuda::DeviceBuffer scores = *cuda::DeviceBuffer::Allocate(4 * uint64_t{n});
    const int iters = n > 50000 ? 6 : 20;
    for (int iter = 0; iter < iters; ++iter) {
      const ModelShape shape{1 + static_cast<uint32_t>(rng_() % 8),
                             1 + static_cast<uint32_t>(rng_() % 4), 128};
      const int kind = static_cast<int>(rng_() % kScoreKinds);
      const std::vector<float> host = StressScores(n, kind, rng_);
      ASSERT_TRUE(cuda::CopyToDevice(scores.data(), host.data(), 4 * uint64_t{n}).ok());
      PlanOptions o = RandomPlanOptions(rng_);
      if (iter % 4 == 0) o.sink_tokens = n + 3;  // every token a sink
      const absl::StatusOr<PlanSkeleton> skeleton = PlanSkeletonFor(shape, DType::kFloat16, n, o);
      ranked += skeleton.ok() && skeleton->ranked;
      ++total;
      const std::string diff =
          ComparePlans(cuda().PlanOnDevice({reinterpret_cast<const float*>(scores.data()), n},
                                           shape, DType::kFloat16, o),
                       PlanTiers(shape, DType::kFloat16, n, host, o));
      ASSERT_EQ(diff, "") << "n " << n << " kind " << kind << " policy " << PolicyName(o.policy)
                          << " per_layer " << o.per_layer << " seed " << seed_;
    }
  }
  EXPECT_GT(ranked, total / 5) << "seed " << seed_;
}

// ScorePlanPack (score, plan, lists and prelude on the device, no host round trip) writes the
// reference's payload for the host plan of the same scores, and returns that plan.
TEST_F(CudaCodecTest, ScorePlanPackEqualsTheHostPath) {
  const ModelShape shape{4, 2, 128};
  for (uint32_t n : {6u, 300u, 2100u}) {
    for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
      TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, dtype, 16, n, rng_());
      FillGaussian(src.View(), rng_);
      const KvBuffer dev = harness_->Upload(src.View());
      const uint32_t window = std::min(n, 16u);
      std::vector<float> queries(uint64_t{shape.num_layers} * window * 8 * shape.head_dim);
      std::normal_distribution<float> g;
      for (float& q : queries) q = g(rng_);
      std::vector<float> external = StressScores(n, 1, rng_);
      for (int mode = 0; mode < 3; ++mode) {
        ScoreOptions so;
        if (mode == 0) so.mode = ScoringMode::kKeyNorm;
        if (mode == 1) {
          so.mode = ScoringMode::kAttention;
          so.window_queries = queries;
          so.window = window;
          so.num_q_heads = 8;
          so.recency_decay = 0.002;
        }
        if (mode == 2) {
          so.mode = ScoringMode::kExternal;
          so.external_scores = external;
        }
        std::vector<float> scores(n);
        ASSERT_TRUE(cuda().Score(dev, so, scores).ok());
        for (int k = 0; k < 5; ++k) {
          PlanOptions po = RandomPlanOptions(rng_);
          po.scoring = static_cast<uint8_t>(so.mode);
          const absl::StatusOr<TierPlan> host = PlanTiers(shape, dtype, n, scores, po);
          absl::StatusOr<PlanSkeleton> skeleton = PlanSkeletonFor(shape, dtype, n, po);
          ASSERT_EQ(skeleton.ok(), host.ok());
          if (!host.ok()) continue;
          std::span<uint8_t> payload = harness_->AllocPayload(host->layout.total_bytes);
          const absl::StatusOr<TierPlan> got = cuda().ScorePlanPack(dev, so, po, payload);
          const std::string what =
              absl::StrFormat("n %u %s mode %d policy %s per_layer %d seed %u", n, DTypeName(dtype),
                              mode, PolicyName(po.policy), po.per_layer, seed_);
          ASSERT_EQ(ComparePlans(got, host), "") << what;
          const std::vector<uint8_t> bytes = harness_->PayloadToHost(payload);
          const std::vector<uint8_t> expect = *PackPayload(reference_, src.View(), *host);
          ASSERT_EQ(bytes.size(), expect.size()) << what;
          for (size_t i = 0; i < bytes.size(); ++i) {
            ASSERT_EQ(bytes[i], expect[i]) << what << ": byte " << i;
          }
        }
      }
    }
  }
}

TEST_F(CudaCodecTest, SelfTestPasses) { EXPECT_TRUE(cuda().SelfTest().ok()); }

TEST_F(CudaCodecTest, RegistryPicksCudaOnlyForDeviceMemoryCallers) {
  auto cuda_choice = CreateCodec(BackendChoice::kCuda);
  ASSERT_TRUE(cuda_choice.ok()) << cuda_choice.status();
  EXPECT_EQ(cuda_choice->codec->name(), "cuda");
  EXPECT_EQ(cuda_choice->codec->memory_kind(), MemoryKind::kDevice);
  auto automatic = CreateCodec(BackendChoice::kAuto);
  ASSERT_TRUE(automatic.ok());
  EXPECT_EQ(automatic->codec->name(), "cuda") << automatic->reason;
  auto host_only = CreateCodec(BackendChoice::kAuto, CodecRequirements{.host_memory_only = true});
  ASSERT_TRUE(host_only.ok());
  EXPECT_EQ(host_only->codec->memory_kind(), MemoryKind::kHost);
  EXPECT_EQ(CreateCodec(BackendChoice::kCuda, CodecRequirements{.host_memory_only = true})
                .status()
                .code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(CudaCodecTest, RefusesHostMemory) {
  const ModelShape shape{1, 1, 64};
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, 8, rng_());
  const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, 8, RandomTiers(1, 8, rng_),
                                       Policy::k3Tier, Quantizer::kAbsmax);
  std::span<uint8_t> payload = harness_->AllocPayload(plan.layout.total_bytes);
  KvBuffer host = src.View();
  EXPECT_EQ(cuda().PackLayers(host, plan, 0, 1, payload).code(),
            absl::StatusCode::kInvalidArgument);
  host.memory_kind = MemoryKind::kDevice;  // lying about it is caught too
  EXPECT_EQ(cuda().PackLayers(host, plan, 0, 1, payload).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> host_payload(plan.layout.total_bytes);
  EXPECT_EQ(cuda().PackLayers(harness_->Upload(src.View()), plan, 0, 1, host_payload).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace spectrumkv::testing
