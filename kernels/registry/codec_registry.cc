#include "kernels/registry/codec_registry.h"

#include "absl/strings/str_cat.h"
#include "kernels/cpu/cpu_codec.h"

#ifdef SPECTRUMKV_HAVE_CUDA
#include "kernels/cuda/cuda_codec.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.h"
#endif

namespace spectrumkv {
namespace {

#ifdef SPECTRUMKV_HAVE_CUDA
// The CUDA codec if a device exists and the known-answer self-test passes; UNAVAILABLE with the
// reason otherwise (no device or driver, an unsupported GPU, a failed self-test).
absl::StatusOr<BackendSelection> TryCuda() {
  absl::Status device = cuda::CheckDevice();
  if (!device.ok()) {
    return absl::UnavailableError(absl::StrCat("no usable CUDA device: ", device.message()));
  }
  auto codec = CudaCodec::Create();
  if (!codec.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the CUDA codec cannot start: ", codec.status().message()));
  }
  absl::Status self_test = (*codec)->SelfTest();
  if (!self_test.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the CUDA codec failed its self-test: ", self_test.message()));
  }
  auto info = cuda::GetDeviceInfo();
  BackendSelection out;
  out.reason =
      absl::StrCat("CUDA kernels on ", info.ok() ? info->name : "device 0", " (self-test passed)");
  out.codec = std::move(*codec);
  return out;
}
#endif

#ifdef SPECTRUMKV_HAVE_CUDA
class CudaPinnedHostMemory final : public PinnedHostMemory {
 public:
  explicit CudaPinnedHostMemory(std::unique_ptr<cuda::PinnedHostRange> range)
      : range_(std::move(range)) {}

 private:
  std::unique_ptr<cuda::PinnedHostRange> range_;
};

class CudaExportableAllocation final : public ExportableDeviceAllocation {
 public:
  CudaExportableAllocation(cuda::DeviceBuffer buffer, std::string handle)
      : buffer_(std::move(buffer)), handle_(std::move(handle)) {}
  uint8_t* data() const override { return buffer_.data(); }
  uint64_t size() const override { return buffer_.size(); }
  const std::string& ipc_handle() const override { return handle_; }

 private:
  cuda::DeviceBuffer buffer_;
  std::string handle_;
};
#else
constexpr char kNoCuda[] = "the CUDA backend is not part of this build";
#endif

BackendSelection BestCpu(BackendChoice choice, const std::string& why_not_cuda) {
  BackendSelection out;
  out.codec = CpuCodec::CreateBest();
  out.reason = out.codec->name() == "cpu-avx2"
                   ? "AVX2/F16C CPU kernels (self-test passed)"
                   : "portable scalar CPU kernels (no AVX2/F16C, or its self-test failed)";
  if (choice == BackendChoice::kAuto) out.reason += "; " + why_not_cuda;
  return out;
}

}  // namespace

std::optional<BackendChoice> ParseBackendChoice(std::string_view name) {
  if (name == "auto") return BackendChoice::kAuto;
  if (name == "cpu") return BackendChoice::kCpu;
  if (name == "cpu-scalar") return BackendChoice::kCpuScalar;
  if (name == "cuda") return BackendChoice::kCuda;
  return std::nullopt;
}

bool CudaBackendBuilt() {
#ifdef SPECTRUMKV_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<BackendSelection> CreateCodec(BackendChoice choice,
                                             const CodecRequirements& requirements) {
  if (requirements.host_memory_only) {
    if (choice == BackendChoice::kCuda) {
      return absl::UnavailableError(
          "the CUDA codec works on device memory and this caller has host memory only");
    }
    if (choice == BackendChoice::kAuto) {
      return BestCpu(choice, "the caller has host memory only, so no device backend");
    }
  }
  switch (choice) {
    case BackendChoice::kCpuScalar: {
      BackendSelection out;
      out.codec = std::make_unique<CpuCodec>(ScalarRowKernels());
      out.reason = "portable scalar CPU kernels, as asked";
      return out;
    }
    case BackendChoice::kCuda:
#ifdef SPECTRUMKV_HAVE_CUDA
      return TryCuda();
#else
      return absl::UnavailableError("the CUDA codec backend is not part of this build");
#endif
    case BackendChoice::kAuto: {
#ifdef SPECTRUMKV_HAVE_CUDA
      auto cuda = TryCuda();
      if (cuda.ok()) return cuda;
      return BestCpu(choice, std::string(cuda.status().message()));
#else
      return BestCpu(choice, "no CUDA backend in this build");
#endif
    }
    case BackendChoice::kCpu:
      break;
  }
  return BestCpu(choice, "");
}

absl::StatusOr<std::unique_ptr<DeviceMemory>> CreateDeviceMemory(int device) {
#ifdef SPECTRUMKV_HAVE_CUDA
  auto memory = cuda::CudaDeviceMemory::Create(device);
  if (!memory.ok()) return memory.status();
  return std::unique_ptr<DeviceMemory>(std::move(*memory));
#else
  (void)device;
  return absl::UnavailableError(kNoCuda);
#endif
}

absl::StatusOr<std::unique_ptr<DeviceAllocation>> ImportCudaIpcMemory(std::string_view handle,
                                                                      int device,
                                                                      uint64_t offset_bytes,
                                                                      uint64_t size_bytes) {
#ifdef SPECTRUMKV_HAVE_CUDA
  auto memory = cuda::CudaIpcMemory::Open(handle, device, offset_bytes, size_bytes);
  if (!memory.ok()) return memory.status();
  return std::unique_ptr<DeviceAllocation>(std::move(*memory));
#else
  (void)handle;
  (void)device;
  (void)offset_bytes;
  (void)size_bytes;
  return absl::UnavailableError(absl::StrCat("CUDA IPC memory cannot be imported: ", kNoCuda));
#endif
}

absl::StatusOr<std::unique_ptr<ExportableDeviceAllocation>> AllocateExportableDeviceMemory(
    uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("cannot allocate 0 bytes of device memory");
#ifdef SPECTRUMKV_HAVE_CUDA
  if (absl::Status s = cuda::CheckDevice(kCudaCodecDevice); !s.ok()) return s;
  auto buffer = cuda::DeviceBuffer::Allocate(bytes);
  if (!buffer.ok()) return buffer.status();
  auto exported = cuda::ExportIpcHandle(buffer->data());
  if (!exported.ok()) return exported.status();
  return std::unique_ptr<ExportableDeviceAllocation>(
      new CudaExportableAllocation(std::move(*buffer), std::move(exported->handle)));
#else
  return absl::UnavailableError(kNoCuda);
#endif
}

absl::StatusOr<std::unique_ptr<PinnedHostMemory>> PinHostMemory(void* data, uint64_t bytes) {
#ifdef SPECTRUMKV_HAVE_CUDA
  auto range = cuda::PinnedHostRange::Register(data, bytes);
  if (!range.ok()) return range.status();
  return std::unique_ptr<PinnedHostMemory>(new CudaPinnedHostMemory(std::move(*range)));
#else
  (void)data;
  (void)bytes;
  return absl::UnavailableError(kNoCuda);
#endif
}

}  // namespace spectrumkv
