// The CUDA backend of the codec. KvBuffer regions and payloads live in device memory
// (memory_kind() == kDevice); score outputs, window queries and external scores stay on the host
// as the Codec interface defines them. Payloads are byte-identical to the CPU reference's.
//
// How it runs (docs/BENCHMARKS.md has the measurements):
//   * Planning: the score-independent half (tier counts, layout, tiers by rank: PlanSkeletonFor)
//     is host code shared with PlanTiers; ScoreAndPlan, PlanOnDevice and ScorePlanPack rank the
//     device-resident scores on the device (CUB stable radix sort, ties and NaN exactly as
//     RankTokens) and assign tiers there, so plans are identical to the host planner's.
//     ScorePlanPack goes score -> plan -> token lists -> prelude -> pack without the host in
//     between. PackLayers with a host plan uploads the plan's token lists, the block table and a
//     per-layer descriptor in one host-to-device copy.
//   * Pack is one launch over every layer of the call: each warp gathers rows of one
//     (layer, K|V, tier) array straight from the paged layout with 16-byte loads, quantizes
//     them, writes them compacted, and folds the CRC32C of what it wrote into the layer's
//     checksum (GF(2) combine, crc_tables.h) so that nothing is read back. A small launch then
//     writes padding and trailers. The kcn quantizer adds one pass over the INT4 keys (channel
//     statistics) before the pack.
//   * UnpackLayers with kVerify checksums every layer section on the device first and writes a
//     layer only if it and every earlier layer of the call verified (as the CPU backend, which
//     stops at the first bad layer); DATA_LOSS names the first bad layer. One launch scatters
//     every layer into the destination's paged layout.
//   * key_norm reads K and V once; attention reads K twice (softmax normalisers, then weights),
//     on tensor cores with float-accurate split operands where head_dim <= 256 and rows are
//     16-byte aligned, on CUDA cores otherwise.
//
// Requirements beyond the Codec contract: payload spans must be 16-byte aligned device memory
// (cudaMalloc returns 256-byte aligned memory); KV rows may be 2-byte aligned (a slower path is
// taken unless every row is 16-byte aligned).
//
// Thread-safety: as codec.h. Each call takes a private workspace (stream, scratch memory, pinned
// staging) from a pool and returns it, so concurrent calls on different data are safe. Every call
// is synchronous: the device work is complete when it returns.
#ifndef SPECTRUMKV_KERNELS_CUDA_CUDA_CODEC_H_
#define SPECTRUMKV_KERNELS_CUDA_CUDA_CODEC_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/api/codec.h"
#include "kernels/api/plan.h"

namespace spectrumkv {

class CudaCodec final : public Codec {
 public:
  // A codec on CUDA device `device`. UNAVAILABLE (with the reason) if there is no usable device
  // or driver; other errors if the device cannot be initialised.
  static absl::StatusOr<std::unique_ptr<CudaCodec>> Create(int device = 0);

  ~CudaCodec() override;
  CudaCodec(const CudaCodec&) = delete;
  CudaCodec& operator=(const CudaCodec&) = delete;

  // Known-answer self-test: packs fixed pseudo-random KV (fp16 and bf16, absmax and kcn, per-layer
  // tiers, several layouts) and compares the bytes with the CPU reference, unpacks and compares
  // the bits, and checks key_norm and attention scores within 1e-4. OK or INTERNAL with the first
  // difference.
  absl::Status SelfTest();

  std::string_view name() const override { return "cuda"; }
  MemoryKind memory_kind() const override { return MemoryKind::kDevice; }

  absl::Status Score(const KvBuffer& kv, const ScoreOptions& options,
                     std::span<float> scores) override;
  // As Codec::ScoreAndPlan: scores and ranks on the device; only the tier codes come back.
  absl::StatusOr<TierPlan> ScoreAndPlan(const KvBuffer& kv, const ScoreOptions& score_options,
                                        const PlanOptions& plan_options) override;

