// Tier planning: from per-token importance scores to a tier per token (or per layer and token)
// under a budget. Backend-independent host code; every backend packs the plan it is given.
//
// Budgets (SPEC.md): the element budget b = (1/n) Σ c(tier) with c = 1, 1/2, 1/4, 0 for FP16,
// INT8, INT4 and DROP; the wire budget = all payload bytes / FP16 KV bytes, metadata included.
// Either can be planned for; the plan never exceeds it. Budgets are taken to 9 decimal places.
// Tier counts are floored and the leftover goes to the next upgrade (3-tier greedy: all INT4,
// top ranks to INT8, the very top to FP16). A budget below what the policy's tiers reach is met
// by dropping the lowest-ranked non-sink tokens, or rejected, as PlanOptions asks.
#ifndef SPECTRUMKV_KERNELS_API_PLAN_H_
#define SPECTRUMKV_KERNELS_API_PLAN_H_

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/api/types.h"
#include "kernels/api/wire_format.h"

namespace spectrumkv {

enum class BudgetKind : uint8_t {
  kElement = 0,  // the paper's b: element bytes / FP16 bytes
  kWire = 1,     // all payload bytes (scales, tier maps, headers, padding) / FP16 bytes
};

enum class OnUnreachable : uint8_t {
  kDrop = 0,    // drop the lowest-ranked non-sink tokens until the budget holds
  kReject = 1,  // fail with INVALID_ARGUMENT
};

struct PlanOptions {
  Policy policy = Policy::k3Tier;
  double budget = 0.5;  // fraction of the FP16 KV bytes, in (0, 1]
  BudgetKind budget_kind = BudgetKind::kElement;
  OnUnreachable on_unreachable = OnUnreachable::kDrop;
  uint32_t sink_tokens = 4;  // the first s tokens rank first and are never dropped
  double first_ratio = 0.0;  // pdtrim: share of kept tokens taken from the front (0 = sinks)
  uint64_t seed = 0;         // random_tier
  // Per-layer budgets b_l = b + (l - (L-1)/2) * layer_slope (clipped above at 1), one tier map
  // per layer. layer_slope = 0 with per_layer true gives L identical maps.
  bool per_layer = false;
  double layer_slope = 0.0;
  Quantizer quantizer = Quantizer::kAbsmax;  // wire costs depend on it
  uint8_t scoring = 0;                       // recorded in the header; a ScoringMode or 0
};

// The result of planning: tier codes and what the payload will look like.
struct TierPlan {
  PayloadDesc desc;
  std::vector<uint8_t> tiers;  // desc.num_maps() * num_tokens Tier codes, map-major
  WireLayout layout;

  std::span<const uint8_t> MapTiers(uint32_t map) const {
    return std::span<const uint8_t>(tiers).subspan(uint64_t{map} * desc.num_tokens,
                                                   desc.num_tokens);
  }
  // Realized element budget: Σ c(tier) over all maps and tokens / (maps * tokens).
  double ElementBudget() const;
  // Realized wire budget: layout.total_bytes / FP16 KV bytes.
  double WireBudget() const;
};

// Realized budgets of any payload layout (the receiver computes them from the prelude).
double ElementBudgetOf(const WireLayout& layout);
double WireBudgetOf(const WireLayout& layout);

// The part of planning that does not depend on the scores. Tier counts follow from the budget
// alone, so the payload layout is known before any token is scored; which token gets which tier
// is then a function of its rank only: ranks [segments[i-1].end_rank, segments[i].end_rank) get
// segments[i].tier (the first segment starts at rank 0, the last ends at num_tokens). PlanTiers is
// PlanSkeletonFor, RankTokens and AssignByRank; the CUDA backend ranks and assigns on the device
// from the same skeleton.
struct RankSegment {
  uint32_t end_rank = 0;
  Tier tier = Tier::kDrop;
};
inline constexpr int kMaxRankSegments = 5;  // sinks, FP16, INT8, INT4, DROP
using MapSegments = std::array<RankSegment, kMaxRankSegments>;

struct PlanSkeleton {
  // desc and layout are final. tiers is filled only when ranked is false.
  TierPlan plan;
  // False for policies whose tiers do not depend on scores (pdtrim, random_tier): plan.tiers is
  // already the answer. True: rank the tokens, then assign by segments.
  bool ranked = true;
  // Ranks [0, sinks) are positions [0, sinks) in order (RankTokens).
  uint32_t sinks = 0;
  std::vector<MapSegments> segments;  // one per tier map, when ranked
};

// The skeleton of PlanTiers(shape, dtype, num_tokens, scores, options) for any scores: the same
// errors for the same options (INVALID_ARGUMENT), the same layout and, once ranked, the same tiers.
absl::StatusOr<PlanSkeleton> PlanSkeletonFor(const ModelShape& shape, DType dtype,
                                             uint32_t num_tokens, const PlanOptions& options);

// Fills skeleton.plan.tiers from `ranking` (RankTokens order, num_tokens entries) when
// skeleton.ranked; a no-op otherwise.
void AssignByRank(PlanSkeleton& skeleton, std::span<const uint32_t> ranking);

// Plans tiers for `num_tokens` tokens of a model with `shape` and `dtype`, ranking by `scores`
// (one per token, higher = more important; NaN ranks last). Sinks rank first whatever their
// score. Ties break towards the lower position. Returns INVALID_ARGUMENT for bad options, a
// budget out of reach under kReject, or a budget too small for the sinks.
absl::StatusOr<TierPlan> PlanTiers(const ModelShape& shape, DType dtype, uint32_t num_tokens,
                                   std::span<const float> scores, const PlanOptions& options);

// Builds a plan from explicit tier codes (tests, replays). `tiers` is map-major with 1 or
// num_layers maps.
absl::StatusOr<TierPlan> PlanFromTiers(const ModelShape& shape, DType dtype, uint32_t num_tokens,
                                       std::vector<uint8_t> tiers, Policy policy,
                                       Quantizer quantizer, uint8_t scoring = 0);

// The ranking PlanTiers uses: sinks in position order, then descending score, ties by position.
std::vector<uint32_t> RankTokens(std::span<const float> scores, uint32_t sink_tokens);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_PLAN_H_
