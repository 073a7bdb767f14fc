// Synthetic KV caches that look like real ones where it matters to the codec: attention sinks
// with large norms, per-token magnitude spread (so key_norm has something to rank), and key
// channels with large constant offsets and scales (the outlier channels of Qwen2.5-style models
// that break per-token INT4). Deterministic for a given seed.
#ifndef SPECTRUMKV_CLIENT_KVGEN_SYNTHETIC_H_
#define SPECTRUMKV_CLIENT_KVGEN_SYNTHETIC_H_

#include <cstdint>
#include <vector>

#include "kernels/api/layout.h"

namespace spectrumkv::kvgen {

struct SyntheticOptions {
  uint64_t seed = 1;
  uint32_t sink_tokens = 4;  // first tokens get sink_scale times the magnitude
  float sink_scale = 6.0f;
  float token_spread = 0.5f;      // sigma of the log-normal per-token magnitude
  uint32_t outlier_channels = 2;  // key channels per (layer, head) with offset and scale
  float outlier_offset = 8.0f;    // constant added to those key channels, in units of sigma
  float outlier_scale = 4.0f;     // their extra spread
};

// Fills every row of `kv` (host memory, validated) with synthetic values.
void FillSynthetic(const KvBuffer& kv, const SyntheticOptions& options);

// Window queries for attention scoring of `kv`: [layers][window][num_q_heads][head_dim] floats,
// each a noisy copy of the key of its own position (so attention has structure) plus a
// component towards the sinks.
std::vector<float> SyntheticWindowQueries(const KvBuffer& kv, uint32_t window, uint32_t num_q_heads,
                                          uint64_t seed);

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_SYNTHETIC_H_
