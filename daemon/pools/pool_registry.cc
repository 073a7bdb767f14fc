#include "daemon/pools/pool_registry.h"

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "daemon/pools/shm_region.h"

namespace spectrumkv {
namespace {

class ShmMemory final : public ImportedMemory {
 public:
  explicit ShmMemory(std::unique_ptr<ShmRegion> r) : region_(std::move(r)) {}
  void* data() const override { return region_->data(); }
  uint64_t size() const override { return region_->size(); }

 private:
  std::unique_ptr<ShmRegion> region_;
};

}  // namespace

bool IsValidPoolId(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

Pool::Pool(std::string id, KvLayout layout, MemoryKind kind, std::string model,
           std::vector<std::unique_ptr<ImportedMemory>> memory)
    : id_(std::move(id)),
      layout_(std::move(layout)),
      kind_(kind),
      model_(std::move(model)),
      memory_(std::move(memory)) {
  for (const auto& m : memory_) {
    regions_.push_back(MemoryRegion{m->data(), m->size()});
    total_bytes_ += m->size();
  }
}

KvBuffer Pool::View(std::span<const uint32_t> block_table, uint32_t num_tokens) const {
  KvBuffer kv;
  kv.layout = &layout_;
  kv.regions = regions_;
  kv.memory_kind = kind_;
  kv.block_table = block_table;
  kv.num_tokens = num_tokens;
  return kv;
}

PoolRegistry::PoolRegistry(uint32_t max_pools, CudaIpcImporter cuda_importer)
    : max_pools_(max_pools), cuda_importer_(std::move(cuda_importer)) {}

absl::StatusOr<std::shared_ptr<Pool>> PoolRegistry::Register(PoolSpec spec) {
  if (!IsValidPoolId(spec.pool_id)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "pool_id \"%s\" must be 1-128 characters of [A-Za-z0-9._-]", spec.pool_id.substr(0, 200)));
  }
  if (spec.regions.empty()) return absl::InvalidArgumentError("regions: at least one is needed");
  if (spec.regions.size() > 4096) return absl::InvalidArgumentError("regions: more than 4096");
  {
    absl::MutexLock lock(&mu_);
    if (pools_.count(spec.pool_id)) {
      return absl::AlreadyExistsError(
          absl::StrFormat("pool \"%s\" is already registered", spec.pool_id));
    }
    if (pools_.size() >= max_pools_) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("%u pools registered, the configured maximum", pools_.size()));
    }
  }
  // Check the layout against the declared sizes before touching any memory.
  std::vector<uint64_t> sizes;
  bool any_host = false, any_cuda = false;
  for (const RegionSpec& r : spec.regions) {
    if (const auto* h = std::get_if<HostShmSpec>(&r)) {
      sizes.push_back(h->size_bytes);
      any_host = true;
    } else {
      sizes.push_back(std::get<CudaIpcSpec>(r).size_bytes);
      any_cuda = true;
    }
  }
  if (any_host && any_cuda) {
    return absl::InvalidArgumentError("regions: host and CUDA regions cannot be mixed in a pool");
  }
  SPECTRUMKV_RETURN_IF_ERROR(ValidateLayout(spec.layout, sizes));

  std::vector<std::unique_ptr<ImportedMemory>> memory;
  for (size_t i = 0; i < spec.regions.size(); ++i) {
    if (const auto* h = std::get_if<HostShmSpec>(&spec.regions[i])) {
      auto region = ShmRegion::Map(h->name, h->offset_bytes, h->size_bytes);
      if (!region.ok()) {
        return absl::Status(region.status().code(),
                            absl::StrFormat("regions[%u]: %s", i, region.status().message()));
      }
      memory.push_back(std::make_unique<ShmMemory>(std::move(*region)));
    } else {
      const auto& c = std::get<CudaIpcSpec>(spec.regions[i]);
      auto imported = cuda_importer_(c);
      if (!imported.ok()) {
        return absl::Status(imported.status().code(),
                            absl::StrFormat("regions[%u]: %s", i, imported.status().message()));
      }
      memory.push_back(std::move(*imported));
    }
  }
  auto pool = std::make_shared<Pool>(spec.pool_id, std::move(spec.layout),
                                     any_cuda ? MemoryKind::kDevice : MemoryKind::kHost,
                                     std::move(spec.model), std::move(memory));
  absl::MutexLock lock(&mu_);
  if (!pools_.emplace(pool->id(), pool).second) {
    return absl::AlreadyExistsError(
        absl::StrFormat("pool \"%s\" is already registered", pool->id()));
  }
  return pool;
}

absl::Status PoolRegistry::Unregister(const std::string& pool_id) {
  absl::MutexLock lock(&mu_);
  auto it = pools_.find(pool_id);
  if (it == pools_.end()) {
    return absl::NotFoundError(absl::StrFormat("pool \"%s\" is not registered", pool_id));
  }
  const uint32_t active = it->second->active_transfers.load();
  if (active > 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "pool \"%s\" is used by %u active transfers; cancel them first", pool_id, active));
  }
  pools_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Pool>> PoolRegistry::Get(const std::string& pool_id) const {
  absl::MutexLock lock(&mu_);
  auto it = pools_.find(pool_id);
  if (it == pools_.end()) {
    return absl::NotFoundError(absl::StrFormat("pool \"%s\" is not registered", pool_id));
  }
  return it->second;
}

std::vector<std::shared_ptr<Pool>> PoolRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Pool>> out;
  for (const auto& [id, p] : pools_) out.push_back(p);
  return out;
}

size_t PoolRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return pools_.size();
}

}  // namespace spectrumkv
