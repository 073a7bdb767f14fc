// Run-time choice of a codec backend.
//
// "auto" uses the CUDA backend only where it was built, a device exists (no device and a driver
// too old for the runtime both count as none) and its known-answer self-test against the CPU
// reference passes; otherwise the best CPU kernels (AVX2 where available and self-tested).
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

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_REGISTRY_CODEC_REGISTRY_H_
