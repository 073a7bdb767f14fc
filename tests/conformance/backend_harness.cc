#include "tests/conformance/backend_harness.h"

#include <cstring>
#include <list>

#include "kernels/cpu/cpu_codec.h"

namespace spectrumkv::testing {
namespace {

class CpuHarness final : public BackendHarness {
 public:
  explicit CpuHarness(const RowKernels* kernels) : kernels_(kernels) {
    if (kernels_ != nullptr && CpuCodec::SelfTest(*kernels_)) {
      codec_ = std::make_unique<CpuCodec>(*kernels_);
    }
  }
  std::string Unavailable() const override {
    if (kernels_ == nullptr) return "this CPU lacks AVX2/F16C/FMA";
    if (codec_ == nullptr) return "the kernels failed their self-test";
    return "";
  }
  Codec& codec() override { return *codec_; }
  KvBuffer Upload(const KvBuffer& host) override { return host; }
  void Download(const KvBuffer&, const KvBuffer&) override {}
  std::span<uint8_t> AllocPayload(uint64_t size) override {
    payloads_.emplace_back(size);
    return payloads_.back();
  }
  std::vector<uint8_t> PayloadToHost(std::span<const uint8_t> payload) override {
    return {payload.begin(), payload.end()};
  }
  void PayloadFromHost(std::span<const uint8_t> host, std::span<uint8_t> payload) override {
    std::memcpy(payload.data(), host.data(), host.size());
  }

 private:
  const RowKernels* kernels_;
  std::unique_ptr<CpuCodec> codec_;
  std::list<std::vector<uint8_t>> payloads_;
};

}  // namespace

std::vector<std::pair<std::string, HarnessFactory>> AllHarnesses() {
  std::vector<std::pair<std::string, HarnessFactory>> all = {
      {"cpu_scalar", [] { return std::make_unique<CpuHarness>(&ScalarRowKernels()); }},
      {"cpu_avx2", [] { return std::make_unique<CpuHarness>(Avx2RowKernels()); }},
  };
  for (auto& h : CudaHarnesses()) all.push_back(std::move(h));
  return all;
}

}  // namespace spectrumkv::testing
