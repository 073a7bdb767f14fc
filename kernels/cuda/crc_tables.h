// Lookup tables and the per-lane stream arithmetic of the CUDA backend's fused CRC32C.
//
// How the kernels checksum what they write without reading it back: a warp writes a range of
// equal-sized rows (one array of a layer section) in steps of `rpi` rows (a "super-row"); each
// lane writes one or more fixed-size chunks (4, 8 or 16 bytes) at the same offset of every
// super-row. Each lane folds its chunks into its own register as the message
// "chunk ‖ gap zero bytes ‖ chunk ‖ gap …", gap = super-row bytes - chunk bytes, which needs one
// table lookup per byte (tables T_{gap + c - 1 - i}, T_k[b] = F(0, [b] ‖ k zero bytes)). That
// message sits `offset` bytes after the range's own bytes, so at the end of the range each lane
// multiplies its register by x^(-8 * offset) (a per-lane constant), the warp XORs the lanes, and
// one multiplication by x^(8 * bytes after the range) moves the range's CRC to the end of the
// layer section. Ranges are XORed into one register per layer (order-free), and the trailer gets
// that register ^ ZeroCrc(section bytes). Zero padding contributes nothing. Leading rows before a
// range's first row count as zeros, which keeps every lane's message aligned to the range's end.
//
// Pure and thread-safe; the Build* functions fill caller-owned structs.
#ifndef SPECTRUMKV_KERNELS_CUDA_CRC_TABLES_H_
#define SPECTRUMKV_KERNELS_CUDA_CRC_TABLES_H_

#include <cstdint>

#include "kernels/cuda/crc_gf2.h"

