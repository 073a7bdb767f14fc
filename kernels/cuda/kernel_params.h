// Plain-data descriptions of one codec call that the host builds and the kernels read, and the
// launch functions of the CUDA backend's kernels (kernels/cuda/*.cu).
//
// Internal to kernels/cuda/. The host (cuda_codec.cc) validates everything first: every pointer
// here is a device pointer into validated memory, every count fits the layout it came from.
#ifndef SPECTRUMKV_KERNELS_CUDA_KERNEL_PARAMS_H_
#define SPECTRUMKV_KERNELS_CUDA_KERNEL_PARAMS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/crc_tables.h"

namespace spectrumkv::cuda_kernels {

// One layer's K (or V) rows in device memory: row (token, head) starts at
//   base + block_table[token / block_size] * block_stride + (token % block_size) * token_stride
//        + head * head_stride.
struct DevPlacement {
  uint8_t* base = nullptr;  // region base + offset_bytes
  uint64_t block_stride = 0;
  uint64_t token_stride = 0;
  uint64_t head_stride = 0;
};

// Payload offsets of one K or V part of a layer section, indexed by row kind (FP16, INT8, INT4).
struct DevPart {
  uint64_t rows[3] = {0, 0, 0};
  uint64_t scales[3] = {0, 0, 0};  // scales[0] unused
  uint64_t end = 0;
};

// One layer of a call.
struct DevLayer {
  DevPlacement kv[2];  // K, V
  DevPart part[2];
  uint64_t begin = 0;
  uint64_t crc_offset = 0;
  uint64_t key_offsets = 0;  // kcn arrays (0 when absent)
  uint64_t key_factors = 0;
  uint32_t counts[3] = {0, 0, 0};       // tokens at FP16, INT8, INT4 in this layer's map
  uint64_t list_offset[3] = {0, 0, 0};  // where each tier's token list starts in `lists`
  uint32_t zero_crc = 0;                // CRC32C of (crc_offset - begin) zero bytes
  uint32_t layer = 0;                   // layer index (for error reports)
};

// Rows of one (layer, part, row kind) array, cut into ranges of `range_rows` rows.
struct DevSegment {
  uint32_t slot = 0;  // index into the call's DevLayer array
  uint8_t part = 0;   // 0 K, 1 V
  uint8_t kind = 0;   // 0 FP16, 1 INT8, 2 INT4
  uint64_t rows = 0;  // count * heads
  uint64_t first_range = 0;
};

// A contiguous byte range of the payload whose raw CRC goes into the register of `slot`.
struct DevCrcRange {
  uint64_t begin = 0;  // payload offset, 16-byte aligned
  uint64_t bytes = 0;  // multiple of 16
  uint64_t after = 0;  // bytes from the range's end to the end of its layer section's CRC span
  uint32_t slot = 0;
  uint64_t first_range = 0;  // prefix of work items (chunks of kVerifyChunkBytes)
};

inline constexpr uint64_t kVerifyChunkBytes = 16384;

// Everything the pack and unpack kernels share.
struct DevCall {
  const DevLayer* layers = nullptr;  // num_slots entries
  uint32_t num_slots = 0;
  const DevSegment* segments = nullptr;
  uint32_t num_segments = 0;
  uint64_t num_ranges = 0;
  uint64_t range_rows = 0;
  const uint32_t* lists = nullptr;  // token lists of every tier of every map used
  const uint32_t* block_table = nullptr;
  uint32_t block_size = 0;
  uint32_t heads = 0;
  uint32_t head_dim = 0;
  uint8_t* payload = nullptr;
  bool bf16 = false;
  bool kv_aligned = false;  // every KV row is 16-byte aligned
  bool kcn = false;
  // Pack: per slot raw CRC registers; per slot float m and 1/f of the kcn quantizer, [H][D].
  uint32_t* crc = nullptr;
  const float* kcn_offset = nullptr;
  const float* kcn_inv_factor = nullptr;
  // Error report: the smallest (layer, part, token, head) key of a non-finite quantized row.
  unsigned long long* bad_row = nullptr;
  // Unpack: per slot 1 where this and every earlier slot verified (null: write everything).
  const uint32_t* write_ok = nullptr;
  const cuda_crc::StaticTables* static_tables = nullptr;
  const cuda_crc::DimTables* dim_tables = nullptr;
};

// Encodes a row position for bad_row (min over rows gives the first in layer/part/token order).
SPECTRUMKV_HD uint64_t EncodeBadRow(uint32_t layer, uint32_t part, uint32_t token, uint32_t head) {
  return (uint64_t{layer} << 56) | (uint64_t{part} << 55) | (uint64_t{token} << 30) | head;
}
inline constexpr unsigned long long kNoBadRow = ~0ull;

// Launches (all asynchronous on `stream`; they return the launch error, if any).

// Work items of the kcn statistics for `int4_tokens` tokens of one slot.
uint64_t KcnItemsFor(uint64_t int4_tokens, uint32_t heads);
// kcn: per slot, head and channel min/max of the INT4 keys (call.segments describe the INT4 key
// token lists, rows = tokens, first_range = item prefix). lo, hi are [slots][H][D] ordered
// encodings the caller zeroes first.
cudaError_t LaunchKcnMinMax(const DevCall& call, uint32_t* lo, uint32_t* hi, uint64_t items,
                            cudaStream_t stream);
// m, f into the payload, and float m and 1/f into offset / inv_factor ([slots][H][D]).
cudaError_t LaunchKcnFactors(const DevCall& call, const uint32_t* lo, const uint32_t* hi,
                             float* offset, float* inv_factor, cudaStream_t stream);
// Quantizes and writes every row of the call's segments, folding CRCs into call.crc.
cudaError_t LaunchPack(const DevCall& call, int grid_blocks, cudaStream_t stream);
// Zeroes padding, adds the kcn arrays' CRC and writes every layer's trailer.
cudaError_t LaunchPackFinalize(const DevCall& call, cudaStream_t stream);
// Resident blocks per multiprocessor of the pack and unpack kernels.
int PackBlocksPerSm();
int UnpackBlocksPerSm();
// Raw CRCs of byte ranges of call.payload into crc[slot].
cudaError_t LaunchCrcRanges(const DevCall& call, const DevCrcRange* ranges, uint32_t num_ranges,
                            uint64_t num_items, uint32_t* crc, int grid_blocks,
                            cudaStream_t stream);
// Compares each layer's CRC with its trailer; writes status[slot] (1 ok) and the write_ok prefix.
cudaError_t LaunchVerifyCheck(const DevCall& call, const uint32_t* crc, uint32_t* status,
                              uint32_t* write_ok, cudaStream_t stream);
// Dequantizes every row of the call's segments into the destination placements.
cudaError_t LaunchUnpack(const DevCall& call, int grid_blocks, cudaStream_t stream);

// Scoring. Lives in device memory (it is too large for kernel parameters).
struct DevScoreCall {
  DevPlacement kv[2 * 256];  // [layer][K, V]
  const uint32_t* block_table = nullptr;
  uint32_t block_size = 0;
  uint32_t layers = 0;
  uint32_t heads = 0;
  uint32_t head_dim = 0;
  uint32_t tokens = 0;
  bool bf16 = false;
  bool kv_aligned = false;
};

// key_norm: scores[t] = (sum over layers, K and V, heads of the row norm) / (layers * heads).
cudaError_t LaunchKeyNorm(const DevScoreCall* call, const DevScoreCall& host_call, float* scores,
                          cudaStream_t stream);

// Attention (SnapKV) scoring: scores[t] = sum over layers, q heads and window queries of the
// softmax weight of token t (before pooling and decay, which the host applies).
struct AttentionArgs {
  const DevScoreCall* call = nullptr;  // device copy
  uint32_t layers = 0, heads = 0, head_dim = 0, tokens = 0;
  bool bf16 = false;
  bool kv_aligned = false;
  uint32_t window = 0;
  uint32_t group = 0;              // q heads per KV head
  float inv_sqrt_d = 0.0f;         // 1 / sqrt(head_dim) as the reference computes it
  const float* queries = nullptr;  // [layer][window][q head][head_dim], as the caller gave them
  int num_sms = 1;
};

// True if the tensor-core path handles this shape (head_dim <= 256, 16-byte aligned rows).
bool AttentionTensorCoreSupported(uint32_t head_dim, bool kv_aligned);

// Scratch the attention path needs, in bytes (device memory the caller provides).
uint64_t AttentionScratchBytes(const AttentionArgs& a);

// Runs the attention path: prepares the queries, then either the tensor-core kernels (fp16 or
// bf16 operands with the queries split into 2 or 3 parts so that logits keep float accuracy) or
// the CUDA-core kernels (head_dim > 256, unaligned rows, fp16 queries out of range). Writes
// scores [tokens]. `overflow_host` must point at pinned host memory (one uint32); the call
// synchronizes `stream` once to read it. *used_tensor_cores says which path ran.
cudaError_t RunAttention(const AttentionArgs& a, void* scratch, float* scores,
                         uint32_t* overflow_host, cudaStream_t stream, bool* used_tensor_cores);

// Device planning (plan_kernels.cu): the ranking of RankTokens and the tier assignment of
// AssignByRank (plan.h), from scores already in device memory.
//
// Ranking: sinks first in position order, then a stable ascending radix sort (CUB) of the other
// tokens by a 32-bit key that orders scores descending: -0.0 is canonicalised to +0.0 (they compare
// equal on the host), every NaN maps to the largest key (NaN ranks last), so equal keys are exactly
// the scores the host comparator calls equal and stability gives the host's tie order (position
// ascending).
struct DevRankSegment {
  uint32_t end_rank = 0;
  uint32_t tier = 0;
};
inline constexpr int kDevRankSegments = 5;  // = kMaxRankSegments (plan.h)

struct DevPlanArgs {
  const float* scores = nullptr;  // [tokens]
  uint32_t tokens = 0;
  uint32_t sinks = 0;  // <= tokens
  uint32_t maps = 0;
  const DevRankSegment* segments = nullptr;  // [maps][kDevRankSegments]
  uint8_t* tiers = nullptr;                  // out: [maps][tokens] Tier codes
  // Optional (null: skipped). The token lists PackLayers uses: per map m and row kind k, the
  // ascending tokens of tier k at lists + list_base[3 m + k].
  uint32_t* lists = nullptr;
  const uint64_t* list_base = nullptr;
  // Optional (null: skipped). The prelude's 2-bit tier maps, map m at packed + m * map_bytes.
  uint8_t* packed = nullptr;
  uint64_t map_bytes = 0;
};

// Device scratch LaunchPlan needs for `tokens` tokens and `maps` maps, in bytes.
uint64_t PlanScratchBytes(uint32_t tokens, uint32_t maps);
// Ranks, assigns and (optionally) builds the lists and packed maps. `scratch` holds
// PlanScratchBytes bytes, 256-byte aligned.
cudaError_t LaunchPlan(const DevPlanArgs& a, void* scratch, cudaStream_t stream);

// PoolAndDecay (scoring.h) on the device, bit-exact: out[j] = max over the pool window of in
// (std::max order), times decay[j] when decay is not null (the host computes the factors).
// `in` and `out` must not overlap.
cudaError_t LaunchPoolAndDecay(const float* in, float* out, uint32_t tokens, uint32_t pool_kernel,
                               const float* decay, cudaStream_t stream);

// Stores (*crc ^ zero_crc) little-endian at dst (the tier maps' checksum of the prelude).
cudaError_t LaunchStoreCrc(const uint32_t* crc, uint32_t zero_crc, uint8_t* dst,
                           cudaStream_t stream);

}  // namespace spectrumkv::cuda_kernels

#endif  // SPECTRUMKV_KERNELS_CUDA_KERNEL_PARAMS_H_
