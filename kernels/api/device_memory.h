// Device memory for code that drives a device codec (Codec::memory_kind() == kDevice) without
// including CUDA headers: payload buffers in device memory, and copies between host and device.
//
// The daemon's transfer manager packs a GPU pool's KV into a device payload buffer and copies it
// chunk by chunk into host staging memory for the network, and the reverse on the receiver; this
// interface is all it knows of the device. Implementations: the CUDA runtime's
// (kernels/cuda/cuda_memory.h, created through kernels/registry) and test doubles.
//
// Thread-safety: every method may be called from several threads at once, on disjoint memory.
#ifndef SPECTRUMKV_KERNELS_API_DEVICE_MEMORY_H_
#define SPECTRUMKV_KERNELS_API_DEVICE_MEMORY_H_

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace spectrumkv {

// A range of device memory that this object owns: it is freed (or, for memory imported from
// another process, unmapped) when the object is destroyed. The caller must make sure no device
// work still uses the memory by then (every Codec call and every DeviceMemory copy is complete
// when it returns, so this holds once those calls have returned).
class DeviceAllocation {
 public:
  virtual ~DeviceAllocation() = default;
  // A device pointer (never dereference it on the host), 16-byte aligned at least.
  virtual uint8_t* data() const = 0;
  virtual uint64_t size() const = 0;
  std::span<uint8_t> span() const { return {data(), size()}; }
};

class DeviceMemory {
 public:
  virtual ~DeviceMemory() = default;

  // `bytes` (> 0) of device memory, 16-byte aligned at least (as device codecs need payloads),
  // on this object's device. Its contents are undefined. RESOURCE_EXHAUSTED when the device is
  // out of memory, INVALID_ARGUMENT for 0 bytes, UNAVAILABLE or INTERNAL for device errors.
  virtual absl::StatusOr<std::unique_ptr<DeviceAllocation>> Allocate(uint64_t bytes) = 0;

  // Synchronous copies: when they return OK the destination holds the bytes. Any host memory
  // works; host memory registered as pinned (page-locked) is copied by DMA at full speed.
  // Errors as Allocate (a pointer that is not memory of the expected kind is an error).
  virtual absl::Status CopyToHost(void* host_dst, const void* device_src, uint64_t bytes) = 0;
  virtual absl::Status CopyToDevice(void* device_dst, const void* host_src, uint64_t bytes) = 0;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_DEVICE_MEMORY_H_
