#include "tests/testing/kv_testing.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_format.h"
#include "common/half.h"
#include "gtest/gtest.h"
#include "kernels/api/wire_format.h"

namespace spectrumkv::testing {
namespace {

// One unit in the last place of the dtype at |v| (v finite).
float UlpAt(DType dtype, uint16_t bits) {
  const uint16_t a = bits & 0x7FFFu;
  return ToFloat(dtype, static_cast<uint16_t>(a + 1)) - ToFloat(dtype, a);
}

uint16_t Load16(const std::vector<uint8_t>& payload, uint64_t offset) {
  return LoadLe16(payload.data() + offset);
}

}  // namespace

uint64_t FreshSeed() {
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

TestPool MakePool(kvgen::PoolLayoutKind kind, const ModelShape& shape, DType dtype,
                  uint32_t block_size, uint32_t num_tokens, uint64_t seed) {
  kvgen::PoolSpec spec;
  spec.kind = kind;
  spec.shape = shape;
  spec.dtype = dtype;
  spec.block_size = block_size;
  spec.num_blocks = kvgen::BlocksFor(num_tokens, block_size) + 2;
  TestPool p;
  auto pool = kvgen::HostPool::Create(spec);
  EXPECT_TRUE(pool.ok()) << pool.status();
  p.pool = std::move(*pool);
  p.table = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, num_tokens, seed);
  p.num_tokens = num_tokens;
  return p;
}

void FillRandom(const KvBuffer& kv, std::mt19937_64& rng) {
  const ModelShape& s = kv.layout->shape;
  const DType dtype = kv.layout->dtype;
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  std::uniform_int_distribution<int> kind_of_row(0, 19);
  std::uniform_int_distribution<uint32_t> channel(0, s.head_dim - 1);
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    for (bool value : {false, true}) {
      const uint32_t outlier = channel(rng);
      for (uint32_t t = 0; t < kv.num_tokens; ++t) {
        for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
          uint16_t* row = HostRowPtr(kv, l, value, t, h);
          const int kind = kind_of_row(rng);
          float magnitude = std::exp(gauss(rng));
          if (kind == 0) magnitude = 0.0f;     // all-zero row
          if (kind == 1) magnitude = 1e-5f;    // tiny (subnormal fp16 range)
          if (kind == 2) magnitude = 3000.0f;  // large
          for (uint32_t c = 0; c < s.head_dim; ++c) {
            float x = gauss(rng) * magnitude;
            if (!value && c == outlier && kind > 2) x += 20.0f;  // key outlier channel
            row[c] = FromFloatRne(dtype, x);
          }
        }
      }
    }
  }
}

void FillGaussian(const KvBuffer& kv, std::mt19937_64& rng, float scale) {
  const ModelShape& s = kv.layout->shape;
  const DType dtype = kv.layout->dtype;
  std::normal_distribution<float> gauss(0.0f, 1.0f);
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    for (bool value : {false, true}) {
      for (uint32_t t = 0; t < kv.num_tokens; ++t) {
        for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
          uint16_t* row = HostRowPtr(kv, l, value, t, h);
          const float magnitude = scale * std::exp(0.5f * gauss(rng));
          for (uint32_t c = 0; c < s.head_dim; ++c) {
            row[c] = FromFloatRne(dtype, gauss(rng) * magnitude);
          }
        }
      }
    }
  }
}

std::vector<uint8_t> RandomTiers(uint32_t maps, uint32_t num_tokens, std::mt19937_64& rng) {
  std::vector<uint8_t> tiers(uint64_t{maps} * num_tokens);
  std::uniform_int_distribution<int> code(0, 3);
  for (auto& t : tiers) t = static_cast<uint8_t>(code(rng));
  if (num_tokens >= 8) {
    for (uint32_t m = 0; m < maps; ++m) {
      for (uint8_t c = 0; c < 4; ++c) tiers[uint64_t{m} * num_tokens + c] = c;
    }
  }
  return tiers;
}

