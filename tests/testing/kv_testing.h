// Helpers shared by the codec tests: random KV pools and the error bound every backend meets.
#ifndef SPECTRUMKV_TESTS_TESTING_KV_TESTING_H_
#define SPECTRUMKV_TESTS_TESTING_KV_TESTING_H_

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "client/kvgen/host_pool.h"
#include "kernels/api/plan.h"

namespace spectrumkv::testing {

// A host pool with one request's block table.
struct TestPool {
  std::unique_ptr<kvgen::HostPool> pool;
  std::vector<uint32_t> table;
  uint32_t num_tokens = 0;
  KvBuffer View() const { return pool->View(table, num_tokens); }
};

// A pool of `kind` holding `num_tokens` tokens in shuffled blocks (plus spare blocks).
TestPool MakePool(kvgen::PoolLayoutKind kind, const ModelShape& shape, DType dtype,
                  uint32_t block_size, uint32_t num_tokens, uint64_t seed);

// Fills every row with fresh random values: gaussian of random per-row magnitude, with some
// rows all zero, some tiny, some huge, and outlier channels, so every code path is exercised.
void FillRandom(const KvBuffer& kv, std::mt19937_64& rng);

// Fills every row with gaussian values of a per-row log-normal magnitude (sigma 0.5) around
// `scale`: KV whose attention logits stay moderate, so that float rounding in a backend's dot
// products (about 1e-7 relative) is far below the 1e-4 score tolerance. FillRandom's huge rows
// push logits to the thousands, where one float ulp already exceeds that tolerance.
void FillGaussian(const KvBuffer& kv, std::mt19937_64& rng, float scale = 1.0f);

// A fresh seed (from std::random_device) that a failing test prints so it can be replayed.
uint64_t FreshSeed();

// Random tier codes for `maps` maps of `num_tokens` tokens, every tier present when n >= 8.
std::vector<uint8_t> RandomTiers(uint32_t maps, uint32_t num_tokens, std::mt19937_64& rng);
// As RandomTiers, INT8 and INT4 only (a progressive payload's tiers).
std::vector<uint8_t> RandomProgressiveTiers(uint32_t maps, uint32_t num_tokens,
                                            std::mt19937_64& rng);

// Scores that stress a ranking, one of kScoreKinds kinds: 0 uniform in [-1, 1]; 1 heavy ties
// (four values, zeros of both signs); 2 specials (NaNs of both signs and several payloads, +-Inf,
// +-0, denormals, +-FLT_MAX, duplicates); 3 all equal; 4 ascending; 5 descending with ties.
inline constexpr int kScoreKinds = 6;
std::vector<float> StressScores(uint32_t n, int kind, std::mt19937_64& rng);

// Random planning options: any policy, budget kind and on_unreachable, budgets from far below
// to 1, 0 to 9 sinks, pdtrim first_ratio, per-layer budgets with a random slope, either
// quantizer. Some are invalid (PlanTiers rejects them), which tests compare too.
PlanOptions RandomPlanOptions(std::mt19937_64& rng);

// Empty if `got` equals the host plan `expect` (status code, tiers, layout); else what differs.
std::string ComparePlans(const absl::StatusOr<TierPlan>& got,
                         const absl::StatusOr<TierPlan>& expect);

// Checks dst against src for every kept row: FP16 rows bit-exact, quantized rows within the
// bound of docs/wire-format.md (s/2 plus half an ulp of the dtype), dropped rows untouched
// (still equal to `dst_before` fill value 0). Returns an empty string or the first violation.
std::string CheckRoundTrip(const KvBuffer& src, const KvBuffer& dst, const TierPlan& plan,
                           const std::vector<uint8_t>& payload);

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_TESTING_KV_TESTING_H_
