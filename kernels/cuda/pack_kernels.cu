// Pack-side kernels: kcn channel statistics and factors, the fused gather-quantize-compact-CRC
// pack, and the per-layer finalize (padding, trailers). See crc_tables.h for the CRC scheme and
// device_common.cuh for the arithmetic.
#include "kernels/cuda/crc_tables.h"
#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/row_cursor.cuh"

namespace spectrumkv::cuda_kernels {
namespace {

using cuda_crc::RowGeometry;

constexpr int kPackThreads = 256;
constexpr uint32_t kKcnTokensPerItem = 256;

// Shared-memory word offsets of the pack tables (DimTables: FP16 at 0, INT8 at 4096, INT4 at
// 6144, then the lane corrections, then StaticTables::t).
constexpr uint32_t kCorrOffset = 7168;
constexpr uint32_t kScaleOffset = 7552;
constexpr uint32_t kScaleCorrOffset = 8576;
constexpr uint32_t kStaticTOffset = 8608;
constexpr uint32_t kPackSmemWords = 9632;
static_assert(sizeof(cuda_crc::DimTables) == kStaticTOffset * 4, "DimTables layout");

// Order-preserving encoding of floats as unsigned integers (-0 sorts below +0).
__device__ __forceinline__ uint32_t EncodeOrdered(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float DecodeOrdered(uint32_t e) {
  return __uint_as_float((e & 0x80000000u) ? (e & 0x7FFFFFFFu) : ~e);
}

__device__ __forceinline__ void ReportBadRow(const DevCall& call, uint32_t layer, uint32_t part,
                                             uint32_t token, uint32_t head) {
  atomicMin(call.bad_row, static_cast<unsigned long long>(EncodeBadRow(layer, part, token, head)));
}

// Largest |x| bit pattern (sign cleared) over the words of a chunk.
__device__ __forceinline__ uint32_t AbsMaxBits(const uint4& v) {
  uint32_t m = __vmaxu2(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu);
  m = __vmaxu2(m, __vmaxu2(v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu));
  return max(m & 0xFFFFu, m >> 16);
}

// ---------------------------------------------------------------------------------------------
// kcn statistics. Work items: (segment of a slot's INT4 keys, head, chunk of tokens).

template <bool kBf16, int kCpl>
__global__ void __launch_bounds__(kPackThreads)
    KcnMinMaxKernel(const DevCall call, uint32_t* lo_enc, uint32_t* hi_enc, uint64_t items) {
  const RowGeometry g = cuda_crc::GeometryFor(call.head_dim);
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t warps = (uint64_t{gridDim.x} * blockDim.x) >> 5;
  const uint32_t lpr = g.lanes_per_row, rpi = g.rows_per_step;
  const uint32_t sub = lane / lpr, lir = lane % lpr;
  const uint32_t heads = call.heads, dim = call.head_dim;
  for (uint64_t item = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; item < items;
       item += warps) {
    const DevSegment seg = call.segments[FindByFirst(call.segments, call.num_segments, item)];
    const DevLayer& layer = call.layers[seg.slot];
    const uint64_t local = item - seg.first_range;
    const uint32_t head = static_cast<uint32_t>(local % heads);
    const uint64_t t0 = (local / heads) * kKcnTokensPerItem;
    const uint64_t t1 = min(t0 + kKcnTokensPerItem, seg.rows);
    const uint32_t* list = call.lists + layer.list_offset[2];
    uint32_t lo[kCpl][8], hi[kCpl][8];
#pragma unroll
    for (int j = 0; j < kCpl; ++j) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        lo[j][e] = 0xFFFFFFFFu;
        hi[j][e] = 0u;
      }
    }
    for (uint64_t t = t0 + sub; t < t1; t += rpi) {
      const uint32_t token = list[t];
      const uint8_t* row = TokenBase(layer.kv[0], call.block_table, call.block_size, token) +
                           uint64_t{head} * layer.kv[0].head_stride;
      uint32_t amax = 0;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const uint32_t chunk = lir + j * lpr;
        if (chunk >= g.chunks) continue;
        const uint4 v = LoadChunk(row + chunk * 16, call.kv_aligned);
        amax = max(amax, AbsMaxBits(v));
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const uint32_t bits = (Word(v, e / 2) >> (16 * (e % 2))) & 0xFFFFu;
          const uint32_t enc = EncodeOrdered(ToF<kBf16>(bits));
          lo[j][e] = min(lo[j][e], enc);
          hi[j][e] = max(hi[j][e], enc);
        }
      }
      if (amax >= NonFiniteAbs<kBf16>()) ReportBadRow(call, layer.layer, 0, token, head);
    }
#pragma unroll
    for (int j = 0; j < kCpl; ++j) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        for (uint32_t o = lpr; o < 32; o *= 2) {
          lo[j][e] = min(lo[j][e], __shfl_xor_sync(kFullMask, lo[j][e], o));
          hi[j][e] = max(hi[j][e], __shfl_xor_sync(kFullMask, hi[j][e], o));
        }
      }
    }
    if (sub == 0) {
      const uint64_t base = (uint64_t{seg.slot} * heads + head) * dim;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const uint32_t chunk = lir + j * lpr;
        if (chunk >= g.chunks) continue;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          // lo is kept as a maximum of the complement so that both arrays start at zero.
          atomicMax(lo_enc + base + chunk * 8 + e, ~lo[j][e]);
          atomicMax(hi_enc + base + chunk * 8 + e, hi[j][e]);
        }
      }
    }
  }
}

