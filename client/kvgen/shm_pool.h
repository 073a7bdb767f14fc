// A KV pool in POSIX shared memory, as a frontend would create one to register with spectrumkvd:
// one shared-memory object per region of the chosen engine layout. The objects are unlinked and
// unmapped on destruction. Not thread-safe for writes.
#ifndef SPECTRUMKV_CLIENT_KVGEN_SHM_POOL_H_
#define SPECTRUMKV_CLIENT_KVGEN_SHM_POOL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
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

// Bytes in a POSIX shared-memory object of their own, as a frontend hands window queries to the
// daemon (WindowQueries.shm). The object is unlinked on destruction.
class ShmBytes {
 public:
  // An object named `name` ("/name") of offset + data.size() bytes, `data` at `offset`, zeros
  // before it. ALREADY_EXISTS if the name is taken.
  static absl::StatusOr<std::unique_ptr<ShmBytes>> Create(const std::string& name,
                                                          std::span<const std::byte> data,
                                                          uint64_t offset = 0);
  ~ShmBytes();
  ShmBytes(const ShmBytes&) = delete;
  ShmBytes& operator=(const ShmBytes&) = delete;

  const std::string& name() const { return name_; }

 private:
  explicit ShmBytes(std::string name) : name_(std::move(name)) {}
  std::string name_;
};

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_SHM_POOL_H_
