// The KV pools frontends register: imported memory regions plus a validated layout.
//
// A Pool is shared (std::shared_ptr) by the registry and the transfers using it, so memory stays
// mapped until the last user is done; Unregister refuses while transfers are active.
// PoolRegistry is thread-safe.
#ifndef SPECTRUMKV_DAEMON_POOLS_POOL_REGISTRY_H_
#define SPECTRUMKV_DAEMON_POOLS_POOL_REGISTRY_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/api/layout.h"

namespace spectrumkv {

struct HostShmSpec {
  std::string name;
  uint64_t offset_bytes = 0;
  uint64_t size_bytes = 0;
};

struct CudaIpcSpec {
  std::string handle;  // cudaIpcMemHandle_t bytes (64)
  int device = 0;
  uint64_t offset_bytes = 0;
  uint64_t size_bytes = 0;
};

using RegionSpec = std::variant<HostShmSpec, CudaIpcSpec>;

struct PoolSpec {
  std::string pool_id;
  std::vector<RegionSpec> regions;
  KvLayout layout;
  std::string model;
};

// Memory imported into this process; released when destroyed.
class ImportedMemory {
 public:
  virtual ~ImportedMemory() = default;
  virtual void* data() const = 0;
  virtual uint64_t size() const = 0;
};

// Imports a CUDA IPC region (UNAVAILABLE where the daemon has no GPU).
using CudaIpcImporter =
    std::function<absl::StatusOr<std::unique_ptr<ImportedMemory>>(const CudaIpcSpec&)>;

class Pool {
 public:
  Pool(std::string id, KvLayout layout, MemoryKind kind, std::string model,
       std::vector<std::unique_ptr<ImportedMemory>> memory);

  const std::string& id() const { return id_; }
  const KvLayout& layout() const { return layout_; }
  MemoryKind memory_kind() const { return kind_; }
  const std::string& model() const { return model_; }
  uint64_t total_bytes() const { return total_bytes_; }
  std::span<const MemoryRegion> regions() const { return regions_; }

  // A view of one request; `block_table` must outlive it.
  KvBuffer View(std::span<const uint32_t> block_table, uint32_t num_tokens) const;

  // Transfers currently using the pool.
  std::atomic<uint32_t> active_transfers{0};

 private:
  std::string id_;
  KvLayout layout_;
  MemoryKind kind_;
  std::string model_;
  std::vector<std::unique_ptr<ImportedMemory>> memory_;
  std::vector<MemoryRegion> regions_;
  uint64_t total_bytes_ = 0;
};

class PoolRegistry {
 public:
  PoolRegistry(uint32_t max_pools, CudaIpcImporter cuda_importer);

  // Imports the regions and validates the layout against them. Errors: INVALID_ARGUMENT (bad id,
  // layout, handle or range; mixed host and CUDA regions), ALREADY_EXISTS, NOT_FOUND (no such
  // shared-memory object), UNAVAILABLE (CUDA IPC without a GPU), RESOURCE_EXHAUSTED (max_pools).
  absl::StatusOr<std::shared_ptr<Pool>> Register(PoolSpec spec);

  // NOT_FOUND, or FAILED_PRECONDITION while transfers use the pool.
  absl::Status Unregister(const std::string& pool_id);

  // NOT_FOUND if unknown.
  absl::StatusOr<std::shared_ptr<Pool>> Get(const std::string& pool_id) const;

  std::vector<std::shared_ptr<Pool>> List() const;
  size_t size() const;

 private:
  const uint32_t max_pools_;
  CudaIpcImporter cuda_importer_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Pool>> pools_ ABSL_GUARDED_BY(mu_);
};

// True if `id` is 1-128 characters of [A-Za-z0-9._-].
bool IsValidPoolId(const std::string& id);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_POOLS_POOL_REGISTRY_H_
