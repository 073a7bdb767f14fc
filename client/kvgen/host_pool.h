// A KV pool in ordinary host memory with one of the engine layouts of pool_layouts.h, for the
// CLI, tests and benchmarks. Not thread-safe for writes; the memory is owned by the pool.
#ifndef SPECTRUMKV_CLIENT_KVGEN_HOST_POOL_H_
#define SPECTRUMKV_CLIENT_KVGEN_HOST_POOL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "client/kvgen/pool_layouts.h"
#include "kernels/api/layout.h"

namespace spectrumkv::kvgen {

class HostPool {
 public:
  // Allocates zero-filled, 64-byte aligned memory for every region of the spec's layout.
  // RESOURCE_EXHAUSTED if the allocation fails, INVALID_ARGUMENT for an invalid spec.
  static absl::StatusOr<std::unique_ptr<HostPool>> Create(const PoolSpec& spec);

  ~HostPool();
  HostPool(const HostPool&) = delete;
  HostPool& operator=(const HostPool&) = delete;

  const PoolSpec& spec() const { return spec_; }
  const KvLayout& layout() const { return layout_; }
  std::span<const MemoryRegion> regions() const { return regions_; }
  uint64_t total_bytes() const;

  // A view of `num_tokens` tokens through `block_table`; both spans must outlive the view.
  KvBuffer View(std::span<const uint32_t> block_table, uint32_t num_tokens) const;

 private:
  HostPool() = default;
  PoolSpec spec_;
  KvLayout layout_;
  std::vector<MemoryRegion> regions_;
};

// The blocks a request of `num_tokens` tokens needs, drawn without repetition from the pool's
// `num_blocks` in a seeded random order (so gathers are real). Requires enough blocks.
std::vector<uint32_t> ShuffledBlockTable(uint64_t num_blocks, uint32_t block_size,
                                         uint32_t num_tokens, uint64_t seed);

// Number of blocks of `block_size` tokens that hold `num_tokens`.
inline uint64_t BlocksFor(uint32_t num_tokens, uint32_t block_size) {
  return (uint64_t{num_tokens} + block_size - 1) / block_size;
}

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_HOST_POOL_H_