// One thread per (slot, head, channel): m and f as docs/wire-format.md defines them.
template <bool kBf16>
__global__ void KcnFactorsKernel(const DevCall call, const uint32_t* lo_enc, const uint32_t* hi_enc,
                                 float* offset, float* inv_factor) {
  const uint64_t hd = uint64_t{call.heads} * call.head_dim;
  const uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= hd * call.num_slots) return;
  const uint32_t slot = static_cast<uint32_t>(i / hd);
  const uint64_t hc = i % hd;
  const DevLayer& layer = call.layers[slot];
  uint32_t m_bits = 0, f_bits = OneBits<kBf16>();
  if (layer.counts[2] > 0) {
    float lo = DecodeOrdered(~lo_enc[i]);
    float hi = DecodeOrdered(hi_enc[i]);
    if (lo == 0.0f && hi == 0.0f) {
      // Every value is a zero: the reference keeps the first token's zero for both, so the
      // sign of m is that of the first INT4 token.
      const uint32_t head = static_cast<uint32_t>(hc / call.head_dim);
      const uint32_t c = static_cast<uint32_t>(hc % call.head_dim);
      const uint32_t token = call.lists[layer.list_offset[2]];
      const uint8_t* row = TokenBase(layer.kv[0], call.block_table, call.block_size, token) +
                           uint64_t{head} * layer.kv[0].head_stride;
      const float first = ToF<kBf16>(*reinterpret_cast<const uint16_t*>(row + 2 * c));
      lo = first;
      hi = first;
    }
    m_bits = FromFRne<kBf16>(__fadd_rn(__fmul_rn(0.5f, lo), __fmul_rn(0.5f, hi)));
    const float m = ToF<kBf16>(m_bits);
    const float half = fmaxf(__fsub_rn(hi, m), __fsub_rn(m, lo));
    const uint32_t candidate = FromFRne<kBf16>(__fsqrt_rn(half));
    const float fv = ToF<kBf16>(candidate);
    if (fv > 0.0f && isfinite(fv)) f_bits = candidate;
  }
  reinterpret_cast<uint16_t*>(call.payload + layer.key_offsets)[hc] = static_cast<uint16_t>(m_bits);
  reinterpret_cast<uint16_t*>(call.payload + layer.key_factors)[hc] = static_cast<uint16_t>(f_bits);
  offset[i] = ToF<kBf16>(m_bits);
  inv_factor[i] = __fdiv_rn(1.0f, ToF<kBf16>(f_bits));
}

// ---------------------------------------------------------------------------------------------
// The pack itself.

