// The codec interface: score, pack and unpack a request's KV cache in the SpectrumKV wire format.
//
// One interface, several backends (CPU reference, CUDA). For the same input, plan and options,
// every backend writes byte-identical payloads, and each unpacks the others' payloads to the
// same bits. Planning (plan.h) and the prelude (wire_format.h) are shared host code.
//
// Thread-safety: a Codec may be called from several threads at once as long as the calls write
// disjoint memory (different requests, or disjoint layer ranges of one payload).
#ifndef SPECTRUMKV_KERNELS_API_CODEC_H_
#define SPECTRUMKV_KERNELS_API_CODEC_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/api/layout.h"
#include "kernels/api/plan.h"
#include "kernels/api/scoring.h"
#include "kernels/api/wire_format.h"

namespace spectrumkv {

enum class VerifyMode : uint8_t {
  kVerify = 0,           // check each layer's CRC32C before writing any of its bytes
  kAlreadyVerified = 1,  // the caller verified these layers (VerifyLayerSection)
};

// The parts of a progressive payload's layer sections (PackProgressiveSlice).
enum class ProgressivePart : uint8_t {
  kBase = 0,    // every token's INT4 base: [begin, ranked_begin), from the source rows alone
  kRanked = 1,  // the INT8 tokens' refinements: [ranked_begin, crc_offset), from the tier map
};

class Codec {
 public:
  virtual ~Codec() = default;

  // Short backend name for logs and metrics ("cpu-avx2", "cpu-scalar", "cuda").
  virtual std::string_view name() const = 0;

  // Where KvBuffers and payloads handed to this backend must live.
  virtual MemoryKind memory_kind() const = 0;

  // Writes one importance score per token of `kv` into `scores` (size kv.num_tokens).
  // kExternal and kPositional do not read the KV. INVALID_ARGUMENT for bad options or buffers.
  virtual absl::Status Score(const KvBuffer& kv, const ScoreOptions& options,
                             std::span<float> scores) = 0;

  // Scores `kv` and plans its tiers: the plan equals PlanTiers(shape, dtype, kv.num_tokens,
  // scores, plan_options) for the scores Score writes, and errors are those of Score and then of
  // PlanTiers. The default runs Score, then PlanTiers on the host; a backend may rank where the
  // scores live (the CUDA backend does, and copies back only the tier codes).
  virtual absl::StatusOr<TierPlan> ScoreAndPlan(const KvBuffer& kv,
                                                const ScoreOptions& score_options,
                                                const PlanOptions& plan_options);

  // Writes the sections of layers [first_layer, last_layer) of the payload that `plan` describes
  // into `payload` (the whole message buffer, plan.layout.total_bytes long), each sealed with its
  // CRC32C. The prelude is written separately (WritePrelude). `src` must match the plan's shape,
  // dtype and token count. INVALID_ARGUMENT if a quantized row holds Inf or NaN.
  virtual absl::Status PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                                  uint32_t last_layer, std::span<uint8_t> payload) = 0;

