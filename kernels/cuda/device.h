// A small C++ view of the CUDA runtime for code outside kernels/cuda/ (tests, benchmarks, the
// backend registry), so that CUDA headers stay inside this folder (STYLE.md).
//
// Every function is thread-safe (the CUDA runtime is) and works on the calling thread's current
// device. Errors come back as absl::Status: UNAVAILABLE where no device or no usable driver
// exists, RESOURCE_EXHAUSTED when memory runs out, INTERNAL for other CUDA errors, each naming
// the failed call.
#ifndef SPECTRUMKV_KERNELS_CUDA_DEVICE_H_
#define SPECTRUMKV_KERNELS_CUDA_DEVICE_H_

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace spectrumkv::cuda {

// OK if device `device` exists and the driver can run this build's kernels; UNAVAILABLE with the
// reason otherwise (no device, driver older than the runtime, no kernel image for this GPU).
absl::Status CheckDevice(int device = 0);

struct DeviceInfo {
  std::string name;  // cudaDeviceProp::name, e.g. "NVIDIA H100 80GB HBM3"
  int multiprocessors = 0;
  int compute_major = 0;
  int compute_minor = 0;
  uint64_t global_memory_bytes = 0;
  uint64_t l2_bytes = 0;
};
absl::StatusOr<DeviceInfo> GetDeviceInfo(int device = 0);

// Device memory from cudaMalloc (256-byte aligned), freed on destruction. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(uint64_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  std::span<uint8_t> span() const { return {data_, size_}; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

// Synchronous copies and fills (they complete before returning).
absl::Status CopyToDevice(void* dst, const void* src, uint64_t bytes);
absl::Status CopyToHost(void* dst, const void* src, uint64_t bytes);
absl::Status CopyOnDevice(void* dst, const void* src, uint64_t bytes);
absl::Status FillDevice(void* dst, uint8_t value, uint64_t bytes);

// Median time in milliseconds of `reps` device-to-device copies of `bytes` (cudaMemcpyAsync on
// one stream, each bracketed by CUDA events), after `warmup` untimed copies.
absl::StatusOr<double> TimeDeviceCopyMs(void* dst, const void* src, uint64_t bytes, int warmup,
                                        int reps);

}  // namespace spectrumkv::cuda

#endif  // SPECTRUMKV_KERNELS_CUDA_DEVICE_H_
