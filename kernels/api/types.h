// Small value types shared by every part of the codec: model shape, tiers, quantizers, policies.
#ifndef SPECTRUMKV_KERNELS_API_TYPES_H_
#define SPECTRUMKV_KERNELS_API_TYPES_H_

#include <cstdint>
#include <optional>
#include <string_view>

#include "common/half.h"

namespace spectrumkv {

// Limits every layout, plan and payload must respect; the wire parser enforces them too.
inline constexpr uint32_t kMaxLayers = 255;
inline constexpr uint32_t kMaxKvHeads = 1024;
inline constexpr uint32_t kMaxHeadDim = 1024;
inline constexpr uint32_t kMaxTokens = 1u << 24;

// The geometry of a model's KV cache. head_dim must be a multiple of 8.
struct ModelShape {
  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;

  // Bytes of one token's FP16/BF16 K and V over all layers and heads.
  uint64_t Fp16BytesPerToken() const {
    return uint64_t{2} * num_layers * num_kv_heads * head_dim * 2;
  }
  bool operator==(const ModelShape&) const = default;
};

// Precision tier of one token. The numeric values are the 2-bit codes of the wire format.
enum class Tier : uint8_t {
  kFp16 = 0,  // the model's native 16-bit dtype (fp16 or bf16), sent bit-exact
  kInt8 = 1,
  kInt4 = 2,
  kDrop = 3,
};
inline constexpr int kNumTiers = 4;
std::string_view TierName(Tier t);

// How quantized tiers are encoded.
enum class Quantizer : uint8_t {
  // The paper's: symmetric absmax per (token, KV head) over head_dim, INT8 ±127, INT4 ±7.
  kAbsmax = 1,
  // Keys in the INT4 tier are first centred and divided per channel by factors computed over
  // the layer's INT4 tokens (sent once per layer and head); otherwise as kAbsmax.
  kKeyChannelNorm = 2,
  // For plans of INT8 and INT4 tokens only (3tier from b = 0.25 to 0.5): every token's INT4
  // codes as kAbsmax (the base), and for an INT8 token a 4-bit refinement within its INT4 step
  // (INT8's bytes, a step of amax/112 instead of amax/127). The bases do not depend on the
  // ranking, so a sender can send them while it scores. A plan with FP16 or dropped tokens is
  // planned and encoded as kAbsmax.
  kProgressive = 3,
};
std::string_view QuantizerName(Quantizer q);
std::optional<Quantizer> ParseQuantizer(std::string_view name);

enum class Policy : uint8_t {
  k3Tier = 1,        // greedy FP16/INT8/INT4 by rank
  k2Tier = 2,        // FP16/INT8 only (models that fail the INT4 probe)
  kSinkProtect = 3,  // sinks forced to FP16, the rest 3-tier greedy in the remaining budget
  kUniformInt8 = 4,
  kUniformInt4 = 5,
  kPdTrim = 6,      // keep front and most recent tokens at FP16, drop the rest
  kRandomTier = 7,  // 3-tier counts at random (seeded) non-sink positions
};
std::string_view PolicyName(Policy p);
std::optional<Policy> ParsePolicy(std::string_view name);

enum class ScoringMode : uint8_t {
  kAttention = 1,   // SnapKV-style from window queries
  kKeyNorm = 2,     // ‖k‖ + ‖v‖ averaged over layers and heads
  kExternal = 3,    // supplied by the frontend
  kPositional = 4,  // the paper's fixed heuristic (reproduction only)
};
std::string_view ScoringModeName(ScoringMode m);
std::optional<ScoringMode> ParseScoringMode(std::string_view name);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_TYPES_H_