// Eight elements of a chunk as floats.
template <bool kBf16>
__device__ __forceinline__ void ToFloats(const uint4& v, float (&x)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = ToF<kBf16>((Word(v, e / 2) >> (16 * (e % 2))) & 0xFFFFu);
}

// y * inv (or y / s when 1/s overflowed) rounded to an integer, as the bit pattern of
// y + 1.5 * 2^23: its low byte is the two's-complement code. No clamp is needed: the scale is
// rounded up, so |y| <= qmax * (1 + 2^-22) and rounds to at most qmax; a zero scale has inv 0.
__device__ __forceinline__ uint32_t RoundedBits(float x, const DevScale& s) {
  const float y = s.divide ? __fdiv_rn(x, s.value) : __fmul_rn(x, s.inv);
  return __float_as_uint(__fadd_rn(y, kRoundMagic));
}

// 16 bytes from global to shared memory without passing through registers; `bytes` 0 writes
// zeros (nothing is read).
__device__ __forceinline__ void CpAsync16(void* smem_dst, const void* src, uint32_t bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void CpAsyncWaitAllButOne() {
  asm volatile("cp.async.wait_group 1;\n" ::);
}
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_group 0;\n" ::); }

// Per warp: two stages of [chunk j][lane] 16-byte slots, plus the (token, head) of each stage's
// row per lane, in shared memory after the tables.
constexpr uint32_t kStageWordsPerWarp = 2 * cuda_crc::kMaxChunksPerLane * 32 * 4 + 2 * 32 * 2;
constexpr uint32_t kPackStageWords = (kPackThreads / 32) * kStageWordsPerWarp;

// Writes rows [a, b) of one (layer, part, kind) array and folds their CRC into call.crc.
// The rows are walked in warp steps aligned to b; rows before a in the first step are zeros that
// are neither read nor written (see crc_tables.h).
template <bool kBf16, int kCpl, int kKind>
__device__ void PackRange(const DevCall& call, const DevSegment& seg, uint64_t a, uint64_t b,
                          const uint32_t* smem, uint32_t* stage, const RowGeometry& g,
                          uint32_t lane) {
  constexpr uint32_t kCBytes = kKind == 0 ? 16 : (kKind == 1 ? 8 : 4);
  const DevLayer& layer = call.layers[seg.slot];
  const DevPart& part = layer.part[seg.part];
  uint8_t* rows_out = call.payload + part.rows[kKind];
  uint8_t* scales_out = call.payload + part.scales[kKind];
  const uint32_t heads = call.heads;
  const uint64_t row_bytes = uint64_t{g.chunks} * kCBytes;
  const uint32_t rpi = g.rows_per_step, lpr = g.lanes_per_row;
  const uint32_t sub = lane / lpr, lir = lane % lpr;
  const uint64_t steps = (b - a + rpi - 1) / rpi;
  const int64_t first = static_cast<int64_t>(b) - static_cast<int64_t>(steps * rpi);
  const bool kcn = kKind == 2 && seg.part == 0 && call.kcn;
  const uint32_t* tabs = smem + (kKind == 0 ? 0 : (kKind == 1 ? 4096 : 6144));
  const bool aligned = call.kv_aligned;

  RowCursor cursor(layer.kv[seg.part], call.lists + layer.list_offset[kKind], call.block_table,
                   call.block_size, heads);
  uint32_t crc[kCpl];
#pragma unroll
  for (int j = 0; j < kCpl; ++j) crc[j] = 0;
  uint32_t scale_crc = 0;

  // Two steps are in flight while one is processed: the rows of step it + 2 are copied into
  // shared memory (cp.async; plain loads for rows that are not 16-byte aligned) while step it is
  // quantized. Each lane reads back only its own slots, so no barrier is needed.
  uint4* slots = reinterpret_cast<uint4*>(stage);
  uint32_t* meta = stage + 2 * cuda_crc::kMaxChunksPerLane * 32 * 4;  // [stage][token, head][lane]
  auto issue = [&](uint64_t it_issue) {
    const uint32_t st = static_cast<uint32_t>(it_issue & 1);
    const int64_t r = first + static_cast<int64_t>(it_issue * rpi) + sub;
    const bool act = it_issue < steps && r >= static_cast<int64_t>(a);
    const uint8_t* src = act ? cursor.Seek(static_cast<uint64_t>(r), rpi) : nullptr;
    meta[(st * 2) * 32 + lane] = cursor.token();
    meta[(st * 2 + 1) * 32 + lane] = cursor.head();
#pragma unroll
    for (int j = 0; j < kCpl; ++j) {
      const uint32_t chunk = lir + j * lpr;
      const bool has = act && chunk < g.chunks;
      uint4* dst = slots + (st * cuda_crc::kMaxChunksPerLane + j) * 32 + lane;
      if (aligned) {
        CpAsync16(dst, has ? static_cast<const void*>(src + chunk * 16) : call.lists,
                  has ? 16u : 0u);
      } else {
        *dst = has ? LoadChunk(src + chunk * 16, false) : make_uint4(0, 0, 0, 0);
      }
    }
    CpAsyncCommit();
  };
  issue(0);
  issue(1);

  int64_t row = first + sub;
  for (uint64_t it = 0; it < steps; ++it, row += rpi) {
    const bool active = row >= static_cast<int64_t>(a);
    const uint64_t urow = static_cast<uint64_t>(row);
    const uint32_t st = static_cast<uint32_t>(it & 1);
    CpAsyncWaitAllButOne();
    uint4 v[kCpl];
#pragma unroll
    for (int j = 0; j < kCpl; ++j) v[j] = slots[(st * cuda_crc::kMaxChunksPerLane + j) * 32 + lane];
    const uint32_t token = meta[(st * 2) * 32 + lane];
    const uint32_t head = meta[(st * 2 + 1) * 32 + lane];
    issue(it + 2);

    if constexpr (kKind == 0) {
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const uint32_t chunk = lir + j * lpr;
        if (active && chunk < g.chunks) {
          *reinterpret_cast<uint4*>(rows_out + urow * row_bytes + chunk * 16) = v[j];
        }
        const uint32_t w[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
        crc[j] = cuda_crc::StreamStep<4>(crc[j], w, tabs);
      }
    } else {
      uint32_t amax_bits = 0;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) amax_bits = max(amax_bits, AbsMaxBits(v[j]));
      for (uint32_t o = lpr / 2; o > 0; o /= 2) {
        amax_bits = max(amax_bits, __shfl_xor_sync(kFullMask, amax_bits, o));
      }
      if (active && lir == 0 && amax_bits >= NonFiniteAbs<kBf16>()) {
        ReportBadRow(call, layer.layer, seg.part, token, head);
      }
      const float* kcn_m = nullptr;
      const float* kcn_inv = nullptr;
      float amax = ToF<kBf16>(amax_bits);
      if (kcn) {
        // The normalised row's |max|; the normalised values are recomputed below rather than
        // kept, to keep registers for the common path.
        const uint64_t at = (uint64_t{seg.slot} * heads + head) * call.head_dim;
        kcn_m = call.kcn_offset + at;
        kcn_inv = call.kcn_inv_factor + at;
        float fa = 0.0f;
#pragma unroll
        for (int j = 0; j < kCpl; ++j) {
          const uint32_t chunk = lir + j * lpr;
          if (!(active && chunk < g.chunks)) continue;
          float x[8];
          ToFloats<kBf16>(v[j], x);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float xn =
                __fmul_rn(__fsub_rn(x[e], kcn_m[chunk * 8 + e]), kcn_inv[chunk * 8 + e]);
            fa = fmaxf(fa, fabsf(xn));
          }
        }
        for (uint32_t o = lpr / 2; o > 0; o /= 2) {
          fa = fmaxf(fa, __shfl_xor_sync(kFullMask, fa, o));
        }
        amax = fa;
      }
      const DevScale s = MakeScaleDev<kBf16>(amax, kKind == 1 ? 127.0f : 7.0f);
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const uint32_t chunk = lir + j * lpr;
        const bool has = active && chunk < g.chunks;
        float x[8];
        ToFloats<kBf16>(v[j], x);
        if (kcn && has) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            x[e] = __fmul_rn(__fsub_rn(x[e], kcn_m[chunk * 8 + e]), kcn_inv[chunk * 8 + e]);
          }
        }
        uint32_t r[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) r[e] = RoundedBits(x[e], s);
        if constexpr (kKind == 1) {
          uint32_t w[2];
          w[0] =
              __byte_perm(__byte_perm(r[0], r[1], 0x0040), __byte_perm(r[2], r[3], 0x0040), 0x5410);
          w[1] =
              __byte_perm(__byte_perm(r[4], r[5], 0x0040), __byte_perm(r[6], r[7], 0x0040), 0x5410);
          if (!has) w[0] = w[1] = 0;
          if (has) {
            *reinterpret_cast<uint2*>(rows_out + urow * row_bytes + chunk * 8) =
                make_uint2(w[0], w[1]);
          }
          crc[j] = cuda_crc::StreamStep<2>(crc[j], w, tabs);
        } else {
          uint32_t w[1] = {0};
#pragma unroll
          for (int e = 0; e < 8; ++e) w[0] |= (r[e] & 0xFu) << (4 * e);
          if (!has) w[0] = 0;
          if (has) *reinterpret_cast<uint32_t*>(rows_out + urow * row_bytes + chunk * 4) = w[0];
          crc[j] = cuda_crc::StreamStep<1>(crc[j], w, tabs);
        }
      }
      if (active && lir == 0) {
        *reinterpret_cast<uint16_t*>(scales_out + 2 * urow) = static_cast<uint16_t>(s.bits);
      }
      // The scales of a step are contiguous, 2 bytes a row (zero for rows before a).
      if (rpi >= 2) {
        const uint32_t partner = __shfl_down_sync(kFullMask, s.bits, lpr);
        const uint32_t w[1] = {s.bits | (partner << 16)};
        scale_crc = cuda_crc::StreamStep<1>(scale_crc, w, smem + kScaleOffset);
      } else if (lane == 0) {
        scale_crc = cuda_crc::Feed2(
            scale_crc, s.bits, reinterpret_cast<const uint32_t(*)[256]>(smem + kStaticTOffset));
      }
    }
  }

  // The copies issued past the last step (zero fills) must land before the next range reuses
  // the slots.
  CpAsyncWaitAll();

  // Move each lane's streams to the range's end, combine, and move the range to the section end.
  uint32_t val = 0;
