#include "client/kvgen/host_pool.h"

#include <cstdlib>
#include <cstring>
#include <numeric>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv::kvgen {

absl::StatusOr<std::unique_ptr<HostPool>> HostPool::Create(const PoolSpec& spec) {
  PoolLayout built = BuildPoolLayout(spec);
  SPECTRUMKV_RETURN_IF_ERROR(ValidateLayout(built.layout, built.region_sizes));
  std::unique_ptr<HostPool> pool(new HostPool());
  pool->spec_ = spec;
  pool->layout_ = std::move(built.layout);
  for (uint64_t size : built.region_sizes) {
    const uint64_t rounded = (size + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("cannot allocate a %u-byte KV region", rounded));
    }
    std::memset(p, 0, rounded);
    pool->regions_.push_back(MemoryRegion{p, size});
  }
  return pool;
}

HostPool::~HostPool() {
  for (const MemoryRegion& r : regions_) std::free(r.base);
}

uint64_t HostPool::total_bytes() const {
  uint64_t sum = 0;
  for (const MemoryRegion& r : regions_) sum += r.size_bytes;
  return sum;
}

KvBuffer HostPool::View(std::span<const uint32_t> block_table, uint32_t num_tokens) const {
  return KvBuffer{&layout_, regions_, MemoryKind::kHost, block_table, num_tokens};
}

std::vector<uint32_t> ShuffledBlockTable(uint64_t num_blocks, uint32_t block_size,
                                         uint32_t num_tokens, uint64_t seed) {
  const uint64_t needed = BlocksFor(num_tokens, block_size);
  SPECTRUMKV_CHECK(needed <= num_blocks);
  std::vector<uint32_t> all(num_blocks);
  std::iota(all.begin(), all.end(), 0u);
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (uint64_t i = num_blocks; i > 1; --i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::swap(all[i - 1], all[state % i]);
  }
  all.resize(needed);
  return all;
}

}  // namespace spectrumkv::kvgen