namespace spectrumkv::cuda_crc {

// How a warp covers the rows of one head_dim: `lanes_per_row` lanes (a power of two) per row,
// `rows_per_step` = 32 / lanes_per_row rows at once, each lane holding up to `chunks_per_lane`
// chunks of 8 elements (chunk j of lane-in-row i is chunk i + j * lanes_per_row of the row).
struct RowGeometry {
  uint32_t chunks = 0;  // head_dim / 8
  uint32_t lanes_per_row = 0;
  uint32_t rows_per_step = 0;
  uint32_t chunks_per_lane = 0;
};

// A lane holds up to four chunks of a row (32 elements), so that the per-row work (address,
// scale, reductions) is shared by as many elements as registers allow.
SPECTRUMKV_HD RowGeometry GeometryFor(uint32_t head_dim) {
  RowGeometry g;
  g.chunks = head_dim / 8;
  uint32_t pow2 = 1;
  while (pow2 < g.chunks) pow2 *= 2;
  uint32_t lanes = pow2 / 4;
  if (lanes < 1) lanes = 1;
  if (lanes > 32) lanes = 32;
  g.lanes_per_row = lanes;
  g.rows_per_step = 32 / lanes;
  g.chunks_per_lane = (g.chunks + lanes - 1) / lanes;
  return g;
}

// The row kinds a warp writes, indexed like Tier (FP16 rows, INT8 codes, INT4 nibbles).
inline constexpr int kRowKinds = 3;
inline constexpr uint32_t kChunkBytes[kRowKinds] = {16, 8, 4};
inline constexpr int kMaxChunksPerLane = 4;  // head_dim <= 1024

// Chunk streams of the verifier: 32 lanes x 16 bytes per step.
inline constexpr uint32_t kVerifyStepBytes = 512;

// Tables that do not depend on the model shape.
struct StaticTables {
  uint32_t t[4][256];                  // t[k][b] = T_k[b]
  uint32_t digits[kShiftDigits][256];  // x^(8 * v * 256^d)
  uint32_t verify[16][256];            // T_{496 + 15 - i}: 16-byte chunks, 512-byte steps
  uint32_t verify_corr[32];            // x^(-8 * 16 * lane)
};

// Tables for the row streams of one head_dim. The scales of a warp step (2 bytes per row) are
// folded in pairs: the leader lane of an even row of the step takes the next row's scale and
// streams the 4 bytes (where rows_per_step >= 2; with one row per step, lane 0 feeds the scales
// in order with StaticTables::t).
struct DimTables {
  uint32_t fp16[16][256];                           // T_{gap + 15 - i}
  uint32_t int8[8][256];                            // T_{gap + 7 - i}
  uint32_t int4[4][256];                            // T_{gap + 3 - i}
  uint32_t corr[kRowKinds][kMaxChunksPerLane][32];  // x^(-8 * offset of lane's chunk j)
  uint32_t scale[4][256];                           // T_{2 * rows_per_step - 4 + 3 - i}
  uint32_t scale_corr[32];  // x^(-8 * 4 * pair) for pair leaders, 0 for other lanes
};

// True if `lane` leads a pair of scales in a warp step.
SPECTRUMKV_HD bool ScalePairLeader(const RowGeometry& g, uint32_t lane) {
  return g.rows_per_step >= 2 && lane % g.lanes_per_row == 0 && (lane / g.lanes_per_row) % 2 == 0;
}

// T_k[b] for every b and k in [first, first + count), written to out[i] for k = first + count -
// 1 - i (the order the stream step wants).
void BuildStreamTables(uint64_t first, uint32_t count, uint32_t (*out)[256]);
void BuildStaticTables(StaticTables* t);
void BuildDimTables(uint32_t head_dim, DimTables* t);

// Byte offset, within a super-row of row kind `kind`, of chunk j of `lane`; -1 if the lane holds
// no such chunk.
SPECTRUMKV_HD int64_t LaneChunkOffset(const RowGeometry& g, int kind, uint32_t lane, uint32_t j) {
  const uint32_t sub = lane / g.lanes_per_row, lir = lane % g.lanes_per_row;
  const uint32_t chunk = lir + j * g.lanes_per_row;
  if (chunk >= g.chunks) return -1;
  const uint64_t row_bytes = uint64_t{g.chunks} * kChunkBytes[kind];
  return static_cast<int64_t>(sub * row_bytes + uint64_t{chunk} * kChunkBytes[kind]);
}

// Feeds a chunk of 4 * kWords bytes (little-endian words) plus the stream's gap into register r.
// tabs points at 4 * kWords tables of 256 entries, tabs[i] = T_{gap + c - 1 - i}.
template <int kWords>
SPECTRUMKV_HD uint32_t StreamStep(uint32_t r, const uint32_t* w, const uint32_t* tabs) {
  uint32_t acc = 0;
  for (int k = 0; k < kWords; ++k) {
    const uint32_t x = k == 0 ? w[0] ^ r : w[k];
    acc ^= tabs[(4 * k + 0) * 256 + (x & 0xFFu)] ^ tabs[(4 * k + 1) * 256 + ((x >> 8) & 0xFFu)] ^
           tabs[(4 * k + 2) * 256 + ((x >> 16) & 0xFFu)] ^ tabs[(4 * k + 3) * 256 + (x >> 24)];
  }
  return acc;
}

// Feeds 4 contiguous bytes (word w) into register r with the static tables t[0..3].
SPECTRUMKV_HD uint32_t Feed4(uint32_t r, uint32_t w, const uint32_t (*t)[256]) {
  const uint32_t x = w ^ r;
  return t[3][x & 0xFFu] ^ t[2][(x >> 8) & 0xFFu] ^ t[1][(x >> 16) & 0xFFu] ^ t[0][x >> 24];
}

// Feeds 2 contiguous bytes (low half of w) into register r.
SPECTRUMKV_HD uint32_t Feed2(uint32_t r, uint32_t w, const uint32_t (*t)[256]) {
  const uint32_t x = (w & 0xFFFFu) ^ r;
  return (r >> 16) ^ t[1][x & 0xFFu] ^ t[0][(x >> 8) & 0xFFu];
}

}  // namespace spectrumkv::cuda_crc

#endif  // SPECTRUMKV_KERNELS_CUDA_CRC_TABLES_H_