std::vector<uint8_t> RandomProgressiveTiers(uint32_t maps, uint32_t num_tokens,
                                            std::mt19937_64& rng) {
  std::vector<uint8_t> tiers(uint64_t{maps} * num_tokens);
  std::uniform_int_distribution<int> code(1, 2);
  for (auto& t : tiers) t = static_cast<uint8_t>(code(rng));
  if (num_tokens >= 2) {
    for (uint32_t m = 0; m < maps; ++m) {
      tiers[uint64_t{m} * num_tokens] = 1;
      tiers[uint64_t{m} * num_tokens + 1] = 2;
    }
  }
  return tiers;
}

std::string CheckRoundTrip(const KvBuffer& src, const KvBuffer& dst, const TierPlan& plan,
                           const std::vector<uint8_t>& payload) {
  const PayloadDesc& d = plan.desc;
  const WireLayout& wl = plan.layout;
  const DType dtype = d.dtype;
  const uint32_t heads = d.shape.num_kv_heads, dim = d.shape.head_dim;
  for (uint32_t l = 0; l < d.shape.num_layers; ++l) {
    const std::span<const uint8_t> tiers = plan.MapTiers(d.MapForLayer(l));
    const LayerSection& sec = wl.layers[l];
    for (bool value : {false, true}) {
      const PartLayout& part = value ? sec.value : sec.key;
      uint64_t index[kNumTiers] = {0, 0, 0, 0};
      for (uint32_t t = 0; t < d.num_tokens; ++t) {
        const Tier tier = static_cast<Tier>(tiers[t]);
        const uint64_t i = index[tiers[t]]++;
        for (uint32_t h = 0; h < heads; ++h) {
          const uint16_t* x = HostRowPtr(src, l, value, t, h);
          const uint16_t* y = HostRowPtr(dst, l, value, t, h);
          const uint64_t row = i * heads + h;
          float s = 0.0f;
          if (tier == Tier::kInt8) s = ToFloat(dtype, Load16(payload, part.int8_scales + 2 * row));
          if (tier == Tier::kInt4) s = ToFloat(dtype, Load16(payload, part.int4_scales + 2 * row));
          // Progressive: every token's scale is its INT4 base's, at its token index; an INT8
          // row is within a 32nd of it (half a 16th of the INT4 step).
          const bool refined = d.progressive() && tier == Tier::kInt8;
          if (d.progressive()) {
            s = ToFloat(dtype, Load16(payload, part.int4_scales + 2 * (uint64_t{t} * heads + h)));
          }
          const bool kcn = tier == Tier::kInt4 && !value && d.key_channel_norm();
          for (uint32_t c = 0; c < dim; ++c) {
            const std::string where =
                absl::StrFormat("layer %u %s token %u head %u channel %u tier %s", l,
                                value ? "V" : "K", t, h, c, TierName(tier));
            if (tier == Tier::kDrop) {
              if (y[c] != 0) return where + ": a dropped row was written";
              continue;
            }
            if (tier == Tier::kFp16) {
              if (x[c] != y[c]) return where + ": FP16 row not bit-exact";
              continue;
            }
            const float xv = ToFloat(dtype, x[c]), yv = ToFloat(dtype, y[c]);
            float bound = s * ((refined ? 0.03125f : 0.5f) + 1e-5f) + 0.5f * UlpAt(dtype, y[c]);
            if (kcn) {
              const uint64_t fc = uint64_t{h} * dim + c;
              const float f = ToFloat(dtype, Load16(payload, sec.key_factors + 2 * fc));
              const float m = ToFloat(dtype, Load16(payload, sec.key_offsets + 2 * fc));
              bound = f * s * (0.5f + 1e-5f) + 1e-6f * (std::fabs(xv) + std::fabs(m)) +
                      0.5f * UlpAt(dtype, y[c]);
            }
            if (!(std::fabs(xv - yv) <= bound)) {
              return absl::StrFormat("%s: |%g - %g| = %g exceeds the bound %g (scale %g)", where,
                                     xv, yv, std::fabs(xv - yv), bound, s);
            }
          }
        }
      }
    }
  }
  return "";
}

