#include "kernels/api/plan.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv {
namespace {

// Whether a plan is sent progressively under the progressive quantizer: a ranked plan (the
// bases then leave while the tokens are scored) of INT8 and INT4 tokens only, with both tiers
// used (one tier needs no ranking). Other plans are absmax payloads.
// Whether a policy's tiers follow a ranking of the tokens (pdtrim's and random_tier's do not).
bool RankedPolicy(Policy p) { return p != Policy::kPdTrim && p != Policy::kRandomTier; }

bool ProgressiveFits(bool ranked, std::span<const TierCounts> counts) {
  TierCounts total;
  for (const TierCounts& c : counts) {
    if (c[Tier::kFp16] != 0 || c[Tier::kDrop] != 0) return false;
    for (int t = 0; t < kNumTiers; ++t) total.n[t] += c.n[t];
  }
  return ranked && total[Tier::kInt8] != 0 && total[Tier::kInt4] != 0;
}

uint32_t QuantizerFlags(Quantizer q) {
  switch (q) {
    case Quantizer::kKeyChannelNorm:
      return kFlagKeyChannelNorm;
    case Quantizer::kProgressive:
      return kFlagProgressive;
    case Quantizer::kAbsmax:
      break;
  }
  return 0;
}

constexpr uint64_t kPpb = 1'000'000'000;

__extension__ typedef unsigned __int128 Uint128;

// Tiers from most to least precise; a policy enables a subset.
constexpr Tier kByPrecision[] = {Tier::kFp16, Tier::kInt8, Tier::kInt4};

uint8_t Bit(Tier t) { return static_cast<uint8_t>(1u << static_cast<int>(t)); }

uint8_t AllowedTiers(Policy p) {
  switch (p) {
    case Policy::k3Tier:
    case Policy::kSinkProtect:
    case Policy::kRandomTier:
      return Bit(Tier::kFp16) | Bit(Tier::kInt8) | Bit(Tier::kInt4);
    case Policy::k2Tier:
      return Bit(Tier::kFp16) | Bit(Tier::kInt8);
    case Policy::kUniformInt8:
      return Bit(Tier::kInt8);
    case Policy::kUniformInt4:
      return Bit(Tier::kInt4);
    case Policy::kPdTrim:
      return Bit(Tier::kFp16);
  }
  return 0;
}

// floor(ppb * x / 1e9) without overflow.
uint64_t ScaleFloor(uint64_t ppb, uint64_t x) {
  return static_cast<uint64_t>(static_cast<Uint128>(ppb) * x / kPpb);
}

absl::StatusOr<uint64_t> FractionToPpb(double value, const char* what) {
  if (!std::isfinite(value) || value < 0.0 || value > 1.0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s %g is outside [0, 1]", what, value));
  }
  return static_cast<uint64_t>(std::llround(value * static_cast<double>(kPpb)));
}

// Per-token costs of one tier map, in the unit of its budget.
using Costs = std::array<uint64_t, kNumTiers>;

// Lowers the largest entries of `budgets` until they sum to at most `total` (rounding of
// per-layer budgets must never push the whole payload over the request's budget).
void CapSum(std::vector<uint64_t>& budgets, uint64_t total) {
  uint64_t sum = std::accumulate(budgets.begin(), budgets.end(), uint64_t{0});
  while (sum > total) {
    auto it = std::max_element(budgets.begin(), budgets.end());
    const uint64_t dec = std::min(sum - total, *it);
    *it -= dec;
    sum -= dec;
  }
}

struct MapFill {
  Costs cost;
  uint64_t budget = 0;
  uint8_t allowed = 0;
  bool sinks_fp16 = false;
  uint32_t sinks = 0;
  OnUnreachable on_unreachable = OnUnreachable::kDrop;
  const PlanOptions* options = nullptr;
};

// Gives the token at ranking[k] the tier of rank k's segment, for every rank of one map.
void AssignMap(const MapSegments& segments, std::span<const uint32_t> ranking,
               std::span<uint8_t> map) {
  uint32_t begin = 0;
  for (const RankSegment& r : segments) {
    for (uint32_t k = begin; k < r.end_rank; ++k) map[ranking[k]] = static_cast<uint8_t>(r.tier);
    begin = std::max(begin, r.end_rank);
  }
}

// Greedy fill of one tier map of `n` tokens (see plan.h), as tiers by rank. Every token starts at
// the least precise enabled tier (sinks at FP16 under sinkprotect); the lowest ranks are dropped
// while the budget does not hold; the leftover upgrades the top non-sink-pinned ranks one tier at
// a time. The result only depends on ranks, never on scores.
absl::StatusOr<MapSegments> FillGreedy(const MapFill& f, uint32_t map, uint32_t n) {
  const uint32_t s = std::min(f.sinks, n);
  std::vector<Tier> chain;  // enabled tiers, least precise first
  for (int i = 2; i >= 0; --i) {
    if (f.allowed & Bit(kByPrecision[i])) chain.push_back(kByPrecision[i]);
  }
  const Tier floor_tier = chain.front();
  const auto c = [&](Tier t) { return f.cost[static_cast<int>(t)]; };
  Uint128 cost = static_cast<Uint128>(n) * c(floor_tier);
  // Ranks [0, pinned) are the sinks held at FP16 (RankTokens puts them first).
  const uint32_t pinned = f.sinks_fp16 ? s : 0;
  cost += static_cast<Uint128>(pinned) * (c(Tier::kFp16) - c(floor_tier));
  uint32_t kept = n;
  if (cost > f.budget) {
    if (f.on_unreachable == OnUnreachable::kReject) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "budget %g (%s) is below what policy %s reaches without dropping tokens (map %u); "
          "allow dropping or raise the budget",
          f.options->budget, f.options->budget_kind == BudgetKind::kWire ? "wire" : "element",
          PolicyName(f.options->policy), map));
    }
    const uint64_t per = c(floor_tier);
    const Uint128 need = cost - f.budget;
    const Uint128 drops = (need + per - 1) / per;
    if (drops > n - s) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "budget %g is too small to keep the %u sink tokens (map %u)", f.options->budget, s, map));
    }
    const uint32_t d = static_cast<uint32_t>(drops);
    cost -= static_cast<Uint128>(d) * per;
    kept = n - d;
  }
  // Upgrade candidates: ranks [pinned, kept), best first. Each upgrade step takes a prefix of
  // the previous step's candidates.
  uint64_t left = f.budget - static_cast<uint64_t>(cost);
  std::array<uint64_t, 3> up{};  // up[k]: candidates at chain[k] or above
  up[0] = kept - pinned;
  for (size_t k = 1; k < chain.size(); ++k) {
    const uint64_t delta = c(chain[k]) - c(chain[k - 1]);
    up[k] = std::min<uint64_t>(up[k - 1], delta ? left / delta : 0);
    left -= up[k] * delta;
  }
  MapSegments seg{};
  int i = 0;
  seg[i++] = {pinned, Tier::kFp16};
  for (size_t k = chain.size(); k-- > 0;) {
    seg[i++] = {static_cast<uint32_t>(pinned + up[k]), chain[k]};
  }
  while (i < kMaxRankSegments) seg[i++] = {n, Tier::kDrop};
  return seg;
}

