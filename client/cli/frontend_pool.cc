#include "client/cli/frontend_pool.h"

#include <cstring>
#include <utility>
#include <vector>

#include "client/kvgen/host_pool.h"
#include "client/kvgen/shm_pool.h"

#include "kernels/registry/codec_registry.h"

namespace spectrumkv {
namespace {

class ShmFrontendPool final : public FrontendPool {
 public:
  explicit ShmFrontendPool(std::unique_ptr<kvgen::ShmPool> pool) : pool_(std::move(pool)) {}

  const KvLayout& layout() const override { return pool_->layout(); }
  KvBuffer View(std::span<const uint32_t> table, uint32_t num_tokens) const override {
    return pool_->View(table, num_tokens);
  }
  absl::Status Zero() override {
    pool_->Zero();
    return absl::OkStatus();
  }
  absl::Status Publish() override { return absl::OkStatus(); }
  absl::Status Fetch() override { return absl::OkStatus(); }
  absl::Status AddRegions(v1::RegisterPoolRequest* request) const override {
    for (size_t r = 0; r < pool_->names().size(); ++r) {
      v1::HostSharedMemory* shm = request->add_regions()->mutable_host_shm();
      shm->set_name(pool_->names()[r]);
      shm->set_size_bytes(pool_->regions()[r].size_bytes);
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<kvgen::ShmPool> pool_;
};

// One exportable device allocation per region of the layout, on the CUDA codec's device, and a
// host mirror that is filled, uploaded, downloaded and checked.
class CudaFrontendPool final : public FrontendPool {
 public:
  static absl::StatusOr<std::unique_ptr<FrontendPool>> Create(const kvgen::PoolSpec& spec) {
    auto memory = CreateDeviceMemory();
    if (!memory.ok()) return memory.status();
    auto mirror = kvgen::HostPool::Create(spec);
    if (!mirror.ok()) return mirror.status();
    std::vector<std::unique_ptr<ExportableDeviceAllocation>> regions;
    for (const MemoryRegion& r : (*mirror)->regions()) {
      auto a = AllocateExportableDeviceMemory(r.size_bytes);
      if (!a.ok()) return a.status();
      regions.push_back(std::move(*a));
    }
    std::unique_ptr<FrontendPool> pool(
        new CudaFrontendPool(std::move(*memory), std::move(*mirror), std::move(regions)));
    if (absl::Status s = pool->Publish(); !s.ok()) return s;  // the mirror is zero-filled
    return pool;
  }

  const KvLayout& layout() const override { return mirror_->layout(); }
  KvBuffer View(std::span<const uint32_t> table, uint32_t num_tokens) const override {
    return mirror_->View(table, num_tokens);
  }
  absl::Status Zero() override {
    for (const MemoryRegion& r : mirror_->regions()) std::memset(r.base, 0, r.size_bytes);
    return Publish();
  }
  absl::Status Publish() override {
    for (size_t i = 0; i < regions_.size(); ++i) {
      const MemoryRegion& r = mirror_->regions()[i];
      if (absl::Status s = memory_->CopyToDevice(regions_[i]->data(), r.base, r.size_bytes);
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  absl::Status Fetch() override {
    for (size_t i = 0; i < regions_.size(); ++i) {
      const MemoryRegion& r = mirror_->regions()[i];
      if (absl::Status s = memory_->CopyToHost(r.base, regions_[i]->data(), r.size_bytes);
          !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  }
  absl::Status AddRegions(v1::RegisterPoolRequest* request) const override {
    for (const auto& r : regions_) {
      v1::CudaIpcMemory* c = request->add_regions()->mutable_cuda_ipc();
      c->set_ipc_handle(r->ipc_handle());
      c->set_device(0);  // as this process numbers its devices (CUDA_VISIBLE_DEVICES)
      c->set_offset_bytes(0);
      c->set_size_bytes(r->size());
    }
    return absl::OkStatus();
  }

 private:
  CudaFrontendPool(std::unique_ptr<DeviceMemory> memory, std::unique_ptr<kvgen::HostPool> mirror,
                   std::vector<std::unique_ptr<ExportableDeviceAllocation>> regions)
      : memory_(std::move(memory)), mirror_(std::move(mirror)), regions_(std::move(regions)) {}
  std::unique_ptr<DeviceMemory> memory_;
  std::unique_ptr<kvgen::HostPool> mirror_;
  std::vector<std::unique_ptr<ExportableDeviceAllocation>> regions_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<FrontendPool>> FrontendPool::Create(PoolMemory memory,
                                                                   const std::string& name,
                                                                   const kvgen::PoolSpec& spec) {
  if (memory == PoolMemory::kHostShm) {
    auto pool = kvgen::ShmPool::Create(name, spec);
    if (!pool.ok()) return pool.status();
    return std::unique_ptr<FrontendPool>(new ShmFrontendPool(std::move(*pool)));
  }
  return CudaFrontendPool::Create(spec);
}

}  // namespace spectrumkv
