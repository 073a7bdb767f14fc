// Scoring kernels: key_norm, and SnapKV attention mass on tensor cores (with a CUDA-core path for
// the shapes the tensor-core path does not cover).
//
// Attention needs every query's softmax normaliser before any token's weight is known, so it
// reads the keys twice: pass 1 computes per-query (max, sum of exp) over the keys, pass 2 the
// per-token weights. Logits must keep float accuracy (scores agree with the reference to 1e-4):
// the keys are exact in the 16-bit operand type, and each float query is split into 16-bit parts
// (fp16: two, bf16: three) whose products are summed in float by the tensor cores.
#include <cfloat>

#include "kernels/cuda/device_common.cuh"

namespace spectrumkv::cuda_kernels {
namespace {

using cuda_crc::RowGeometry;

constexpr int kScoreThreads = 256;

// ---------------------------------------------------------------------------------------------
// key_norm: one warp per token.

template <bool kBf16, int kCpl>
__global__ void __launch_bounds__(kScoreThreads)
    KeyNormKernel(const DevScoreCall* __restrict__ call, float* __restrict__ scores) {
  const uint32_t layers = call->layers, heads = call->heads, tokens = call->tokens;
  const RowGeometry g = cuda_crc::GeometryFor(call->head_dim);
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t lpr = g.lanes_per_row, rpi = g.rows_per_step;
  const uint32_t sub = lane / lpr, lir = lane % lpr;
  const uint32_t head_steps = (heads + rpi - 1) / rpi;
  const uint32_t iterations = layers * 2 * head_steps;
  const bool aligned = call->kv_aligned;
  const uint64_t warps = (uint64_t{gridDim.x} * blockDim.x) >> 5;
  for (uint64_t t = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5; t < tokens;
       t += warps) {
    // The token's block and slot are the same for every layer (one block table per request).
    const uint64_t block = call->block_table[t / call->block_size];
    const uint64_t slot = t % call->block_size;
    float acc = 0.0f;
#pragma unroll 2
    for (uint32_t i = 0; i < iterations; ++i) {
      const uint32_t lp = i / head_steps;  // layer * 2 + part
      const uint32_t head = (i % head_steps) * rpi + sub;
      const DevPlacement& p = call->kv[lp];
      const uint8_t* row =
          p.base + block * p.block_stride + slot * p.token_stride + uint64_t{head} * p.head_stride;
      uint4 v[kCpl];
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
        const uint32_t chunk = lir + j * lpr;
        v[j] = (head < heads && chunk < g.chunks) ? LoadChunk(row + chunk * 16, aligned)
                                                  : make_uint4(0, 0, 0, 0);
      }
      float ss = 0.0f;
#pragma unroll
      for (int j = 0; j < kCpl; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float x = ToF<kBf16>((Word(v[j], e / 2) >> (16 * (e % 2))) & 0xFFFFu);
          ss = __fadd_rn(ss, __fmul_rn(x, x));
        }
      }
      for (uint32_t o = lpr / 2; o > 0; o /= 2) ss += __shfl_xor_sync(kFullMask, ss, o);
      if (head < heads && lir == 0) acc += sqrtf(ss);
    }
    for (uint32_t o = lpr; o < 32; o *= 2) acc += __shfl_xor_sync(kFullMask, acc, o);
    if (lane == 0) scores[t] = acc * (1.0f / static_cast<float>(layers * heads));
  }
}

