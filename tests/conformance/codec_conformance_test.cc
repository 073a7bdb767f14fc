// The codec conformance suite: every backend must write the reference (scalar CPU) payload
// bytes for the same plan, unpack any backend's payload into any layout within the documented
// error bound, agree on scores within a tolerance, and refuse what the contract says to refuse.
#include <algorithm>
#include <numeric>
#include <random>
#include <string>

#include "absl/strings/str_format.h"
#include "client/kvgen/host_pool.h"
#include "gtest/gtest.h"
#include "kernels/api/codec.h"
#include "kernels/cpu/cpu_codec.h"
#include "tests/conformance/backend_harness.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv::testing {
namespace {

using kvgen::PoolLayoutKind;

constexpr PoolLayoutKind kAllLayouts[] = {PoolLayoutKind::kVllmNhd, PoolLayoutKind::kVllmHnd,
                                          PoolLayoutKind::kSglang, PoolLayoutKind::kTrtllm};

class CodecConformanceTest
    : public ::testing::TestWithParam<std::pair<std::string, HarnessFactory>> {
 protected:
  void SetUp() override {
    harness_ = GetParam().second();
    const std::string why = harness_->Unavailable();
    if (!why.empty()) GTEST_SKIP() << GetParam().first << " unavailable: " << why;
    seed_ = FreshSeed();
    rng_.seed(seed_);
  }

  // Packs host KV `src` with the backend under test (through its memory), returns host bytes.
  absl::StatusOr<std::vector<uint8_t>> Pack(const KvBuffer& src, const TierPlan& plan) {
    const KvBuffer dev = harness_->Upload(src);
    std::span<uint8_t> payload = harness_->AllocPayload(plan.layout.total_bytes);
    std::vector<uint8_t> prelude(plan.layout.prelude_bytes);
    WritePrelude(plan.layout, plan.tiers, prelude);
    harness_->PayloadFromHost(prelude, payload.first(prelude.size()));
    absl::Status s =
        harness_->codec().PackLayers(dev, plan, 0, plan.desc.shape.num_layers, payload);
    if (!s.ok()) return s;
    return harness_->PayloadToHost(payload);
  }

  // Unpacks host payload bytes into host KV `dst` with the backend under test.
  absl::Status Unpack(const std::vector<uint8_t>& bytes, const KvBuffer& dst, uint32_t first = 0,
                      uint32_t last = ~0u) {
    auto prelude = ParsePrelude(bytes, bytes.size());
    if (!prelude.ok()) return prelude.status();
    const KvBuffer dev = harness_->Upload(dst);
    std::span<uint8_t> payload = harness_->AllocPayload(bytes.size());
    harness_->PayloadFromHost(bytes, payload);
    last = std::min(last, prelude->layout.desc.shape.num_layers);
    absl::Status s =
        harness_->codec().UnpackLayers(*prelude, payload, dev, first, last, VerifyMode::kVerify);
    harness_->Download(dev, dst);
    return s;
  }

  std::string Ctx() const { return absl::StrFormat("%s seed %u", GetParam().first, seed_); }

  // Progressive payloads are packed and unpacked by the CPU backends only (the CUDA backend
  // refuses them: ProgressiveIsPackedInPartsOrRefused).
  bool Skips(Quantizer q) const {
    return q == Quantizer::kProgressive && harness_->codec().memory_kind() != MemoryKind::kHost;
  }

  std::unique_ptr<BackendHarness> harness_;
  CpuCodec reference_{ScalarRowKernels()};
  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

struct Case {
  DType dtype;
  Quantizer quantizer;
  bool per_layer;
  ModelShape shape;
  uint32_t tokens;
};

constexpr Case kCases[] = {
    {DType::kFloat16, Quantizer::kAbsmax, false, {3, 2, 64}, 37},
    {DType::kBFloat16, Quantizer::kAbsmax, false, {2, 4, 128}, 50},
    {DType::kFloat16, Quantizer::kKeyChannelNorm, false, {2, 2, 128}, 41},
    {DType::kBFloat16, Quantizer::kKeyChannelNorm, true, {3, 1, 256}, 23},
    {DType::kFloat16, Quantizer::kAbsmax, true, {2, 3, 72}, 64},
    {DType::kFloat16, Quantizer::kAbsmax, false, {1, 1, 8}, 1},
    {DType::kFloat16, Quantizer::kProgressive, false, {3, 2, 64}, 45},
    {DType::kBFloat16, Quantizer::kProgressive, true, {2, 3, 136}, 29},
};

// A case's source: a pool of `kind` holding fresh random rows, and a 3-tier plan of random tiers.
struct CaseInput {
  TestPool src;
  TierPlan plan;
};

CaseInput RandomInput(const Case& c, PoolLayoutKind kind, uint32_t block_size,
                      std::mt19937_64& rng) {
  CaseInput in{MakePool(kind, c.shape, c.dtype, block_size, c.tokens, rng()), {}};
  FillRandom(in.src.View(), rng);
  const uint32_t maps = c.per_layer ? c.shape.num_layers : 1;
  in.plan = *PlanFromTiers(c.shape, c.dtype, c.tokens,
                           c.quantizer == Quantizer::kProgressive
                               ? RandomProgressiveTiers(maps, c.tokens, rng)
                               : RandomTiers(maps, c.tokens, rng),
                           Policy::k3Tier, c.quantizer);
  return in;
}

TEST_P(CodecConformanceTest, PayloadBytesMatchTheReference) {
  for (const Case& c : kCases) {
    if (Skips(c.quantizer)) continue;
    CaseInput in = RandomInput(c, PoolLayoutKind::kVllmNhd, 16, rng_);
    const TestPool& src = in.src;
    const TierPlan& plan = in.plan;
    auto got = Pack(src.View(), plan);
    ASSERT_TRUE(got.ok()) << Ctx() << ": " << got.status();
    auto expect = PackPayload(reference_, src.View(), plan);
    ASSERT_TRUE(expect.ok()) << expect.status();
    ASSERT_EQ(got->size(), expect->size()) << Ctx();
    for (size_t i = 0; i < got->size(); ++i) {
      ASSERT_EQ((*got)[i], (*expect)[i]) << Ctx() << ": first difference at byte " << i;
    }
  }
}

// A chunk packed in slices (each on its own, in shuffled order) and then sealed is byte for byte
// PackLayers' chunk, whatever the padding held before; no byte is written by two slices. A
// backend that packs a chunk in one part packs slice 0 of 1 and refuses more.
TEST_P(CodecConformanceTest, SlicedPackEqualsPackLayers) {
  Codec& codec = harness_->codec();
  for (const Case& c : kCases) {
    if (Skips(c.quantizer)) continue;
    CaseInput in = RandomInput(c, PoolLayoutKind::kVllmHnd, 16, rng_);
    const TestPool& src = in.src;
    const TierPlan& plan = in.plan;
    const std::vector<uint8_t> expect = *PackPayload(reference_, src.View(), plan);
    const KvBuffer dev = harness_->Upload(src.View());
    const uint32_t layers = c.shape.num_layers;
    const uint32_t first = layers > 1 ? 1 : 0;  // a chunk that is not the first layer too
    const uint64_t begin = plan.layout.layers[first].begin, end = plan.layout.layers.back().end;
    std::span<uint8_t> payload = harness_->AllocPayload(plan.layout.total_bytes);
    auto pack_into = [&](uint8_t fill, std::vector<uint32_t> order, uint32_t slices,
                         bool seal) -> std::vector<uint8_t> {
      harness_->PayloadFromHost(std::vector<uint8_t>(payload.size(), fill), payload);
      for (uint32_t s : order) {
        const absl::Status st = codec.PackLayerSlice(dev, plan, first, layers, s, slices, payload);
        EXPECT_TRUE(st.ok()) << Ctx() << " slice " << s << " of " << slices << ": " << st;
      }
      if (seal) {
        EXPECT_TRUE(codec.SealLayers(plan, first, layers, payload).ok()) << Ctx();
      }
      return harness_->PayloadToHost(payload);
    };
    if (codec.max_slices() == 1) {
      const std::vector<uint8_t> got = pack_into(0xA5, {0}, 1, true);
      EXPECT_TRUE(std::equal(got.begin() + begin, got.begin() + end, expect.begin() + begin))
          << Ctx();
      EXPECT_EQ(codec.PackLayerSlice(dev, plan, first, layers, 0, 2, payload).code(),
                absl::StatusCode::kUnimplemented);
      continue;
    }
    for (uint32_t slices : {2u, 3u, 7u}) {
      std::vector<uint32_t> order(slices);
      std::iota(order.begin(), order.end(), 0u);
      std::vector<int> owner(payload.size(), -1);
      for (uint32_t s = 0; s < slices; ++s) {
        const std::vector<uint8_t> a = pack_into(0x00, {s}, slices, false);
        const std::vector<uint8_t> b = pack_into(0xFF, {s}, slices, false);
        for (uint64_t i = 0; i < payload.size(); ++i) {
          if (a[i] == 0x00 && b[i] == 0xFF) continue;  // not written
          ASSERT_TRUE(i >= begin && i < end) << Ctx() << " slice " << s << " wrote byte " << i;
          ASSERT_EQ(owner[i], -1) << Ctx() << " byte " << i << " written by slices " << owner[i]
                                  << " and " << s << " of " << slices;
          owner[i] = static_cast<int>(s);
        }
      }
      for (uint8_t fill : {uint8_t{0x00}, uint8_t{0xFF}}) {
        std::shuffle(order.begin(), order.end(), rng_);
        const std::vector<uint8_t> got = pack_into(fill, order, slices, true);
        for (uint64_t i = begin; i < end; ++i) {
          ASSERT_EQ(got[i], expect[i]) << Ctx() << " " << slices << " slices, fill " << int(fill)
                                       << ": first difference at byte " << i;
        }
      }
    }
    EXPECT_EQ(codec.PackLayerSlice(dev, plan, first, layers, 2, 2, payload).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// A progressive payload's bases (packed from a plan without tiers, as a sender does before it
// ranks) and refinements, each in shuffled slices, the refinements first, then sealed, are byte
// for byte PackLayers' payload; a layer's base does not depend on the tier map. A backend
// without progressive kernels refuses such payloads whole.
TEST_P(CodecConformanceTest, ProgressiveIsPackedInPartsOrRefused) {
  Codec& codec = harness_->codec();
  for (const Case& c : kCases) {
    if (c.quantizer != Quantizer::kProgressive) continue;
    CaseInput in = RandomInput(c, PoolLayoutKind::kVllmHnd, 16, rng_);
    const TierPlan& plan = in.plan;
    const KvBuffer dev = harness_->Upload(in.src.View());
    std::span<uint8_t> payload = harness_->AllocPayload(plan.layout.total_bytes);
    if (Skips(c.quantizer)) {
      EXPECT_EQ(codec.PackLayers(dev, plan, 0, c.shape.num_layers, payload).code(),
                absl::StatusCode::kUnimplemented);
      const std::vector<uint8_t> bytes = *PackPayload(reference_, in.src.View(), plan);
      EXPECT_EQ(Unpack(bytes, in.src.View()).code(), absl::StatusCode::kUnimplemented);
      continue;
    }
    const std::vector<uint8_t> expect = *PackPayload(reference_, in.src.View(), plan);
    TierPlan untiered = plan;
    untiered.tiers.clear();
    const uint32_t layers = c.shape.num_layers;
    harness_->PayloadFromHost(std::vector<uint8_t>(payload.size(), 0xC3), payload);
    const uint32_t slices = 3;
    std::vector<uint32_t> order = {0, 1, 2};
    for (ProgressivePart part : {ProgressivePart::kRanked, ProgressivePart::kBase}) {
      std::shuffle(order.begin(), order.end(), rng_);
      for (uint32_t sl : order) {
        const TierPlan& p = part == ProgressivePart::kBase ? untiered : plan;
        const absl::Status st =
            codec.PackProgressiveSlice(dev, p, part, 0, layers, sl, slices, payload);
        ASSERT_TRUE(st.ok()) << Ctx() << ": " << st;
      }
    }
    ASSERT_TRUE(codec.SealLayers(plan, 0, layers, payload).ok());
    const std::vector<uint8_t> got = harness_->PayloadToHost(payload);
    const uint64_t begin = plan.layout.layers[0].begin;
    for (uint64_t i = begin; i < got.size(); ++i) {
      ASSERT_EQ(got[i], expect[i]) << Ctx() << ": first difference at byte " << i;
    }
    // Another tier map (other counts, other sections after it): the same first base.
    const uint32_t maps = c.per_layer ? layers : 1;
    const TierPlan other =
        *PlanFromTiers(c.shape, c.dtype, c.tokens, RandomProgressiveTiers(maps, c.tokens, rng_),
                       Policy::k3Tier, Quantizer::kProgressive);
    const std::vector<uint8_t> theirs = *PackPayload(reference_, in.src.View(), other);
    const LayerSection& sec = plan.layout.layers[0];
    ASSERT_EQ(other.layout.layers[0].ranked_begin, sec.ranked_begin);
    EXPECT_TRUE(std::equal(expect.begin() + sec.begin, expect.begin() + sec.ranked_begin,
                           theirs.begin() + sec.begin))
        << Ctx();
    EXPECT_EQ(
        codec
            .PackProgressiveSlice(dev, untiered, ProgressivePart::kRanked, 0, layers, 0, 1, payload)
            .code(),
        absl::StatusCode::kInvalidArgument);
  }
  CaseInput plain = RandomInput(kCases[0], PoolLayoutKind::kVllmNhd, 16, rng_);
  std::span<uint8_t> payload = harness_->AllocPayload(plain.plan.layout.total_bytes);
  EXPECT_FALSE(codec
                   .PackProgressiveSlice(harness_->Upload(plain.src.View()), plain.plan,
                                         ProgressivePart::kBase, 0, 1, 0, 1, payload)
                   .ok());
}

// A verified chunk unpacked in slices (shuffled order) writes what UnpackLayers writes.
TEST_P(CodecConformanceTest, SlicedUnpackEqualsUnpackLayers) {
  Codec& codec = harness_->codec();
  for (const Case& c : kCases) {
    if (Skips(c.quantizer)) continue;
    CaseInput in = RandomInput(c, PoolLayoutKind::kVllmNhd, 16, rng_);
    const TestPool& src = in.src;
    const TierPlan& plan = in.plan;
    const std::vector<uint8_t> bytes = *PackPayload(reference_, src.View(), plan);
    const ParsedPrelude prelude = *ParsePrelude(bytes, bytes.size());
    std::span<uint8_t> payload = harness_->AllocPayload(bytes.size());
    harness_->PayloadFromHost(bytes, payload);
    const uint32_t layers = c.shape.num_layers;
    const uint32_t first = layers > 1 ? 1 : 0;
    for (uint32_t l = first; l < layers; ++l)
      ASSERT_TRUE(VerifyLayerSection(prelude.layout, l, bytes).ok());
    TestPool whole = MakePool(PoolLayoutKind::kSglang, c.shape, c.dtype, 1, c.tokens, 9);
    const KvBuffer whole_dev = harness_->Upload(whole.View());
    ASSERT_TRUE(
        codec.UnpackLayers(prelude, payload, whole_dev, first, layers, VerifyMode::kAlreadyVerified)
            .ok())
        << Ctx();
    harness_->Download(whole_dev, whole.View());
    const std::vector<uint32_t> counts =
        codec.max_slices() == 1 ? std::vector<uint32_t>{1} : std::vector<uint32_t>{2, 3, 7};
    for (uint32_t slices : counts) {
      TestPool sliced = MakePool(PoolLayoutKind::kSglang, c.shape, c.dtype, 1, c.tokens, 9);
      const KvBuffer dev = harness_->Upload(sliced.View());
      std::vector<uint32_t> order(slices);
      std::iota(order.begin(), order.end(), 0u);
      std::shuffle(order.begin(), order.end(), rng_);
      for (uint32_t s : order) {
        const absl::Status st =
            codec.UnpackLayerSlice(prelude, payload, dev, first, layers, s, slices);
        ASSERT_TRUE(st.ok()) << Ctx() << " slice " << s << " of " << slices << ": " << st;
      }
      harness_->Download(dev, sliced.View());
      for (size_t r = 0; r < whole.pool->regions().size(); ++r) {
        const MemoryRegion& a = whole.pool->regions()[r];
        const MemoryRegion& b = sliced.pool->regions()[r];
        ASSERT_EQ(std::memcmp(a.base, b.base, a.size_bytes), 0)
            << Ctx() << " " << slices << " slices, region " << r;
      }
    }
    if (codec.max_slices() == 1) {
      TestPool other = MakePool(PoolLayoutKind::kSglang, c.shape, c.dtype, 1, c.tokens, 9);
      EXPECT_EQ(codec
                    .UnpackLayerSlice(prelude, payload, harness_->Upload(other.View()), first,
                                      layers, 0, 2)
                    .code(),
                absl::StatusCode::kUnimplemented);
    }
  }
}

TEST_P(CodecConformanceTest, RoundTripsAcrossEveryLayoutPair) {
  const ModelShape shape{2, 2, 64};
  const uint32_t n = 45;
  const uint32_t block_sizes[] = {16, 1, 8, 32};
  for (int si = 0; si < 4; ++si) {
    for (int di = 0; di < 4; ++di) {
      TestPool src = MakePool(kAllLayouts[si], shape, DType::kFloat16, block_sizes[si], n, rng_());
      TestPool dst =
          MakePool(kAllLayouts[di], shape, DType::kFloat16, block_sizes[(di + 1) % 4], n, rng_());
      FillRandom(src.View(), rng_);
      const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, n, RandomTiers(1, n, rng_),
                                           Policy::k3Tier, Quantizer::kAbsmax);
      auto payload = Pack(src.View(), plan);
      ASSERT_TRUE(payload.ok()) << Ctx() << ": " << payload.status();
      ASSERT_TRUE(Unpack(*payload, dst.View()).ok()) << Ctx();
      EXPECT_EQ(CheckRoundTrip(src.View(), dst.View(), plan, *payload), "")
          << Ctx() << " layouts " << si << "->" << di;
    }
  }
}

TEST_P(CodecConformanceTest, UnpacksTheReferencePayloadLikeTheReference) {
  for (const Case& c : kCases) {
    if (Skips(c.quantizer)) continue;
    CaseInput in = RandomInput(c, PoolLayoutKind::kTrtllm, 8, rng_);
    const TestPool& src = in.src;
    const TierPlan& plan = in.plan;
    const std::vector<uint8_t> payload = *PackPayload(reference_, src.View(), plan);
    TestPool ours = MakePool(PoolLayoutKind::kSglang, c.shape, c.dtype, 1, c.tokens, 9);
    TestPool theirs = MakePool(PoolLayoutKind::kSglang, c.shape, c.dtype, 1, c.tokens, 9);
    ASSERT_TRUE(Unpack(payload, ours.View()).ok()) << Ctx();
    ASSERT_TRUE(UnpackPayload(reference_, payload, theirs.View(), payload.size()).ok());
    for (size_t r = 0; r < ours.pool->regions().size(); ++r) {
      const MemoryRegion& a = ours.pool->regions()[r];
      const MemoryRegion& b = theirs.pool->regions()[r];
      ASSERT_EQ(std::memcmp(a.base, b.base, a.size_bytes), 0) << Ctx() << " region " << r;
    }
    EXPECT_EQ(CheckRoundTrip(src.View(), ours.View(), plan, payload), "") << Ctx();
  }
}

TEST_P(CodecConformanceTest, PlannedPayloadsRoundTrip) {
  const ModelShape shape{4, 2, 128};
  const uint32_t n = 300;
  TestPool src = MakePool(PoolLayoutKind::kVllmHnd, shape, DType::kBFloat16, 16, n, rng_());
  FillRandom(src.View(), rng_);
  std::vector<float> scores(n);
  ASSERT_TRUE(harness_->codec().Score(harness_->Upload(src.View()), ScoreOptions{}, scores).ok());
  for (Policy policy : {Policy::k3Tier, Policy::k2Tier, Policy::kSinkProtect, Policy::kUniformInt4,
                        Policy::kPdTrim, Policy::kRandomTier}) {
    for (double budget : {0.2, 0.3, 0.55}) {
      PlanOptions o;
      o.policy = policy;
      o.budget = budget;
      o.quantizer = budget < 0.3 ? Quantizer::kKeyChannelNorm : Quantizer::kAbsmax;
      const TierPlan plan = *PlanTiers(shape, DType::kBFloat16, n, scores, o);
      auto payload = Pack(src.View(), plan);
      ASSERT_TRUE(payload.ok()) << Ctx();
      TestPool dst = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kBFloat16, 32, n, rng_());
      ASSERT_TRUE(Unpack(*payload, dst.View()).ok()) << Ctx();
      EXPECT_EQ(CheckRoundTrip(src.View(), dst.View(), plan, *payload), "")
          << Ctx() << " " << PolicyName(policy) << " b=" << budget;
    }
  }
}

TEST_P(CodecConformanceTest, ScoresAgreeWithTheReference) {
  // Sums may be ordered differently by each backend: scores agree to a relative 1e-4, and near
  // ties may therefore rank differently (the planner breaks exact ties by position). The KV has
  // moderate magnitudes (FillGaussian): with FillRandom's huge rows the logits reach thousands,
  // where a single float ulp of a dot product exceeds the tolerance for any two summation
  // orders (the AVX2 backend failed about 4% of seeds there).
  const ModelShape shape{3, 2, 64};
  const uint32_t n = 120;
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
  FillGaussian(src.View(), rng_);
  std::vector<float> queries(3 * 8 * 4 * 64);
  std::normal_distribution<float> g;
  for (float& q : queries) q = g(rng_);
  for (ScoringMode mode : {ScoringMode::kKeyNorm, ScoringMode::kAttention}) {
    ScoreOptions o;
    o.mode = mode;
    if (mode == ScoringMode::kAttention) {
      o.window_queries = queries;
      o.window = 8;
      o.num_q_heads = 4;
    }
    std::vector<float> got(n), expect(n);
    ASSERT_TRUE(harness_->codec().Score(harness_->Upload(src.View()), o, got).ok()) << Ctx();
    ASSERT_TRUE(reference_.Score(src.View(), o, expect).ok());
    for (uint32_t t = 0; t < n; ++t) {
      EXPECT_NEAR(got[t], expect[t], 1e-4 * std::fabs(expect[t]) + 1e-6)
          << Ctx() << " " << ScoringModeName(mode) << " token " << t;
    }
  }
}

TEST_P(CodecConformanceTest, RefusesNonFiniteQuantizedRowsOnly) {
  const ModelShape shape{2, 2, 64};
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, 8, rng_());
  FillRandom(src.View(), rng_);
  HostRowPtr(src.View(), 1, true, 5, 1)[7] = 0x7C00;      // +inf in V of token 5
  std::vector<uint8_t> tiers = {0, 1, 2, 1, 2, 0, 1, 2};  // token 5 FP16: fine
  TierPlan plan =
      *PlanFromTiers(shape, DType::kFloat16, 8, tiers, Policy::k3Tier, Quantizer::kAbsmax);
  EXPECT_TRUE(Pack(src.View(), plan).ok()) << Ctx();
  tiers[5] = 1;  // INT8: refused
  plan = *PlanFromTiers(shape, DType::kFloat16, 8, tiers, Policy::k3Tier, Quantizer::kAbsmax);
  EXPECT_EQ(Pack(src.View(), plan).status().code(), absl::StatusCode::kInvalidArgument) << Ctx();
}

TEST_P(CodecConformanceTest, CorruptLayerIsNeverWritten) {
  const ModelShape shape{3, 2, 64};
  const uint32_t n = 20;
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
  FillRandom(src.View(), rng_);
  const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, n, RandomTiers(1, n, rng_),
                                       Policy::k3Tier, Quantizer::kAbsmax);
  std::vector<uint8_t> payload = *PackPayload(reference_, src.View(), plan);
  payload[plan.layout.layers[1].begin + 5] ^= 0x20;
  TestPool dst = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
  EXPECT_EQ(Unpack(payload, dst.View(), 1, 2).code(), absl::StatusCode::kDataLoss) << Ctx();
  for (const MemoryRegion& r : dst.pool->regions()) {
    const auto* p = static_cast<const uint8_t*>(r.base);
    EXPECT_TRUE(std::all_of(p, p + r.size_bytes, [](uint8_t b) { return b == 0; })) << Ctx();
  }
}

TEST_P(CodecConformanceTest, LayerRangesComposeToTheWholePayload) {
  const ModelShape shape{5, 2, 64};
  const uint32_t n = 33;
  TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
  FillRandom(src.View(), rng_);
  const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, n, RandomTiers(1, n, rng_),
                                       Policy::k3Tier, Quantizer::kKeyChannelNorm);
  const std::vector<uint8_t> whole = *PackPayload(reference_, src.View(), plan);
  const KvBuffer dev = harness_->Upload(src.View());
  std::span<uint8_t> payload = harness_->AllocPayload(plan.layout.total_bytes);
  std::vector<uint8_t> prelude(plan.layout.prelude_bytes);
  WritePrelude(plan.layout, plan.tiers, prelude);
  harness_->PayloadFromHost(prelude, payload.first(prelude.size()));
  for (auto [a, b] : {std::pair{3u, 5u}, std::pair{0u, 1u}, std::pair{1u, 3u}}) {
    ASSERT_TRUE(harness_->codec().PackLayers(dev, plan, a, b, payload).ok()) << Ctx();
  }
  EXPECT_EQ(harness_->PayloadToHost(payload), whole) << Ctx();
  TestPool dst = MakePool(PoolLayoutKind::kVllmHnd, shape, DType::kFloat16, 4, n, rng_());
  for (auto [a, b] : {std::pair{2u, 5u}, std::pair{0u, 2u}}) {
    ASSERT_TRUE(Unpack(whole, dst.View(), a, b).ok()) << Ctx();
  }
  EXPECT_EQ(CheckRoundTrip(src.View(), dst.View(), plan, whole), "") << Ctx();
  EXPECT_FALSE(harness_->codec().PackLayers(dev, plan, 4, 6, payload).ok());
}

