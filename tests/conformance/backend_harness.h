// What the codec conformance suite needs from a backend: the codec, and a way to move test data
// into and out of the memory it works on (host memory for the CPU backends, device memory for
// CUDA). A new backend adds a harness to AllHarnesses() and gets the whole suite.
#ifndef SPECTRUMKV_TESTS_CONFORMANCE_BACKEND_HARNESS_H_
#define SPECTRUMKV_TESTS_CONFORMANCE_BACKEND_HARNESS_H_

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kernels/api/codec.h"

namespace spectrumkv::testing {

class BackendHarness {
 public:
  virtual ~BackendHarness() = default;

  // Empty if the backend can run here; otherwise the reason the suite skips it.
  virtual std::string Unavailable() const = 0;
  virtual Codec& codec() = 0;

  // A buffer in backend memory with the layout, table and contents of the host buffer `host`.
  // Valid until the harness is destroyed.
  virtual KvBuffer Upload(const KvBuffer& host) = 0;
  // Copies the regions of a buffer returned by Upload back over `host`'s regions.
  virtual void Download(const KvBuffer& device, const KvBuffer& host) = 0;

  // Payload memory of `size` bytes in backend memory, valid until the harness is destroyed.
  virtual std::span<uint8_t> AllocPayload(uint64_t size) = 0;
  virtual std::vector<uint8_t> PayloadToHost(std::span<const uint8_t> payload) = 0;
  virtual void PayloadFromHost(std::span<const uint8_t> host, std::span<uint8_t> payload) = 0;
};

using HarnessFactory = std::function<std::unique_ptr<BackendHarness>()>;

// Every backend of this build: "cpu-scalar", "cpu-avx2" and, where built, "cuda".
std::vector<std::pair<std::string, HarnessFactory>> AllHarnesses();

// The CUDA harness where the CUDA backend is built (cuda_harness.cc), else none
// (no_cuda_harness.cc). Its Unavailable() says why where no device exists.
std::vector<std::pair<std::string, HarnessFactory>> CudaHarnesses();

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_CONFORMANCE_BACKEND_HARNESS_H_