template <bool kBf16>
cudaError_t LaunchKeyNormT(const DevScoreCall* call, const DevScoreCall& host, float* scores,
                           cudaStream_t stream) {
  const uint64_t blocks64 = (uint64_t{host.tokens} * 32 + kScoreThreads - 1) / kScoreThreads;
  const int blocks = static_cast<int>(blocks64 < 1u << 20 ? blocks64 : 1u << 20);
  switch (cuda_crc::GeometryFor(host.head_dim).chunks_per_lane) {
    case 1:
      KeyNormKernel<kBf16, 1><<<blocks, kScoreThreads, 0, stream>>>(call, scores);
      break;
    case 2:
      KeyNormKernel<kBf16, 2><<<blocks, kScoreThreads, 0, stream>>>(call, scores);
      break;
    default:
      KeyNormKernel<kBf16, 4><<<blocks, kScoreThreads, 0, stream>>>(call, scores);
      break;
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Attention: shared geometry.

struct AttnGeometry {
  uint32_t lh = 0;      // layers * heads
  uint32_t nq = 0;      // queries per KV head: group * window (query = g * window + i)
  uint32_t nq_pad = 0;  // multiple of 8
  uint32_t dp = 0;      // head_dim rounded up to 32
  uint32_t splits = 0;  // 16-bit parts per query: 2 fp16, 3 bf16
  uint32_t pitch = 0;   // bytes per query row in shared memory (dp * 2 + 16: no bank conflicts)
  uint32_t qchunk = 0;  // queries per block (multiple of 8)
  uint32_t num_qchunks = 0;
  uint32_t token_splits = 0;
  uint64_t tokens_per_split = 0;
  // Scratch offsets (bytes).
  uint64_t off_scaled = 0, off_split = 0, off_stats = 0, off_final = 0, off_partial = 0,
           off_flag = 0, total = 0;
};

constexpr uint64_t kMaxQuerySmem = 96 * 1024;
constexpr uint64_t kMaxPartialBytes = uint64_t{1} << 30;

uint64_t Align256(uint64_t x) { return (x + 255) & ~uint64_t{255}; }

AttnGeometry Geometry(const AttentionArgs& a) {
  AttnGeometry g;
  g.lh = a.layers * a.heads;
  g.nq = a.group * a.window;
  g.nq_pad = (g.nq + 7) / 8 * 8;
  g.dp = (a.head_dim + 31) / 32 * 32;
  g.splits = a.bf16 ? 3 : 2;
  g.pitch = g.dp * 2 + 16;
  uint64_t fit = kMaxQuerySmem / (uint64_t{g.splits} * g.pitch) / 8 * 8;
  if (fit > 256) fit = 256;
  if (fit < 8) fit = 8;
  g.qchunk = static_cast<uint32_t>(fit < g.nq_pad ? fit : g.nq_pad);
  g.num_qchunks = (g.nq_pad + g.qchunk - 1) / g.qchunk;
  // Enough blocks for a few waves, at least 64 tokens each.
  const uint64_t want_blocks = uint64_t{8} * static_cast<uint64_t>(a.num_sms);
  uint64_t splits =
      (want_blocks + uint64_t{g.lh} * g.num_qchunks - 1) / (uint64_t{g.lh} * g.num_qchunks);
  const uint64_t max_splits = (uint64_t{a.tokens} + 63) / 64;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  g.token_splits = static_cast<uint32_t>(splits);
  g.tokens_per_split = (uint64_t{a.tokens} + splits - 1) / splits;

  uint64_t off = 0;
  g.off_scaled = off;
  off = Align256(off + uint64_t{g.lh} * g.nq * a.head_dim * 4);
  g.off_split = off;
  off = Align256(off + uint64_t{g.lh} * g.splits * g.nq_pad * g.dp * 2);
  g.off_stats = off;
  off = Align256(off + uint64_t{g.lh} * g.token_splits * g.nq_pad * 2 * 4);
  g.off_final = off;
  off = Align256(off + uint64_t{g.lh} * g.nq_pad * 2 * 4);
  g.off_partial = off;
  const uint64_t partial = uint64_t{g.lh} * g.num_qchunks * a.tokens * 4;
  if (partial <= kMaxPartialBytes) off = Align256(off + partial);
  g.off_flag = off;
  off = Align256(off + 4);
  g.total = off;
  return g;
}

bool UsePartials(const AttentionArgs& a, const AttnGeometry& g) {
  return uint64_t{g.lh} * g.num_qchunks * a.tokens * 4 <= kMaxPartialBytes;
}

// Position of real channel c in the permuted k order of the tensor-core operands. Within each
// 32-channel block, lane tig of a quad loads channels 8 tig .. 8 tig + 7 of a key row with one
// 16-byte load; the first four feed k-step 2 kb, the last four k-step 2 kb + 1, at fragment
// positions {2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9}. The queries are stored in the same order.
__device__ __forceinline__ uint32_t PermutedChannel(uint32_t c) {
  const uint32_t kb = c / 32, r = c % 32, tig = r / 8, rr = r % 8, s = rr / 4, e = rr % 4;
  const uint32_t kp = e < 2 ? 2 * tig + e : 8 + 2 * tig + (e - 2);
  return 16 * (2 * kb + s) + kp;
}

// One thread per (lh, query, channel): scaled float copy for the CUDA-core path and the 16-bit
// parts for the tensor-core path.
template <bool kBf16>
__global__ void PrepareQueriesKernel(AttentionArgs a, AttnGeometry g, uint8_t* scratch) {
  const uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const uint64_t total = uint64_t{g.lh} * g.nq_pad * g.dp;
  if (i >= total) return;
  const uint32_t c = static_cast<uint32_t>(i % g.dp);
  const uint32_t q = static_cast<uint32_t>((i / g.dp) % g.nq_pad);
  const uint32_t lh = static_cast<uint32_t>(i / (uint64_t{g.dp} * g.nq_pad));
  const uint32_t l = lh / a.heads, h = lh % a.heads;
  float v = 0.0f;
  if (q < g.nq && c < a.head_dim) {
    const uint32_t member = q / a.window, w = q % a.window;
    const uint32_t hq = h * a.group + member;
    const uint32_t q_heads = a.heads * a.group;
    const float raw = a.queries[((uint64_t{l} * a.window + w) * q_heads + hq) * a.head_dim + c];
    v = __fmul_rn(raw, a.inv_sqrt_d);
    auto* scaled = reinterpret_cast<float*>(scratch + g.off_scaled);
    scaled[(uint64_t{lh} * g.nq + q) * a.head_dim + c] = v;
  }
  auto* split = reinterpret_cast<uint16_t*>(scratch + g.off_split);
  const uint32_t pos = PermutedChannel(c);
  float rest = v;
  for (uint32_t s = 0; s < g.splits; ++s) {
    const uint32_t bits = FromFRne<kBf16>(rest);
    split[((uint64_t{lh} * g.splits + s) * g.nq_pad + q) * g.dp + pos] =
        static_cast<uint16_t>(bits);
    const float part = ToF<kBf16>(bits);
    if (!isfinite(part)) *reinterpret_cast<uint32_t*>(scratch + g.off_flag) = 1;
    rest = __fsub_rn(rest, part);
  }
}

// Combines per-split (max, sum) into (max, 1 / sum) per query.
__global__ void CombineStatsKernel(AttnGeometry g, uint8_t* scratch) {
  const uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= uint64_t{g.lh} * g.nq_pad) return;
  const uint32_t lh = static_cast<uint32_t>(i / g.nq_pad), q = static_cast<uint32_t>(i % g.nq_pad);
  const auto* stats = reinterpret_cast<const float*>(scratch + g.off_stats);
  float m = -INFINITY;
  for (uint32_t s = 0; s < g.token_splits; ++s) {
    m = fmaxf(m, stats[((uint64_t{lh} * g.token_splits + s) * g.nq_pad + q) * 2]);
  }
  double sum = 0.0;
  for (uint32_t s = 0; s < g.token_splits; ++s) {
    const float* st = stats + ((uint64_t{lh} * g.token_splits + s) * g.nq_pad + q) * 2;
    if (st[0] != -INFINITY) sum += static_cast<double>(st[1]) * exp(static_cast<double>(st[0] - m));
  }
  auto* final_stats = reinterpret_cast<float*>(scratch + g.off_final);
  final_stats[i * 2] = m;
  final_stats[i * 2 + 1] = sum > 0.0 ? static_cast<float>(1.0 / sum) : 0.0f;
}

// scores[t] = sum over lh and query chunks of the pass-2 partials (fixed order: deterministic).
__global__ void ReducePartialsKernel(AttnGeometry g, uint32_t tokens, const uint8_t* scratch,
                                     float* scores) {
  const uint64_t t = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const auto* partial = reinterpret_cast<const float*>(scratch + g.off_partial);
  float acc = 0.0f;
  for (uint64_t k = 0; k < uint64_t{g.lh} * g.num_qchunks; ++k) acc += partial[k * tokens + t];
  scores[t] = acc;
}

__device__ __forceinline__ void MergeStats(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  const float nm = fmaxf(m, m2);
  s = s * __expf(m - nm) + s2 * __expf(m2 - nm);
  m = nm;
}

__device__ __forceinline__ bool QueryValid(uint32_t q, uint32_t tok, const AttentionArgs& a,
                                           uint32_t nq) {
  return q < nq && tok <= a.tokens - a.window + q % a.window;
}

// ---------------------------------------------------------------------------------------------
// CUDA-core path. Pass 1: one warp per (lh, query). Pass 2: one warp per (lh, token).

__device__ __forceinline__ const uint8_t* KeyRow(const DevScoreCall* call, uint32_t layer,
                                                 uint32_t head, uint32_t token) {
  const DevPlacement& p = call->kv[2 * layer];
  return TokenBase(p, call->block_table, call->block_size, token) + uint64_t{head} * p.head_stride;
}

template <bool kBf16>
__device__ __forceinline__ float KeyElement(const uint8_t* row, uint32_t c) {
  return ToF<kBf16>(*reinterpret_cast<const uint16_t*>(row + 2 * c));
}

template <bool kBf16>
__global__ void __launch_bounds__(kScoreThreads)
    SimpleStatsKernel(AttentionArgs a, AttnGeometry g, uint8_t* scratch) {
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t warp = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5;
  if (warp >= uint64_t{g.lh} * g.nq_pad) return;
  const uint32_t lh = static_cast<uint32_t>(warp / g.nq_pad), q = warp % g.nq_pad;
  auto* final_stats = reinterpret_cast<float*>(scratch + g.off_final);
  if (q >= g.nq) {
    if (lane == 0) {
      final_stats[warp * 2] = 0.0f;
      final_stats[warp * 2 + 1] = 0.0f;
    }
    return;
  }
  const uint32_t l = lh / a.heads, h = lh % a.heads;
  const float* qv = reinterpret_cast<const float*>(scratch + g.off_scaled) +
                    (uint64_t{lh} * g.nq + q) * a.head_dim;
  const uint32_t last = a.tokens - a.window + q % a.window;
  float m = -INFINITY;
  double s = 0.0;
  for (uint32_t t = 0; t <= last; ++t) {
    const uint8_t* row = KeyRow(a.call, l, h, t);
    float dot = 0.0f;
    for (uint32_t c = lane; c < a.head_dim; c += 32) {
      dot = __fadd_rn(dot, __fmul_rn(qv[c], KeyElement<kBf16>(row, c)));
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(kFullMask, dot, o);
    if (dot > m) {
      s = s * exp(static_cast<double>(m) - dot) + 1.0;
      m = dot;
    } else {
      s += exp(static_cast<double>(dot) - m);
    }
  }
  if (lane == 0) {
    final_stats[warp * 2] = m;
    final_stats[warp * 2 + 1] = static_cast<float>(1.0 / s);
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kScoreThreads)
    SimpleWeightsKernel(AttentionArgs a, AttnGeometry g, uint8_t* scratch, float* scores,
                        bool partials) {
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t warp = (uint64_t{blockIdx.x} * blockDim.x + threadIdx.x) >> 5;
  if (warp >= uint64_t{g.lh} * a.tokens) return;
  const uint32_t lh = static_cast<uint32_t>(warp / a.tokens);
  const uint32_t t = static_cast<uint32_t>(warp % a.tokens);
  const uint32_t l = lh / a.heads, h = lh % a.heads;
  const uint8_t* row = KeyRow(a.call, l, h, t);
  const float* final_stats = reinterpret_cast<const float*>(scratch + g.off_final);
  const float* queries =
      reinterpret_cast<const float*>(scratch + g.off_scaled) + uint64_t{lh} * g.nq * a.head_dim;
  float acc = 0.0f;
  for (uint32_t q = 0; q < g.nq; ++q) {
    if (!QueryValid(q, t, a, g.nq)) continue;
    float dot = 0.0f;
    for (uint32_t c = lane; c < a.head_dim; c += 32) {
      dot = __fadd_rn(dot,
                      __fmul_rn(queries[uint64_t{q} * a.head_dim + c], KeyElement<kBf16>(row, c)));
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(kFullMask, dot, o);
    const float* st = final_stats + (uint64_t{lh} * g.nq_pad + q) * 2;
    acc += expf(dot - st[0]) * st[1];
  }
  if (lane == 0) {
    if (partials) {
      // One query chunk in this path's accounting: slot lh * num_qchunks.
      auto* partial = reinterpret_cast<float*>(scratch + g.off_partial);
      partial[uint64_t{lh} * g.num_qchunks * a.tokens + t] = acc;
      for (uint32_t qc = 1; qc < g.num_qchunks; ++qc) {
        partial[(uint64_t{lh} * g.num_qchunks + qc) * a.tokens + t] = 0.0f;
      }
    } else {
      atomicAdd(scores + t, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path. Block: 4 warps, one (lh, query chunk, token split). Each warp takes tiles of
// 16 * kMt tokens; A = keys (tokens x channels, from global memory straight into fragments),
// B = queries (channels x queries, from shared memory with ldmatrix).

constexpr int kAttnWarps = 4;

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                           uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void LdMatrixX2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr));
}

template <bool kBf16>
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <bool kBf16, int kMaxKb, int kMt, int kPass>
__global__ void __launch_bounds__(kAttnWarps * 32)
    TensorAttentionKernel(AttentionArgs a, AttnGeometry g, uint8_t* scratch, float* scores,
                          bool partials) {
  constexpr int kSplits = kBf16 ? 3 : 2;
  extern __shared__ __align__(16) uint8_t smem[];
  const uint32_t split = blockIdx.x, lh = blockIdx.y, qc = blockIdx.z;
  const uint32_t l = lh / a.heads, h = lh % a.heads;
  const uint32_t q_begin = qc * g.qchunk;
  const uint32_t nqc = min(g.qchunk, g.nq_pad - q_begin);
  const uint32_t warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint32_t group_id = lane >> 2, tig = lane & 3;
  const uint32_t nkb = g.dp / 32;

  // Queries of this chunk: [split][query][dp] halves, row pitch g.pitch.
  const auto* split_q = reinterpret_cast<const uint16_t*>(scratch + g.off_split);
  const uint32_t row_chunks = g.dp / 8;
  for (uint32_t i = threadIdx.x; i < kSplits * nqc * row_chunks; i += blockDim.x) {
    const uint32_t s = i / (nqc * row_chunks);
    const uint32_t q = (i / row_chunks) % nqc;
    const uint32_t c8 = i % row_chunks;
    const uint4 v = *reinterpret_cast<const uint4*>(
        split_q + ((uint64_t{lh} * kSplits + s) * g.nq_pad + q_begin + q) * g.dp + c8 * 8);
    *reinterpret_cast<uint4*>(smem + (s * nqc + q) * g.pitch + c8 * 16) = v;
  }
  // Pass 1: per-warp (max, sum) of each query. Pass 2: (max, 1/sum) of each query.
  float* qstats = reinterpret_cast<float*>(smem + kSplits * nqc * g.pitch);
  // The last token each query attends to (causal), -1 for padding queries.
  int* last = reinterpret_cast<int*>(qstats + 2 * kAttnWarps * nqc);
  for (uint32_t i = threadIdx.x; i < nqc; i += blockDim.x) {
    const uint32_t q = q_begin + i;
    last[i] = q < g.nq ? static_cast<int>(a.tokens - a.window + q % a.window) : -1;
  }
  if constexpr (kPass == 1) {
    for (uint32_t i = threadIdx.x; i < kAttnWarps * nqc; i += blockDim.x) {
      qstats[2 * i] = -INFINITY;
      qstats[2 * i + 1] = 0.0f;
    }
  } else {
    const float* final_stats = reinterpret_cast<const float*>(scratch + g.off_final);
    for (uint32_t i = threadIdx.x; i < 2 * nqc; i += blockDim.x) {
      qstats[i] = final_stats[(uint64_t{lh} * g.nq_pad + q_begin) * 2 + i];
    }
  }
  __syncthreads();
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // Tokens at or below this attend to every real query.
  const uint64_t all_queries = a.tokens - a.window;

  const uint64_t t_begin = uint64_t{split} * g.tokens_per_split;
  const uint64_t t_end = min(t_begin + g.tokens_per_split, uint64_t{a.tokens});
  constexpr uint32_t kTile = 16 * kMt;
  const DevPlacement& p = a.call->kv[2 * l];
  const uint32_t* table = a.call->block_table;
  const uint32_t bs = a.call->block_size;
  for (uint64_t t0 = t_begin + uint64_t{warp} * kTile; t0 < t_end; t0 += kAttnWarps * kTile) {
    // Keys: ka[m][kb][r] = channels 32 kb + 8 tig .. + 7 of token t0 + 16 m + group_id + 8 r.
    uint4 ka[kMt][kMaxKb][2];
#pragma unroll
    for (int m = 0; m < kMt; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint64_t tok = t0 + 16 * m + group_id + 8 * r;
        const uint8_t* row = nullptr;
        if (tok < t_end) {
          row = TokenBase(p, table, bs, static_cast<uint32_t>(tok)) + uint64_t{h} * p.head_stride;
        }
#pragma unroll
        for (int kb = 0; kb < kMaxKb; ++kb) {
          const uint32_t c = 32 * kb + 8 * tig;
          ka[m][kb][r] = (row != nullptr && c < a.head_dim)
                             ? *reinterpret_cast<const uint4*>(row + 2 * c)
                             : make_uint4(0, 0, 0, 0);
        }
      }
    }
    const bool full_tile = t0 + kTile <= t_end && t0 + kTile - 1 <= all_queries;
    float tok_acc[kMt][2];
#pragma unroll
    for (int m = 0; m < kMt; ++m) tok_acc[m][0] = tok_acc[m][1] = 0.0f;

    for (uint32_t nt = 0; nt < nqc / 8; ++nt) {
      // One accumulator per query part: independent MMA chains; summed (high part first) after.
      float part_acc[kMt][kSplits][4];
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
#pragma unroll
        for (int sp = 0; sp < kSplits; ++sp) {
          part_acc[m][sp][0] = part_acc[m][sp][1] = part_acc[m][sp][2] = part_acc[m][sp][3] = 0.0f;
        }
      }
#pragma unroll
      for (int kb = 0; kb < kMaxKb; ++kb) {
        if (kb >= static_cast<int>(nkb)) break;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint32_t kpos = 16 * (2 * kb + s);
          uint32_t b[kSplits][2];
          {
            const uint32_t mi = lane >> 3, ri = lane & 7;
            const uint32_t addr =
                smem_base + ((mi >> 1) * nqc + nt * 8 + ri) * g.pitch + (kpos + 8 * (mi & 1)) * 2;
            LdMatrixX4(addr, b[0][0], b[0][1], b[1][0], b[1][1]);
          }
          if constexpr (kSplits == 3) {
            const uint32_t mi = (lane >> 3) & 1, ri = lane & 7;
            const uint32_t addr =
                smem_base + (2 * nqc + nt * 8 + ri) * g.pitch + (kpos + 8 * mi) * 2;
            LdMatrixX2(addr, b[2][0], b[2][1]);
          }
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
            const uint32_t a0 = Word(ka[m][kb][0], 2 * s), a1 = Word(ka[m][kb][1], 2 * s);
            const uint32_t a2 = Word(ka[m][kb][0], 2 * s + 1), a3 = Word(ka[m][kb][1], 2 * s + 1);
#pragma unroll
            for (int sp = 0; sp < kSplits; ++sp) {
              Mma<kBf16>(part_acc[m][sp], a0, a1, a2, a3, b[sp][0], b[sp][1]);
            }
          }
        }
      }
      float acc[kMt][4];
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = part_acc[m][0][e] + part_acc[m][1][e];
          if constexpr (kSplits == 3) v += part_acc[m][2][e];
          acc[m][e] = v;
        }
      }
      // acc[m][2 r + col]: token t0 + 16 m + group_id + 8 r, query q_begin + nt * 8 + 2 tig + col.
      // valid[col] bit 2 m + r: that token attends to that query.
      uint32_t valid[2];
#pragma unroll
      for (int col = 0; col < 2; ++col) {
        const int lq = last[nt * 8 + 2 * tig + col];
        if (full_tile) {
          valid[col] = lq >= 0 ? 0xFFu : 0u;
        } else {
          valid[col] = 0;
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint64_t tok = t0 + 16 * m + group_id + 8 * r;
              if (tok < t_end && static_cast<int64_t>(tok) <= lq) valid[col] |= 1u << (2 * m + r);
            }
          }
        }
      }
      if constexpr (kPass == 1) {
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          float mx = -INFINITY;
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              if (valid[col] & (1u << (2 * m + r))) mx = fmaxf(mx, acc[m][2 * r + col]);
            }
          }
          for (int o = 4; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
          float sum = 0.0f;
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              if (valid[col] & (1u << (2 * m + r))) sum += __expf(acc[m][2 * r + col] - mx);
            }
          }
          for (int o = 4; o < 32; o <<= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
          if (group_id == 0) {
            float* st = qstats + 2 * (warp * nqc + nt * 8 + 2 * tig + col);
            MergeStats(st[0], st[1], mx, sum);
          }
        }
      } else {
#pragma unroll
        for (int col = 0; col < 2; ++col) {
          const float mq = qstats[2 * (nt * 8 + 2 * tig + col)];
          const float inv = qstats[2 * (nt * 8 + 2 * tig + col) + 1];
#pragma unroll
          for (int m = 0; m < kMt; ++m) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              if (valid[col] & (1u << (2 * m + r))) {
                tok_acc[m][r] += __expf(acc[m][2 * r + col] - mq) * inv;
              }
            }
          }
        }
      }
    }
    if constexpr (kPass == 2) {
#pragma unroll
      for (int m = 0; m < kMt; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float v = tok_acc[m][r];
          v += __shfl_xor_sync(kFullMask, v, 1);
          v += __shfl_xor_sync(kFullMask, v, 2);
          const uint64_t tok = t0 + 16 * m + group_id + 8 * r;
          if (tig == 0 && tok < t_end) {
            if (partials) {
              auto* partial = reinterpret_cast<float*>(scratch + g.off_partial);
              partial[(uint64_t{lh} * g.num_qchunks + qc) * a.tokens + tok] = v;
            } else {
              atomicAdd(scores + tok, v);
            }
          }
        }
      }
    }
  }
  if constexpr (kPass == 1) {
    __syncthreads();
    auto* stats = reinterpret_cast<float*>(scratch + g.off_stats);
    for (uint32_t q = threadIdx.x; q < nqc; q += blockDim.x) {
      float m = -INFINITY, s = 0.0f;
      for (uint32_t w = 0; w < kAttnWarps; ++w) {
        MergeStats(m, s, qstats[2 * (w * nqc + q)], qstats[2 * (w * nqc + q) + 1]);
      }
      float* out = stats + ((uint64_t{lh} * g.token_splits + split) * g.nq_pad + q_begin + q) * 2;
      out[0] = m;
      out[1] = s;
    }
  }
}

