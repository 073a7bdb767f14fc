#include "kernels/api/wire_format.h"

#include <cstring>
#include <string>

#include "absl/strings/str_format.h"
#include "common/crc32c.h"
#include "common/status.h"

namespace spectrumkv {
namespace {

constexpr uint64_t Align16(uint64_t x) { return (x + 15) & ~uint64_t{15}; }

// Header field offsets (docs/wire-format.md, "Header").
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffHeaderBytes = 6;
constexpr size_t kOffFlags = 8;
constexpr size_t kOffDtype = 12;
constexpr size_t kOffPolicy = 13;
constexpr size_t kOffScoring = 14;
constexpr size_t kOffReserved0 = 15;
constexpr size_t kOffLayers = 16;
constexpr size_t kOffHeads = 20;
constexpr size_t kOffHeadDim = 24;
constexpr size_t kOffTokens = 28;
constexpr size_t kOffTotalBytes = 32;
constexpr size_t kOffCounts = 40;  // 4 x u32, FP16 INT8 INT4 DROP
constexpr size_t kOffReserved1 = 56;
constexpr size_t kOffHeaderCrc = 60;

absl::Status CheckDesc(const PayloadDesc& d) {
  const ModelShape& s = d.shape;
  if (s.num_layers == 0 || s.num_layers > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_layers %u is outside [1, %u]", s.num_layers, kMaxLayers));
  }
  if (s.num_kv_heads == 0 || s.num_kv_heads > kMaxKvHeads) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_kv_heads %u is outside [1, %u]", s.num_kv_heads, kMaxKvHeads));
  }
  if (s.head_dim == 0 || s.head_dim > kMaxHeadDim || s.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("head_dim %u is not a multiple of 8 in [8, %u]", s.head_dim, kMaxHeadDim));
  }
  if (d.num_tokens == 0 || d.num_tokens > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_tokens %u is outside [1, %u]", d.num_tokens, kMaxTokens));
  }
  if (d.dtype != DType::kFloat16 && d.dtype != DType::kBFloat16) {
    return absl::InvalidArgumentError(
        absl::StrFormat("unknown dtype code %d", static_cast<int>(d.dtype)));
  }
  if ((d.flags & ~kKnownFlags) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("unknown flags 0x%x", d.flags));
  }
  if (d.progressive() && d.key_channel_norm()) {
    return absl::InvalidArgumentError(
        "a payload cannot be both progressive and key-channel-normed");
  }
  const int policy = static_cast<int>(d.policy);
  if (policy < 1 || policy > 7) {
    return absl::InvalidArgumentError(absl::StrFormat("unknown policy code %d", policy));
  }
  if (d.scoring > 4) {
    return absl::InvalidArgumentError(absl::StrFormat("unknown scoring code %d", d.scoring));
  }
  return absl::OkStatus();
}

PartLayout LayoutPart(const ModelShape& s, const TierCounts& c, uint64_t* off) {
  const uint64_t h = s.num_kv_heads, d = s.head_dim;
  PartLayout p;
  p.fp16_rows = *off;
  *off += Align16(uint64_t{c[Tier::kFp16]} * h * d * 2);
  p.int8_rows = *off;
  *off += Align16(uint64_t{c[Tier::kInt8]} * h * d);
  p.int8_scales = *off;
  *off += Align16(uint64_t{c[Tier::kInt8]} * h * 2);
  p.int4_rows = *off;
  *off += Align16(uint64_t{c[Tier::kInt4]} * h * d / 2);
  p.int4_scales = *off;
  *off += Align16(uint64_t{c[Tier::kInt4]} * h * 2);
  p.end = *off;
  return p;
}

// A progressive part: every token's INT4 base (rows, then scales), then, after the bases of K
// and V, the INT8 tokens' refinements (LayoutRefinement).
PartLayout LayoutBase(const ModelShape& s, uint32_t num_tokens, uint64_t* off) {
  const uint64_t h = s.num_kv_heads, d = s.head_dim;
  PartLayout p;
  p.int4_rows = *off;
  *off += Align16(uint64_t{num_tokens} * h * d / 2);
  p.int4_scales = *off;
  *off += Align16(uint64_t{num_tokens} * h * 2);
  p.fp16_rows = p.int8_scales = *off;
  return p;
}

void LayoutRefinement(const ModelShape& s, const TierCounts& c, PartLayout* p, uint64_t* off) {
  p->int8_rows = *off;
  *off += Align16(uint64_t{c[Tier::kInt8]} * s.num_kv_heads * s.head_dim / 2);
  p->end = *off;
}

absl::Status DataLoss(const std::string& what) { return absl::DataLossError(what); }

}  // namespace

