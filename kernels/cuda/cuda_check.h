// Turning CUDA runtime errors into absl::Status. Internal to kernels/cuda/.
#ifndef SPECTRUMKV_KERNELS_CUDA_CUDA_CHECK_H_
#define SPECTRUMKV_KERNELS_CUDA_CUDA_CHECK_H_

#include <cuda_runtime.h>

#include "absl/status/status.h"

namespace spectrumkv::cuda {

// UNAVAILABLE for "no device" style errors, RESOURCE_EXHAUSTED for out-of-memory, INTERNAL
// otherwise; the message names `what` and the CUDA error.
absl::Status CudaStatus(cudaError_t error, const char* what);

}  // namespace spectrumkv::cuda

// Evaluates a CUDA runtime call and returns its error as a Status from the current function.
#define SPECTRUMKV_CUDA_RETURN_IF_ERROR(expr)                               \
  do {                                                                      \
    const cudaError_t spectrumkv_cuda_error_ = (expr);                      \
    if (spectrumkv_cuda_error_ != cudaSuccess) {                            \
      return ::spectrumkv::cuda::CudaStatus(spectrumkv_cuda_error_, #expr); \
    }                                                                       \
  } while (0)

#endif  // SPECTRUMKV_KERNELS_CUDA_CUDA_CHECK_H_
