#include "kernels/api/layout.h"

#include "client/kvgen/pool_layouts.h"
#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

using kvgen::BuildPoolLayout;
using kvgen::PoolLayoutKind;
using kvgen::PoolSpec;

constexpr ModelShape kShape{4, 2, 64};

PoolSpec Spec(PoolLayoutKind kind) { return PoolSpec{kind, kShape, DType::kFloat16, 16, 8}; }

TEST(LayoutTest, EngineLayoutsValidate) {
  for (auto kind : {PoolLayoutKind::kVllmNhd, PoolLayoutKind::kVllmHnd, PoolLayoutKind::kSglang,
                    PoolLayoutKind::kTrtllm}) {
    const auto built = BuildPoolLayout(Spec(kind));
    EXPECT_TRUE(ValidateLayout(built.layout, built.region_sizes).ok())
        << kvgen::PoolLayoutKindName(kind);
    // One byte less in any region must be caught.
    for (size_t r = 0; r < built.region_sizes.size(); ++r) {
      auto sizes = built.region_sizes;
      sizes[r] -= 1;
      EXPECT_EQ(ValidateLayout(built.layout, sizes).code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

TEST(LayoutTest, ErrorsNameTheField) {
  auto built = BuildPoolLayout(Spec(PoolLayoutKind::kVllmNhd));
  KvLayout l = built.layout;
  l.values[2].offset_bytes += 2;
  absl::Status s = ValidateLayout(l, built.region_sizes);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layout.values[2]"), std::string::npos) << s;

  l = built.layout;
  l.keys[1].token_stride_bytes = 3;
  s = ValidateLayout(l, built.region_sizes);
  EXPECT_NE(s.message().find("layout.keys[1].token_stride_bytes"), std::string::npos) << s;

  l = built.layout;
  l.keys[0].block_stride_bytes = uint64_t{1} << 62;
  s = ValidateLayout(l, built.region_sizes);
  EXPECT_NE(s.message().find("overflows"), std::string::npos) << s;

  l = built.layout;
  l.keys[3].region = 99;
  s = ValidateLayout(l, built.region_sizes);
  EXPECT_NE(s.message().find("layout.keys[3].region"), std::string::npos) << s;

  l = built.layout;
  l.shape.head_dim = 60;
  EXPECT_NE(ValidateLayout(l, built.region_sizes).message().find("head_dim"), std::string::npos);
  l = built.layout;
  l.values.pop_back();
  EXPECT_FALSE(ValidateLayout(l, built.region_sizes).ok());
  l = built.layout;
  l.block_size = 0;
  EXPECT_FALSE(ValidateLayout(l, built.region_sizes).ok());
  l = built.layout;
  l.dtype = static_cast<DType>(9);
  EXPECT_FALSE(ValidateLayout(l, built.region_sizes).ok());
}

TEST(LayoutTest, BufferChecksBlockTableAndTokens) {
  const auto built = BuildPoolLayout(Spec(PoolLayoutKind::kVllmHnd));
  std::vector<std::vector<uint8_t>> memory;
  std::vector<MemoryRegion> regions;
  for (uint64_t size : built.region_sizes) {
    memory.emplace_back(size);
    regions.push_back({memory.back().data(), size});
  }
  std::vector<uint32_t> table = {7, 0, 3};
  KvBuffer kv{&built.layout, regions, MemoryKind::kHost, table, 40};
  EXPECT_TRUE(ValidateKvBuffer(kv).ok());
  kv.num_tokens = 49;  // needs 4 blocks
  EXPECT_NE(ValidateKvBuffer(kv).message().find("block_table"), std::string::npos);
  kv.num_tokens = 40;
  table[1] = 8;  // pool has blocks 0..7
  EXPECT_NE(ValidateKvBuffer(kv).message().find("block_table[1]"), std::string::npos);
  table[1] = 0;
  kv.num_tokens = 0;
  EXPECT_FALSE(ValidateKvBuffer(kv).ok());
  kv.num_tokens = 40;
  regions[0].base = nullptr;
  EXPECT_NE(ValidateKvBuffer(kv).message().find("regions[0]"), std::string::npos);
}

// Each builder places element (layer, K|V, block, slot, head, channel) where the engine's own
// tensor indexing puts it; checked with the engines' index formulas, independently of RowOffset.
TEST(LayoutTest, BuildersMatchEngineIndexing) {
  const uint64_t nb = 8, bs = 16, H = kShape.num_kv_heads, D = kShape.head_dim,
                 L = kShape.num_layers;
  for (auto kind : {PoolLayoutKind::kVllmNhd, PoolLayoutKind::kVllmHnd, PoolLayoutKind::kSglang,
                    PoolLayoutKind::kTrtllm}) {
    const auto built = BuildPoolLayout(Spec(kind));
    for (uint32_t l = 0; l < L; ++l) {
      for (uint32_t v = 0; v < 2; ++v) {
        for (uint32_t b : {0u, 3u, 7u}) {
          for (uint32_t s : {0u, 5u, 15u}) {
            for (uint32_t h = 0; h < H; ++h) {
              const std::vector<uint32_t> table = {b};
              const TensorPlacement& p = built.layout.Placement(l, v == 1);
              const uint64_t got = RowOffset(built.layout, p, table, s, h) / 2;
              uint64_t region = 0, expect = 0;  // element index within its region
              switch (kind) {
                case PoolLayoutKind::kVllmNhd:  // per layer [2, nb, bs, H, D]
                  region = l;
                  expect = (((v * nb + b) * bs + s) * H + h) * D;
                  break;
                case PoolLayoutKind::kVllmHnd:  // per layer [2, nb, H, bs, D]
                  region = l;
                  expect = (((v * nb + b) * H + h) * bs + s) * D;
                  break;
                case PoolLayoutKind::kSglang:  // k_buffer[l], v_buffer[l]: [nb*bs, H, D]
                  region = 2 * l + v;
                  expect = ((b * bs + s) * H + h) * D;
                  break;
                case PoolLayoutKind::kTrtllm:  // [nb, L, 2, H, bs, D]
                  region = 0;
                  expect = ((((b * L + l) * 2 + v) * H + h) * bs + s) * D;
                  break;
              }
              EXPECT_EQ(p.region, region);
              EXPECT_EQ(got, expect) << kvgen::PoolLayoutKindName(kind) << " l" << l << " v" << v
                                     << " b" << b << " s" << s << " h" << h;
            }
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace spectrumkv
