#include "kernels/api/codec.h"

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv {

absl::Status CheckBufferMatches(const KvBuffer& kv, const PayloadDesc& desc, const char* role) {
  SPECTRUMKV_RETURN_IF_ERROR(ValidateKvBuffer(kv));
  const KvLayout& l = *kv.layout;
  if (!(l.shape == desc.shape)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s layout shape (%u layers, %u heads, dim %u) differs from the payload's (%u, %u, %u)",
        role, l.shape.num_layers, l.shape.num_kv_heads, l.shape.head_dim, desc.shape.num_layers,
        desc.shape.num_kv_heads, desc.shape.head_dim));
  }
  if (l.dtype != desc.dtype) {
    return absl::InvalidArgumentError(absl::StrFormat("%s dtype %s differs from the payload's %s",
                                                      role, DTypeName(l.dtype),
                                                      DTypeName(desc.dtype)));
  }
  if (kv.num_tokens != desc.num_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat("%s holds %u tokens, the payload %u", role,
                                                      kv.num_tokens, desc.num_tokens));
  }
  return absl::OkStatus();
}

namespace {

absl::Status CheckLayerRange(uint32_t first, uint32_t last, uint32_t layers) {
  if (first > last || last > layers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("layer range [%u, %u) is outside [0, %u)", first, last, layers));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckPackArgs(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                           uint32_t last_layer, std::span<const uint8_t> payload) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckBufferMatches(src, plan.desc, "source"));
  SPECTRUMKV_RETURN_IF_ERROR(CheckLayerRange(first_layer, last_layer, plan.desc.shape.num_layers));
  if (payload.size() != plan.layout.total_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("payload buffer of %u bytes for a %u-byte payload", payload.size(),
                        plan.layout.total_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckUnpackArgs(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                             const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer) {
  const WireLayout& wl = prelude.layout;
  SPECTRUMKV_RETURN_IF_ERROR(CheckBufferMatches(dst, wl.desc, "destination"));
  SPECTRUMKV_RETURN_IF_ERROR(CheckLayerRange(first_layer, last_layer, wl.desc.shape.num_layers));
  if (payload.size() != wl.total_bytes) {
    return absl::DataLossError(
        absl::StrFormat("payload of %u bytes, the header says %u", payload.size(), wl.total_bytes));
  }
  return absl::OkStatus();
}

absl::Status NonFiniteRowError(uint32_t layer, bool value, uint32_t token, uint32_t head) {
  return absl::InvalidArgumentError(
      absl::StrFormat("layer %u %s token %u head %u holds Inf or NaN and cannot be quantized",
                      layer, value ? "V" : "K", token, head));
}

absl::StatusOr<TierPlan> Codec::ScoreAndPlan(const KvBuffer& kv, const ScoreOptions& score_options,
                                             const PlanOptions& plan_options) {
  std::vector<float> scores(kv.num_tokens);
  SPECTRUMKV_RETURN_IF_ERROR(Score(kv, score_options, scores));
  return PlanTiers(kv.layout->shape, kv.layout->dtype, kv.num_tokens, scores, plan_options);
}

absl::Status Codec::PackLayerSlice(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                                   uint32_t last_layer, uint32_t slice, uint32_t slices,
                                   std::span<uint8_t> payload) {
  if (slice != 0 || slices != 1) {
    return absl::UnimplementedError(absl::StrFormat(
        "the %s codec packs a chunk in one part (slice %u of %u)", name(), slice, slices));
  }
  return PackLayers(src, plan, first_layer, last_layer, payload);
}

absl::Status Codec::PackProgressiveSlice(const KvBuffer&, const TierPlan&, ProgressivePart,
                                         uint32_t, uint32_t, uint32_t, uint32_t,
                                         std::span<uint8_t>) {
  return absl::UnimplementedError(
      absl::StrFormat("the %s codec does not pack progressive payloads", name()));
}

absl::Status Codec::SealLayers(const TierPlan&, uint32_t, uint32_t, std::span<uint8_t>) {
  return absl::OkStatus();
}

absl::Status Codec::UnpackLayerSlice(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                                     const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                                     uint32_t slice, uint32_t slices) {
  if (slice != 0 || slices != 1) {
    return absl::UnimplementedError(absl::StrFormat(
        "the %s codec unpacks a chunk in one part (slice %u of %u)", name(), slice, slices));
  }
  return UnpackLayers(prelude, payload, dst, first_layer, last_layer, VerifyMode::kAlreadyVerified);
}

absl::Status PackPayloadInto(Codec& codec, const KvBuffer& src, const TierPlan& plan,
                             std::span<uint8_t> payload) {
  if (payload.size() != plan.layout.total_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("payload buffer of %u bytes for a %u-byte payload", payload.size(),
                        plan.layout.total_bytes));
  }
  WritePrelude(plan.layout, plan.tiers, payload);
  return codec.PackLayers(src, plan, 0, plan.desc.shape.num_layers, payload);
}

absl::StatusOr<std::vector<uint8_t>> PackPayload(Codec& codec, const KvBuffer& src,
                                                 const TierPlan& plan) {
  std::vector<uint8_t> payload(plan.layout.total_bytes);
  SPECTRUMKV_RETURN_IF_ERROR(PackPayloadInto(codec, src, plan, payload));
  return payload;
}

absl::StatusOr<UnpackResult> UnpackPayload(Codec& codec, std::span<const uint8_t> payload,
                                           const KvBuffer& dst, uint64_t max_payload_bytes) {
  SPECTRUMKV_ASSIGN_OR_RETURN(ParsedPrelude prelude, ParsePrelude(payload, max_payload_bytes));
  const WireLayout& wl = prelude.layout;
  SPECTRUMKV_RETURN_IF_ERROR(CheckPayloadSize(wl, payload.size()));
  SPECTRUMKV_RETURN_IF_ERROR(CheckBufferMatches(dst, wl.desc, "destination"));
  for (uint32_t l = 0; l < wl.desc.shape.num_layers; ++l) {
    SPECTRUMKV_RETURN_IF_ERROR(VerifyLayerSection(wl, l, payload));
  }
  SPECTRUMKV_RETURN_IF_ERROR(codec.UnpackLayers(prelude, payload, dst, 0, wl.desc.shape.num_layers,
                                                VerifyMode::kAlreadyVerified));
  UnpackResult result;
  result.desc = wl.desc;
  result.counts = wl.total_counts;
  result.payload_bytes = payload.size();
  result.dropped.resize(wl.desc.num_maps());
  for (uint32_t m = 0; m < wl.desc.num_maps(); ++m) {
    const uint8_t* map = prelude.tiers.data() + uint64_t{m} * wl.desc.num_tokens;
    for (uint32_t t = 0; t < wl.desc.num_tokens; ++t) {
      if (map[t] == static_cast<uint8_t>(Tier::kDrop)) result.dropped[m].push_back(t);
    }
  }
  return result;
}

}  // namespace spectrumkv
