#include "kernels/api/layout.h"

#include <string>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv {
namespace {

// a*b + c with overflow detection.
bool MulAdd(uint64_t a, uint64_t b, uint64_t c, uint64_t* out) {
  uint64_t prod;
  if (__builtin_mul_overflow(a, b, &prod)) return false;
  return !__builtin_add_overflow(prod, c, out);
}

absl::Status Invalid(const std::string& path, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrFormat("%s: %s", path, why));
}

absl::Status ValidatePlacement(const KvLayout& layout, const TensorPlacement& p,
                               const std::string& path, std::span<const uint64_t> region_sizes) {
  if (p.region >= region_sizes.size()) {
    return Invalid(path + ".region", absl::StrFormat("region %u does not exist (%u regions)",
                                                     p.region, region_sizes.size()));
  }
  const uint64_t elem = 2;
  for (auto [value, name] : {std::pair{p.offset_bytes, "offset_bytes"},
                             std::pair{p.block_stride_bytes, "block_stride_bytes"},
                             std::pair{p.token_stride_bytes, "token_stride_bytes"},
                             std::pair{p.head_stride_bytes, "head_stride_bytes"}}) {
    if (value % elem != 0) {
      return Invalid(path + "." + name,
                     absl::StrFormat("%u is not a multiple of the element size 2", value));
    }
  }
  // Furthest byte touched: last block, last slot, last head, end of the row.
  const ModelShape& s = layout.shape;
  uint64_t end = uint64_t{s.head_dim} * elem;
  if (!MulAdd(layout.num_blocks - 1, p.block_stride_bytes, end, &end) ||
      !MulAdd(layout.block_size - 1, p.token_stride_bytes, end, &end) ||
      !MulAdd(s.num_kv_heads - 1, p.head_stride_bytes, end, &end) ||
      __builtin_add_overflow(end, p.offset_bytes, &end)) {
    return Invalid(path, "extent overflows 64 bits");
  }
  if (end > region_sizes[p.region]) {
    return Invalid(path, absl::StrFormat("extent %u bytes exceeds region %u of %u bytes", end,
                                         p.region, region_sizes[p.region]));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateLayout(const KvLayout& layout, std::span<const uint64_t> region_sizes) {
  const ModelShape& s = layout.shape;
  if (s.num_layers == 0 || s.num_layers > kMaxLayers) {
    return Invalid("layout.shape.num_layers",
                   absl::StrFormat("%u is outside [1, %u]", s.num_layers, kMaxLayers));
  }
  if (s.num_kv_heads == 0 || s.num_kv_heads > kMaxKvHeads) {
    return Invalid("layout.shape.num_kv_heads",
                   absl::StrFormat("%u is outside [1, %u]", s.num_kv_heads, kMaxKvHeads));
  }
  if (s.head_dim == 0 || s.head_dim > kMaxHeadDim || s.head_dim % 8 != 0) {
    return Invalid("layout.shape.head_dim", absl::StrFormat("%u is not a multiple of 8 in [8, %u]",
                                                            s.head_dim, kMaxHeadDim));
  }
  if (layout.dtype != DType::kFloat16 && layout.dtype != DType::kBFloat16) {
    return Invalid("layout.dtype",
                   absl::StrFormat("unknown dtype %d", static_cast<int>(layout.dtype)));
  }
  if (layout.block_size == 0 || layout.block_size > kMaxTokens) {
    return Invalid("layout.block_size",
                   absl::StrFormat("%u is outside [1, %u]", layout.block_size, kMaxTokens));
  }
  if (layout.num_blocks == 0) return Invalid("layout.num_blocks", "must be at least 1");
  if (layout.keys.size() != s.num_layers || layout.values.size() != s.num_layers) {
    return Invalid("layout.keys",
                   absl::StrFormat("%u key and %u value placements for %u layers",
                                   layout.keys.size(), layout.values.size(), s.num_layers));
  }
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    SPECTRUMKV_RETURN_IF_ERROR(ValidatePlacement(
        layout, layout.keys[l], absl::StrFormat("layout.keys[%u]", l), region_sizes));
    SPECTRUMKV_RETURN_IF_ERROR(ValidatePlacement(
        layout, layout.values[l], absl::StrFormat("layout.values[%u]", l), region_sizes));
  }
  return absl::OkStatus();
}

absl::Status ValidateKvBuffer(const KvBuffer& kv) {
  if (kv.layout == nullptr) return Invalid("layout", "missing");
  std::vector<uint64_t> sizes;
  sizes.reserve(kv.regions.size());
  for (size_t i = 0; i < kv.regions.size(); ++i) {
    if (kv.regions[i].base == nullptr && kv.regions[i].size_bytes != 0) {
      return Invalid(absl::StrFormat("regions[%u].base", i), "null");
    }
    sizes.push_back(kv.regions[i].size_bytes);
  }
  SPECTRUMKV_RETURN_IF_ERROR(ValidateLayout(*kv.layout, sizes));
  if (kv.num_tokens == 0 || kv.num_tokens > kMaxTokens) {
    return Invalid("num_tokens",
                   absl::StrFormat("%u is outside [1, %u]", kv.num_tokens, kMaxTokens));
  }
  const uint64_t blocks_needed =
      (uint64_t{kv.num_tokens} + kv.layout->block_size - 1) / kv.layout->block_size;
  if (kv.block_table.size() < blocks_needed) {
    return Invalid("block_table",
                   absl::StrFormat("%u blocks of %u tokens cannot hold %u tokens",
                                   kv.block_table.size(), kv.layout->block_size, kv.num_tokens));
  }
  for (uint64_t i = 0; i < blocks_needed; ++i) {
    if (kv.block_table[i] >= kv.layout->num_blocks) {
      return Invalid(absl::StrFormat("block_table[%u]", i),
                     absl::StrFormat("block %u is outside the pool of %u blocks", kv.block_table[i],
                                     kv.layout->num_blocks));
    }
  }
  return absl::OkStatus();
}

}  // namespace spectrumkv
