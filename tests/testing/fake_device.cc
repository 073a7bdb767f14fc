#include "tests/testing/fake_device.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv::testing {
namespace {

// True if [p, p + bytes) lies inside one range of `ranges` (start -> bytes).
bool Inside(const std::map<const uint8_t*, uint64_t>& ranges, const void* p, uint64_t bytes) {
  const auto* b = static_cast<const uint8_t*>(p);
  auto it = ranges.upper_bound(b);
  if (it == ranges.begin()) return false;
  --it;
  return b >= it->first && static_cast<uint64_t>(b - it->first) + bytes <= it->second;
}

bool Overlaps(const std::map<const uint8_t*, uint64_t>& ranges, const void* p, uint64_t bytes) {
  const auto* b = static_cast<const uint8_t*>(p);
  for (const auto& [start, size] : ranges) {
    if (b < start + size && start < b + bytes) return true;
  }
  return false;
}

}  // namespace

class FakeDeviceMemory::Allocation final : public DeviceAllocation {
 public:
  Allocation(FakeDeviceMemory& owner, uint8_t* data, uint64_t size)
      : owner_(owner), data_(data), size_(size) {}
  ~Allocation() override {
    owner_.Forget(data_);
    std::free(data_);
  }
  uint8_t* data() const override { return data_; }
  uint64_t size() const override { return size_; }

 private:
  FakeDeviceMemory& owner_;
  uint8_t* const data_;
  const uint64_t size_;
};

FakeDeviceMemory::~FakeDeviceMemory() {
  absl::MutexLock lock(&mu_);
  SPECTRUMKV_CHECK_MSG(allocations_.empty(), "FakeDeviceMemory destroyed with live allocations");
}

absl::StatusOr<std::unique_ptr<DeviceAllocation>> FakeDeviceMemory::Allocate(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("device allocation of 0 bytes");
  if (fail_allocations) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("fake device out of memory (%u bytes asked)", bytes));
  }
  const uint64_t rounded = (bytes + 255) / 256 * 256;
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(256, rounded));
  SPECTRUMKV_CHECK(p != nullptr);
  std::memset(p, 0xA5, rounded);
  {
    absl::MutexLock lock(&mu_);
    allocations_[p] = bytes;
  }
  ++allocations_made;
  return std::unique_ptr<DeviceAllocation>(new Allocation(*this, p, bytes));
}

absl::Status FakeDeviceMemory::CopyToHost(void* host_dst, const void* device_src, uint64_t bytes) {
  if (!IsDevice(device_src, bytes) || TouchesDevice(host_dst, bytes)) {
    return absl::InvalidArgumentError("CopyToHost: not a device-to-host copy");
  }
  std::memcpy(host_dst, device_src, bytes);
  ++copies_to_host;
  bytes_to_host += bytes;
  return absl::OkStatus();
}

absl::Status FakeDeviceMemory::CopyToDevice(void* device_dst, const void* host_src,
                                            uint64_t bytes) {
  if (!IsDevice(device_dst, bytes) || TouchesDevice(host_src, bytes)) {
    return absl::InvalidArgumentError("CopyToDevice: not a host-to-device copy");
  }
  std::memcpy(device_dst, host_src, bytes);
  ++copies_to_device;
  bytes_to_device += bytes;
  return absl::OkStatus();
}

void FakeDeviceMemory::AddRegion(void* data, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  regions_[static_cast<uint8_t*>(data)] = bytes;
}

void FakeDeviceMemory::RemoveRegion(void* data) {
  absl::MutexLock lock(&mu_);
  regions_.erase(static_cast<uint8_t*>(data));
}

bool FakeDeviceMemory::IsDevice(const void* data, uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  return Inside(allocations_, data, bytes) || Inside(regions_, data, bytes);
}

bool FakeDeviceMemory::TouchesDevice(const void* data, uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  return Overlaps(allocations_, data, bytes) || Overlaps(regions_, data, bytes);
}

size_t FakeDeviceMemory::live_allocations() const {
  absl::MutexLock lock(&mu_);
  return allocations_.size();
}

void FakeDeviceMemory::Forget(uint8_t* data) {
  absl::MutexLock lock(&mu_);
  allocations_.erase(data);
}

// ---------------------------------------------------------------------------------------------

namespace {

// As the CUDA backend, which has no progressive kernels.
absl::Status RefuseProgressive() {
  return absl::UnimplementedError(
      "the fake-device codec does not pack or unpack progressive "
      "payloads (as the cuda codec)");
}

}  // namespace

absl::StatusOr<KvBuffer> FakeDeviceCodec::HostView(const KvBuffer& kv, const char* role) const {
  if (kv.memory_kind != MemoryKind::kDevice) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: not a device buffer", role));
  }
  for (size_t i = 0; i < kv.regions.size(); ++i) {
    if (!memory_.IsDevice(kv.regions[i].base, kv.regions[i].size_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: regions[%u] is not device memory", role, i));
    }
  }
  KvBuffer host = kv;
  host.memory_kind = MemoryKind::kHost;
  return host;
}

absl::Status FakeDeviceCodec::Score(const KvBuffer& kv, const ScoreOptions& options,
                                    std::span<float> scores) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const KvBuffer host, HostView(kv, "kv"));
  return host_.Score(host, options, scores);
}

absl::Status FakeDeviceCodec::PackLayers(const KvBuffer& src, const TierPlan& plan,
                                         uint32_t first_layer, uint32_t last_layer,
                                         std::span<uint8_t> payload) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const KvBuffer host, HostView(src, "source"));
  if (!memory_.IsDevice(payload.data(), payload.size())) {
    return absl::InvalidArgumentError("payload: not device memory");
  }
  if (plan.desc.progressive()) return RefuseProgressive();
  ++packs;
  return host_.PackLayers(host, plan, first_layer, last_layer, payload);
}

absl::Status FakeDeviceCodec::UnpackLayers(const ParsedPrelude& prelude,
                                           std::span<const uint8_t> payload, const KvBuffer& dst,
                                           uint32_t first_layer, uint32_t last_layer,
                                           VerifyMode verify) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const KvBuffer host, HostView(dst, "destination"));
  if (!memory_.IsDevice(payload.data(), payload.size())) {
    return absl::InvalidArgumentError("payload: not device memory");
  }
  if (prelude.layout.desc.progressive()) return RefuseProgressive();
  ++unpacks;
  return host_.UnpackLayers(prelude, payload, host, first_layer, last_layer, verify);
}

}  // namespace spectrumkv::testing
