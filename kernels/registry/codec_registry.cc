#include "kernels/registry/codec_registry.h"

#include "kernels/cpu/cpu_codec.h"

namespace spectrumkv {

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

absl::StatusOr<BackendSelection> CreateCodec(BackendChoice choice) {
  BackendSelection out;
  switch (choice) {
    case BackendChoice::kCpuScalar:
      out.codec = std::make_unique<CpuCodec>(ScalarRowKernels());
      out.reason = "portable scalar CPU kernels, as asked";
      return out;
    case BackendChoice::kCuda:
      return absl::UnavailableError("the CUDA codec backend is not part of this build");
    case BackendChoice::kAuto:
    case BackendChoice::kCpu:
      break;
  }
  out.codec = CpuCodec::CreateBest();
  out.reason = out.codec->name() == "cpu-avx2"
                   ? "AVX2/F16C CPU kernels (self-test passed)"
                   : "portable scalar CPU kernels (no AVX2/F16C, or its self-test failed)";
  if (choice == BackendChoice::kAuto) out.reason += "; no CUDA backend in this build";
  return out;
}

}  // namespace spectrumkv
