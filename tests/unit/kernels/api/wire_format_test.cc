#include "kernels/api/wire_format.h"

#include <cstdlib>
#include <fstream>
#include <random>
#include <set>
#include <string>

#include "absl/strings/str_format.h"
#include "client/kvgen/host_pool.h"
#include "common/crc32c.h"
#include "gtest/gtest.h"
#include "kernels/api/codec.h"
#include "kernels/cpu/cpu_codec.h"
#include "tests/testing/kv_testing.h"

namespace spectrumkv {
namespace {

using ::spectrumkv::testing::MakePool;
using ::spectrumkv::testing::TestPool;

constexpr ModelShape kSmall{2, 2, 16};
constexpr uint32_t kSmallTokens = 10;

// A deterministic small KV and plan, the source of the golden payloads.
struct GoldenCase {
  TestPool pool;
  TierPlan plan;
};

GoldenCase MakeGolden(DType dtype, Quantizer quantizer, bool per_layer) {
  GoldenCase g;
  kvgen::PoolSpec spec{kvgen::PoolLayoutKind::kVllmNhd, kSmall, dtype, 4, 3};
  g.pool.pool = std::move(*kvgen::HostPool::Create(spec));
  g.pool.table = {2, 0, 1};
  g.pool.num_tokens = kSmallTokens;
  const KvBuffer kv = g.pool.View();
  for (uint32_t l = 0; l < kSmall.num_layers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < kSmallTokens; ++t) {
        for (uint32_t h = 0; h < kSmall.num_kv_heads; ++h) {
          uint16_t* row = HostRowPtr(kv, l, kind == 1, t, h);
          for (uint32_t c = 0; c < kSmall.head_dim; ++c) {
            const int v = static_cast<int>((l * 7 + kind * 3 + t * 5 + h * 11 + c * 13) % 29) - 14;
            float x = 0.37f * static_cast<float>(v);
            if (kind == 0 && c == 3) x += 9.5f;  // an outlier key channel
            row[c] = FromFloatRne(dtype, x);
          }
        }
      }
    }
  }
  std::vector<uint8_t> tiers = {0, 1, 2, 3, 1, 2, 2, 1, 0, 2};
  if (per_layer) {
    const std::vector<uint8_t> second = {0, 2, 2, 1, 3, 2, 1, 2, 2, 0};
    tiers.insert(tiers.end(), second.begin(), second.end());
  }
  g.plan = *PlanFromTiers(kSmall, dtype, kSmallTokens, tiers, Policy::k3Tier, quantizer,
                          static_cast<uint8_t>(ScoringMode::kKeyNorm));
  return g;
}

std::string TestData(const std::string& name) {
  const char* dir = std::getenv("SPECTRUMKV_TESTDATA");
  return std::string(dir ? dir : SPECTRUMKV_TESTDATA_DIR) + "/" + name;
}

void CheckGolden(const std::string& file, DType dtype, Quantizer quantizer, bool per_layer) {
  GoldenCase g = MakeGolden(dtype, quantizer, per_layer);
  auto codec = CpuCodec::CreateBest();
  auto payload = PackPayload(*codec, g.pool.View(), g.plan);
  ASSERT_TRUE(payload.ok()) << payload.status();
  const std::string path = TestData(file);
  if (std::getenv("SPECTRUMKV_REGENERATE_GOLDEN") != nullptr) {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(payload->data()), payload->size());
  }
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << "missing golden file " << path;
  const std::vector<uint8_t> golden((std::istreambuf_iterator<char>(in)), {});
  ASSERT_EQ(golden.size(), payload->size());
  for (size_t i = 0; i < golden.size(); ++i) {
    ASSERT_EQ(golden[i], (*payload)[i]) << "first difference at byte " << i << " of " << file;
  }
  // The scalar kernels, the definition of the arithmetic, produce the same bytes.
  CpuCodec scalar(ScalarRowKernels());
  EXPECT_EQ(*PackPayload(scalar, g.pool.View(), g.plan), golden);
}

TEST(WireFormatGoldenTest, Fp16Absmax) {
  CheckGolden("golden_v1_fp16_absmax.bin", DType::kFloat16, Quantizer::kAbsmax, false);
}
TEST(WireFormatGoldenTest, Bf16KcnPerLayer) {
  CheckGolden("golden_v1_bf16_kcn_per_layer.bin", DType::kBFloat16, Quantizer::kKeyChannelNorm,
              true);
}

