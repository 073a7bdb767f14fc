// The CPU backend of the codec: the reference implementation. KV buffers and payloads live in
// host memory. Thread-safe in the sense of codec.h (no mutable state).
#ifndef SPECTRUMKV_KERNELS_CPU_CPU_CODEC_H_
#define SPECTRUMKV_KERNELS_CPU_CPU_CODEC_H_

#include <memory>
#include <string>

#include "kernels/api/codec.h"
#include "kernels/cpu/row_kernels.h"

namespace spectrumkv {

class CpuCodec final : public Codec {
 public:
  static constexpr uint32_t kMaxSlices = 256;

  // Uses `kernels`, which must outlive the codec.
  explicit CpuCodec(const RowKernels& kernels);

  // The AVX2 kernels where the CPU has them and they pass the known-answer self-test against the
  // scalar kernels; the scalar kernels otherwise.
  static std::unique_ptr<CpuCodec> CreateBest();

  // Runs the self-test of `kernels` against the scalar reference on fixed pseudo-random rows.
  static bool SelfTest(const RowKernels& kernels);

  // Threads that share a key_norm scoring pass (by token ranges: the result does not depend on
  // the count). 1 by default; the daemon uses codec.score_threads.
  void set_score_threads(uint32_t threads) { score_threads_ = threads == 0 ? 1 : threads; }

  std::string_view name() const override { return name_; }
  MemoryKind memory_kind() const override { return MemoryKind::kHost; }

  absl::Status Score(const KvBuffer& kv, const ScoreOptions& options,
                     std::span<float> scores) override;
  absl::Status PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                          uint32_t last_layer, std::span<uint8_t> payload) override;
  // Any number of slices (a slice whose runs are all empty writes nothing). With key-channel
  // normalization every slice of a pack computes the layer's key factors (slice 0 writes them).
  uint32_t max_slices() const override { return kMaxSlices; }
  absl::Status PackLayerSlice(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                              uint32_t last_layer, uint32_t slice, uint32_t slices,
                              std::span<uint8_t> payload) override;
  absl::Status SealLayers(const TierPlan& plan, uint32_t first_layer, uint32_t last_layer,
                          std::span<uint8_t> payload) override;
  absl::Status PackProgressiveSlice(const KvBuffer& src, const TierPlan& plan, ProgressivePart part,
                                    uint32_t first_layer, uint32_t last_layer, uint32_t slice,
                                    uint32_t slices, std::span<uint8_t> payload) override;
  absl::Status UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                            const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                            VerifyMode verify) override;
  absl::Status UnpackLayerSlice(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                                const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                                uint32_t slice, uint32_t slices) override;

 private:
  absl::Status Unpack(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                      const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                      uint32_t slice, uint32_t slices, VerifyMode verify);

  const RowKernels& k_;
  std::string name_;
  uint32_t score_threads_ = 1;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_CPU_CPU_CODEC_H_
