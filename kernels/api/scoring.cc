#include "kernels/api/scoring.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv {

absl::Status ValidateScoreOptions(const ScoreOptions& o, const ModelShape& shape,
                                  uint32_t num_tokens) {
  switch (o.mode) {
    case ScoringMode::kKeyNorm:
    case ScoringMode::kPositional:
      return absl::OkStatus();
    case ScoringMode::kExternal:
      if (o.external_scores.size() != num_tokens) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "scores: %u external scores for %u tokens", o.external_scores.size(), num_tokens));
      }
      return absl::OkStatus();
    case ScoringMode::kAttention: {
      if (o.window == 0 || o.window > num_tokens) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "window_queries.window: %u is outside [1, %u tokens]", o.window, num_tokens));
      }
      if (o.num_q_heads == 0 || o.num_q_heads % shape.num_kv_heads != 0 ||
          o.num_q_heads > 64 * shape.num_kv_heads) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "window_queries.num_q_heads: %u is not a multiple (at most 64x) of %u KV heads",
            o.num_q_heads, shape.num_kv_heads));
      }
      const uint64_t expected =
          uint64_t{shape.num_layers} * o.window * o.num_q_heads * shape.head_dim;
      if (o.window_queries.size() != expected) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "window_queries: %u floats, expected %u (layers x window x q_heads x head_dim)",
            o.window_queries.size(), expected));
      }
      if (o.pool_kernel == 0 || o.pool_kernel % 2 == 0 || o.pool_kernel > 63) {
        return absl::InvalidArgumentError(
            absl::StrFormat("pool_kernel: %u is not odd in [1, 63]", o.pool_kernel));
      }
      if (!std::isfinite(o.recency_decay) || o.recency_decay < 0) {
        return absl::InvalidArgumentError("recency_decay must be finite and >= 0");
      }
      for (float q : o.window_queries) {
        if (!std::isfinite(q)) {
          return absl::InvalidArgumentError("window_queries: non-finite value");
        }
      }
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError("unknown scoring mode");
}

void PositionalScores(std::span<float> scores) {
  const size_t n = scores.size();
  if (n == 0) return;
  constexpr size_t kSinks = 4;
  for (size_t j = 0; j < n; ++j) {
    scores[j] = j < kSinks ? 1.0f : static_cast<float>(std::exp(-0.01 * double(j - kSinks)));
  }
  const size_t start = static_cast<size_t>(std::floor(0.8 * double(n)));
  for (size_t j = start; j < n; ++j) {
    const double span = n - 1 > start ? double(n - 1 - start) : 1.0;
    const float ramp = static_cast<float>(0.3 + 0.5 * double(j - start) / span);
    scores[j] = std::max(scores[j], ramp);
  }
  const auto [lo, hi] = std::minmax_element(scores.begin(), scores.end());
  const float min = *lo, range = *hi - *lo;
  for (float& s : scores) s = range > 0 ? (s - min) / range : 1.0f;
}

void PoolAndDecay(std::span<float> scores, uint32_t pool_kernel, double recency_decay) {
  const size_t n = scores.size();
  if (pool_kernel > 1) {
    const size_t half = pool_kernel / 2;
    std::vector<float> pooled(n);
    for (size_t j = 0; j < n; ++j) {
      const size_t lo = j >= half ? j - half : 0, hi = std::min(n - 1, j + half);
      float m = scores[lo];
      for (size_t k = lo + 1; k <= hi; ++k) m = std::max(m, scores[k]);
      pooled[j] = m;
    }
    std::copy(pooled.begin(), pooled.end(), scores.begin());
  }
  if (recency_decay > 0) {
    for (size_t j = 0; j < n; ++j) {
      scores[j] *= static_cast<float>(std::exp(-recency_decay * double(n - 1 - j)));
    }
  }
}

absl::StatusOr<bool> ScoreWithoutKv(const KvBuffer& kv, const ScoreOptions& options,
                                    std::span<float> scores) {
  if (kv.layout == nullptr) return absl::InvalidArgumentError("layout: missing");
  if (scores.size() != kv.num_tokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%u score slots for %u tokens", scores.size(), kv.num_tokens));
  }
  SPECTRUMKV_RETURN_IF_ERROR(ValidateScoreOptions(options, kv.layout->shape, kv.num_tokens));
  switch (options.mode) {
    case ScoringMode::kExternal:
      std::copy(options.external_scores.begin(), options.external_scores.end(), scores.begin());
      return true;
    case ScoringMode::kPositional:
      PositionalScores(scores);
      return true;
    case ScoringMode::kKeyNorm:
    case ScoringMode::kAttention:
      break;
  }
  SPECTRUMKV_RETURN_IF_ERROR(ValidateKvBuffer(kv));
  return false;
}

}  // namespace spectrumkv
