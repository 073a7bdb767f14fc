// Device memory services of the CUDA runtime, for code outside kernels/cuda/ (the backend
// registry, tests): payload buffers and host<->device copies (the DeviceMemory interface), memory
// imported from another process through a CUDA IPC handle, and page-locking of host memory.
// Plain C++: CUDA headers stay inside kernels/cuda/ (STYLE.md).
//
// Errors follow device.h: UNAVAILABLE where no device or no usable driver exists,
// RESOURCE_EXHAUSTED when memory runs out, INVALID_ARGUMENT for a handle, range or pointer the
// caller got wrong, INTERNAL for other CUDA errors; each message names the failed call.
//
// Thread-safety: every class here may be used from several threads at once. Each call selects
// its device itself (cudaSetDevice), so callers need not care which device their thread has.
#ifndef SPECTRUMKV_KERNELS_CUDA_CUDA_MEMORY_H_
#define SPECTRUMKV_KERNELS_CUDA_CUDA_MEMORY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/api/device_memory.h"

namespace spectrumkv::cuda {

// Bytes of a cudaIpcMemHandle_t.
inline constexpr size_t kIpcHandleBytes = 64;

// DeviceMemory on one CUDA device. Allocations come from the device's stream-ordered memory pool
// (cudaMallocAsync; cudaMalloc where the device has no pools), so that freeing one never
// synchronizes the device; copies run on the calling thread's per-thread stream and are waited
// for, so they overlap codec work of other threads.
class CudaDeviceMemory final : public DeviceMemory {
 public:
  // UNAVAILABLE if `device` does not exist or cannot be used.
  static absl::StatusOr<std::unique_ptr<CudaDeviceMemory>> Create(int device = 0);
  ~CudaDeviceMemory() override;
  CudaDeviceMemory(const CudaDeviceMemory&) = delete;
  CudaDeviceMemory& operator=(const CudaDeviceMemory&) = delete;

  int device() const { return device_; }

  absl::StatusOr<std::unique_ptr<DeviceAllocation>> Allocate(uint64_t bytes) override;
  absl::Status CopyToHost(void* host_dst, const void* device_src, uint64_t bytes) override;
  absl::Status CopyToDevice(void* device_dst, const void* host_src, uint64_t bytes) override;

 private:
  CudaDeviceMemory(int device, bool pools, void* stream)
      : device_(device), pools_(pools), stream_(stream) {}
  const int device_;
  const bool pools_;    // cudaMallocAsync is supported
  void* const stream_;  // cudaStream_t for allocations and frees
};

// Device memory of another process, opened from the CUDA IPC handle of its allocation
// (cudaIpcGetMemHandle) and closed (cudaIpcCloseMemHandle) on destruction. The view is
// [offset_bytes, offset_bytes + size_bytes) of the allocation.
//
// A handle cannot be opened by the process that allocated the memory (CUDA refuses; use the
// pointer itself there). The exporting process must keep the allocation alive while it is open.
class CudaIpcMemory final : public DeviceAllocation {
 public:
  // INVALID_ARGUMENT if `handle` is not kIpcHandleBytes long, cannot be opened (a stale or
  // corrupted handle, or one of this process's own allocations), `size_bytes` is 0, or the range
  // does not lie inside the allocation; UNAVAILABLE if `device` does not exist.
  static absl::StatusOr<std::unique_ptr<CudaIpcMemory>> Open(std::string_view handle, int device,
                                                             uint64_t offset_bytes,
                                                             uint64_t size_bytes);
  ~CudaIpcMemory() override;
  CudaIpcMemory(const CudaIpcMemory&) = delete;
  CudaIpcMemory& operator=(const CudaIpcMemory&) = delete;

  uint8_t* data() const override { return base_ + offset_; }
  uint64_t size() const override { return size_; }
  int device() const { return device_; }
  // Bytes of the whole imported allocation.
  uint64_t allocation_bytes() const { return allocation_bytes_; }

 private:
  CudaIpcMemory(int device, uint8_t* base, uint64_t allocation_bytes, uint64_t offset,
                uint64_t size)
      : device_(device),
        base_(base),
        allocation_bytes_(allocation_bytes),
        offset_(offset),
        size_(size) {}
  const int device_;
  uint8_t* const base_;  // what cudaIpcOpenMemHandle returned
  const uint64_t allocation_bytes_;
  const uint64_t offset_;
  const uint64_t size_;
};

// What a process that owns device memory hands to another so it can import it.
struct IpcExport {
  std::string handle;             // kIpcHandleBytes bytes
  uint64_t offset_bytes = 0;      // of `device_ptr` from the start of its allocation
  uint64_t allocation_bytes = 0;  // of the whole allocation
};

// The IPC handle of the cudaMalloc allocation that contains `device_ptr`. INVALID_ARGUMENT if it
// is not such memory.
absl::StatusOr<IpcExport> ExportIpcHandle(const void* device_ptr);

// Page-locks [data, data + bytes) of existing host memory (cudaHostRegister) until destroyed, so
// that copies between it and any device run by DMA at full speed. The memory must stay mapped
// while registered. UNAVAILABLE where no device exists; RESOURCE_EXHAUSTED if the pages cannot be
// locked.
class PinnedHostRange {
 public:
  static absl::StatusOr<std::unique_ptr<PinnedHostRange>> Register(void* data, uint64_t bytes);
  ~PinnedHostRange();
  PinnedHostRange(const PinnedHostRange&) = delete;
  PinnedHostRange& operator=(const PinnedHostRange&) = delete;

  void* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  PinnedHostRange(void* data, uint64_t size) : data_(data), size_(size) {}
  void* const data_;
  const uint64_t size_;
};

}  // namespace spectrumkv::cuda

#endif  // SPECTRUMKV_KERNELS_CUDA_CUDA_MEMORY_H_
