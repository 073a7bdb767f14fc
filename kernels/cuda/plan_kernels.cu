// Device planning: ranking, tier assignment, token lists and packed tier maps (kernel_params.h).
//
// Why a full stable radix sort rather than a threshold select: a tier map has up to four rank
// boundaries per map and, with per-layer budgets, a different set per layer, all over the same
// ranking; one sort serves every map, and CUB's onesweep sort of 32-bit keys with 32-bit values
// runs at tens of microseconds for 32K tokens, below the launch cost of the rest of the pack.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "kernels/cuda/kernel_params.h"
#include "kernels/cuda/rank_key.h"

namespace spectrumkv::cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr uint32_t kPerThread = 8;
constexpr uint32_t kChunk = kThreads * kPerThread;  // tokens per list block
constexpr uint64_t kAlign = 256;

uint64_t AlignUp(uint64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

__global__ void KeysKernel(const float* __restrict__ scores, uint32_t sinks, uint32_t count,
                           uint32_t* __restrict__ keys, uint32_t* __restrict__ values) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    keys[i] = RankKey(scores[sinks + i]);
    values[i] = sinks + i;
  }
}

__global__ void AssignKernel(const uint32_t* __restrict__ order, uint32_t tokens, uint32_t sinks,
                             uint32_t maps, const DevRankSegment* __restrict__ segments,
                             uint8_t* __restrict__ tiers) {
  for (uint32_t r = blockIdx.x * blockDim.x + threadIdx.x; r < tokens;
       r += gridDim.x * blockDim.x) {
    const uint32_t token = r < sinks ? r : order[r - sinks];
    for (uint32_t m = 0; m < maps; ++m) {
      const DevRankSegment* seg = segments + uint64_t{m} * kDevRankSegments;
      uint32_t tier = 3;
#pragma unroll
      for (int i = kDevRankSegments - 1; i >= 0; --i) {
        if (r < seg[i].end_rank) tier = seg[i].tier;
      }
      tiers[uint64_t{m} * tokens + token] = static_cast<uint8_t>(tier);
    }
  }
}

// Three 21-bit counters (FP16, INT8, INT4) in one word; a chunk holds at most 2048 tokens.
__device__ __forceinline__ uint64_t CountOf(uint32_t tier) {
  return tier < 3 ? uint64_t{1} << (21 * tier) : 0;
}
__device__ __forceinline__ uint32_t Field(uint64_t v, int k) {
  return static_cast<uint32_t>((v >> (21 * k)) & ((1u << 21) - 1));
}

__device__ __forceinline__ uint64_t ThreadCounts(const uint8_t* map, uint32_t tokens,
                                                 uint32_t first) {
  uint64_t c = 0;
#pragma unroll
  for (uint32_t i = 0; i < kPerThread; ++i) {
    if (first + i < tokens) c += CountOf(map[first + i]);
  }
  return c;
}

// grid (chunks, maps): per chunk counts of each listed tier.
__global__ void __launch_bounds__(kThreads)
    ChunkCountKernel(const uint8_t* __restrict__ tiers, uint32_t tokens,
                     uint64_t* __restrict__ counts) {
  using Reduce = cub::BlockReduce<uint64_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const uint8_t* map = tiers + uint64_t{blockIdx.y} * tokens;
  const uint32_t first = blockIdx.x * kChunk + threadIdx.x * kPerThread;
  const uint64_t total = Reduce(temp).Sum(ThreadCounts(map, tokens, first));
  if (threadIdx.x == 0) counts[uint64_t{blockIdx.y} * gridDim.x + blockIdx.x] = total;
}

// One thread per (map, tier): exclusive prefix over the map's chunks.
__global__ void ChunkScanKernel(const uint64_t* __restrict__ counts, uint32_t chunks, uint32_t maps,
                                uint32_t* __restrict__ base) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= maps * 3) return;
  const uint32_t m = i / 3, k = i % 3;
  uint32_t sum = 0;
  for (uint32_t c = 0; c < chunks; ++c) {
    base[(uint64_t{m} * chunks + c) * 3 + k] = sum;
    sum += Field(counts[uint64_t{m} * chunks + c], k);
  }
}

