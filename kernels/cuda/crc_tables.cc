#include "kernels/cuda/crc_tables.h"

namespace spectrumkv::cuda_crc {

void BuildStreamTables(uint64_t first, uint32_t count, uint32_t (*out)[256]) {
  uint32_t byte_crc[256];
  for (uint32_t b = 0; b < 256; ++b) byte_crc[b] = ByteCrc(b);
  for (uint32_t i = 0; i < count; ++i) {
    const uint32_t shift = XPowBytes(first + count - 1 - i);
    for (uint32_t b = 0; b < 256; ++b) out[i][b] = MulMod(shift, byte_crc[b]);
  }
}

void BuildStaticTables(StaticTables* t) {
  for (uint32_t k = 0; k < 4; ++k) BuildStreamTables(k, 1, &t->t[k]);
  for (int d = 0; d < kShiftDigits; ++d) {
    for (uint32_t v = 0; v < 256; ++v) t->digits[d][v] = XPowBytes(uint64_t{v} << (8 * d));
  }
  BuildStreamTables(kVerifyStepBytes - 16, 16, t->verify);
  for (uint32_t lane = 0; lane < 32; ++lane) t->verify_corr[lane] = XPowNegBytes(16 * lane);
}

void BuildDimTables(uint32_t head_dim, DimTables* t) {
  const RowGeometry g = GeometryFor(head_dim);
  uint32_t(*tabs[kRowKinds])[256] = {t->fp16, t->int8, t->int4};
  for (int kind = 0; kind < kRowKinds; ++kind) {
    const uint64_t c = kChunkBytes[kind];
    const uint64_t super_bytes = uint64_t{g.rows_per_step} * g.chunks * c;
    BuildStreamTables(super_bytes - c, static_cast<uint32_t>(c), tabs[kind]);
    for (uint32_t j = 0; j < kMaxChunksPerLane; ++j) {
      for (uint32_t lane = 0; lane < 32; ++lane) {
        const int64_t off = LaneChunkOffset(g, kind, lane, j);
        t->corr[kind][j][lane] = off < 0 ? 0 : XPowNegBytes(static_cast<uint64_t>(off));
      }
    }
  }
  BuildStreamTables(g.rows_per_step >= 2 ? 2 * g.rows_per_step - 4 : 0, 4, t->scale);
  for (uint32_t lane = 0; lane < 32; ++lane) {
    const uint32_t pair = lane / g.lanes_per_row / 2;
    t->scale_corr[lane] = ScalePairLeader(g, lane) ? XPowNegBytes(4 * pair) : 0;
  }
}

}  // namespace spectrumkv::cuda_crc
