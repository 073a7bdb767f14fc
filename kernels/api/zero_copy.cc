#include "kernels/api/zero_copy.h"

#include <cstring>

#include "absl/strings/str_format.h"
#include "common/crc32c.h"
#include "common/status.h"
#include "kernels/api/codec.h"

namespace spectrumkv {
namespace {

// Walks the rows of one (layer, K|V) placement in wire order and reports maximal contiguous runs.
template <typename Fn>
void ForEachRun(const KvBuffer& src, uint32_t layer, bool value, Fn&& fn) {
  const KvLayout& layout = *src.layout;
  const TensorPlacement& p = layout.Placement(layer, value);
  const uint8_t* base = static_cast<const uint8_t*>(src.regions[p.region].base);
  const uint32_t heads = layout.shape.num_kv_heads;
  const uint64_t row_bytes = uint64_t{layout.shape.head_dim} * 2;
  const uint8_t* run = nullptr;
  uint64_t run_bytes = 0;
  for (uint32_t t = 0; t < src.num_tokens; ++t) {
    for (uint32_t h = 0; h < heads; ++h) {
      const uint8_t* row = base + RowOffset(layout, p, src.block_table, t, h);
      if (run != nullptr && row == run + run_bytes) {
        run_bytes += row_bytes;
        continue;
      }
      if (run != nullptr) fn(run, run_bytes);
      run = row;
      run_bytes = row_bytes;
    }
  }
  if (run != nullptr) fn(run, run_bytes);
}

}  // namespace

bool IsPlainFp16Plan(const TierPlan& plan) {
  if (plan.desc.key_channel_norm()) return false;
  for (const TierCounts& c : plan.layout.map_counts) {
    if (c[Tier::kFp16] != plan.desc.num_tokens) return false;
  }
  return !plan.layout.map_counts.empty();
}

uint64_t Fp16RunCount(const KvBuffer& src, uint32_t layer) {
  uint64_t runs = 0;
  ForEachRun(src, layer, false, [&](const uint8_t*, uint64_t) { ++runs; });
  return runs;
}

absl::Status DescribeFp16Layers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                                uint32_t last_layer, std::span<uint8_t> payload,
                                std::vector<std::span<const uint8_t>>* ranges) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckPackArgs(src, plan, first_layer, last_layer, payload));
  if (src.memory_kind != MemoryKind::kHost) {
    return absl::InvalidArgumentError("zero-copy sections need a KV buffer in host memory");
  }
  if (!IsPlainFp16Plan(plan)) {
    return absl::InvalidArgumentError("zero-copy sections need a plan with every token in FP16");
  }
  const WireLayout& wl = plan.layout;
  const uint64_t part_bytes =
      uint64_t{plan.desc.num_tokens} * plan.desc.shape.num_kv_heads * plan.desc.shape.head_dim * 2;
  for (uint32_t l = first_layer; l < last_layer; ++l) {
    const LayerSection& sec = wl.layers[l];
    // The layout this function relies on: K rows, V rows, trailer, nothing in between.
    SPECTRUMKV_CHECK(sec.key.fp16_rows == sec.begin && sec.key.end == sec.begin + part_bytes &&
                     sec.value.fp16_rows == sec.key.end &&
                     sec.value.end == sec.key.end + part_bytes && sec.crc_offset == sec.value.end);
    uint32_t crc = 0;
    for (bool value : {false, true}) {
      ForEachRun(src, l, value, [&](const uint8_t* run, uint64_t bytes) {
        crc = crc32c::Extend(crc, run, bytes);
        ranges->emplace_back(run, bytes);
      });
    }
    uint8_t* trailer = payload.data() + sec.crc_offset;
    std::memset(trailer, 0, kWireTrailerBytes);
    StoreLe32(trailer, crc);
    ranges->emplace_back(trailer, kWireTrailerBytes);
  }
  return absl::OkStatus();
}

}  // namespace spectrumkv