#pragma unroll
  for (int j = 0; j < kCpl; ++j) {
    val ^= cuda_crc::MulMod(
        smem[kCorrOffset + (kKind * cuda_crc::kMaxChunksPerLane + j) * 32 + lane], crc[j]);
  }
  val = WarpXor(val);
  uint32_t scales_raw = 0;
  if constexpr (kKind != 0) {
    scales_raw = rpi >= 2 ? WarpXor(cuda_crc::MulMod(smem[kScaleCorrOffset + lane], scale_crc))
                          : __shfl_sync(kFullMask, scale_crc, 0);
  }
  const uint64_t after_rows = layer.crc_offset - (part.rows[kKind] + b * row_bytes);
  const uint64_t after_scales = layer.crc_offset - (part.scales[kKind] + 2 * b);
  const uint32_t mine = lane == 0 ? val : scales_raw;
  const uint64_t after = lane == 0 ? after_rows : after_scales;
  const uint32_t contribution =
      cuda_crc::ShiftBytes(mine, after, &call.static_tables->digits[0][0]);
  if (lane == 0 || (kKind != 0 && lane == 1)) atomicXor(call.crc + seg.slot, contribution);
}

template <bool kBf16, int kCpl>
__global__ void __launch_bounds__(kPackThreads, 2) PackKernel(const DevCall call) {
  extern __shared__ __align__(16) uint32_t smem[];
  const auto* dim = reinterpret_cast<const uint32_t*>(call.dim_tables);
  const auto* stat = &call.static_tables->t[0][0];
  for (uint32_t i = threadIdx.x; i < kStaticTOffset; i += blockDim.x) smem[i] = dim[i];
  for (uint32_t i = threadIdx.x; i < 1024; i += blockDim.x) smem[kStaticTOffset + i] = stat[i];
  __syncthreads();
  const RowGeometry g = cuda_crc::GeometryFor(call.head_dim);
  const uint32_t lane = threadIdx.x & 31;
  uint32_t* stage = smem + kPackSmemWords + (threadIdx.x >> 5) * kStageWordsPerWarp;
  const uint64_t warps = (uint64_t{gridDim.x} * blockDim.x) >> 5;
  for (uint64_t r = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; r < call.num_ranges;
       r += warps) {
    const DevSegment seg = call.segments[FindByFirst(call.segments, call.num_segments, r)];
    const uint64_t a = (r - seg.first_range) * call.range_rows;
    const uint64_t b = min(a + call.range_rows, seg.rows);
    switch (seg.kind) {
      case 0:
        PackRange<kBf16, kCpl, 0>(call, seg, a, b, smem, stage, g, lane);
        break;
      case 1:
        PackRange<kBf16, kCpl, 1>(call, seg, a, b, smem, stage, g, lane);
        break;
      default:
        PackRange<kBf16, kCpl, 2>(call, seg, a, b, smem, stage, g, lane);
        break;
    }
  }
}