uint64_t TierBytesPerTokenLayer(const ModelShape& shape, Tier t) {
  const uint64_t h = shape.num_kv_heads, d = shape.head_dim;
  switch (t) {
    case Tier::kFp16:
      return 2 * h * d * 2;
    case Tier::kInt8:
      return 2 * h * (d + 2);
    case Tier::kInt4:
      return 2 * h * (d / 2 + 2);
    case Tier::kDrop:
      return 0;
  }
  return 0;
}

uint64_t WireOverheadBound(const PayloadDesc& desc) {
  const ModelShape& s = desc.shape;
  const uint64_t maps = uint64_t{desc.num_maps()} * ((uint64_t{desc.num_tokens} + 3) / 4);
  uint64_t per_layer = kWireTrailerBytes + 10 * 15;  // trailer + worst padding of 10 arrays
  if (desc.key_channel_norm()) per_layer += 2 * Align16(uint64_t{s.num_kv_heads} * s.head_dim * 2);
  return kWireHeaderBytes + Align16(maps) + kWireTrailerBytes + s.num_layers * per_layer;
}

absl::StatusOr<WireLayout> ComputeWireLayout(const PayloadDesc& desc,
                                             std::span<const TierCounts> map_counts) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckDesc(desc));
  if (map_counts.size() != desc.num_maps()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%u tier maps given, %u expected", map_counts.size(), desc.num_maps()));
  }
  WireLayout wl;
  wl.desc = desc;
  for (size_t m = 0; m < map_counts.size(); ++m) {
    if (map_counts[m].Total() != desc.num_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat("tier map %u counts %u tokens, expected %u",
                                                        m, map_counts[m].Total(), desc.num_tokens));
    }
    if (desc.progressive() &&
        (map_counts[m][Tier::kFp16] != 0 || map_counts[m][Tier::kDrop] != 0)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tier map %u has %u FP16 and %u dropped tokens: a progressive payload carries INT8 and "
          "INT4 tokens only",
          m, map_counts[m][Tier::kFp16], map_counts[m][Tier::kDrop]));
    }
    for (int t = 0; t < kNumTiers; ++t) wl.total_counts.n[t] += map_counts[m].n[t];
  }
  wl.map_counts.assign(map_counts.begin(), map_counts.end());
  const ModelShape& s = desc.shape;
  wl.tier_map_bytes = (uint64_t{desc.num_tokens} + 3) / 4;
  wl.tier_maps_offset = kWireHeaderBytes;
  wl.tier_maps_crc_offset =
      Align16(wl.tier_maps_offset + uint64_t{desc.num_maps()} * wl.tier_map_bytes);
  wl.prelude_bytes = wl.tier_maps_crc_offset + kWireTrailerBytes;
  uint64_t off = wl.prelude_bytes;
  wl.layers.resize(s.num_layers);
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    LayerSection& sec = wl.layers[l];
    sec.counts = map_counts[desc.MapForLayer(l)];
    sec.begin = off;
    if (desc.key_channel_norm()) {
      const uint64_t factors = Align16(uint64_t{s.num_kv_heads} * s.head_dim * 2);
      sec.key_offsets = off;
      off += factors;
      sec.key_factors = off;
      off += factors;
    }
    if (desc.progressive()) {
      sec.key = LayoutBase(s, desc.num_tokens, &off);
      sec.value = LayoutBase(s, desc.num_tokens, &off);
      sec.ranked_begin = off;
      LayoutRefinement(s, sec.counts, &sec.key, &off);
      LayoutRefinement(s, sec.counts, &sec.value, &off);
    } else {
      sec.ranked_begin = sec.begin;  // channel factors too: they are over the INT4 tokens
      sec.key = LayoutPart(s, sec.counts, &off);
      sec.value = LayoutPart(s, sec.counts, &off);
    }
    sec.crc_offset = off;
    off += kWireTrailerBytes;
    sec.end = off;
  }
  wl.total_bytes = off;
  return wl;
}

void WritePreludeHeader(const WireLayout& wl, std::span<uint8_t> out) {
  const PayloadDesc& d = wl.desc;
  SPECTRUMKV_CHECK(out.size() >= kWireHeaderBytes);
  uint8_t* p = out.data();
  std::memset(p, 0, kWireHeaderBytes);
  StoreLe32(p + kOffMagic, kWireMagic);
  StoreLe16(p + kOffVersion, kWireVersion);
  StoreLe16(p + kOffHeaderBytes, kWireHeaderBytes);
  StoreLe32(p + kOffFlags, d.flags);
  p[kOffDtype] = static_cast<uint8_t>(d.dtype);
  p[kOffPolicy] = static_cast<uint8_t>(d.policy);
  p[kOffScoring] = d.scoring;
  StoreLe32(p + kOffLayers, d.shape.num_layers);
  StoreLe32(p + kOffHeads, d.shape.num_kv_heads);
  StoreLe32(p + kOffHeadDim, d.shape.head_dim);
  StoreLe32(p + kOffTokens, d.num_tokens);
  StoreLe64(p + kOffTotalBytes, wl.total_bytes);
  for (int t = 0; t < kNumTiers; ++t) StoreLe32(p + kOffCounts + 4 * t, wl.total_counts.n[t]);
  StoreLe32(p + kOffHeaderCrc, crc32c::Value(p, kOffHeaderCrc));
}

