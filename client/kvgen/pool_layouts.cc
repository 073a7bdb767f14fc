#include "client/kvgen/pool_layouts.h"

#include <array>
#include <utility>

namespace spectrumkv::kvgen {
namespace {

constexpr std::array<std::pair<std::string_view, PoolLayoutKind>, 4> kKinds = {{
    {"vllm-nhd", PoolLayoutKind::kVllmNhd},
    {"vllm-hnd", PoolLayoutKind::kVllmHnd},
    {"sglang", PoolLayoutKind::kSglang},
    {"trtllm", PoolLayoutKind::kTrtllm},
}};

}  // namespace

std::optional<PoolLayoutKind> ParsePoolLayoutKind(std::string_view name) {
  for (const auto& [n, k] : kKinds) {
    if (n == name) return k;
  }
  return std::nullopt;
}

std::string_view PoolLayoutKindName(PoolLayoutKind kind) {
  for (const auto& [n, k] : kKinds) {
    if (k == kind) return n;
  }
  return "unknown";
}

std::vector<std::string> PoolLayoutKindNames() {
  std::vector<std::string> names;
  for (const auto& [n, k] : kKinds) names.emplace_back(n);
  return names;
}

PoolLayout BuildPoolLayout(const PoolSpec& spec) {
  const ModelShape& s = spec.shape;
  const uint64_t e = 2, d = s.head_dim, h = s.num_kv_heads, bs = spec.block_size;
  const uint64_t nb = spec.num_blocks, layers = s.num_layers;
  PoolLayout out;
  KvLayout& l = out.layout;
  l.shape = s;
  l.dtype = spec.dtype;
  l.block_size = spec.block_size;
  l.num_blocks = spec.num_blocks;
  l.keys.resize(layers);
  l.values.resize(layers);
  const uint64_t tensor = nb * bs * h * d * e;  // one layer's K (or V)
  for (uint32_t i = 0; i < layers; ++i) {
    TensorPlacement k, v;
    switch (spec.kind) {
      case PoolLayoutKind::kVllmNhd:
        k = {i, 0, bs * h * d * e, h * d * e, d * e};
        v = k;
        v.offset_bytes = tensor;
        break;
      case PoolLayoutKind::kVllmHnd:
        k = {i, 0, h * bs * d * e, d * e, bs * d * e};
        v = k;
        v.offset_bytes = tensor;
        break;
      case PoolLayoutKind::kSglang:
        k = {2 * i, 0, bs * h * d * e, h * d * e, d * e};
        v = k;
        v.region = 2 * i + 1;
        break;
      case PoolLayoutKind::kTrtllm: {
        const uint64_t part = h * bs * d * e;  // one (layer, K|V) of one block
        k = {0, (uint64_t{i} * 2) * part, layers * 2 * part, d * e, bs * d * e};
        v = k;
        v.offset_bytes = (uint64_t{i} * 2 + 1) * part;
        break;
      }
    }
    l.keys[i] = k;
    l.values[i] = v;
  }
  switch (spec.kind) {
    case PoolLayoutKind::kVllmNhd:
    case PoolLayoutKind::kVllmHnd:
      out.region_sizes.assign(layers, 2 * tensor);
      break;
    case PoolLayoutKind::kSglang:
      out.region_sizes.assign(2 * layers, tensor);
      break;
    case PoolLayoutKind::kTrtllm:
      out.region_sizes.assign(1, 2 * layers * tensor);
      break;
  }
  return out;
}

}  // namespace spectrumkv::kvgen