// One block per slot: zero the padding, add the kcn arrays' CRC, write the trailer.
__global__ void PackFinalizeKernel(const DevCall call) {
  const uint32_t slot = blockIdx.x;
  const DevLayer& layer = call.layers[slot];
  uint8_t* out = call.payload;
  const uint64_t hd = uint64_t{call.heads} * call.head_dim;
  const auto* t = reinterpret_cast<const uint32_t(*)[256]>(&call.static_tables->t[0][0]);

  // Padding: the gap after each array of both parts (each shorter than 16 bytes).
  for (uint32_t p = 0; p < 2; ++p) {
    const DevPart& part = layer.part[p];
    const uint64_t ends[5] = {part.rows[0] + 2 * uint64_t{layer.counts[0]} * hd,
                              part.rows[1] + uint64_t{layer.counts[1]} * hd,
                              part.scales[1] + 2 * uint64_t{layer.counts[1]} * call.heads,
                              part.rows[2] + uint64_t{layer.counts[2]} * hd / 2,
                              part.scales[2] + 2 * uint64_t{layer.counts[2]} * call.heads};
    const uint64_t starts[5] = {part.rows[1], part.scales[1], part.rows[2], part.scales[2],
                                part.end};
    for (uint32_t i = threadIdx.x; i < 5 * 16; i += blockDim.x) {
      const uint64_t at = ends[i / 16] + (i % 16);
      if (at < starts[i / 16]) out[at] = 0;
    }
  }

  uint32_t acc = 0;
  if (call.kcn) {
    const uint64_t begin = layer.key_offsets, end = layer.part[0].rows[0];
    for (uint64_t p = threadIdx.x; p < (end - begin) / 16; p += blockDim.x) {
      const uint4 v = *reinterpret_cast<const uint4*>(out + begin + 16 * p);
      uint32_t r = cuda_crc::Feed4(0, v.x, t);
      r = cuda_crc::Feed4(r, v.y, t);
      r = cuda_crc::Feed4(r, v.z, t);
      r = cuda_crc::Feed4(r, v.w, t);
      acc ^= cuda_crc::ShiftBytes(r, layer.crc_offset - (begin + 16 * p + 16),
                                  &call.static_tables->digits[0][0]);
    }
  }
  acc = WarpXor(acc);
  __shared__ uint32_t partial[32];
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t crc = call.crc[slot] ^ layer.zero_crc;
    for (uint32_t w = 0; w < (blockDim.x + 31) / 32; ++w) crc ^= partial[w];
    uint8_t* trailer = out + layer.crc_offset;
    for (int i = 0; i < 4; ++i) trailer[i] = static_cast<uint8_t>(crc >> (8 * i));
    for (int i = 4; i < 16; ++i) trailer[i] = 0;
  }
}

