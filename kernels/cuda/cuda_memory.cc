#include "kernels/cuda/cuda_memory.h"

#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device.h"

// As SPECTRUMKV_CUDA_RETURN_IF_ERROR, and clears the runtime's last-error state, so that a failed
// copy (a bad pointer from a caller) does not surface again in an unrelated later call.
#define SPECTRUMKV_CUDA_RETURN_AND_CLEAR(expr)                              \
  do {                                                                      \
    const cudaError_t spectrumkv_cuda_error_ = (expr);                      \
    if (spectrumkv_cuda_error_ != cudaSuccess) {                            \
      (void)cudaGetLastError();                                             \
      return ::spectrumkv::cuda::CudaStatus(spectrumkv_cuda_error_, #expr); \
    }                                                                       \
  } while (0)

namespace spectrumkv::cuda {
namespace {

// The allocation that contains `p`: its start and size (cuMemGetAddressRange). The runtime has no
// such call; the driver's is reached through the runtime's entry-point query, so that the build
// links no libcuda (which exists only where a driver is installed).
absl::Status AddressRange(const void* p, uint8_t** base, uint64_t* size) {
  static const PFN_cuMemGetAddressRange_v3020 get_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(fn);
  }();
  if (get_range == nullptr) {
    return absl::UnavailableError("the CUDA driver does not provide cuMemGetAddressRange");
  }
  CUdeviceptr_v2 start = 0;
  size_t bytes = 0;
  const CUresult r = get_range(&start, &bytes, reinterpret_cast<CUdeviceptr_v2>(p));
  if (r != CUDA_SUCCESS) {
    return absl::InvalidArgumentError(
        absl::StrFormat("cuMemGetAddressRange: %p is not device memory (CUresult %d)", p, r));
  }
  *base = reinterpret_cast<uint8_t*>(start);
  *size = bytes;
  return absl::OkStatus();
}

// An allocation of CudaDeviceMemory.
class PoolAllocation final : public DeviceAllocation {
 public:
  PoolAllocation(int device, bool pools, cudaStream_t stream, uint8_t* data, uint64_t size)
      : device_(device), pools_(pools), stream_(stream), data_(data), size_(size) {}
  ~PoolAllocation() override {
    // Nothing can be reported from a destructor; a failure here means the context is gone.
    cudaSetDevice(device_);
    if (pools_) {
      cudaFreeAsync(data_, stream_);
    } else {
      cudaFree(data_);
    }
  }
  uint8_t* data() const override { return data_; }
  uint64_t size() const override { return size_; }

 private:
  const int device_;
  const bool pools_;
  const cudaStream_t stream_;
  uint8_t* const data_;
  const uint64_t size_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// CudaDeviceMemory

absl::StatusOr<std::unique_ptr<CudaDeviceMemory>> CudaDeviceMemory::Create(int device) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckDevice(device));
  int pools = 0;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
  cudaStream_t stream = nullptr;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return std::unique_ptr<CudaDeviceMemory>(new CudaDeviceMemory(device, pools != 0, stream));
}

CudaDeviceMemory::~CudaDeviceMemory() {
  cudaSetDevice(device_);
  cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

absl::StatusOr<std::unique_ptr<DeviceAllocation>> CudaDeviceMemory::Allocate(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("device allocation of 0 bytes");
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaSetDevice(device_));
  auto stream = static_cast<cudaStream_t>(stream_);
  void* p = nullptr;
  if (pools_) {
    SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaMallocAsync(&p, bytes, stream));
    // Other streams (the codec's, the copies') use it next: the allocation must be complete.
    const cudaError_t sync = cudaStreamSynchronize(stream);
    if (sync != cudaSuccess) {
      cudaFreeAsync(p, stream);
      return CudaStatus(sync, "cudaStreamSynchronize after cudaMallocAsync");
    }
  } else {
    SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaMalloc(&p, bytes));
  }
  return std::unique_ptr<DeviceAllocation>(
      new PoolAllocation(device_, pools_, stream, static_cast<uint8_t*>(p), bytes));
}

absl::Status CudaDeviceMemory::CopyToHost(void* host_dst, const void* device_src, uint64_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaSetDevice(device_));
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(
      cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, cudaStreamPerThread));
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaStreamSynchronize(cudaStreamPerThread));
  return absl::OkStatus();
}

absl::Status CudaDeviceMemory::CopyToDevice(void* device_dst, const void* host_src,
                                            uint64_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaSetDevice(device_));
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(
      cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, cudaStreamPerThread));
  SPECTRUMKV_CUDA_RETURN_AND_CLEAR(cudaStreamSynchronize(cudaStreamPerThread));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// CudaIpcMemory