// Spot checks of the golden payload computed by hand from docs/wire-format.md.
TEST(WireFormatGoldenTest, HandCheckedFields) {
  GoldenCase g = MakeGolden(DType::kFloat16, Quantizer::kAbsmax, false);
  auto codec = CpuCodec::CreateBest();
  const std::vector<uint8_t> p = *PackPayload(*codec, g.pool.View(), g.plan);
  EXPECT_EQ(std::string(p.begin(), p.begin() + 4), "SPKV");
  EXPECT_EQ(LoadLe16(&p[4]), 1);
  EXPECT_EQ(LoadLe16(&p[6]), 64);
  EXPECT_EQ(p[12], 1);  // fp16
  EXPECT_EQ(LoadLe32(&p[16]), 2u);
  EXPECT_EQ(LoadLe32(&p[28]), 10u);
  EXPECT_EQ(LoadLe64(&p[32]), p.size());
  // Tier map {0,1,2,3,1,2,2,1,0,2}: byte 0 = 0 | 1<<2 | 2<<4 | 3<<6.
  EXPECT_EQ(p[64], 0xE4);
  EXPECT_EQ(p[65], 1 | (2 << 2) | (2 << 4) | (1 << 6));
  EXPECT_EQ(p[66], 0 | (2 << 2));
  EXPECT_EQ(LoadLe32(&p[60]), crc32c::Value(p.data(), 60));
  // Counts FP16 2, INT8 3, INT4 4, DROP 1.
  EXPECT_EQ(LoadLe32(&p[40]), 2u);
  EXPECT_EQ(LoadLe32(&p[44]), 3u);
  EXPECT_EQ(LoadLe32(&p[48]), 4u);
  EXPECT_EQ(LoadLe32(&p[52]), 1u);
  // Prelude: 64 + 3 map bytes -> 80, + 16 trailer = 96; layer 0 K FP16 rows start there and
  // hold token 0 head 0 bit-exact.
  const KvBuffer kv = g.pool.View();
  EXPECT_EQ(g.plan.layout.prelude_bytes, 96u);
  EXPECT_EQ(LoadLe16(&p[96]), HostRowPtr(kv, 0, false, 0, 0)[0]);
  // First INT8 K row: token 1 head 0. Its scale is amax/127 rounded up to fp16.
  const LayerSection& sec = g.plan.layout.layers[0];
  const uint16_t* row = HostRowPtr(kv, 0, false, 1, 0);
  float amax = 0;
  for (int c = 0; c < 16; ++c) amax = std::max(amax, std::fabs(HalfToFloat(row[c])));
  const uint16_t scale = LoadLe16(&p[sec.key.int8_scales]);
  EXPECT_EQ(scale, FromFloatUp(DType::kFloat16, amax / 127.0f));
  for (int c = 0; c < 16; ++c) {
    const float expect = std::nearbyint(HalfToFloat(row[c]) * (1.0f / HalfToFloat(scale)));
    EXPECT_EQ(static_cast<int8_t>(p[sec.key.int8_rows + c]), static_cast<int>(expect));
  }
}

TEST(WireLayoutTest, SizesFollowTheCounts) {
  PayloadDesc d;
  d.shape = {3, 4, 64};
  d.num_tokens = 100;
  TierCounts c;
  c[Tier::kFp16] = 10;
  c[Tier::kInt8] = 20;
  c[Tier::kInt4] = 65;
  c[Tier::kDrop] = 5;
  const WireLayout wl = *ComputeWireLayout(d, std::vector<TierCounts>{c});
  EXPECT_EQ(wl.tier_map_bytes, 25u);
  EXPECT_EQ(wl.prelude_bytes, 96u + 16u);  // 64 + 25 -> 96, trailer
  // INT4 scales: 65*4*2 = 520 bytes, padded to 528.
  const uint64_t part = 10 * 4 * 64 * 2 + 20 * 4 * 64 + 20 * 4 * 2 + 65 * 4 * 32 + 528;
  EXPECT_EQ(wl.layers[0].key.end - wl.layers[0].key.fp16_rows, part);
  EXPECT_EQ(wl.total_bytes, 112 + 3 * (2 * part + 16));
  // Every array is 16-byte aligned.
  for (const LayerSection& s : wl.layers) {
    for (uint64_t off : {s.begin, s.key.int8_rows, s.key.int8_scales, s.key.int4_rows,
                         s.key.int4_scales, s.value.fp16_rows, s.crc_offset}) {
      EXPECT_EQ(off % 16, 0u);
    }
  }
  EXPECT_LE(wl.total_bytes - (10 * 3 * TierBytesPerTokenLayer(d.shape, Tier::kFp16) +
                              20 * 3 * TierBytesPerTokenLayer(d.shape, Tier::kInt8) +
                              65 * 3 * TierBytesPerTokenLayer(d.shape, Tier::kInt4)),
            WireOverheadBound(d));
}

