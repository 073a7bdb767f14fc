// KV-cache layout descriptors: where each layer's K and V rows live in an engine's paged cache.
//
// A layout describes a pool of `num_blocks` blocks of `block_size` tokens. For layer l and kind
// (K or V), the head_dim elements of token slot s of block b, head h start at byte
//   region[placement.region].base + offset_bytes + b*block_stride_bytes
//                                 + s*token_stride_bytes + h*head_stride_bytes
// and are contiguous. This covers vLLM's NHD and HND paged caches, SGLang's per-layer token pools
// (block_size 1) and TensorRT-LLM's block-major pools without copies (tests/unit/kernels/
// layout_test.cc builds each). A request's tokens are mapped to blocks by a block table: token t
// lives in block block_table[t / block_size], slot t % block_size.
//
// Nothing here touches memory. ValidateKvBuffer must pass before any backend reads or writes a
// KvBuffer; it proves that every byte the codec can touch lies inside its region.
#ifndef SPECTRUMKV_KERNELS_API_LAYOUT_H_
#define SPECTRUMKV_KERNELS_API_LAYOUT_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kernels/api/types.h"

namespace spectrumkv {

// Placement of one layer's K (or V) tensor.
struct TensorPlacement {
  uint32_t region = 0;  // index into the KvBuffer's regions
  uint64_t offset_bytes = 0;
  uint64_t block_stride_bytes = 0;
  uint64_t token_stride_bytes = 0;
  uint64_t head_stride_bytes = 0;
};

struct KvLayout {
  ModelShape shape;
  DType dtype = DType::kFloat16;
  uint32_t block_size = 0;              // tokens per block
  uint64_t num_blocks = 0;              // blocks in the pool
  std::vector<TensorPlacement> keys;    // one per layer
  std::vector<TensorPlacement> values;  // one per layer

  const TensorPlacement& Placement(uint32_t layer, bool is_value) const {
    return is_value ? values[layer] : keys[layer];
  }
};

// Where a region of memory lives.
enum class MemoryKind : uint8_t { kHost = 0, kDevice = 1 };

// A contiguous memory region registered by a frontend. `base` is a host pointer for kHost and a
// device pointer for kDevice. Not owned.
struct MemoryRegion {
  void* base = nullptr;
  uint64_t size_bytes = 0;
};

// One request's KV: a layout over some regions, plus the request's block table and token count.
// All spans are views; the caller keeps them alive for the duration of any codec call.
struct KvBuffer {
  const KvLayout* layout = nullptr;
  std::span<const MemoryRegion> regions;
  MemoryKind memory_kind = MemoryKind::kHost;
  std::span<const uint32_t> block_table;
  uint32_t num_tokens = 0;
};

// Checks shape limits, dtype, strides (2-byte aligned, overflow-free) and that the furthest byte
// of every placement lies inside a region of the given sizes. Returns INVALID_ARGUMENT naming the
// field path (for example "layout.keys[3].offset_bytes") on failure.
absl::Status ValidateLayout(const KvLayout& layout, std::span<const uint64_t> region_sizes);

// ValidateLayout plus: regions non-null, block table entries < num_blocks, and enough blocks for
// num_tokens (1 <= num_tokens <= kMaxTokens).
absl::Status ValidateKvBuffer(const KvBuffer& kv);

// Byte offset of row (layer, kind, token, head) from its region's base. Requires a validated
// buffer and an in-range token and head.
inline uint64_t RowOffset(const KvLayout& layout, const TensorPlacement& p,
                          std::span<const uint32_t> block_table, uint32_t token, uint32_t head) {
  const uint32_t block = block_table[token / layout.block_size];
  return p.offset_bytes + uint64_t{block} * p.block_stride_bytes +
         uint64_t{token % layout.block_size} * p.token_stride_bytes +
         uint64_t{head} * p.head_stride_bytes;
}

// Host pointer to the row (layer, K or V, token, head) of a validated kHost buffer.
inline uint16_t* HostRowPtr(const KvBuffer& kv, uint32_t layer, bool is_value, uint32_t token,
                            uint32_t head) {
  const TensorPlacement& p = kv.layout->Placement(layer, is_value);
  auto* base = static_cast<uint8_t*>(kv.regions[p.region].base);
  return reinterpret_cast<uint16_t*>(base + RowOffset(*kv.layout, p, kv.block_table, token, head));
}

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_LAYOUT_H_
