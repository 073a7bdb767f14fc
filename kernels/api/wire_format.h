// The SpectrumKV wire format, version 1: layout arithmetic, the prelude writer and the parser.
//
// docs/wire-format.md is the normative description; this header implements it. A payload is a
// prelude (64-byte header, 2-bit tier maps, their CRC) followed by one section per layer; every
// section starts 16-byte aligned and ends with a CRC32C trailer, so a receiver can verify and
// unpack layer by layer as chunks arrive. All integers are little-endian.
//
// Everything here is host code, shared by every backend, and pure (thread-safe).
#ifndef SPECTRUMKV_KERNELS_API_WIRE_FORMAT_H_
#define SPECTRUMKV_KERNELS_API_WIRE_FORMAT_H_

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/api/types.h"

namespace spectrumkv {

inline constexpr uint32_t kWireMagic = 0x564B5053;  // bytes "SPKV"
inline constexpr uint16_t kWireVersion = 1;
inline constexpr uint32_t kWireHeaderBytes = 64;
inline constexpr uint32_t kWireAlign = 16;
inline constexpr uint32_t kWireTrailerBytes = 16;  // u32 CRC32C + 12 zero bytes

inline constexpr uint32_t kFlagPerLayerTiers = 1u << 0;
inline constexpr uint32_t kFlagKeyChannelNorm = 1u << 1;
inline constexpr uint32_t kFlagProgressive = 1u << 2;
inline constexpr uint32_t kKnownFlags = kFlagPerLayerTiers | kFlagKeyChannelNorm | kFlagProgressive;

// Token counts per tier, indexed by Tier.
struct TierCounts {
  std::array<uint32_t, kNumTiers> n{};
  uint32_t& operator[](Tier t) { return n[static_cast<int>(t)]; }
  uint32_t operator[](Tier t) const { return n[static_cast<int>(t)]; }
  uint64_t Total() const { return uint64_t{n[0]} + n[1] + n[2] + n[3]; }
  bool operator==(const TierCounts&) const = default;
};

// What a payload's header declares.
struct PayloadDesc {
  ModelShape shape;
  DType dtype = DType::kFloat16;
  uint32_t num_tokens = 0;
  uint32_t flags = 0;
  Policy policy = Policy::k3Tier;  // informational
  uint8_t scoring = 0;             // informational: ScoringMode, or 0 when not scored

