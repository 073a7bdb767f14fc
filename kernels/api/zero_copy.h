// Uncompressed layer sections described as byte ranges of a host KV pool (no gather copy).
//
// A layer whose tokens are all FP16 and that carries no key-channel factors is, on the wire
// (docs/wire-format.md), the layer's K rows in token and head order, then its V rows, then the
// 16-byte CRC32C trailer: no padding, since a row is head_dim * 2 bytes and head_dim is a multiple
// of 8. Where the pool keeps those rows in long contiguous runs (vLLM NHD: one run per block), a
// transport can send them from the pool with a scatter-gather list instead of copying them into
// staging first. DescribeFp16Layers lists those runs and computes each layer's CRC32C while
// reading the pool; the bytes its ranges cover, in order, are exactly what PackLayers writes for
// the same plan.
//
// Host memory only. Pure functions; calls that write disjoint trailers may run concurrently.
#ifndef SPECTRUMKV_KERNELS_API_ZERO_COPY_H_
#define SPECTRUMKV_KERNELS_API_ZERO_COPY_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "kernels/api/layout.h"
#include "kernels/api/plan.h"

namespace spectrumkv {

// True if every tier map of `plan` puts every token in FP16 and the payload has no key-channel
// factors: each layer section is then plain rows plus its trailer.
bool IsPlainFp16Plan(const TierPlan& plan);

// The number of maximal contiguous runs of `src`'s memory that the K rows of layer `layer` form
// in wire order (token by token, head by head). A validated host buffer; layer in range.
uint64_t Fp16RunCount(const KvBuffer& src, uint32_t layer);

// Appends to `ranges` the payload bytes [layout.layers[first].begin, layout.layers[last-1].end)
// of a plain FP16 plan (IsPlainFp16Plan): the rows, straight from `src` and merged into maximal
// contiguous runs, and each layer's trailer, which this call writes into `payload` (the message
// buffer, plan.layout.total_bytes long) with the CRC32C of the layer's rows as read from `src`.
// Nothing else of `payload` is touched. The ranges point into `src` and `payload` and stay valid
// as long as they do; if the pool changes before they are sent, the receiver's checksum fails.
// INVALID_ARGUMENT if the plan is not plain FP16, `src` is not host memory or does not match the
// plan, or the layer range or payload size is wrong.
absl::Status DescribeFp16Layers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                                uint32_t last_layer, std::span<uint8_t> payload,
                                std::vector<std::span<const uint8_t>>* ranges);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_KERNELS_API_ZERO_COPY_H_
