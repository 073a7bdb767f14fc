// A KV pool in POSIX shared memory, as a frontend would create one to register with spectrumkvd:
// one shared-memory object per region of the chosen engine layout. The objects are unlinked and
// unmapped on destruction. Not thread-safe for writes.
#ifndef SPECTRUMKV_CLIENT_KVGEN_SHM_POOL_H_
#define SPECTRUMKV_CLIENT_KVGEN_SHM_POOL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/kvgen/pool_layouts.h"

namespace spectrumkv::kvgen {

class ShmPool {
 public:
  // Creates zero-filled objects named "/<prefix>-r<i>". ALREADY_EXISTS if a name is taken.
  static absl::StatusOr<std::unique_ptr<ShmPool>> Create(const std::string& prefix,
                                                         const PoolSpec& spec);
  ~ShmPool();
  ShmPool(const ShmPool&) = delete;
  ShmPool& operator=(const ShmPool&) = delete;

  const PoolSpec& spec() const { return spec_; }
  const KvLayout& layout() const { return layout_; }
  const std::vector<std::string>& names() const { return names_; }
  std::span<const MemoryRegion> regions() const { return regions_; }
  KvBuffer View(std::span<const uint32_t> block_table, uint32_t num_tokens) const;
  void Zero();

 private:
  ShmPool() = default;
  PoolSpec spec_;
  KvLayout layout_;
  std::vector<std::string> names_;
  std::vector<MemoryRegion> regions_;
};

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_SHM_POOL_H_