// pdtrim: keep the front and the most recent tokens at FP16 (the budget decides how many),
// drop everything else. Always drops: that is the baseline.
void FillPdTrim(const MapFill& f, uint64_t first_ratio_ppb, std::span<uint8_t> tiers) {
  const uint64_t n = tiers.size();
  const uint64_t keep = std::min<uint64_t>(n, f.budget / f.cost[static_cast<int>(Tier::kFp16)]);
  const uint64_t s = std::min<uint64_t>(f.sinks, keep);
  const uint64_t front = std::min(keep, std::max(s, ScaleFloor(first_ratio_ppb, keep)));
  const uint64_t back = keep - front;
  for (uint64_t t = 0; t < n; ++t) {
    const bool kept = t < front || t >= n - back;
    tiers[t] = static_cast<uint8_t>(kept ? Tier::kFp16 : Tier::kDrop);
  }
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

absl::StatusOr<TierPlan> Finish(const PayloadDesc& desc, std::vector<uint8_t> tiers) {
  std::vector<TierCounts> counts(desc.num_maps());
  for (uint32_t m = 0; m < desc.num_maps(); ++m) {
    for (uint32_t t = 0; t < desc.num_tokens; ++t) {
      const uint8_t code = tiers[uint64_t{m} * desc.num_tokens + t];
      if (code >= kNumTiers) {
        return absl::InvalidArgumentError(absl::StrFormat("tier code %u is not a tier", code));
      }
      ++counts[m].n[code];
    }
  }
  TierPlan plan;
  plan.desc = desc;
  SPECTRUMKV_ASSIGN_OR_RETURN(plan.layout, ComputeWireLayout(desc, counts));
  plan.tiers = std::move(tiers);
  return plan;
}

}  // namespace

