#include "kernels/cuda/device.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/cuda_check.h"

namespace spectrumkv::cuda {

absl::Status CudaStatus(cudaError_t error, const char* what) {
  const std::string message =
      absl::StrFormat("%s: %s (%s)", what, cudaGetErrorString(error), cudaGetErrorName(error));
  switch (error) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorUnsupportedPtxVersion:
      return absl::UnavailableError(message);
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CheckDevice(int device) {
  int count = 0;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::UnavailableError(
        absl::StrFormat("CUDA device %d does not exist (%d devices)", device, count));
  }
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  // A kernel image for this GPU must exist: probing an attribute of a trivial launch target is
  // done by the codec's self-test; here the runtime must at least initialise a context.
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaFree(nullptr));
  return absl::OkStatus();
}

absl::StatusOr<DeviceInfo> GetDeviceInfo(int device) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckDevice(device));
  cudaDeviceProp prop;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  DeviceInfo info;
  info.name = prop.name;
  info.multiprocessors = prop.multiProcessorCount;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.global_memory_bytes = prop.totalGlobalMem;
  info.l2_bytes = static_cast<uint64_t>(prop.l2CacheSize);
  return info;
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(uint64_t bytes) {
  DeviceBuffer b;
  if (bytes == 0) return b;
  void* p = nullptr;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
  b.data_ = static_cast<uint8_t*>(p);
  b.size_ = bytes;
  return b;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

absl::Status CopyToDevice(void* dst, const void* src, uint64_t bytes) {
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CopyToHost(void* dst, const void* src, uint64_t bytes) {
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

absl::Status CopyOnDevice(void* dst, const void* src, uint64_t bytes) {
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
  return absl::OkStatus();
}

absl::Status FillDevice(void* dst, uint8_t value, uint64_t bytes) {
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaMemset(dst, value, bytes));
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::StatusOr<double> TimeDeviceCopyMs(void* dst, const void* src, uint64_t bytes, int warmup,
                                        int reps) {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  absl::Status status = [&]() -> absl::Status {
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
    SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
    for (int i = 0; i < warmup; ++i) {
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
    }
    return absl::OkStatus();
  }();
  std::vector<double> times;
  for (int i = 0; status.ok() && i < reps; ++i) {
    status = [&]() -> absl::Status {
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(start, stream));
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop, stream));
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop));
      float ms = 0.0f;
      SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms);
      return absl::OkStatus();
    }();
  }
  if (start != nullptr) cudaEventDestroy(start);
  if (stop != nullptr) cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  SPECTRUMKV_RETURN_IF_ERROR(status);
  if (times.empty()) return absl::InvalidArgumentError("reps must be positive");
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace spectrumkv::cuda