__global__ void __launch_bounds__(kThreads)
    ListsKernel(const uint8_t* __restrict__ tiers, uint32_t tokens, const uint32_t* chunk_base,
                const uint64_t* __restrict__ list_base, uint32_t* __restrict__ lists) {
  using Scan = cub::BlockScan<uint64_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const uint32_t m = blockIdx.y;
  const uint8_t* map = tiers + uint64_t{m} * tokens;
  const uint32_t first = blockIdx.x * kChunk + threadIdx.x * kPerThread;
  uint64_t before = 0;
  Scan(temp).ExclusiveSum(ThreadCounts(map, tokens, first), before);
  const uint32_t* cb = chunk_base + (uint64_t{m} * gridDim.x + blockIdx.x) * 3;
  uint64_t at[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) at[k] = list_base[3 * m + k] + cb[k] + Field(before, k);
#pragma unroll
  for (uint32_t i = 0; i < kPerThread; ++i) {
    const uint32_t t = first + i;
    if (t >= tokens) break;
    const uint32_t tier = map[t];
    if (tier < 3) lists[at[tier]++] = t;
  }
}

__global__ void PackMapsKernel(const uint8_t* __restrict__ tiers, uint32_t tokens, uint32_t maps,
                               uint64_t map_bytes, uint8_t* __restrict__ packed) {
  const uint64_t total = uint64_t{maps} * map_bytes;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const uint64_t m = i / map_bytes, j = i % map_bytes;
    const uint8_t* map = tiers + m * tokens;
    uint32_t b = 0;
#pragma unroll
    for (uint32_t q = 0; q < 4; ++q) {
      const uint64_t t = 4 * j + q;
      if (t < tokens) b |= (map[t] & 3u) << (2 * q);
    }
    packed[i] = static_cast<uint8_t>(b);
  }
}

__global__ void PoolDecayKernel(const float* __restrict__ in, float* __restrict__ out,
                                uint32_t tokens, uint32_t half, const float* __restrict__ decay) {
  for (uint32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < tokens;
       j += gridDim.x * blockDim.x) {
    const uint32_t lo = j >= half ? j - half : 0;
    const uint32_t hi = min(tokens - 1, j + half);
    float m = in[lo];
    for (uint32_t k = lo + 1; k <= hi; ++k) {
      const float x = in[k];
      m = (m < x) ? x : m;  // std::max(m, x)
    }
    out[j] = decay != nullptr ? __fmul_rn(m, decay[j]) : m;
  }
}

__global__ void StoreCrcKernel(const uint32_t* crc, uint32_t zero_crc, uint8_t* dst) {
  const uint32_t v = *crc ^ zero_crc;
  for (int i = 0; i < 4; ++i) dst[i] = static_cast<uint8_t>(v >> (8 * i));
}

int Blocks(uint64_t items) {
  const uint64_t b = (items + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

struct ScratchLayout {
  uint64_t keys_in = 0, keys_out = 0, values_in = 0, values_out = 0;
  uint64_t chunk_counts = 0, chunk_base = 0, sort_temp = 0;
  size_t sort_temp_bytes = 0;
  uint64_t total = 0;
};

ScratchLayout LayoutFor(uint32_t tokens, uint32_t maps) {
  ScratchLayout s;
  const uint64_t words = 4 * uint64_t{tokens};
  const uint64_t chunks = (uint64_t{tokens} + kChunk - 1) / kChunk;
  s.keys_in = 0;
  s.keys_out = AlignUp(s.keys_in + words);
  s.values_in = AlignUp(s.keys_out + words);
  s.values_out = AlignUp(s.values_in + words);
  s.chunk_counts = AlignUp(s.values_out + words);
  s.chunk_base = AlignUp(s.chunk_counts + 8 * chunks * maps);
  s.sort_temp = AlignUp(s.chunk_base + 12 * chunks * maps);
  // A size query only: CUB reads no pointer when temp storage is null.
  cub::DeviceRadixSort::SortPairs(nullptr, s.sort_temp_bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr),
                                  static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<int>(tokens));
  s.total = AlignUp(s.sort_temp + s.sort_temp_bytes);
  return s;
}

}  // namespace