std::vector<uint32_t> RankTokens(std::span<const float> scores, uint32_t sink_tokens) {
  const uint32_t n = static_cast<uint32_t>(scores.size());
  const uint32_t s = std::min(sink_tokens, n);
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin() + s, order.end(), [&](uint32_t a, uint32_t b) {
    const bool na = std::isnan(scores[a]), nb = std::isnan(scores[b]);
    if (na != nb) return nb;  // NaN ranks last
    if (!na && scores[a] != scores[b]) return scores[a] > scores[b];
    return a < b;
  });
  return order;
}

double ElementBudgetOf(const WireLayout& layout) {
  static constexpr double kCost[kNumTiers] = {1.0, 0.5, 0.25, 0.0};
  double sum = 0;
  for (const TierCounts& c : layout.map_counts) {
    for (int t = 0; t < kNumTiers; ++t) sum += kCost[t] * c.n[t];
  }
  return sum / (static_cast<double>(layout.desc.num_tokens) * layout.desc.num_maps());
}

double WireBudgetOf(const WireLayout& layout) {
  return static_cast<double>(layout.total_bytes) /
         (static_cast<double>(layout.desc.num_tokens) *
          static_cast<double>(layout.desc.shape.Fp16BytesPerToken()));
}

double TierPlan::ElementBudget() const { return ElementBudgetOf(layout); }
double TierPlan::WireBudget() const { return WireBudgetOf(layout); }

