// Importance-scoring options and the backend-independent parts of scoring.
//
// A score is one float per token, higher = more important. The planner pins sinks on top
// whatever their score, so scoring never needs to special-case them.
#ifndef SPECTRUMKV_KERNELS_API_SCORING_H_
#define SPECTRUMKV_KERNELS_API_SCORING_H_

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/api/layout.h"
#include "kernels/api/types.h"

namespace spectrumkv {

struct ScoreOptions {
  ScoringMode mode = ScoringMode::kKeyNorm;

  // kAttention (SnapKV-style): the last `window` prompt queries of every layer, post-RoPE,
  // float32, laid out [num_layers][window][num_q_heads][head_dim]. num_q_heads must be a
  // multiple of the model's KV heads (GQA groups). Query i sits at position n - window + i and
  // attends causally. score_j = Σ_layers Σ_q-heads Σ_window softmax(q·k / sqrt(d))_j, then a
  // 1-D max-pool of width pool_kernel (odd; 1 = none), then × exp(-recency_decay·(n-1-j)).
  std::span<const float> window_queries;
  uint32_t window = 0;
  uint32_t num_q_heads = 0;
  uint32_t pool_kernel = 5;
  double recency_decay = 0.0;

  // kExternal: one score per token, supplied by the frontend.
  std::span<const float> external_scores;

  // At most this many threads for a pass over the KV (a backend that scores on several); 0: the
  // backend's own count.
  uint32_t max_threads = 0;
};

// INVALID_ARGUMENT naming the field if the options do not fit the model and token count.
absl::Status ValidateScoreOptions(const ScoreOptions& options, const ModelShape& shape,
                                  uint32_t num_tokens);

// The paper's positional heuristic (paper.md §4.2): sinks 1.0, exp(-0.01 (j-4)) from the front,
// max with a 0.3 → 0.8 ramp over the last 20%, min-max normalized.
void PositionalScores(std::span<float> scores);

// The backend-independent start of Codec::Score: checks the layout, the size of `scores` and
// the options, and fills `scores` for the modes that read no KV (external, positional).
// Returns true when `scores` is complete; false when the backend must read the KV (key_norm,
// attention), which ValidateKvBuffer has then passed.
absl::StatusOr<bool> ScoreWithoutKv(const KvBuffer& kv, const ScoreOptions& options,
                                    std::span<float> scores);

// The SnapKV post-processing of attention mass, in place: max-pool then recency decay.
void PoolAndDecay(std::span<float> scores, uint32_t pool_kernel, double recency_decay);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_SCORING_H_