template <bool kBf16, int kMaxKb, int kMt, int kPass>
cudaError_t LaunchTensorPass(const AttentionArgs& a, const AttnGeometry& g, uint8_t* scratch,
                             float* scores, bool partials, cudaStream_t stream) {
  constexpr int kSplits = kBf16 ? 3 : 2;
  const size_t smem = size_t{kSplits} * g.qchunk * g.pitch + size_t{kAttnWarps} * g.qchunk * 8 +
                      size_t{g.qchunk} * 4;
  auto kernel = TensorAttentionKernel<kBf16, kMaxKb, kMt, kPass>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const dim3 grid(g.token_splits, g.lh, g.num_qchunks);
  kernel<<<grid, kAttnWarps * 32, smem, stream>>>(a, g, scratch, scores, partials);
  return cudaGetLastError();
}

template <bool kBf16, int kMaxKb, int kMt>
cudaError_t RunTensorPath(const AttentionArgs& a, const AttnGeometry& g, uint8_t* scratch,
                          float* scores, bool partials, cudaStream_t stream) {
  cudaError_t e = LaunchTensorPass<kBf16, kMaxKb, kMt, 1>(a, g, scratch, scores, partials, stream);
  if (e != cudaSuccess) return e;
  const uint64_t n = uint64_t{g.lh} * g.nq_pad;
  CombineStatsKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(g, scratch);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  return LaunchTensorPass<kBf16, kMaxKb, kMt, 2>(a, g, scratch, scores, partials, stream);
}