void WritePrelude(const WireLayout& wl, std::span<const uint8_t> tiers, std::span<uint8_t> out) {
  const PayloadDesc& d = wl.desc;
  SPECTRUMKV_CHECK(out.size() >= wl.prelude_bytes);
  SPECTRUMKV_CHECK(tiers.size() == uint64_t{d.num_maps()} * d.num_tokens);
  uint8_t* p = out.data();
  std::memset(p, 0, wl.prelude_bytes);
  WritePreludeHeader(wl, out);

  uint8_t* maps = p + wl.tier_maps_offset;
  for (uint32_t m = 0; m < d.num_maps(); ++m) {
    uint8_t* map = maps + m * wl.tier_map_bytes;
    const uint8_t* src = tiers.data() + uint64_t{m} * d.num_tokens;
    for (uint32_t t = 0; t < d.num_tokens; ++t) {
      map[t / 4] = static_cast<uint8_t>(map[t / 4] | ((src[t] & 3u) << (2 * (t % 4))));
    }
  }
  StoreLe32(p + wl.tier_maps_crc_offset,
            crc32c::Value(maps, wl.tier_maps_crc_offset - wl.tier_maps_offset));
}

absl::StatusOr<ParsedPrelude> ParsePrelude(std::span<const uint8_t> bytes,
                                           uint64_t max_total_bytes) {
  const uint8_t* p = bytes.data();
  if (bytes.size() >= 4 && LoadLe32(p + kOffMagic) != kWireMagic) {
    return absl::InvalidArgumentError("not a SpectrumKV payload (bad magic)");
  }
  if (bytes.size() < kWireHeaderBytes) {
    return DataLoss(
        absl::StrFormat("truncated header: %u of %u bytes", bytes.size(), kWireHeaderBytes));
  }
  const uint16_t version = LoadLe16(p + kOffVersion);
  if (version != kWireVersion) {
    return absl::UnimplementedError(absl::StrFormat(
        "wire version %u is not supported (this build reads %u)", version, kWireVersion));
  }
  if (LoadLe32(p + kOffHeaderCrc) != crc32c::Value(p, kOffHeaderCrc)) {
    return DataLoss("header checksum mismatch");
  }
  if (LoadLe16(p + kOffHeaderBytes) != kWireHeaderBytes || p[kOffReserved0] != 0 ||
      LoadLe32(p + kOffReserved1) != 0) {
    return absl::InvalidArgumentError("header size or reserved fields are not as version 1 says");
  }
  PayloadDesc d;
  d.flags = LoadLe32(p + kOffFlags);
  d.dtype = static_cast<DType>(p[kOffDtype]);
  d.policy = static_cast<Policy>(p[kOffPolicy]);
  d.scoring = p[kOffScoring];
  d.shape.num_layers = LoadLe32(p + kOffLayers);
  d.shape.num_kv_heads = LoadLe32(p + kOffHeads);
  d.shape.head_dim = LoadLe32(p + kOffHeadDim);
  d.num_tokens = LoadLe32(p + kOffTokens);
  const uint64_t total_bytes = LoadLe64(p + kOffTotalBytes);
  TierCounts header_counts;
  for (int t = 0; t < kNumTiers; ++t) header_counts.n[t] = LoadLe32(p + kOffCounts + 4 * t);
  SPECTRUMKV_RETURN_IF_ERROR(CheckDesc(d));
  if (total_bytes > max_total_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "payload declares %u bytes, above the limit of %u", total_bytes, max_total_bytes));
  }

  const uint64_t map_bytes = (uint64_t{d.num_tokens} + 3) / 4;
  const uint64_t maps_block = Align16(kWireHeaderBytes + d.num_maps() * map_bytes);
  const uint64_t prelude = maps_block + kWireTrailerBytes;
  if (prelude > total_bytes) {
    return absl::InvalidArgumentError("declared total size is smaller than the prelude");
  }
  if (bytes.size() < prelude) {
    return DataLoss(absl::StrFormat("truncated tier maps: %u of %u bytes", bytes.size(), prelude));
  }
  const uint8_t* maps = p + kWireHeaderBytes;
  if (LoadLe32(p + maps_block) != crc32c::Value(maps, maps_block - kWireHeaderBytes)) {
    return DataLoss("tier map checksum mismatch");
  }
  for (size_t i = 4; i < kWireTrailerBytes; ++i) {
    if (p[maps_block + i] != 0) return absl::InvalidArgumentError("tier map trailer not zero");
  }

  ParsedPrelude out;
  out.tiers.resize(uint64_t{d.num_maps()} * d.num_tokens);
  std::vector<TierCounts> counts(d.num_maps());
  for (uint32_t m = 0; m < d.num_maps(); ++m) {
    const uint8_t* map = maps + m * map_bytes;
    uint8_t* dst = out.tiers.data() + uint64_t{m} * d.num_tokens;
    for (uint32_t t = 0; t < d.num_tokens; ++t) {
      const uint8_t code = (map[t / 4] >> (2 * (t % 4))) & 3u;
      dst[t] = code;
      ++counts[m].n[code];
    }
    const uint32_t used_bits = 2 * (d.num_tokens % 4);
    if (used_bits != 0 && (map[map_bytes - 1] >> used_bits) != 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tier map %u has non-zero padding bits", m));
    }
  }
  for (uint64_t i = kWireHeaderBytes + d.num_maps() * map_bytes; i < maps_block; ++i) {
    if (p[i] != 0) return absl::InvalidArgumentError("tier map padding not zero");
  }
  SPECTRUMKV_ASSIGN_OR_RETURN(out.layout, ComputeWireLayout(d, counts));
  if (!(out.layout.total_counts == header_counts)) {
    return absl::InvalidArgumentError("header tier counts disagree with the tier maps");
  }
  if (out.layout.total_bytes != total_bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("header declares %u bytes but the tier maps imply %u", total_bytes,
                        out.layout.total_bytes));
  }
  return out;
}