  // PlanTiers(shape, dtype, device_scores.size(), scores, options) for scores already in device
  // memory (device_scores: device pointers, one float per token), ranked on the device. Errors as
  // PlanTiers; INVALID_ARGUMENT if device_scores is not device memory.
  absl::StatusOr<TierPlan> PlanOnDevice(std::span<const float> device_scores,
                                        const ModelShape& shape, DType dtype,
                                        const PlanOptions& options);

  // The whole sender path in one synchronous call: scores `src`, plans on the device, builds the
  // token lists and the prelude (header, tier maps, their checksum) on the device and packs every
  // layer into `payload` (device memory, exactly PlanSkeletonFor(...).plan.layout.total_bytes
  // long). The payload is byte-identical to PackPayloadInto(*this, src, plan) with plan =
  // ScoreAndPlan(src, ...), which is also what it returns (tiers copied back after the pack).
  // Errors as ScoreAndPlan, then as PackLayers.
  absl::StatusOr<TierPlan> ScorePlanPack(const KvBuffer& src, const ScoreOptions& score_options,
                                         const PlanOptions& plan_options,
                                         std::span<uint8_t> payload);

  absl::Status PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                          uint32_t last_layer, std::span<uint8_t> payload) override;
  absl::Status UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                            const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                            VerifyMode verify) override;

  // Device time, in milliseconds, between the first and the last device operation of the most
  // recent call that completed (CUDA events; excludes host-side planning and validation).
  double last_device_ms() const;
  // True if the most recent attention Score ran on tensor cores.
  bool last_attention_used_tensor_cores() const;

 private:
  struct Workspace;
  struct DeviceTables;
  class WorkspaceLease;

  struct Arena;
  struct DevicePlan;

  explicit CudaCodec(int device);
  // Enqueues scoring on the workspace's stream (score arena) and returns the device scores:
  // key_norm and attention read the KV (options already validated by ScoreWithoutKv),
  // `host_scores` (external, positional) are uploaded. Records ws.start before the first kernel
  // when record_start.
  absl::StatusOr<const float*> EnqueueScore(Workspace& ws, const KvBuffer& kv,
                                            const ScoreOptions& options,
                                            std::span<const float> host_scores, bool record_start,
                                            bool* tensor_cores);
  // Enqueues ranking and assignment (plan arena) for a ranked skeleton.
  absl::StatusOr<DevicePlan> EnqueuePlan(Workspace& ws, const float* device_scores,
                                         const PlanSkeleton& skeleton, bool lists,
                                         uint8_t* payload);
  // Ranks and assigns on the device, copies the tier codes back into the skeleton's plan and
  // waits for the workspace's stream (ws.start must have been recorded); records the timing.
  absl::StatusOr<TierPlan> PlanAndFetchTiers(Workspace& ws, const float* device_scores,
                                             PlanSkeleton skeleton, bool tensor_cores);
  // Enqueues the pack of layers [first, last) (main arena); `device_lists` null: the plan's
  // lists are built on the host from `tiers` and uploaded. Records ws.start before the first
  // device operation when record_start.
  struct PackEnqueued;
  absl::StatusOr<PackEnqueued> EnqueuePack(Workspace& ws, const KvBuffer& src, const WireLayout& wl,
                                           std::span<const uint8_t> tiers,
                                           const uint32_t* device_lists, uint32_t first,
                                           uint32_t last, std::span<uint8_t> payload,
                                           bool record_start);
  absl::Status Init();
  absl::StatusOr<const void*> DimTablesFor(uint32_t head_dim);
  void RecordTiming(double device_ms, bool tensor_cores);

  int device_ = 0;
  int multiprocessors_ = 1;
  int pack_blocks_per_sm_ = 1;
  int unpack_blocks_per_sm_ = 1;
  void* static_tables_ = nullptr;  // device cuda_crc::StaticTables

  mutable std::mutex mu_;
  std::map<uint32_t, void*> dim_tables_;  // head_dim -> device cuda_crc::DimTables
  std::vector<std::unique_ptr<Workspace>> free_workspaces_;
  double last_device_ms_ = 0.0;
  bool last_tensor_cores_ = false;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_CUDA_CUDA_CODEC_H_
