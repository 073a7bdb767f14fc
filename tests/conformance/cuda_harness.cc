// The CUDA backend's harness for the conformance suite: KV and payloads are copied into device
// memory with the same layouts. Compiled only where the CUDA backend is built; where no device
// exists the harness reports why and the suite skips it.
#include <list>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_codec.h"
#include "kernels/cuda/device.h"
#include "tests/conformance/backend_harness.h"

namespace spectrumkv::testing {
namespace {

// Test infrastructure failing (out of device memory, a broken driver) is not a codec result.
void CheckOk(const absl::Status& s) { SPECTRUMKV_CHECK_MSG(s.ok(), s.ToString()); }

class CudaHarness final : public BackendHarness {
 public:
  CudaHarness() {
    const absl::Status device = cuda::CheckDevice();
    if (!device.ok()) {
      why_ = absl::StrCat("no CUDA device: ", device.message());
      return;
    }
    auto codec = CudaCodec::Create();
    if (!codec.ok()) {
      why_ = absl::StrCat("the CUDA codec cannot start: ", codec.status().message());
      return;
    }
    codec_ = std::move(*codec);
  }

  std::string Unavailable() const override { return why_; }
  Codec& codec() override { return *codec_; }

  KvBuffer Upload(const KvBuffer& host) override {
    Uploaded& u = uploads_.emplace_back();
    for (const MemoryRegion& r : host.regions) {
      auto buffer = cuda::DeviceBuffer::Allocate(r.size_bytes);
      CheckOk(buffer.status());
      CheckOk(cuda::CopyToDevice(buffer->data(), r.base, r.size_bytes));
      u.regions.push_back({buffer->data(), r.size_bytes});
      u.buffers.push_back(std::move(*buffer));
    }
    KvBuffer out = host;
    out.regions = u.regions;
    out.memory_kind = MemoryKind::kDevice;
    return out;
  }

  void Download(const KvBuffer& device, const KvBuffer& host) override {
    for (size_t r = 0; r < host.regions.size(); ++r) {
      CheckOk(cuda::CopyToHost(host.regions[r].base, device.regions[r].base,
                               host.regions[r].size_bytes));
    }
  }

  std::span<uint8_t> AllocPayload(uint64_t size) override {
    auto buffer = cuda::DeviceBuffer::Allocate(size);
    CheckOk(buffer.status());
    // Poisoned, so that a byte the codec forgets to write differs from the reference.
    CheckOk(cuda::FillDevice(buffer->data(), 0xA5, size));
    payloads_.push_back(std::move(*buffer));
    return payloads_.back().span();
  }

  std::vector<uint8_t> PayloadToHost(std::span<const uint8_t> payload) override {
    std::vector<uint8_t> out(payload.size());
    CheckOk(cuda::CopyToHost(out.data(), payload.data(), payload.size()));
    return out;
  }

  void PayloadFromHost(std::span<const uint8_t> host, std::span<uint8_t> payload) override {
    CheckOk(cuda::CopyToDevice(payload.data(), host.data(), host.size()));
  }

 private:
  struct Uploaded {
    std::vector<cuda::DeviceBuffer> buffers;
    std::vector<MemoryRegion> regions;
  };

  std::string why_;
  std::unique_ptr<CudaCodec> codec_;
  std::list<Uploaded> uploads_;
  std::list<cuda::DeviceBuffer> payloads_;
};

}  // namespace

std::vector<std::pair<std::string, HarnessFactory>> CudaHarnesses() {
  return {{"cuda", [] { return std::make_unique<CudaHarness>(); }}};
}

}  // namespace spectrumkv::testing