absl::StatusOr<PlanSkeleton> PlanSkeletonFor(const ModelShape& shape, DType dtype,
                                             uint32_t num_tokens, const PlanOptions& options) {
  if (options.budget <= 0.0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("budget %g must be greater than 0", options.budget));
  }
  SPECTRUMKV_ASSIGN_OR_RETURN(const uint64_t budget_ppb, FractionToPpb(options.budget, "budget"));
  SPECTRUMKV_ASSIGN_OR_RETURN(const uint64_t first_ratio_ppb,
                              FractionToPpb(options.first_ratio, "first_ratio"));
  if (!std::isfinite(options.layer_slope)) {
    return absl::InvalidArgumentError("layer_slope must be finite");
  }
  const uint8_t allowed = AllowedTiers(options.policy);
  if (allowed == 0) return absl::InvalidArgumentError("unknown policy");
  if (options.quantizer != Quantizer::kAbsmax && options.quantizer != Quantizer::kKeyChannelNorm &&
      options.quantizer != Quantizer::kProgressive) {
    return absl::InvalidArgumentError("unknown quantizer");
  }

  PayloadDesc desc;
  desc.shape = shape;
  desc.dtype = dtype;
  desc.num_tokens = num_tokens;
  desc.flags = (options.per_layer ? kFlagPerLayerTiers : 0u) | QuantizerFlags(options.quantizer);
  desc.policy = options.policy;
  desc.scoring = options.scoring;
  // Validates the shape before any arithmetic on it.
  std::vector<TierCounts> probe(desc.num_maps());
  for (auto& c : probe) c[desc.progressive() ? Tier::kInt4 : Tier::kDrop] = num_tokens;
  SPECTRUMKV_RETURN_IF_ERROR(ComputeWireLayout(desc, probe).status());

  const uint32_t maps = desc.num_maps();
  const uint32_t layers_per_map = options.per_layer ? 1 : shape.num_layers;

  // Per-map budget fractions (ppb).
  std::vector<uint64_t> map_ppb(maps, budget_ppb);
  if (options.per_layer) {
    for (uint32_t l = 0; l < maps; ++l) {
      const double b_l = options.budget + (static_cast<double>(l) -
                                           (static_cast<double>(shape.num_layers) - 1) / 2) *
                                              options.layer_slope;
      if (b_l < 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "per-layer budget of layer %u is %g < 0: layer_slope %g is too steep for budget %g", l,
            b_l, options.layer_slope, options.budget));
      }
      map_ppb[l] = static_cast<uint64_t>(std::llround(std::min(b_l, 1.0) * kPpb));
    }
  }

  // Costs and budgets in the planning unit of the budget kind.
  Costs cost{};
  std::vector<uint64_t> budgets(maps);
  if (options.budget_kind == BudgetKind::kElement) {
    cost = {4, 2, 1, 0};  // quarter-token units
    for (uint32_t m = 0; m < maps; ++m)
      budgets[m] = ScaleFloor(map_ppb[m], uint64_t{4} * num_tokens);
    CapSum(budgets, ScaleFloor(budget_ppb, uint64_t{4} * num_tokens * maps));
  } else {
    for (int t = 0; t < kNumTiers; ++t) {
      cost[t] = layers_per_map * TierBytesPerTokenLayer(shape, static_cast<Tier>(t));
    }
    const uint64_t overhead = WireOverheadBound(desc);
    const uint64_t fp16_total = uint64_t{num_tokens} * shape.Fp16BytesPerToken();
    const uint64_t total_raw = ScaleFloor(budget_ppb, fp16_total);
    if (total_raw < overhead) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "wire budget %g (%u bytes) is below the payload's fixed overhead of up to %u bytes "
          "(header, tier maps, trailers)",
          options.budget, total_raw, overhead));
    }
    const uint64_t total = total_raw - overhead;
    const uint64_t share = (overhead + maps - 1) / maps;
    for (uint32_t m = 0; m < maps; ++m) {
      const uint64_t raw = ScaleFloor(map_ppb[m], fp16_total / maps);
      budgets[m] = raw > share ? raw - share : 0;
    }
    CapSum(budgets, total);
  }

  PlanSkeleton skeleton;
  skeleton.sinks = std::min(options.sink_tokens, num_tokens);
  skeleton.ranked = RankedPolicy(options.policy);
  std::vector<uint8_t> tiers;
  std::vector<TierCounts> counts(maps);
  if (skeleton.ranked) skeleton.segments.resize(maps);
  // random_tier: greedy's tier counts at random positions, i.e. greedy over a random ranking.
  std::vector<uint32_t> random_ranking;
  if (options.policy == Policy::kRandomTier) {
    random_ranking.resize(num_tokens);
    std::iota(random_ranking.begin(), random_ranking.end(), 0u);
    uint64_t state = options.seed;
    const uint32_t s = skeleton.sinks;
    for (uint32_t i = num_tokens; i > s + 1; --i) {  // Fisher-Yates over the non-sinks
      const uint32_t j = s + static_cast<uint32_t>(SplitMix64(state) % (i - s));
      std::swap(random_ranking[i - 1], random_ranking[j]);
    }
  }
  if (!skeleton.ranked) tiers.resize(uint64_t{maps} * num_tokens);
  for (uint32_t m = 0; m < maps; ++m) {
    MapFill f;
    f.cost = cost;
    f.budget = budgets[m];
    f.allowed = allowed;
    f.sinks_fp16 = options.policy == Policy::kSinkProtect;
    f.sinks = options.sink_tokens;
    f.on_unreachable = options.on_unreachable;
    f.options = &options;
    std::span<uint8_t> map_tiers;
    if (!skeleton.ranked) map_tiers = {tiers.data() + uint64_t{m} * num_tokens, num_tokens};
    if (options.policy == Policy::kPdTrim) {
      FillPdTrim(f, first_ratio_ppb, map_tiers);
      for (uint8_t t : map_tiers) ++counts[m].n[t];
      continue;
    }
    SPECTRUMKV_ASSIGN_OR_RETURN(const MapSegments seg, FillGreedy(f, m, num_tokens));
    uint32_t begin = 0;
    for (const RankSegment& r : seg) {
      counts[m][r.tier] += r.end_rank - begin;
      begin = r.end_rank;
    }
    if (skeleton.ranked) {
      skeleton.segments[m] = seg;
    } else {
      AssignMap(seg, random_ranking, map_tiers);
    }
  }
  if (desc.progressive() && !ProgressiveFits(skeleton.ranked, counts)) {
    desc.flags &= ~kFlagProgressive;
  }
  skeleton.plan.desc = desc;
  SPECTRUMKV_ASSIGN_OR_RETURN(skeleton.plan.layout, ComputeWireLayout(desc, counts));
  skeleton.plan.tiers = std::move(tiers);
  return skeleton;
}