  bool per_layer_tiers() const { return (flags & kFlagPerLayerTiers) != 0; }
  bool key_channel_norm() const { return (flags & kFlagKeyChannelNorm) != 0; }
  bool progressive() const { return (flags & kFlagProgressive) != 0; }
  uint32_t num_maps() const { return per_layer_tiers() ? shape.num_layers : 1; }
  uint32_t MapForLayer(uint32_t layer) const { return per_layer_tiers() ? layer : 0; }
};

// Byte offsets (from the payload start) of the arrays of one K or V part of a layer section.
// With kFlagProgressive (INT8 and INT4 tokens only) the arrays are read differently: int4_rows
// and int4_scales hold every token's INT4 base in token order, int8_rows the INT8 tokens'
// refinement nibbles [n_int8][H][D/2]; fp16_rows and int8_scales are empty.
struct PartLayout {
  uint64_t fp16_rows = 0;    // [n_fp16][H][D] 16-bit
  uint64_t int8_rows = 0;    // [n_int8][H][D] int8
  uint64_t int8_scales = 0;  // [n_int8][H] 16-bit
  uint64_t int4_rows = 0;    // [n_int4][H][D/2] two's-complement nibbles, even element low
  uint64_t int4_scales = 0;  // [n_int4][H] 16-bit
  uint64_t end = 0;
};

struct LayerSection {
  uint64_t begin = 0;
  uint64_t key_offsets = 0;  // [H][D] 16-bit, only with kFlagKeyChannelNorm
  uint64_t key_factors = 0;  // [H][D] 16-bit, only with kFlagKeyChannelNorm
  PartLayout key;
  PartLayout value;
  // Where the bytes that depend on the tier map begin: `begin`, except in a progressive payload,
  // whose K and V bases, [begin, ranked_begin), depend on the layer's source rows alone.
  uint64_t ranked_begin = 0;
  uint64_t crc_offset = 0;  // CRC32C of [begin, crc_offset)
  uint64_t end = 0;         // crc_offset + kWireTrailerBytes
  TierCounts counts;
};

// The complete geometry of a payload, computed from its header and tier counts.
struct WireLayout {
  PayloadDesc desc;
  std::vector<TierCounts> map_counts;  // per tier map
  TierCounts total_counts;             // summed over maps
  uint64_t tier_map_bytes = 0;         // bytes of one map: ceil(num_tokens / 4)
  uint64_t tier_maps_offset = 0;
  uint64_t tier_maps_crc_offset = 0;
  uint64_t prelude_bytes = 0;
  std::vector<LayerSection> layers;
  uint64_t total_bytes = 0;
};

// Computes the layout of a payload. INVALID_ARGUMENT if the description is out of range or the
// counts do not add up to num_tokens per map.
absl::StatusOr<WireLayout> ComputeWireLayout(const PayloadDesc& desc,
                                             std::span<const TierCounts> map_counts);

// Bytes per token of one layer's K and V rows and scales in tier t (0 for kDrop).
uint64_t TierBytesPerTokenLayer(const ModelShape& shape, Tier t);

// An upper bound on every byte of a payload that is not a row or a scale (header, tier maps,
// channel factors, alignment padding, trailers). Used to plan wire budgets that always hold.
uint64_t WireOverheadBound(const PayloadDesc& desc);

// Writes the 64-byte header of the prelude into out[0, kWireHeaderBytes): everything but the tier
// maps and their checksum, so it depends on the layout only. Requires out.size() >= 64.
void WritePreludeHeader(const WireLayout& layout, std::span<uint8_t> out);

// Writes the prelude (header, tier maps, maps CRC) into out[0, layout.prelude_bytes).
// `tiers` holds num_maps * num_tokens Tier codes, map-major. Requires out.size() >= prelude.
void WritePrelude(const WireLayout& layout, std::span<const uint8_t> tiers, std::span<uint8_t> out);

// A verified prelude.
struct ParsedPrelude {
  WireLayout layout;
  std::vector<uint8_t> tiers;  // num_maps * num_tokens Tier codes, map-major
};

// Parses and verifies the prelude at the start of `bytes` (which may hold the whole payload or
// only its first chunk). Never reads outside `bytes`. Errors:
//   DATA_LOSS         truncated prelude, header or tier-map checksum mismatch;
//   INVALID_ARGUMENT  not a SpectrumKV payload, a field out of range, inconsistent counts, or a
//                     declared size above max_total_bytes;
//   UNIMPLEMENTED     a wire version other than kWireVersion.
absl::StatusOr<ParsedPrelude> ParsePrelude(std::span<const uint8_t> bytes,
                                           uint64_t max_total_bytes);

// DATA_LOSS unless `payload` is exactly layout.total_bytes long (truncated or trailing bytes).
absl::Status CheckPayloadSize(const WireLayout& layout, uint64_t payload_size);

// Verifies the CRC trailer of layer `layer`; `payload` must cover the section. DATA_LOSS on
// mismatch or non-zero trailer padding.
absl::Status VerifyLayerSection(const WireLayout& layout, uint32_t layer,
                                std::span<const uint8_t> payload);

// As VerifyLayerSection, with the CRC32C of the section's bytes [begin, crc_offset) computed by
// the caller (in parts, crc32c::Combine): DATA_LOSS unless the trailer holds `crc` and zero
// padding.
absl::Status CheckLayerTrailer(const WireLayout& layout, uint32_t layer,
                               std::span<const uint8_t> payload, uint32_t crc);

// Writes the CRC trailer of layer `layer` over the already written section bytes.
void SealLayerSection(const WireLayout& layout, uint32_t layer, std::span<uint8_t> payload);

// As SealLayerSection, with the CRC32C of the section's bytes [begin, crc_offset) computed by
// the caller (in parts, crc32c::Combine).
void WriteLayerTrailer(const WireLayout& layout, uint32_t layer, uint32_t crc,
                       std::span<uint8_t> payload);

// Token indices of each tier of one tier map, ascending (the row order inside sections).
struct TierLists {
  std::array<std::vector<uint32_t>, kNumTiers> tokens;
  const std::vector<uint32_t>& operator[](Tier t) const { return tokens[static_cast<int>(t)]; }
};
TierLists BuildTierLists(std::span<const uint8_t> map_tiers);

// Little-endian helpers for the wire.
inline void StoreLe16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline void StoreLe32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void StoreLe64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t LoadLe16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t LoadLe32(const uint8_t* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}
inline uint64_t LoadLe64(const uint8_t* p) {
  return uint64_t{LoadLe32(p)} | (uint64_t{LoadLe32(p + 4)} << 32);
}

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_WIRE_FORMAT_H_