template <bool kBf16>
cudaError_t LaunchPackT(const DevCall& call, int grid_blocks, cudaStream_t stream) {
  const cuda_crc::RowGeometry g = cuda_crc::GeometryFor(call.head_dim);
  const size_t smem = (kPackSmemWords + kPackStageWords) * 4;
  auto launch = [&](auto kernel) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
    kernel<<<grid_blocks, kPackThreads, smem, stream>>>(call);
    return cudaGetLastError();
  };
  switch (g.chunks_per_lane) {
    case 1:
      return launch(PackKernel<kBf16, 1>);
    case 2:
      return launch(PackKernel<kBf16, 2>);
    default:
      return launch(PackKernel<kBf16, 4>);
  }
}

template <bool kBf16>
cudaError_t LaunchKcnMinMaxT(const DevCall& call, uint32_t* lo, uint32_t* hi, uint64_t items,
                             cudaStream_t stream) {
  const cuda_crc::RowGeometry g = cuda_crc::GeometryFor(call.head_dim);
  const uint64_t blocks64 = (items * 32 + kPackThreads - 1) / kPackThreads;
  const int blocks = static_cast<int>(min(blocks64, uint64_t{65535}));
  switch (g.chunks_per_lane) {
    case 1:
      KcnMinMaxKernel<kBf16, 1><<<blocks, kPackThreads, 0, stream>>>(call, lo, hi, items);
      break;
    case 2:
      KcnMinMaxKernel<kBf16, 2><<<blocks, kPackThreads, 0, stream>>>(call, lo, hi, items);
      break;
    default:
      KcnMinMaxKernel<kBf16, 4><<<blocks, kPackThreads, 0, stream>>>(call, lo, hi, items);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

uint64_t KcnItemsFor(uint64_t int4_tokens, uint32_t heads) {
  return (int4_tokens + kKcnTokensPerItem - 1) / kKcnTokensPerItem * heads;
}

cudaError_t LaunchKcnMinMax(const DevCall& call, uint32_t* lo, uint32_t* hi, uint64_t items,
                            cudaStream_t stream) {
  if (items == 0) return cudaSuccess;
  return call.bf16 ? LaunchKcnMinMaxT<true>(call, lo, hi, items, stream)
                   : LaunchKcnMinMaxT<false>(call, lo, hi, items, stream);
}

cudaError_t LaunchKcnFactors(const DevCall& call, const uint32_t* lo, const uint32_t* hi,
                             float* offset, float* inv_factor, cudaStream_t stream) {
  const uint64_t n = uint64_t{call.num_slots} * call.heads * call.head_dim;
  const int threads = 256;
  const int blocks = static_cast<int>((n + threads - 1) / threads);
  if (call.bf16) {
    KcnFactorsKernel<true><<<blocks, threads, 0, stream>>>(call, lo, hi, offset, inv_factor);
  } else {
    KcnFactorsKernel<false><<<blocks, threads, 0, stream>>>(call, lo, hi, offset, inv_factor);
  }
  return cudaGetLastError();
}

cudaError_t LaunchPack(const DevCall& call, int grid_blocks, cudaStream_t stream) {
  if (call.num_ranges == 0) return cudaSuccess;
  return call.bf16 ? LaunchPackT<true>(call, grid_blocks, stream)
                   : LaunchPackT<false>(call, grid_blocks, stream);
}

cudaError_t LaunchPackFinalize(const DevCall& call, cudaStream_t stream) {
  PackFinalizeKernel<<<call.num_slots, 128, 0, stream>>>(call);
  return cudaGetLastError();
}

int PackBlocksPerSm() {
  int blocks = 0;
  if (cudaFuncSetAttribute(PackKernel<false, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>((kPackSmemWords + kPackStageWords) * 4)) !=
      cudaSuccess) {
    return 1;
  }
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, PackKernel<false, 4>, kPackThreads,
                                                    (kPackSmemWords + kPackStageWords) * 4) !=
      cudaSuccess) {
    return 1;
  }
  return blocks > 0 ? blocks : 1;
}

}  // namespace spectrumkv::cuda_kernels