std::vector<float> StressScores(uint32_t n, int kind, std::mt19937_64& rng) {
  std::vector<float> s(n);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const auto bits = [](uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  };
  switch (kind) {
    case 0:
      for (float& x : s) x = u(rng);
      break;
    case 1:
      for (float& x : s) {
        const uint32_t r = rng() % 8;
        x = r < 4 ? static_cast<float>(r % 3) : (r < 6 ? 0.0f : -0.0f);
      }
      break;
    case 2: {
      const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                                -std::numeric_limits<float>::quiet_NaN(),
                                bits(0x7F800001u),
                                bits(0xFFC12345u),
                                std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity(),
                                0.0f,
                                -0.0f,
                                std::numeric_limits<float>::denorm_min(),
                                -std::numeric_limits<float>::denorm_min(),
                                FLT_MAX,
                                -FLT_MAX,
                                1.0f,
                                -1.0f};
      for (float& x : s) {
        x = rng() % 3 == 0 ? u(rng) : specials[rng() % std::size(specials)];
      }
      break;
    }
    case 3: {
      const float c = u(rng);
      for (float& x : s) x = c;
      break;
    }
    case 4:
      for (uint32_t i = 0; i < n; ++i) s[i] = static_cast<float>(i) * 0.25f - 3.0f;
      break;
    default:
      for (uint32_t i = 0; i < n; ++i) s[i] = static_cast<float>((n - i) / 3);
      break;
  }
  return s;
}

PlanOptions RandomPlanOptions(std::mt19937_64& rng) {
  constexpr Policy kPolicies[] = {Policy::k3Tier,       Policy::k2Tier,       Policy::kSinkProtect,
                                  Policy::kUniformInt8, Policy::kUniformInt4, Policy::kPdTrim,
                                  Policy::kRandomTier};
  std::uniform_real_distribution<double> u(0.0, 1.0);
  PlanOptions o;
  o.policy = kPolicies[rng() % std::size(kPolicies)];
  const double budgets[] = {0.3, 0.5, 1.0, 0.05 + 0.95 * u(rng), 0.01 + 0.3 * u(rng)};
  o.budget = budgets[rng() % std::size(budgets)];
  o.budget_kind = rng() % 3 == 0 ? BudgetKind::kWire : BudgetKind::kElement;
  o.on_unreachable = rng() % 4 == 0 ? OnUnreachable::kReject : OnUnreachable::kDrop;
  o.sink_tokens = static_cast<uint32_t>(rng() % 10);
  o.first_ratio = rng() % 2 ? 0.0 : u(rng);
  o.seed = rng();
  o.per_layer = rng() % 3 == 0;
  o.layer_slope = o.per_layer && rng() % 2 ? (u(rng) - 0.5) * 0.1 : 0.0;
  o.quantizer = rng() % 2 ? Quantizer::kKeyChannelNorm : Quantizer::kAbsmax;
  return o;
}

std::string ComparePlans(const absl::StatusOr<TierPlan>& got,
                         const absl::StatusOr<TierPlan>& expect) {
  if (got.ok() != expect.ok() || got.status().code() != expect.status().code()) {
    return absl::StrFormat("status %s, host %s", got.status().ToString(),
                           expect.status().ToString());
  }
  if (!got.ok()) return "";
  if (got->tiers.size() != expect->tiers.size()) {
    return absl::StrFormat("%u tier codes, host %u", got->tiers.size(), expect->tiers.size());
  }
  for (size_t i = 0; i < got->tiers.size(); ++i) {
    if (got->tiers[i] != expect->tiers[i]) {
      return absl::StrFormat("map %u token %u: tier %u, host %u", i / got->desc.num_tokens,
                             i % got->desc.num_tokens, got->tiers[i], expect->tiers[i]);
    }
  }
  if (got->layout.total_bytes != expect->layout.total_bytes ||
      got->layout.map_counts != expect->layout.map_counts ||
      got->desc.flags != expect->desc.flags || got->desc.policy != expect->desc.policy ||
      got->desc.scoring != expect->desc.scoring) {
    return "same tiers, different layout or header";
  }
  return "";
}

}  // namespace spectrumkv::testing
