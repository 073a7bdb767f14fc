// Run-time choice of a codec backend, and the device memory services that go with a device
// backend (payload buffers and copies, CUDA IPC import, pinned host memory). The only place
// outside kernels/cuda/ that knows whether the CUDA backend was built.
//
// "auto" uses the CUDA backend only where it was built, a device exists (no device and a driver
// too old for the runtime both count as none) and its known-answer self-test against the CPU
// reference passes; otherwise the best CPU kernels (AVX2 where available and self-tested).
// The reason for the choice is returned so the caller can log it once and export it as a metric.
// The CUDA codec and the services below work on CUDA device 0 (the first of
// CUDA_VISIBLE_DEVICES): one daemon serves one GPU.
//
// Thread-safety: every function may be called from any thread.
#ifndef SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_
#define SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/api/codec.h"
#include "kernels/api/device_memory.h"

namespace spectrumkv {

enum class BackendChoice { kAuto, kCpu, kCpuScalar, kCuda };

// "auto", "cpu", "cpu-scalar", "cuda".
std::optional<BackendChoice> ParseBackendChoice(std::string_view name);

struct BackendSelection {
  std::unique_ptr<Codec> codec;
  std::string reason;  // one line for the log
};

// What the caller can hand the codec.
struct CodecRequirements {
  // The caller keeps KV and payloads in host memory only (the `spectrumkv codec` command, host
  // pools): "auto" then never picks a device backend, and "cuda" is UNAVAILABLE.
  bool host_memory_only = false;
};

// UNAVAILABLE if "cuda" is asked for and cannot be used (not built, no device, self-test failed,
// or the caller needs host memory), with the reason. A device backend's codec has
// memory_kind() == kDevice: its KvBuffers and payloads must be device memory.
absl::StatusOr<BackendSelection> CreateCodec(BackendChoice choice,
                                             const CodecRequirements& requirements = {});

// True if this build contains the CUDA backend.
bool CudaBackendBuilt();

// The device CreateCodec's CUDA backend runs on.
inline constexpr int kCudaCodecDevice = 0;

// Payload buffers and host<->device copies on CUDA device `device`, for the transfer path of GPU
// pools. UNAVAILABLE with the reason where the CUDA backend is not built or the device is
// unusable (none, or a driver too old).
absl::StatusOr<std::unique_ptr<DeviceMemory>> CreateDeviceMemory(int device = kCudaCodecDevice);

// Opens [offset_bytes, offset_bytes + size_bytes) of another process's GPU allocation from its
// CUDA IPC handle (cudaIpcGetMemHandle, 64 bytes; offsets count from the allocation's start) on
// `device`; the memory is unmapped when the returned object is destroyed. UNAVAILABLE where the
// CUDA backend is not built or `device` does not exist; INVALID_ARGUMENT for a handle that cannot
// be opened (stale, corrupted, exported by this process), an allocation on another device, or a
// range outside the allocation.
absl::StatusOr<std::unique_ptr<DeviceAllocation>> ImportCudaIpcMemory(std::string_view handle,
                                                                      int device,
                                                                      uint64_t offset_bytes,
                                                                      uint64_t size_bytes);

// Device memory that another process can import, as a GPU engine's KV cache is: one cudaMalloc
// allocation on device kCudaCodecDevice (memory of stream-ordered pools cannot be exported) and
// its CUDA IPC handle. For frontends and tests (`spectrumkv fake-frontend --pool-memory cuda`).
class ExportableDeviceAllocation : public DeviceAllocation {
 public:
  // The handle of the whole allocation (data() is its start, offset 0).
  virtual const std::string& ipc_handle() const = 0;
};

// UNAVAILABLE where the CUDA backend is not built or no device can be used; RESOURCE_EXHAUSTED
// when the device is out of memory; INVALID_ARGUMENT for 0 bytes.
absl::StatusOr<std::unique_ptr<ExportableDeviceAllocation>> AllocateExportableDeviceMemory(
    uint64_t bytes);

// A registration of host memory as pinned (page-locked for DMA), undone on destruction; the
// memory must stay mapped until then.
class PinnedHostMemory {
 public:
  virtual ~PinnedHostMemory() = default;
};

// Pins [data, data + bytes) so that device copies to and from it run at full speed.
// UNAVAILABLE where the CUDA backend is not built or no device exists; RESOURCE_EXHAUSTED if the
// pages cannot be locked.
absl::StatusOr<std::unique_ptr<PinnedHostMemory>> PinHostMemory(void* data, uint64_t bytes);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_
