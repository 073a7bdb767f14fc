// Unpack-side kernels: CRC32C of payload byte ranges (the verifier), the per-layer check, and the
// fused dequantize-scatter into the destination paged layout.
#include "kernels/cuda/crc_tables.h"
#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/row_cursor.cuh"

namespace spectrumkv::cuda_kernels {
namespace {

using cuda_crc::RowGeometry;

constexpr int kThreads = 256;

// Each warp checksums one chunk of kVerifyChunkBytes of a range: 32 lanes x 16 bytes per step,
// four steps loaded before they are folded. Byte tables in shared memory: their bank conflicts
// make this kernel bound by shared-memory lookups (per-lane nibble tables, conflict-free but
// twice the lookups, measured slower on H200).
__global__ void __launch_bounds__(kThreads)
    CrcRangesKernel(const uint8_t* payload, const DevCrcRange* ranges, uint32_t num_ranges,
                    uint64_t num_items, uint32_t* crc, const cuda_crc::StaticTables* tables) {
  __shared__ uint32_t tabs[16 * 256];
  for (uint32_t i = threadIdx.x; i < 16 * 256; i += blockDim.x)
    tabs[i] = (&tables->verify[0][0])[i];
  __syncthreads();
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t warps = (uint64_t{gridDim.x} * blockDim.x) >> 5;
  const uint32_t corr = tables->verify_corr[lane];
  for (uint64_t item = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; item < num_items;
       item += warps) {
    const DevCrcRange range = ranges[FindByFirst(ranges, num_ranges, item)];
    const uint64_t c0 = (item - range.first_range) * kVerifyChunkBytes;
    const uint64_t c1 = min(c0 + kVerifyChunkBytes, range.bytes);
    const uint64_t steps = (c1 - c0 + cuda_crc::kVerifyStepBytes - 1) / cuda_crc::kVerifyStepBytes;
    const uint64_t steps4 = (steps + 3) / 4 * 4;  // leading zero steps keep the end aligned
    const int64_t start = static_cast<int64_t>(c1) -
                          static_cast<int64_t>(steps4 * cuda_crc::kVerifyStepBytes) + lane * 16;
    const uint8_t* base = payload + range.begin;
    uint32_t c = 0;
    for (uint64_t s = 0; s < steps4; s += 4) {
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t off = start + static_cast<int64_t>((s + u) * cuda_crc::kVerifyStepBytes);
        v[u] = off >= static_cast<int64_t>(c0) ? *reinterpret_cast<const uint4*>(base + off)
                                               : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
        c = cuda_crc::StreamStep<4>(c, w, tabs);
      }
    }
    uint32_t val = WarpXor(cuda_crc::MulMod(corr, c));
    if (lane == 0) {
      atomicXor(crc + range.slot,
                cuda_crc::ShiftBytes(val, range.after + (range.bytes - c1), &tables->digits[0][0]));
    }
  }
}

// One thread per slot compares; thread 0 then builds the in-order prefix of good layers.
__global__ void VerifyCheckKernel(const DevCall call, const uint32_t* crc, uint32_t* status,
                                  uint32_t* write_ok) {
  for (uint32_t slot = threadIdx.x; slot < call.num_slots; slot += blockDim.x) {
    const DevLayer& layer = call.layers[slot];
    const uint8_t* trailer = call.payload + layer.crc_offset;
    const uint32_t stored = uint32_t{trailer[0]} | (uint32_t{trailer[1]} << 8) |
                            (uint32_t{trailer[2]} << 16) | (uint32_t{trailer[3]} << 24);
    bool padding_ok = true;
    for (int i = 4; i < 16; ++i) padding_ok = padding_ok && trailer[i] == 0;
    // 1: verified; 2: checksum mismatch; 3: non-zero trailer padding.
    status[slot] = stored != (crc[slot] ^ layer.zero_crc) ? 2u : (padding_ok ? 1u : 3u);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t good = 1;
    for (uint32_t slot = 0; slot < call.num_slots; ++slot) {
      good = good & (status[slot] == 1u ? 1u : 0u);
      write_ok[slot] = good;
    }
  }
}

template <bool kBf16, int kCpl, int kKind>
__device__ void UnpackRange(const DevCall& call, const DevSegment& seg, uint64_t a, uint64_t b,
                            const RowGeometry& g, uint32_t lane) {
  constexpr uint32_t kCBytes = kKind == 0 ? 16 : (kKind == 1 ? 8 : 4);
  const DevLayer& layer = call.layers[seg.slot];
  const DevPart& part = layer.part[seg.part];
  const uint8_t* rows_in = call.payload + part.rows[kKind];
  const uint8_t* scales_in = call.payload + part.scales[kKind];
  const uint64_t row_bytes = uint64_t{g.chunks} * kCBytes;
  const uint32_t rpi = g.rows_per_step, lpr = g.lanes_per_row;
  const uint32_t sub = lane / lpr, lir = lane % lpr;
  const bool kcn = kKind == 2 && seg.part == 0 && call.kcn;
  const auto* kcn_m = reinterpret_cast<const uint16_t*>(call.payload + layer.key_offsets);
  const auto* kcn_f = reinterpret_cast<const uint16_t*>(call.payload + layer.key_factors);
  const bool aligned = call.kv_aligned;
  RowCursor cursor(layer.kv[seg.part], call.lists + layer.list_offset[kKind], call.block_table,
                   call.block_size, call.heads);

  // Loads the codes (or FP16 chunks) and the scale of one row; the next row's are loaded before
  // the current one is dequantized and stored.
  auto load = [&](uint64_t r, uint4(&in)[kCpl], float& s) {
#pragma unroll
    for (int j = 0; j < kCpl; ++j) {
      const uint32_t chunk = lir + j * lpr;
      in[j] = make_uint4(0, 0, 0, 0);
      if (chunk >= g.chunks) continue;
      const uint8_t* p = rows_in + r * row_bytes + chunk * kCBytes;
      if constexpr (kKind == 0) {
        in[j] = *reinterpret_cast<const uint4*>(p);
      } else if constexpr (kKind == 1) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        in[j].x = w.x;
        in[j].y = w.y;
      } else {
        in[j].x = *reinterpret_cast<const uint32_t*>(p);
      }
    }
    s = 0.0f;
    if constexpr (kKind != 0) {
      s = ToF<kBf16>(*reinterpret_cast<const uint16_t*>(scales_in + 2 * r));
    }
  };
  uint64_t row = a + sub;
  if (row >= b) return;
  uint4 in[kCpl];
  float s;
  uint8_t* dst = cursor.Seek(row, rpi);
  uint32_t head = cursor.head();
  load(row, in, s);
  for (; row < b; row += rpi) {
    const uint64_t next = row + rpi;
    uint4 in_next[kCpl];
    float s_next = 0.0f;
    uint8_t* dst_next = dst;
    uint32_t head_next = head;
    if (next < b) {
      dst_next = cursor.Seek(next, rpi);
      head_next = cursor.head();
      load(next, in_next, s_next);
    }
#pragma unroll
    for (int j = 0; j < kCpl; ++j) {
      const uint32_t chunk = lir + j * lpr;
      if (chunk >= g.chunks) continue;
      uint4 out;
      if constexpr (kKind == 0) {
        out = in[j];
      } else {
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          int code;
          if constexpr (kKind == 1) {
            code = static_cast<int>(Word(in[j], e / 4) << (24 - 8 * (e % 4))) >> 24;
          } else {
            code = static_cast<int>(in[j].x << (28 - 4 * e)) >> 28;
          }
          y[e] = __fmul_rn(CodeToF(code), s);
        }
        if (kcn) {
          const uint64_t at = uint64_t{head} * call.head_dim + chunk * 8;
          const uint4 mv = *reinterpret_cast<const uint4*>(kcn_m + at);
          const uint4 fv = *reinterpret_cast<const uint4*>(kcn_f + at);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float m = ToF<kBf16>((Word(mv, e / 2) >> (16 * (e % 2))) & 0xFFFFu);
            const float f = ToF<kBf16>((Word(fv, e / 2) >> (16 * (e % 2))) & 0xFFFFu);
            y[e] = __fadd_rn(__fmul_rn(y[e], f), m);
          }
        }
        out.x = PackRne2<kBf16>(y[0], y[1]);
        out.y = PackRne2<kBf16>(y[2], y[3]);
        out.z = PackRne2<kBf16>(y[4], y[5]);
        out.w = PackRne2<kBf16>(y[6], y[7]);
      }
      StoreChunk(dst + chunk * 16, out, aligned);
    }
    if (next < b) {
#pragma unroll
      for (int j = 0; j < kCpl; ++j) in[j] = in_next[j];
      s = s_next;
      dst = dst_next;
      head = head_next;
    }
  }
}