  // Unpacks layers [first_layer, last_layer) of a payload whose prelude has been parsed into
  // `dst`, which must match the payload's shape, dtype and token count (layout and block size may
  // differ from the sender's). Dropped tokens are not written. DATA_LOSS if a section fails its
  // checksum; in that case nothing of that layer has been written.
  virtual absl::Status UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                                    const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                                    VerifyMode verify) = 0;

  // One chunk packed or unpacked by several threads. A backend that can cut a chunk's work into
  // parts returns how many from max_slices() (1, the default: it cannot). Slice s of `slices`
  // (slices <= max_slices()) covers the s-th of `slices` near-equal runs of every tier's tokens
  // in each layer of [first_layer, last_layer) (of a progressive payload: of every token for the
  // bases, of the INT8 tokens for the refinements); slices touch disjoint bytes and may run on
  // any threads in any order.
  // - PackLayerSlice writes its rows; once every slice has returned, SealLayers writes each
  //   layer's CRC32C, and the payload equals what PackLayers writes. (The trailers are the wire
  //   format's: a caller may instead checksum the sections itself, in parts, and write them with
  //   WriteLayerTrailer, as the transfer manager does for a payload's first chunks.)
  // - UnpackLayerSlice writes its rows into `dst`; the caller has verified the layers
  //   (VerifyLayerSection): all slices together write what UnpackLayers writes.
  // The defaults serve slices == 1 only: PackLayers (sealed already; SealLayers does nothing)
  // and UnpackLayers(kAlreadyVerified); UNIMPLEMENTED otherwise.
  virtual uint32_t max_slices() const { return 1; }
  virtual absl::Status PackLayerSlice(const KvBuffer& src, const TierPlan& plan,
                                      uint32_t first_layer, uint32_t last_layer, uint32_t slice,
                                      uint32_t slices, std::span<uint8_t> payload);
  virtual absl::Status SealLayers(const TierPlan& plan, uint32_t first_layer, uint32_t last_layer,
                                  std::span<uint8_t> payload);
  virtual absl::Status UnpackLayerSlice(const ParsedPrelude& prelude,
                                        std::span<const uint8_t> payload, const KvBuffer& dst,
                                        uint32_t first_layer, uint32_t last_layer, uint32_t slice,
                                        uint32_t slices);

  // Progressive payloads (kFlagProgressive, docs/wire-format.md): a layer's base depends on its
  // source rows alone, so a sender may pack the bases before it has scored and ranked the tokens
  // and the refinements after. Writes slice `slice` of `slices` of `part` of layers
  // [first_layer, last_layer) (kBase: runs of every token, and `plan`'s tiers are not read; they
  // may be empty; kRanked: runs of each layer's INT8 tokens). The two parts touch disjoint bytes
  // and may be packed in either order; once both are written, SealLayers (or the caller, as for
  // PackLayerSlice) writes the trailers. PackLayers and PackLayerSlice write both parts.
  // The default: UNIMPLEMENTED (a backend that cannot pack progressive payloads also refuses
  // them in PackLayers and UnpackLayers).
  virtual absl::Status PackProgressiveSlice(const KvBuffer& src, const TierPlan& plan,
                                            ProgressivePart part, uint32_t first_layer,
                                            uint32_t last_layer, uint32_t slice, uint32_t slices,
                                            std::span<uint8_t> payload);
};

// Checks that `kv` is valid and matches the payload description (shape, dtype, tokens).
absl::Status CheckBufferMatches(const KvBuffer& kv, const PayloadDesc& desc, const char* role);

// The checks every backend's PackLayers makes before it touches memory: `src` matches the plan,
// [first_layer, last_layer) lies inside the model, and `payload` has the plan's size.
absl::Status CheckPackArgs(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                           uint32_t last_layer, std::span<const uint8_t> payload);

// The same for UnpackLayers: `dst` matches the payload, the layer range lies inside the model,
// and `payload` has the size its header gives (DATA_LOSS if not).
absl::Status CheckUnpackArgs(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                             const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer);

// The INVALID_ARGUMENT of PackLayers for a K or V row holding Inf or NaN.
absl::Status NonFiniteRowError(uint32_t layer, bool value, uint32_t token, uint32_t head);

// Packs a whole payload, prelude plus every layer, into `payload`, which must be exactly
// plan.layout.total_bytes long (a reused staging buffer, say).
absl::Status PackPayloadInto(Codec& codec, const KvBuffer& src, const TierPlan& plan,
                             std::span<uint8_t> payload);

// As PackPayloadInto, into a new vector.
absl::StatusOr<std::vector<uint8_t>> PackPayload(Codec& codec, const KvBuffer& src,
                                                 const TierPlan& plan);

// What the receiver learns from a payload.
struct UnpackResult {
  PayloadDesc desc;
  TierCounts counts;  // summed over tier maps
  // Positions the decode frontend must mask out: one list per tier map (one map unless the
  // payload has per-layer tiers), ascending. Kept tokens keep their original positions.
  std::vector<std::vector<uint32_t>> dropped;
  uint64_t payload_bytes = 0;
};

// Parses, verifies every checksum, then unpacks the whole payload into `dst`. On any error
// nothing has been written. `max_payload_bytes` bounds what the parser accepts.
absl::StatusOr<UnpackResult> UnpackPayload(Codec& codec, std::span<const uint8_t> payload,
                                           const KvBuffer& dst, uint64_t max_payload_bytes);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_CODEC_H_
