#include "kernels/api/types.h"

#include <array>
#include <utility>

namespace spectrumkv {
namespace {

template <typename E, size_t N>
std::optional<E> Lookup(const std::array<std::pair<std::string_view, E>, N>& table,
                        std::string_view name) {
  for (const auto& [n, e] : table) {
    if (n == name) return e;
  }
  return std::nullopt;
}

template <typename E, size_t N>
std::string_view NameOf(const std::array<std::pair<std::string_view, E>, N>& table, E value) {
  for (const auto& [n, e] : table) {
    if (e == value) return n;
  }
  return "unknown";
}

constexpr std::array<std::pair<std::string_view, Policy>, 7> kPolicies = {{
    {"3tier", Policy::k3Tier},
    {"2tier", Policy::k2Tier},
    {"sinkprotect", Policy::kSinkProtect},
    {"uniform_int8", Policy::kUniformInt8},
    {"uniform_int4", Policy::kUniformInt4},
    {"pdtrim", Policy::kPdTrim},
    {"random_tier", Policy::kRandomTier},
}};
constexpr std::array<std::pair<std::string_view, ScoringMode>, 4> kScoring = {{
    {"attention", ScoringMode::kAttention},
    {"key_norm", ScoringMode::kKeyNorm},
    {"external", ScoringMode::kExternal},
    {"positional", ScoringMode::kPositional},
}};
constexpr std::array<std::pair<std::string_view, Quantizer>, 3> kQuantizers = {{
    {"absmax", Quantizer::kAbsmax},
    {"kcn", Quantizer::kKeyChannelNorm},
    {"progressive", Quantizer::kProgressive},
}};
constexpr std::array<std::pair<std::string_view, Tier>, 4> kTiers = {{
    {"fp16", Tier::kFp16},
    {"int8", Tier::kInt8},
    {"int4", Tier::kInt4},
    {"drop", Tier::kDrop},
}};

}  // namespace

std::string_view TierName(Tier t) { return NameOf(kTiers, t); }
std::string_view QuantizerName(Quantizer q) { return NameOf(kQuantizers, q); }
std::optional<Quantizer> ParseQuantizer(std::string_view name) { return Lookup(kQuantizers, name); }
std::string_view PolicyName(Policy p) { return NameOf(kPolicies, p); }
std::optional<Policy> ParsePolicy(std::string_view name) { return Lookup(kPolicies, name); }
std::string_view ScoringModeName(ScoringMode m) { return NameOf(kScoring, m); }
std::optional<ScoringMode> ParseScoringMode(std::string_view name) {
  return Lookup(kScoring, name);
}

}  // namespace spectrumkv