void AssignByRank(PlanSkeleton& skeleton, std::span<const uint32_t> ranking) {
  if (!skeleton.ranked) return;
  const uint32_t n = skeleton.plan.desc.num_tokens;
  SPECTRUMKV_CHECK(ranking.size() == n);
  std::vector<uint8_t>& tiers = skeleton.plan.tiers;
  tiers.assign(uint64_t{skeleton.plan.desc.num_maps()} * n, 0);
  for (size_t m = 0; m < skeleton.segments.size(); ++m) {
    AssignMap(skeleton.segments[m], ranking, {tiers.data() + uint64_t{m} * n, n});
  }
}

absl::StatusOr<TierPlan> PlanTiers(const ModelShape& shape, DType dtype, uint32_t num_tokens,
                                   std::span<const float> scores, const PlanOptions& options) {
  if (scores.size() != num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%u scores for %u tokens", scores.size(), num_tokens));
  }
  SPECTRUMKV_ASSIGN_OR_RETURN(PlanSkeleton skeleton,
                              PlanSkeletonFor(shape, dtype, num_tokens, options));
  if (!skeleton.ranked) return std::move(skeleton.plan);
  AssignByRank(skeleton, RankTokens(scores, options.sink_tokens));
  // Recounted from the tiers themselves: the host plan is the reference the device plan is
  // checked against, so its layout does not trust the skeleton's counts.
  return Finish(skeleton.plan.desc, std::move(skeleton.plan.tiers));
}

absl::StatusOr<TierPlan> PlanFromTiers(const ModelShape& shape, DType dtype, uint32_t num_tokens,
                                       std::vector<uint8_t> tiers, Policy policy,
                                       Quantizer quantizer, uint8_t scoring) {
  PayloadDesc desc;
  desc.shape = shape;
  desc.dtype = dtype;
  desc.num_tokens = num_tokens;
  desc.policy = policy;
  desc.scoring = scoring;
  desc.flags = QuantizerFlags(quantizer);
  if (desc.progressive()) {
    std::vector<TierCounts> counts(1);
    for (uint8_t t : tiers) ++counts[0].n[t & 3u];
    if (!ProgressiveFits(RankedPolicy(policy), counts)) desc.flags &= ~kFlagProgressive;
  }
  if (num_tokens == 0) return absl::InvalidArgumentError("num_tokens must be at least 1");
  if (tiers.size() == uint64_t{shape.num_layers} * num_tokens && shape.num_layers > 1) {
    desc.flags |= kFlagPerLayerTiers;
  } else if (tiers.size() != num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%u tier codes: expected %u (one map) or %u (per layer)", tiers.size(),
                        num_tokens, uint64_t{shape.num_layers} * num_tokens));
  }
  return Finish(desc, std::move(tiers));
}

}  // namespace spectrumkv