uint64_t PlanScratchBytes(uint32_t tokens, uint32_t maps) { return LayoutFor(tokens, maps).total; }

cudaError_t LaunchPlan(const DevPlanArgs& a, void* scratch, cudaStream_t stream) {
  if (a.tokens == 0 || a.maps == 0) return cudaSuccess;
  const ScratchLayout s = LayoutFor(a.tokens, a.maps);
  auto* base = static_cast<uint8_t*>(scratch);
  auto* keys_in = reinterpret_cast<uint32_t*>(base + s.keys_in);
  auto* keys_out = reinterpret_cast<uint32_t*>(base + s.keys_out);
  auto* values_in = reinterpret_cast<uint32_t*>(base + s.values_in);
  auto* values_out = reinterpret_cast<uint32_t*>(base + s.values_out);
  const uint32_t count = a.tokens - a.sinks;
  if (count > 0) {
    KeysKernel<<<Blocks(count), kThreads, 0, stream>>>(a.scores, a.sinks, count, keys_in,
                                                       values_in);
    size_t temp_bytes = s.sort_temp_bytes;
    cudaError_t e = cub::DeviceRadixSort::SortPairs(base + s.sort_temp, temp_bytes, keys_in,
                                                    keys_out, values_in, values_out,
                                                    static_cast<int>(count), 0, 32, stream);
    if (e != cudaSuccess) return e;
  }
  AssignKernel<<<Blocks(a.tokens), kThreads, 0, stream>>>(values_out, a.tokens, a.sinks, a.maps,
                                                          a.segments, a.tiers);
  if (a.lists != nullptr) {
    const uint32_t chunks = (a.tokens + kChunk - 1) / kChunk;
    auto* counts = reinterpret_cast<uint64_t*>(base + s.chunk_counts);
    auto* chunk_base = reinterpret_cast<uint32_t*>(base + s.chunk_base);
    const dim3 grid(chunks, a.maps);
    ChunkCountKernel<<<grid, kThreads, 0, stream>>>(a.tiers, a.tokens, counts);
    ChunkScanKernel<<<(a.maps * 3 + 127) / 128, 128, 0, stream>>>(counts, chunks, a.maps,
                                                                  chunk_base);
    ListsKernel<<<grid, kThreads, 0, stream>>>(a.tiers, a.tokens, chunk_base, a.list_base, a.lists);
  }
  if (a.packed != nullptr) {
    PackMapsKernel<<<Blocks(uint64_t{a.maps} * a.map_bytes), kThreads, 0, stream>>>(
        a.tiers, a.tokens, a.maps, a.map_bytes, a.packed);
  }
  return cudaGetLastError();
}

cudaError_t LaunchPoolAndDecay(const float* in, float* out, uint32_t tokens, uint32_t pool_kernel,
                               const float* decay, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  PoolDecayKernel<<<Blocks(tokens), kThreads, 0, stream>>>(in, out, tokens, pool_kernel / 2, decay);
  return cudaGetLastError();
}

cudaError_t LaunchStoreCrc(const uint32_t* crc, uint32_t zero_crc, uint8_t* dst,
                           cudaStream_t stream) {
  StoreCrcKernel<<<1, 1, 0, stream>>>(crc, zero_crc, dst);
  return cudaGetLastError();
}

}  // namespace spectrumkv::cuda_kernels
