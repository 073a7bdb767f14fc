#include "client/kvgen/model_shapes.h"

#include <array>
#include <utility>

namespace spectrumkv::kvgen {
namespace {

constexpr std::array<std::pair<std::string_view, ModelShape>, 5> kShapes = {{
    {"llama3-8b", {32, 8, 128}},
    {"qwen2.5-7b", {28, 4, 128}},
    {"mistral-7b", {32, 8, 128}},
    {"gemma2-9b", {42, 8, 256}},
    {"tiny", {2, 2, 64}},
}};

}  // namespace

std::optional<ModelShape> LookupModelShape(std::string_view name) {
  for (const auto& [n, s] : kShapes) {
    if (n == name) return s;
  }
  return std::nullopt;
}

std::vector<std::string> ModelShapeNames() {
  std::vector<std::string> names;
  for (const auto& [n, s] : kShapes) names.emplace_back(n);
  return names;
}

}  // namespace spectrumkv::kvgen
