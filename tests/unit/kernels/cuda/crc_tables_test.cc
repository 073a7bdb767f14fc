// Host tests of the CUDA backend's CRC32C arithmetic (kernels/cuda/crc_gf2.h, crc_tables.h): the
// GF(2) helpers, and a lane-by-lane replay of the stream scheme the pack kernel and the verifier
// run, checked against common/crc32c on fresh random data. Needs no GPU.
#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "common/crc32c.h"
#include "gtest/gtest.h"
#include "kernels/cuda/crc_tables.h"

namespace spectrumkv::cuda_crc {
namespace {

uint64_t FreshSeed() {
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

// F(0, bytes): the raw register, from the standard CRC.
uint32_t Raw(const uint8_t* p, size_t n) { return crc32c::Value(p, n) ^ ZeroCrc(n); }

TEST(CrcGf2Test, InverseAndPowers) {
  EXPECT_EQ(MulMod(kX, kXInverse), kOne);
  EXPECT_EQ(MulMod(kOne, 0x12345678u), 0x12345678u);
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 50; ++i) {
    const uint64_t k = rng() % 100000;
    EXPECT_EQ(MulMod(XPowBytes(k), XPowNegBytes(k)), kOne) << "seed " << seed << " k " << k;
  }
}

TEST(CrcGf2Test, ZeroCrcAndCombine) {
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  StaticTables tables;
  BuildStaticTables(&tables);
  for (int i = 0; i < 40; ++i) {
    const size_t na = rng() % 3000, nb = rng() % 3000;
    std::vector<uint8_t> a(na + nb);
    for (auto& b : a) b = static_cast<uint8_t>(rng());
    std::vector<uint8_t> zeros(nb, 0);
    EXPECT_EQ(ZeroCrc(nb), crc32c::Value(zeros.data(), nb));
    // F(0, A ‖ B) = S_|B|(F(0, A)) ^ F(0, B), with both shift implementations.
    const uint32_t whole = Raw(a.data(), na + nb);
    const uint32_t ra = Raw(a.data(), na), rb = Raw(a.data() + na, nb);
    EXPECT_EQ(MulMod(XPowBytes(nb), ra) ^ rb, whole) << "seed " << seed;
    EXPECT_EQ(ShiftBytes(ra, nb, &tables.digits[0][0]) ^ rb, whole) << "seed " << seed;
  }
  EXPECT_EQ(ShiftBytes(0xDEADBEEFu, uint64_t{1} << 33, &tables.digits[0][0]),
            MulMod(XPowBytes(uint64_t{1} << 33), 0xDEADBEEFu));
}

TEST(CrcGf2Test, FeedHelpersMatchBytewise) {
  StaticTables tables;
  BuildStaticTables(&tables);
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 100; ++i) {
    const uint32_t r = static_cast<uint32_t>(rng()), w = static_cast<uint32_t>(rng());
    uint32_t slow = r;
    for (int b = 0; b < 4; ++b)
      slow = FeedByte(slow, static_cast<uint8_t>(w >> (8 * b)), tables.t[0]);
    EXPECT_EQ(Feed4(r, w, tables.t), slow);
    uint32_t slow2 = r;
    for (int b = 0; b < 2; ++b)
      slow2 = FeedByte(slow2, static_cast<uint8_t>(w >> (8 * b)), tables.t[0]);
    EXPECT_EQ(Feed2(r, w, tables.t), slow2);
  }
}

// Replays PackRange's CRC for rows [a, b) of an array of `rows` rows of row kind `kind`, exactly
// as the 32 lanes of a warp compute it, and returns the range's raw register shifted to the end
// of a section that ends `after` bytes past the range. Also replays the scale stream.
uint32_t ReplayRange(const RowGeometry& g, const DimTables& dt, const StaticTables& st, int kind,
                     const uint8_t* array, uint64_t a, uint64_t b, uint64_t after,
                     const uint8_t* scales, uint64_t scales_after) {
  const uint32_t c = kChunkBytes[kind];
  const uint64_t row_bytes = uint64_t{g.chunks} * c;
  const uint32_t rpi = g.rows_per_step, lpr = g.lanes_per_row;
  const uint64_t steps = (b - a + rpi - 1) / rpi;
  const int64_t first = static_cast<int64_t>(b) - static_cast<int64_t>(steps * rpi);
  const uint32_t* tabs = kind == 0 ? &dt.fp16[0][0] : (kind == 1 ? &dt.int8[0][0] : &dt.int4[0][0]);
  uint32_t crc[32][kMaxChunksPerLane] = {};
  uint32_t scale_crc[32] = {};
  auto scale_of = [&](int64_t r) -> uint32_t {
    return r < static_cast<int64_t>(a) ? 0u : scales[2 * r] | (uint32_t{scales[2 * r + 1]} << 8);
  };
  for (uint64_t it = 0; it < steps; ++it) {
    for (uint32_t lane = 0; lane < 32; ++lane) {
      const int64_t row = first + static_cast<int64_t>(it * rpi) + lane / lpr;
      for (uint32_t j = 0; j < g.chunks_per_lane; ++j) {
        const uint32_t chunk = lane % lpr + j * lpr;
        uint32_t w[4] = {0, 0, 0, 0};
        if (row >= static_cast<int64_t>(a) && chunk < g.chunks) {
          std::memcpy(w, array + row * row_bytes + chunk * c, c);
        }
        if (c == 16) crc[lane][j] = StreamStep<4>(crc[lane][j], w, tabs);
        if (c == 8) crc[lane][j] = StreamStep<2>(crc[lane][j], w, tabs);
        if (c == 4) crc[lane][j] = StreamStep<1>(crc[lane][j], w, tabs);
      }
      if (kind != 0 && rpi >= 2) {
        // Every lane streams (its row's scale | the next row's); only leaders count.
        const uint32_t w[1] = {scale_of(row) |
                               (lane / lpr + 1 < rpi ? scale_of(row + 1) << 16 : 0)};
        scale_crc[lane] = StreamStep<1>(scale_crc[lane], w, &dt.scale[0][0]);
      }
    }
    if (kind != 0 && rpi == 1) scale_crc[0] = Feed2(scale_crc[0], scale_of(first + it), st.t);
  }
  uint32_t val = 0;
  for (uint32_t lane = 0; lane < 32; ++lane) {
    for (uint32_t j = 0; j < g.chunks_per_lane; ++j)
      val ^= MulMod(dt.corr[kind][j][lane], crc[lane][j]);
  }
  uint32_t out = ShiftBytes(val, after, &st.digits[0][0]);
  if (kind != 0) {
    uint32_t sv = 0;
    if (rpi >= 2) {
      for (uint32_t lane = 0; lane < 32; ++lane) sv ^= MulMod(dt.scale_corr[lane], scale_crc[lane]);
    } else {
      sv = scale_crc[0];
    }
    out ^= ShiftBytes(sv, scales_after, &st.digits[0][0]);
  }
  return out;
}

TEST(CrcStreamTest, RangesOfRowsComposeToTheSectionCrc) {
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  StaticTables st;
  BuildStaticTables(&st);
  for (uint32_t dim : {8u, 24u, 64u, 72u, 128u, 256u, 264u, 520u, 1024u}) {
    DimTables dt;
    BuildDimTables(dim, &dt);
    const RowGeometry g = GeometryFor(dim);
    for (int kind = 0; kind < kRowKinds; ++kind) {
      // Section: [prefix][rows array][scales array][suffix].
      const uint64_t rows = 1 + rng() % 300;
      const uint64_t row_bytes = uint64_t{g.chunks} * kChunkBytes[kind];
      const uint64_t prefix = 16 * (rng() % 20), suffix = 16 * (rng() % 20);
      const uint64_t array_at = prefix, scales_at = array_at + rows * row_bytes;
      const uint64_t scales_bytes = kind == 0 ? 0 : 2 * rows;
      const uint64_t total = scales_at + scales_bytes + suffix;
      std::vector<uint8_t> section(total);
      for (auto& b : section) b = static_cast<uint8_t>(rng());
      uint32_t raw = ShiftBytes(Raw(section.data(), prefix), total - prefix, &st.digits[0][0]) ^
                     Raw(section.data() + total - suffix, suffix);
      // Random cut of the rows into ranges.
      uint64_t a = 0;
      while (a < rows) {
        const uint64_t b = std::min<uint64_t>(rows, a + 1 + rng() % 70);
        raw ^= ReplayRange(g, dt, st, kind, section.data() + array_at, a, b,
                           total - (array_at + b * row_bytes), section.data() + scales_at,
                           total - (scales_at + 2 * b));
        a = b;
      }
      EXPECT_EQ(raw ^ ZeroCrc(total), crc32c::Value(section.data(), total))
          << "seed " << seed << " dim " << dim << " kind " << kind << " rows " << rows;
    }
  }
}

TEST(CrcStreamTest, VerifierChunksComposeToTheSectionCrc) {
  const uint64_t seed = FreshSeed();
  std::mt19937_64 rng(seed);
  StaticTables st;
  BuildStaticTables(&st);
  for (int trial = 0; trial < 20; ++trial) {
    const uint64_t bytes = 16 * (1 + rng() % 3000);
    const uint64_t chunk_bytes = 512 * (1 + rng() % 8);
    std::vector<uint8_t> data(bytes);
    for (auto& b : data) b = static_cast<uint8_t>(rng());
    uint32_t raw = 0;
    for (uint64_t c0 = 0; c0 < bytes; c0 += chunk_bytes) {
      const uint64_t c1 = std::min(c0 + chunk_bytes, bytes);
      const uint64_t steps = (c1 - c0 + kVerifyStepBytes - 1) / kVerifyStepBytes;
      const uint64_t steps4 = (steps + 3) / 4 * 4;
      uint32_t val = 0;
      for (uint32_t lane = 0; lane < 32; ++lane) {
        uint32_t c = 0;
        for (uint64_t s = 0; s < steps4; ++s) {
          const int64_t off = static_cast<int64_t>(c1) -
                              static_cast<int64_t>(steps4 * kVerifyStepBytes) + lane * 16 +
                              static_cast<int64_t>(s * kVerifyStepBytes);
          uint32_t w[4] = {0, 0, 0, 0};
          if (off >= static_cast<int64_t>(c0)) std::memcpy(w, data.data() + off, 16);
          c = StreamStep<4>(c, w, &st.verify[0][0]);
        }
        val ^= MulMod(st.verify_corr[lane], c);
      }
      raw ^= ShiftBytes(val, bytes - c1, &st.digits[0][0]);
    }
    EXPECT_EQ(raw ^ ZeroCrc(bytes), crc32c::Value(data.data(), bytes)) << "seed " << seed;
  }
}

}  // namespace
}  // namespace spectrumkv::cuda_crc
