// A stand-in GPU for tests of code that drives a device codec, so that the device data path runs
// where no GPU exists (CI). Test-only.
//
// FakeDeviceMemory hands out "device" memory that is ordinary host memory it tracks, and counts
// the copies made through it; memory registered with AddRegion (a fake GPU pool's regions) counts
// as device memory too. FakeDeviceCodec runs another (host) codec but reports kDevice and refuses
// any KV region or payload that is not such device memory, and FakeDeviceMemory refuses copies
// whose device side is not, so a caller that hands host staging memory to the device side, or
// forgets a copy, fails.
//
// Thread-safety: both classes may be used from several threads at once.
#ifndef SPECTRUMKV_TESTS_TESTING_FAKE_DEVICE_H_
#define SPECTRUMKV_TESTS_TESTING_FAKE_DEVICE_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>

#include "absl/synchronization/mutex.h"
#include "kernels/api/codec.h"
#include "kernels/api/device_memory.h"

namespace spectrumkv::testing {

class FakeDeviceMemory final : public DeviceMemory {
 public:
  FakeDeviceMemory() = default;
  // Every allocation must have been destroyed.
  ~FakeDeviceMemory() override;

  // Allocations are 256-byte aligned and filled with 0xA5, so that bytes nobody copied or packed
  // show. RESOURCE_EXHAUSTED while fail_allocations is set.
  absl::StatusOr<std::unique_ptr<DeviceAllocation>> Allocate(uint64_t bytes) override;
  // INVALID_ARGUMENT unless the device side lies inside device memory and the host side outside.
  absl::Status CopyToHost(void* host_dst, const void* device_src, uint64_t bytes) override;
  absl::Status CopyToDevice(void* device_dst, const void* host_src, uint64_t bytes) override;

  // Declares [data, data + bytes) device memory (not owned) until RemoveRegion(data).
  void AddRegion(void* data, uint64_t bytes);
  void RemoveRegion(void* data);
  // True if [data, data + bytes) lies inside one allocation or region.
  bool IsDevice(const void* data, uint64_t bytes) const;

  std::atomic<bool> fail_allocations{false};
  std::atomic<uint64_t> allocations_made{0};
  std::atomic<uint64_t> copies_to_host{0};
  std::atomic<uint64_t> copies_to_device{0};
  std::atomic<uint64_t> bytes_to_host{0};
  std::atomic<uint64_t> bytes_to_device{0};
  // Allocations alive now.
  size_t live_allocations() const;

 private:
  class Allocation;
  void Forget(uint8_t* data);
  // Overlaps any device memory at all.
  bool TouchesDevice(const void* data, uint64_t bytes) const;

  mutable absl::Mutex mu_;
  std::map<const uint8_t*, uint64_t> allocations_ ABSL_GUARDED_BY(mu_);  // start -> bytes
  std::map<const uint8_t*, uint64_t> regions_ ABSL_GUARDED_BY(mu_);
};

class FakeDeviceCodec final : public Codec {
 public:
  // `host` does the work on the same memory, which FakeDeviceMemory makes plain host memory.
  // Neither is owned.
  FakeDeviceCodec(Codec& host, const FakeDeviceMemory& memory) : host_(host), memory_(memory) {}

  std::string_view name() const override { return "fake-device"; }
  MemoryKind memory_kind() const override { return MemoryKind::kDevice; }

  absl::Status Score(const KvBuffer& kv, const ScoreOptions& options,
                     std::span<float> scores) override;
  absl::Status PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                          uint32_t last_layer, std::span<uint8_t> payload) override;
  absl::Status UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                            const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                            VerifyMode verify) override;

  std::atomic<uint64_t> packs{0};
  std::atomic<uint64_t> unpacks{0};

 private:
  // INVALID_ARGUMENT unless `kv` is kDevice and each region is device memory; the host view.
  absl::StatusOr<KvBuffer> HostView(const KvBuffer& kv, const char* role) const;

  Codec& host_;
  const FakeDeviceMemory& memory_;
};

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_TESTING_FAKE_DEVICE_H_