template <bool kBf16>
cudaError_t RunAttentionT(const AttentionArgs& a, const AttnGeometry& g, uint8_t* scratch,
                          float* scores, uint32_t* overflow_host, cudaStream_t stream,
                          bool* used_tensor_cores) {
  const bool partials = UsePartials(a, g);
  cudaError_t e = cudaMemsetAsync(scratch + g.off_flag, 0, 4, stream);
  if (e != cudaSuccess) return e;
  if (!partials &&
      (e = cudaMemsetAsync(scores, 0, uint64_t{a.tokens} * 4, stream)) != cudaSuccess) {
    return e;
  }
  const uint64_t prep = uint64_t{g.lh} * g.nq_pad * g.dp;
  PrepareQueriesKernel<kBf16>
      <<<static_cast<unsigned>((prep + 255) / 256), 256, 0, stream>>>(a, g, scratch);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  bool tensor = AttentionTensorCoreSupported(a.head_dim, a.kv_aligned);
  if (tensor) {
    e = cudaMemcpyAsync(overflow_host, scratch + g.off_flag, 4, cudaMemcpyDeviceToHost, stream);
    if (e != cudaSuccess) return e;
    if ((e = cudaStreamSynchronize(stream)) != cudaSuccess) return e;
    tensor = *overflow_host == 0;
  }
  *used_tensor_cores = tensor;
  if (tensor) {
    e = a.head_dim <= 128 ? RunTensorPath<kBf16, 4, 2>(a, g, scratch, scores, partials, stream)
                          : RunTensorPath<kBf16, 8, 1>(a, g, scratch, scores, partials, stream);
  } else {
    const uint64_t stats_warps = uint64_t{g.lh} * g.nq_pad;
    SimpleStatsKernel<kBf16>
        <<<static_cast<unsigned>((stats_warps * 32 + kScoreThreads - 1) / kScoreThreads),
           kScoreThreads, 0, stream>>>(a, g, scratch);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    const uint64_t weight_warps = uint64_t{g.lh} * a.tokens;
    SimpleWeightsKernel<kBf16>
        <<<static_cast<unsigned>((weight_warps * 32 + kScoreThreads - 1) / kScoreThreads),
           kScoreThreads, 0, stream>>>(a, g, scratch, scores, partials);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess) return e;
  if (partials) {
    ReducePartialsKernel<<<(a.tokens + 255) / 256, 256, 0, stream>>>(g, a.tokens, scratch, scores);
    e = cudaGetLastError();
  }
  return e;
}

}  // namespace

cudaError_t LaunchKeyNorm(const DevScoreCall* call, const DevScoreCall& host_call, float* scores,
                          cudaStream_t stream) {
  return host_call.bf16 ? LaunchKeyNormT<true>(call, host_call, scores, stream)
                        : LaunchKeyNormT<false>(call, host_call, scores, stream);
}

bool AttentionTensorCoreSupported(uint32_t head_dim, bool kv_aligned) {
  return head_dim <= 256 && kv_aligned;
}

uint64_t AttentionScratchBytes(const AttentionArgs& a) { return Geometry(a).total; }

cudaError_t RunAttention(const AttentionArgs& a, void* scratch, float* scores,
                         uint32_t* overflow_host, cudaStream_t stream, bool* used_tensor_cores) {
  const AttnGeometry g = Geometry(a);
  auto* s = static_cast<uint8_t*>(scratch);
  return a.bf16 ? RunAttentionT<true>(a, g, s, scores, overflow_host, stream, used_tensor_cores)
                : RunAttentionT<false>(a, g, s, scores, overflow_host, stream, used_tensor_cores);
}

}  // namespace spectrumkv::cuda_kernels