// A progressive section: every token's K and V bases first (sizes from the token count alone),
// then the INT8 tokens' refinements; the same bytes as the absmax layout of the same counts
// (padding aside); FP16 or dropped tokens, or key channel norms with it, are refused.
TEST(WireLayoutTest, ProgressiveSectionsPutTheBasesFirst) {
  PayloadDesc d;
  d.shape = {3, 4, 64};
  d.num_tokens = 100;
  d.flags = kFlagProgressive;
  TierCounts c;
  c[Tier::kInt8] = 30;
  c[Tier::kInt4] = 70;
  const WireLayout wl = *ComputeWireLayout(d, std::vector<TierCounts>{c});
  for (const LayerSection& s : wl.layers) {
    EXPECT_EQ(s.key.int4_rows, s.begin);
    EXPECT_EQ(s.key.int4_scales, s.begin + 100 * 4 * 32);
    EXPECT_EQ(s.value.int4_rows, s.key.int4_scales + 800);
    EXPECT_EQ(s.ranked_begin, s.value.int4_scales + 800);
    EXPECT_EQ(s.key.int8_rows, s.ranked_begin);
    EXPECT_EQ(s.value.int8_rows, s.key.int8_rows + 30 * 4 * 32);
    EXPECT_EQ(s.crc_offset, s.value.int8_rows + 30 * 4 * 32);
  }
  PayloadDesc plain = d;
  plain.flags = 0;
  const WireLayout pl = *ComputeWireLayout(plain, std::vector<TierCounts>{c});
  EXPECT_EQ(wl.total_bytes, pl.total_bytes);
  EXPECT_EQ(pl.layers[1].ranked_begin, pl.layers[1].begin);
  c[Tier::kInt4] = 69;
  c[Tier::kFp16] = 1;
  EXPECT_EQ(ComputeWireLayout(d, std::vector<TierCounts>{c}).status().code(),
            absl::StatusCode::kInvalidArgument);
  c[Tier::kFp16] = 0;
  c[Tier::kDrop] = 1;
  EXPECT_EQ(ComputeWireLayout(d, std::vector<TierCounts>{c}).status().code(),
            absl::StatusCode::kInvalidArgument);
  c[Tier::kDrop] = 0;
  c[Tier::kInt4] = 70;
  d.flags |= kFlagKeyChannelNorm;
  EXPECT_EQ(ComputeWireLayout(d, std::vector<TierCounts>{c}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

class WireParseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    golden_ = MakeGolden(DType::kFloat16, Quantizer::kAbsmax, false);
    codec_ = CpuCodec::CreateBest();
    payload_ = *PackPayload(*codec_, golden_.pool.View(), golden_.plan);
    dst_ = MakePool(kvgen::PoolLayoutKind::kVllmHnd, kSmall, DType::kFloat16, 8, kSmallTokens, 3);
  }
  absl::Status Unpack(const std::vector<uint8_t>& bytes) {
    return UnpackPayload(*codec_, bytes, dst_.View(), 1 << 20).status();
  }
  // Rewrites the header CRC so that a field edit reaches the semantic checks.
  void Reseal(std::vector<uint8_t>& p) { StoreLe32(&p[60], crc32c::Value(p.data(), 60)); }

  GoldenCase golden_;
  std::unique_ptr<CpuCodec> codec_;
  std::vector<uint8_t> payload_;
  testing::TestPool dst_;
};

TEST_F(WireParseTest, ValidPayloadUnpacks) {
  auto r = UnpackPayload(*codec_, payload_, dst_.View(), 1 << 20);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->dropped.size(), 1u);
  EXPECT_EQ(r->dropped[0], std::vector<uint32_t>{3});
  EXPECT_EQ(testing::CheckRoundTrip(golden_.pool.View(), dst_.View(), golden_.plan, payload_), "");
}