// ScoreAndPlan is PlanTiers on the backend's own scores, whichever device ranks them: tie order
// (position), -0.0 == +0.0, NaN last, sinks first, every policy, per-layer budgets. External
// scores carry the ties and special values; key_norm and attention (pooled, decayed) come from
// the KV.
TEST_P(CodecConformanceTest, ScoreAndPlanIsPlanTiersOnItsScores) {
  const ModelShape shape{3, 2, 64};
  for (uint32_t n : {1u, 5u, 77u, 2049u}) {
    TestPool src = MakePool(PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16, n, rng_());
    FillGaussian(src.View(), rng_);
    const KvBuffer dev = harness_->Upload(src.View());
    const uint32_t window = std::min(n, 8u);
    std::vector<float> queries(3 * window * 4 * 64);
    std::normal_distribution<float> g;
    for (float& q : queries) q = g(rng_);
    for (int variant = 0; variant < kScoreKinds + 2; ++variant) {
      std::vector<float> external;
      ScoreOptions so;
      if (variant < kScoreKinds) {
        so.mode = ScoringMode::kExternal;
        external = StressScores(n, variant, rng_);
        so.external_scores = external;
      } else if (variant == kScoreKinds) {
        so.mode = ScoringMode::kKeyNorm;
      } else {
        so.mode = ScoringMode::kAttention;
        so.window_queries = queries;
        so.window = window;
        so.num_q_heads = 4;
        so.pool_kernel = 3;
        so.recency_decay = 0.001;
      }
      std::vector<float> scores(n);
      ASSERT_TRUE(harness_->codec().Score(dev, so, scores).ok()) << Ctx();
      for (int k = 0; k < 6; ++k) {
        const PlanOptions po = RandomPlanOptions(rng_);
        const std::string diff = ComparePlans(harness_->codec().ScoreAndPlan(dev, so, po),
                                              PlanTiers(shape, DType::kFloat16, n, scores, po));
        EXPECT_EQ(diff, "") << Ctx() << " n " << n << " variant " << variant << " policy "
                            << PolicyName(po.policy) << " b " << po.budget;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, CodecConformanceTest, ::testing::ValuesIn(AllHarnesses()),
                         [](const auto& param_info) { return param_info.param.first; });

}  // namespace
}  // namespace spectrumkv::testing