absl::StatusOr<std::unique_ptr<CudaIpcMemory>> CudaIpcMemory::Open(std::string_view handle,
                                                                   int device,
                                                                   uint64_t offset_bytes,
                                                                   uint64_t size_bytes) {
  if (handle.size() != kIpcHandleBytes) {
    return absl::InvalidArgumentError(absl::StrFormat("a CUDA IPC handle has %u bytes, this one %u",
                                                      kIpcHandleBytes, handle.size()));
  }
  if (size_bytes == 0) return absl::InvalidArgumentError("CUDA IPC region of size 0");
  uint64_t end;
  if (__builtin_add_overflow(offset_bytes, size_bytes, &end)) {
    return absl::InvalidArgumentError("CUDA IPC region: offset_bytes + size_bytes overflows");
  }
  SPECTRUMKV_RETURN_IF_ERROR(CheckDevice(device));  // also makes `device` current
  cudaIpcMemHandle_t h;
  static_assert(sizeof(h) == kIpcHandleBytes);
  std::memcpy(&h, handle.data(), sizeof(h));
  void* opened = nullptr;
  const cudaError_t err = cudaIpcOpenMemHandle(&opened, h, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    absl::Status s = CudaStatus(err, "cudaIpcOpenMemHandle");
    if (s.code() == absl::StatusCode::kUnavailable) return s;
    return absl::InvalidArgumentError(absl::StrFormat(
        "cannot open the CUDA IPC handle on device %d (stale, corrupted, or exported by this "
        "process): %s",
        device, s.message()));
  }
  auto* base = static_cast<uint8_t*>(opened);
  // From here on the handle is open: every error path closes it.
  auto fail = [&](absl::Status s) {
    cudaIpcCloseMemHandle(opened);
    return s;
  };
  cudaPointerAttributes attr;
  if (const cudaError_t e = cudaPointerGetAttributes(&attr, opened); e != cudaSuccess) {
    (void)cudaGetLastError();
    return fail(CudaStatus(e, "cudaPointerGetAttributes of the imported memory"));
  }
  if (attr.device != device) {
    return fail(absl::InvalidArgumentError(absl::StrFormat(
        "the CUDA IPC handle's allocation is on device %d, not device %d", attr.device, device)));
  }
  uint8_t* range_base = nullptr;
  uint64_t range_bytes = 0;
  if (absl::Status s = AddressRange(opened, &range_base, &range_bytes); !s.ok()) return fail(s);
  const uint64_t allocation = range_bytes - static_cast<uint64_t>(base - range_base);
  if (end > allocation) {
    return fail(absl::InvalidArgumentError(absl::StrFormat(
        "CUDA IPC region [%u, +%u) lies outside the imported allocation of %u bytes", offset_bytes,
        size_bytes, allocation)));
  }
  return std::unique_ptr<CudaIpcMemory>(
      new CudaIpcMemory(device, base, allocation, offset_bytes, size_bytes));
}

CudaIpcMemory::~CudaIpcMemory() {
  cudaSetDevice(device_);
  cudaIpcCloseMemHandle(base_);
}

absl::StatusOr<IpcExport> ExportIpcHandle(const void* device_ptr) {
  cudaPointerAttributes attr;
  if (const cudaError_t e = cudaPointerGetAttributes(&attr, device_ptr); e != cudaSuccess) {
    (void)cudaGetLastError();
    return CudaStatus(e, "cudaPointerGetAttributes");
  }
  if (attr.type != cudaMemoryTypeDevice) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%p is not device memory from cudaMalloc", device_ptr));
  }
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(attr.device));
  uint8_t* base = nullptr;
  uint64_t bytes = 0;
  SPECTRUMKV_RETURN_IF_ERROR(AddressRange(device_ptr, &base, &bytes));
  cudaIpcMemHandle_t h;
  if (const cudaError_t e = cudaIpcGetMemHandle(&h, base); e != cudaSuccess) {
    (void)cudaGetLastError();
    absl::Status s = CudaStatus(e, "cudaIpcGetMemHandle");
    if (s.code() == absl::StatusCode::kUnavailable) return s;
    return absl::InvalidArgumentError(s.message());
  }
  IpcExport out;
  out.handle.assign(reinterpret_cast<const char*>(&h), sizeof(h));
  out.offset_bytes = static_cast<uint64_t>(static_cast<const uint8_t*>(device_ptr) - base);
  out.allocation_bytes = bytes;
  return out;
}

// ---------------------------------------------------------------------------------------------
// PinnedHostRange

absl::StatusOr<std::unique_ptr<PinnedHostRange>> PinnedHostRange::Register(void* data,
                                                                           uint64_t bytes) {
  if (data == nullptr || bytes == 0) {
    return absl::InvalidArgumentError("pinning an empty host range");
  }
  int count = 0;
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (count == 0) return absl::UnavailableError("no CUDA device to pin host memory for");
  SPECTRUMKV_CUDA_RETURN_IF_ERROR(cudaHostRegister(data, bytes, cudaHostRegisterPortable));
  return std::unique_ptr<PinnedHostRange>(new PinnedHostRange(data, bytes));
}

PinnedHostRange::~PinnedHostRange() { cudaHostUnregister(data_); }

}  // namespace spectrumkv::cuda