absl::Status CheckPayloadSize(const WireLayout& layout, uint64_t payload_size) {
  if (payload_size < layout.total_bytes) {
    return DataLoss(
        absl::StrFormat("truncated payload: %u of %u bytes", payload_size, layout.total_bytes));
  }
  if (payload_size > layout.total_bytes) {
    return DataLoss(
        absl::StrFormat("%u trailing bytes after the payload", payload_size - layout.total_bytes));
  }
  return absl::OkStatus();
}

absl::Status VerifyLayerSection(const WireLayout& layout, uint32_t layer,
                                std::span<const uint8_t> payload) {
  SPECTRUMKV_CHECK(layer < layout.layers.size());
  const LayerSection& sec = layout.layers[layer];
  if (payload.size() < sec.end) {
    return DataLoss(absl::StrFormat("layer %u section truncated", layer));
  }
  return CheckLayerTrailer(layout, layer, payload,
                           crc32c::Value(payload.data() + sec.begin, sec.crc_offset - sec.begin));
}

absl::Status CheckLayerTrailer(const WireLayout& layout, uint32_t layer,
                               std::span<const uint8_t> payload, uint32_t crc) {
  SPECTRUMKV_CHECK(layer < layout.layers.size());
  const LayerSection& sec = layout.layers[layer];
  if (payload.size() < sec.end) {
    return DataLoss(absl::StrFormat("layer %u section truncated", layer));
  }
  const uint8_t* p = payload.data();
  if (LoadLe32(p + sec.crc_offset) != crc) {
    return DataLoss(absl::StrFormat("layer %u checksum mismatch", layer));
  }
  for (uint64_t i = sec.crc_offset + 4; i < sec.end; ++i) {
    if (p[i] != 0) return DataLoss(absl::StrFormat("layer %u trailer padding not zero", layer));
  }
  return absl::OkStatus();
}

void SealLayerSection(const WireLayout& layout, uint32_t layer, std::span<uint8_t> payload) {
  const LayerSection& sec = layout.layers[layer];
  SPECTRUMKV_CHECK(payload.size() >= sec.end);
  WriteLayerTrailer(layout, layer,
                    crc32c::Value(payload.data() + sec.begin, sec.crc_offset - sec.begin), payload);
}

void WriteLayerTrailer(const WireLayout& layout, uint32_t layer, uint32_t crc,
                       std::span<uint8_t> payload) {
  SPECTRUMKV_CHECK(layer < layout.layers.size());
  const LayerSection& sec = layout.layers[layer];
  SPECTRUMKV_CHECK(payload.size() >= sec.end);
  uint8_t* p = payload.data();
  std::memset(p + sec.crc_offset, 0, kWireTrailerBytes);
  StoreLe32(p + sec.crc_offset, crc);
}

TierLists BuildTierLists(std::span<const uint8_t> map_tiers) {
  TierLists lists;
  std::array<size_t, kNumTiers> counts{};
  for (uint8_t code : map_tiers) ++counts[code & 3u];
  for (int t = 0; t < kNumTiers; ++t) lists.tokens[t].reserve(counts[t]);
  for (size_t i = 0; i < map_tiers.size(); ++i) {
    lists.tokens[map_tiers[i] & 3u].push_back(static_cast<uint32_t>(i));
  }
  return lists;
}

}  // namespace spectrumkv