template <bool kBf16, int kCpl>
__global__ void __launch_bounds__(kThreads, 3) UnpackKernel(const DevCall call) {
  const RowGeometry g = cuda_crc::GeometryFor(call.head_dim);
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t warps = (uint64_t{gridDim.x} * blockDim.x) >> 5;
  for (uint64_t r = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; r < call.num_ranges;
       r += warps) {
    const DevSegment seg = call.segments[FindByFirst(call.segments, call.num_segments, r)];
    if (call.write_ok != nullptr && call.write_ok[seg.slot] == 0) continue;
    const uint64_t a = (r - seg.first_range) * call.range_rows;
    const uint64_t b = min(a + call.range_rows, seg.rows);
    switch (seg.kind) {
      case 0:
        UnpackRange<kBf16, kCpl, 0>(call, seg, a, b, g, lane);
        break;
      case 1:
        UnpackRange<kBf16, kCpl, 1>(call, seg, a, b, g, lane);
        break;
      default:
        UnpackRange<kBf16, kCpl, 2>(call, seg, a, b, g, lane);
        break;
    }
  }
}

template <bool kBf16>
cudaError_t LaunchUnpackT(const DevCall& call, int grid_blocks, cudaStream_t stream) {
  switch (cuda_crc::GeometryFor(call.head_dim).chunks_per_lane) {
    case 1:
      UnpackKernel<kBf16, 1><<<grid_blocks, kThreads, 0, stream>>>(call);
      break;
    case 2:
      UnpackKernel<kBf16, 2><<<grid_blocks, kThreads, 0, stream>>>(call);
      break;
    default:
      UnpackKernel<kBf16, 4><<<grid_blocks, kThreads, 0, stream>>>(call);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchCrcRanges(const DevCall& call, const DevCrcRange* ranges, uint32_t num_ranges,
                            uint64_t num_items, uint32_t* crc, int grid_blocks,
                            cudaStream_t stream) {
  if (num_items == 0) return cudaSuccess;
  CrcRangesKernel<<<grid_blocks, kThreads, 0, stream>>>(call.payload, ranges, num_ranges, num_items,
                                                        crc, call.static_tables);
  return cudaGetLastError();
}

cudaError_t LaunchVerifyCheck(const DevCall& call, const uint32_t* crc, uint32_t* status,
                              uint32_t* write_ok, cudaStream_t stream) {
  VerifyCheckKernel<<<1, 256, 0, stream>>>(call, crc, status, write_ok);
  return cudaGetLastError();
}

cudaError_t LaunchUnpack(const DevCall& call, int grid_blocks, cudaStream_t stream) {
  if (call.num_ranges == 0) return cudaSuccess;
  return call.bf16 ? LaunchUnpackT<true>(call, grid_blocks, stream)
                   : LaunchUnpackT<false>(call, grid_blocks, stream);
}

int UnpackBlocksPerSm() {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, UnpackKernel<false, 1>, kThreads, 0) !=
      cudaSuccess) {
    return 1;
  }
  return blocks > 0 ? blocks : 1;
}

}  // namespace spectrumkv::cuda_kernels