TEST_F(WireParseTest, StatusCodes) {
  auto p = payload_;
  p[0] = 'X';
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kInvalidArgument);
  p = payload_;
  StoreLe16(&p[4], 2);
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kUnimplemented);
  p = payload_;
  p[20] ^= 1;  // heads field, CRC not updated
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kDataLoss);
  p = payload_;
  StoreLe32(&p[24], 12);  // head_dim not a multiple of 8, CRC updated
  Reseal(p);
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kInvalidArgument);
  p = payload_;
  StoreLe32(&p[8], 1u << 7);  // unknown flag
  Reseal(p);
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kInvalidArgument);
  p = payload_;
  StoreLe64(&p[32], payload_.size() + 16);  // total disagrees with the maps
  Reseal(p);
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kInvalidArgument);
  p = payload_;
  p[64] ^= 0x40;  // tier map byte, maps CRC not updated
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kDataLoss);
  p = payload_;
  p[p.size() - 20] ^= 0x01;  // last layer's data
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kDataLoss);
  p = payload_;
  p.push_back(0);
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kDataLoss);
  // The receiver's size limit.
  EXPECT_EQ(UnpackPayload(*codec_, payload_, dst_.View(), payload_.size() - 1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(WireParseTest, NonZeroMapPaddingIsRejected) {
  auto p = payload_;
  p[66] |= 0x40;  // token 11 of a 10-token map
  // Re-seal the maps CRC so the padding check itself is reached.
  StoreLe32(&p[80], crc32c::Value(p.data() + 64, 16));
  EXPECT_EQ(Unpack(p).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(WireParseTest, EveryTruncationFails) {
  for (size_t len = 0; len < payload_.size(); ++len) {
    std::vector<uint8_t> p(payload_.begin(), payload_.begin() + len);
    const absl::Status s = Unpack(p);
    EXPECT_FALSE(s.ok()) << "length " << len;
    EXPECT_TRUE(s.code() == absl::StatusCode::kDataLoss ||
                s.code() == absl::StatusCode::kInvalidArgument)
        << len << ": " << s;
  }
}

TEST_F(WireParseTest, RandomBitFlipsFail) {
  const uint64_t seed = testing::FreshSeed();
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 3000; ++i) {
    auto p = payload_;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) p[rng() % p.size()] ^= static_cast<uint8_t>(1u << (rng() % 8));
    if (p == payload_) continue;
    EXPECT_FALSE(Unpack(p).ok()) << "seed " << seed << " iteration " << i;
  }
}

TEST_F(WireParseTest, HostileHeadersWithValidChecksums) {
  const uint64_t seed = testing::FreshSeed();
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 3000; ++i) {
    auto p = payload_;
    // Random values in the size fields, header CRC recomputed: the parser must bound them.
    const size_t fields[] = {16, 20, 24, 28, 32, 36, 40, 44, 48, 52};
    StoreLe32(&p[fields[rng() % 10]], static_cast<uint32_t>(rng()));
    Reseal(p);
    const absl::Status s = Unpack(p);
    EXPECT_FALSE(s.ok()) << "seed " << seed << " iteration " << i;
  }
  // Random garbage after a valid magic.
  for (int i = 0; i < 1000; ++i) {
    std::vector<uint8_t> p(static_cast<size_t>(rng() % 300));
    for (auto& b : p) b = static_cast<uint8_t>(rng());
    if (p.size() >= 4) StoreLe32(p.data(), kWireMagic);
    if (p.size() >= 64) {
      StoreLe16(&p[4], 1);
      Reseal(p);
    }
    EXPECT_FALSE(Unpack(p).ok()) << "seed " << seed << " garbage " << i;
  }
}

}  // namespace
}  // namespace spectrumkv
