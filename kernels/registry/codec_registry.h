// Run-time choice of a codec backend.
//
// "auto" uses the CUDA backend only where it was built, a device exists and its known-answer
// self-test passes; otherwise the best CPU kernels (AVX2 where available and self-tested).
// The reason for the choice is returned so the caller can log it once and export it as a metric.
#ifndef SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_
#define SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/api/codec.h"

namespace spectrumkv {

enum class BackendChoice { kAuto, kCpu, kCpuScalar, kCuda };

// "auto", "cpu", "cpu-scalar", "cuda".
std::optional<BackendChoice> ParseBackendChoice(std::string_view name);

struct BackendSelection {
  std::unique_ptr<Codec> codec;
  std::string reason;  // one line for the log
};

// UNAVAILABLE if "cuda" is asked for and cannot be used (not built, no device, self-test failed).
absl::StatusOr<BackendSelection> CreateCodec(BackendChoice choice);

// True if this build contains the CUDA backend.
bool CudaBackendBuilt();

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_
