#include "kernels/cpu/cpu_codec.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/lcg.h"
#include "common/status.h"
#include "kernels/cpu/quant_math.h"

namespace spectrumkv {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the CPU codec writes 16-bit values in host order, which must be little-endian");

// Resolves row pointers of one (layer, K|V) placement of a validated buffer.
class Rows {
 public:
  Rows(const KvBuffer& kv, uint32_t layer, bool value)
      : layout_(*kv.layout),
        placement_(kv.layout->Placement(layer, value)),
        table_(kv.block_table),
        base_(static_cast<uint8_t*>(kv.regions[placement_.region].base)) {}

  uint16_t* Row(uint32_t token, uint32_t head) const {
    return reinterpret_cast<uint16_t*>(base_ + RowOffset(layout_, placement_, table_, token, head));
  }
  uint64_t head_stride_bytes() const { return placement_.head_stride_bytes; }

 private:
  const KvLayout& layout_;
  const TensorPlacement& placement_;
  std::span<const uint32_t> table_;
  uint8_t* base_;
};

// While one token's rows are processed, the rows of the token kPrefetchAhead places further in
// the list are prefetched: a gather from a paged cache otherwise waits on DRAM for every row
// (measured: pack ran at 3.5 GB/s of FP16 input, a third of memcpy, stalled on row loads).
constexpr size_t kPrefetchAhead = 2;
// The scoring pass streams each thread's run of tokens through every (layer, K|V): prefetching
// a few tokens ahead keeps loads in flight across the 4 KiB pages a hardware prefetcher stops at.
constexpr uint32_t kScorePrefetchAhead = 4;

// Always inlined: GCC finds a function that only prefetches free of side effects (a prefetch has
// none it can see) and deletes every call to it, which left the passes with no prefetch at all.
// Into L2 (prefetcht1): a non-temporal prefetch (locality 0) made the scoring pass slower than
// none at all (docs/BENCHMARKS.md, "the prefetches that were not there"). Only source rows are
// prefetched: prefetching the destination rows of the scalar unpack (whose stores are ordinary)
// was no faster than not, and non-temporally 1.1x slower.
[[gnu::always_inline]] inline void PrefetchRows(const Rows& rows, uint32_t t, uint32_t heads,
                                                uint32_t row_bytes) {
  // One offset computation per token (it divides by the block size); heads are a stride apart.
  const char* first = reinterpret_cast<const char*>(rows.Row(t, 0));
  for (uint32_t h = 0; h < heads; ++h) {
    const char* p = first + h * rows.head_stride_bytes();
    for (uint32_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
  }
}

[[gnu::always_inline]] inline void PrefetchToken(const Rows& rows, std::span<const uint32_t> tokens,
                                                 size_t i, uint32_t heads, uint32_t row_bytes) {
  if (i + kPrefetchAhead < tokens.size()) {
    PrefetchRows(rows, tokens[i + kPrefetchAhead], heads, row_bytes);
  }
}

// Slice `slice` of `slices` of a tier's token list: the run [first, second) of near-equal runs
// in list order (PackLayerSlice, UnpackLayerSlice).
std::pair<size_t, size_t> SliceRun(const std::vector<uint32_t>& list, uint32_t slice,
                                   uint32_t slices) {
  return {list.size() * slice / slices, list.size() * (slice + 1) / slices};
}

absl::Status CheckSlice(uint32_t slice, uint32_t slices) {
  if (slices == 0 || slice >= slices) {
    return absl::InvalidArgumentError(absl::StrFormat("slice %u of %u", slice, slices));
  }
  return absl::OkStatus();
}

void ZeroGap(uint8_t* out, uint64_t from, uint64_t to) {
  if (to > from) std::memset(out + from, 0, to - from);
}

// Per-channel key factors of one layer, as floats, [H][D] each.
struct KeyFactors {
  std::vector<float> offset, factor, inv_factor;
};

// The tier lists for each tier map the layer range touches (one map, or one per layer).
std::vector<TierLists> ListsFor(const PayloadDesc& desc, std::span<const uint8_t> tiers,
                                uint32_t first, uint32_t last) {
  std::vector<TierLists> lists(desc.num_maps());
  std::vector<bool> built(desc.num_maps(), false);
  for (uint32_t l = first; l < last; ++l) {
    const uint32_t m = desc.MapForLayer(l);
    if (built[m]) continue;
    lists[m] = BuildTierLists(tiers.subspan(uint64_t{m} * desc.num_tokens, desc.num_tokens));
    built[m] = true;
  }
  return lists;
}

}  // namespace

CpuCodec::CpuCodec(const RowKernels& kernels)
    : k_(kernels), name_(std::string("cpu-") + kernels.name) {}

bool CpuCodec::SelfTest(const RowKernels& kernels) {
  const RowKernels& ref = ScalarRowKernels();
  Lcg rng(0x5EC7A1u);
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (uint32_t dim : {8u, 24u, 64u, 128u, 136u, 256u}) {
      for (int trial = 0; trial < 6; ++trial) {
        std::vector<uint16_t> row(dim), out_b(dim);
        // Odd trials write on a 64-byte line (the streaming-store path where a backend has one),
        // even trials 16 bytes past one.
        alignas(64) uint16_t out_buf[kMaxNormalizedDim + 8];
        const std::span<uint16_t> out_a(out_buf + (trial % 2 ? 0 : 8), dim);
        auto differ = [&] {
          kernels.store_fence();
          return !std::equal(out_a.begin(), out_a.end(), out_b.begin());
        };
        for (uint32_t i = 0; i < dim; ++i) {
          const float magnitude = trial == 0 ? 0.0f : (trial == 1 ? 1e-6f : 4.0f);
          const float x = (static_cast<float>(rng.Next() % 20001) / 10000.0f - 1.0f) * magnitude;
          row[i] = FromFloatRne(dtype, x);
        }
        std::vector<int8_t> c8a(dim), c8b(dim);
        std::vector<uint8_t> c4a(dim / 2), c4b(dim / 2);
        uint16_t sa = 0, sb = 0;
        if (!kernels.quantize_int8(dtype, row.data(), dim, c8a.data(), &sa) ||
            !ref.quantize_int8(dtype, row.data(), dim, c8b.data(), &sb) || sa != sb || c8a != c8b) {
          return false;
        }
        kernels.dequantize_int8(dtype, c8a.data(), sa, dim, out_a.data());
        ref.dequantize_int8(dtype, c8b.data(), sb, dim, out_b.data());
        if (differ()) return false;
        if (!kernels.quantize_int4(dtype, row.data(), dim, c4a.data(), &sa) ||
            !ref.quantize_int4(dtype, row.data(), dim, c4b.data(), &sb) || sa != sb || c4a != c4b) {
          return false;
        }
        kernels.dequantize_int4(dtype, c4a.data(), sa, dim, out_a.data());
        ref.dequantize_int4(dtype, c4b.data(), sb, dim, out_b.data());
        if (differ()) return false;
        std::vector<uint8_t> r4a(dim / 2), r4b(dim / 2);
        if (!kernels.refine_int4(dtype, row.data(), dim, r4a.data()) ||
            !ref.refine_int4(dtype, row.data(), dim, r4b.data()) || r4a != r4b) {
          return false;
        }
        kernels.dequantize_refined(dtype, c4a.data(), r4a.data(), sa, dim, out_a.data());
        ref.dequantize_refined(dtype, c4b.data(), r4b.data(), sb, dim, out_b.data());
        if (differ()) return false;
        std::vector<float> offset(dim), factor(dim), inv(dim);
        for (uint32_t i = 0; i < dim; ++i) {
          offset[i] = static_cast<float>(rng.Next() % 7) - 3.0f;
          factor[i] = 0.5f + static_cast<float>(rng.Next() % 4);
          inv[i] = 1.0f / factor[i];
        }
        if (!kernels.quantize_int4_kcn(dtype, row.data(), dim, offset.data(), inv.data(),
                                       c4a.data(), &sa) ||
            !ref.quantize_int4_kcn(dtype, row.data(), dim, offset.data(), inv.data(), c4b.data(),
                                   &sb) ||
            sa != sb || c4a != c4b) {
          return false;
        }
        kernels.dequantize_int4_kcn(dtype, c4a.data(), sa, offset.data(), factor.data(), dim,
                                    out_a.data());
        ref.dequantize_int4_kcn(dtype, c4b.data(), sb, offset.data(), factor.data(), dim,
                                out_b.data());
        if (differ()) return false;
        kernels.copy_row(row.data(), dim, out_a.data());
        out_b = row;
        if (differ()) return false;
      }
    }
  }
  return true;
}

std::unique_ptr<CpuCodec> CpuCodec::CreateBest() {
  const RowKernels* avx2 = Avx2RowKernels();
  if (avx2 != nullptr && SelfTest(*avx2)) return std::make_unique<CpuCodec>(*avx2);
  return std::make_unique<CpuCodec>(ScalarRowKernels());
}

absl::Status CpuCodec::Score(const KvBuffer& kv, const ScoreOptions& options,
                             std::span<float> scores) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const bool complete, ScoreWithoutKv(kv, options, scores));
  if (complete) return absl::OkStatus();
  const ModelShape& shape = kv.layout->shape;
  const uint32_t n = kv.num_tokens;
  const DType dtype = kv.layout->dtype;
  const uint32_t heads = shape.num_kv_heads, dim = shape.head_dim;
  std::fill(scores.begin(), scores.end(), 0.0f);

  if (options.mode == ScoringMode::kKeyNorm) {
    // Token ranges per thread: each token's sum runs in the same order whatever the count.
    auto score_range = [&](uint32_t begin, uint32_t end) {
      for (uint32_t l = 0; l < shape.num_layers; ++l) {
        for (bool value : {false, true}) {
          const Rows rows(kv, l, value);
          for (uint32_t t = begin; t < end; ++t) {
            if (t + kScorePrefetchAhead < end) {
              PrefetchRows(rows, t + kScorePrefetchAhead, heads, dim * 2);
            }
            scores[t] +=
                k_.sum_row_norms(dtype, rows.Row(t, 0), rows.head_stride_bytes(), heads, dim);
          }
        }
      }
    };
    const uint32_t cap = options.max_threads == 0 ? score_threads_ : options.max_threads;
    const uint32_t threads =
        std::min<uint32_t>(std::min(score_threads_, cap), std::max<uint32_t>(1, n / 256));
    std::vector<std::thread> pool;
    for (uint32_t i = 1; i < threads; ++i) {
      pool.emplace_back(score_range, uint64_t{n} * i / threads, uint64_t{n} * (i + 1) / threads);
    }
    score_range(0, n / threads);
    for (std::thread& th : pool) th.join();
    const float norm = 1.0f / static_cast<float>(shape.num_layers * heads);
    for (float& s : scores) s *= norm;
    return absl::OkStatus();
  }

  // Attention mass from the window queries, GQA groups handled by mapping each query head to
  // its KV head; logits scaled by 1/sqrt(d) and masked causally.
  const uint32_t w = options.window, hq = options.num_q_heads, group = hq / heads;
  const uint32_t nq = group * w;
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(dim));
  std::vector<float> queries(uint64_t{nq} * dim);
  std::vector<float> logits(uint64_t{n} * nq);
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    const Rows keys(kv, l, false);
    for (uint32_t h = 0; h < heads; ++h) {
      // queries[g*w + i] = window query i of q head h*group + g, pre-scaled.
      for (uint32_t g = 0; g < group; ++g) {
        for (uint32_t i = 0; i < w; ++i) {
          const float* src =
              options.window_queries.data() + ((uint64_t{l} * w + i) * hq + (h * group + g)) * dim;
          float* dst = queries.data() + (uint64_t{g} * w + i) * dim;
          for (uint32_t c = 0; c < dim; ++c) dst[c] = src[c] * inv_sqrt_d;
        }
      }
      for (uint32_t t = 0; t < n; ++t) {
        k_.dot_many(dtype, keys.Row(t, h), dim, queries.data(), nq,
                    logits.data() + uint64_t{t} * nq);
      }
      for (uint32_t q = 0; q < nq; ++q) {
        const uint32_t last = n - w + q % w;  // causal: keys 0..last
        float max = -std::numeric_limits<float>::infinity();
        for (uint32_t t = 0; t <= last; ++t) max = std::max(max, logits[uint64_t{t} * nq + q]);
        double sum = 0.0;
        for (uint32_t t = 0; t <= last; ++t) {
          float& x = logits[uint64_t{t} * nq + q];
          x = std::exp(x - max);
          sum += x;
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (uint32_t t = 0; t <= last; ++t) scores[t] += logits[uint64_t{t} * nq + q] * inv;
      }
    }
  }
  PoolAndDecay(scores, options.pool_kernel, options.recency_decay);
  return absl::OkStatus();
}

absl::Status CpuCodec::PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first_layer,
                                  uint32_t last_layer, std::span<uint8_t> payload) {
  SPECTRUMKV_RETURN_IF_ERROR(PackLayerSlice(src, plan, first_layer, last_layer, 0, 1, payload));
  return SealLayers(plan, first_layer, last_layer, payload);
}

absl::Status CpuCodec::SealLayers(const TierPlan& plan, uint32_t first_layer, uint32_t last_layer,
                                  std::span<uint8_t> payload) {
  if (first_layer >= last_layer || last_layer > plan.layout.layers.size() ||
      payload.size() != plan.layout.total_bytes) {
    return absl::InvalidArgumentError("SealLayers: layer range or payload size does not match");
  }
  for (uint32_t l = first_layer; l < last_layer; ++l) SealLayerSection(plan.layout, l, payload);
  return absl::OkStatus();
}

absl::Status CpuCodec::PackLayerSlice(const KvBuffer& src, const TierPlan& plan,
                                      uint32_t first_layer, uint32_t last_layer, uint32_t slice,
                                      uint32_t slices, std::span<uint8_t> payload) {
  const PayloadDesc& desc = plan.desc;
  const WireLayout& wl = plan.layout;
  if (desc.progressive()) {
    for (ProgressivePart part : {ProgressivePart::kBase, ProgressivePart::kRanked}) {
      SPECTRUMKV_RETURN_IF_ERROR(
          PackProgressiveSlice(src, plan, part, first_layer, last_layer, slice, slices, payload));
    }
    return absl::OkStatus();
  }
  SPECTRUMKV_RETURN_IF_ERROR(CheckPackArgs(src, plan, first_layer, last_layer, payload));
  SPECTRUMKV_RETURN_IF_ERROR(CheckSlice(slice, slices));
  const DType dtype = desc.dtype;
  const uint32_t heads = desc.shape.num_kv_heads, dim = desc.shape.head_dim;
  const uint64_t hd = uint64_t{heads} * dim;
  const std::vector<TierLists> all_lists = ListsFor(desc, plan.tiers, first_layer, last_layer);
  uint8_t* out = payload.data();
  const bool last_slice = slice + 1 == slices;
  auto run = [&](const std::vector<uint32_t>& list) { return SliceRun(list, slice, slices); };
  KeyFactors f;

  for (uint32_t l = first_layer; l < last_layer; ++l) {
    const LayerSection& sec = wl.layers[l];
    const TierLists& lists = all_lists[desc.MapForLayer(l)];
    const std::vector<uint32_t>& int4_tokens = lists[Tier::kInt4];

    if (desc.key_channel_norm()) {
      // Factors over this layer's INT4 tokens: offset = channel midpoint, factor = sqrt of the
      // half-range (both rounded to the dtype; the encoder uses the rounded values). Every slice
      // needs them and computes them (the same values); slice 0 writes them.
      const Rows keys(src, l, false);
      f.offset.assign(hd, 0.0f);
      f.factor.assign(hd, 1.0f);
      f.inv_factor.assign(hd, 1.0f);
      auto* offsets = reinterpret_cast<uint16_t*>(out + sec.key_offsets);
      auto* factors = reinterpret_cast<uint16_t*>(out + sec.key_factors);
      std::vector<float> lo(dim), hi(dim);
      for (uint32_t h = 0; h < heads; ++h) {
        std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
        std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
        for (uint32_t t : int4_tokens) {
          if (!k_.min_max(dtype, keys.Row(t, h), dim, lo.data(), hi.data())) {
            return NonFiniteRowError(l, false, t, h);
          }
        }
        for (uint32_t c = 0; c < dim; ++c) {
          const uint64_t i = uint64_t{h} * dim + c;
          uint16_t m_bits = 0, f_bits = FromFloatRne(dtype, 1.0f);
          if (!int4_tokens.empty()) {
            m_bits = FromFloatRne(dtype, 0.5f * lo[c] + 0.5f * hi[c]);
            const float m = ToFloat(dtype, m_bits);
            const float half = std::max(hi[c] - m, m - lo[c]);
            const uint16_t candidate = FromFloatRne(dtype, std::sqrt(half));
            const float fv = ToFloat(dtype, candidate);
            if (fv > 0.0f && std::isfinite(fv)) f_bits = candidate;
          }
          if (slice == 0) {
            offsets[i] = m_bits;
            factors[i] = f_bits;
          }
          f.offset[i] = ToFloat(dtype, m_bits);
          f.factor[i] = ToFloat(dtype, f_bits);
          f.inv_factor[i] = 1.0f / f.factor[i];
        }
      }
      if (slice == 0) {
        ZeroGap(out, sec.key_offsets + hd * 2, sec.key_factors);
        ZeroGap(out, sec.key_factors + hd * 2, sec.key.fp16_rows);
      }
    }

    // Each tier's rows and scales start at the slice's first token of that tier; the last slice
    // zeroes the padding after each array.
    for (bool value : {false, true}) {
      const PartLayout& part = value ? sec.value : sec.key;
      const Rows rows(src, l, value);
      // FP16 rows, bit-exact.
      const uint32_t row_bytes = dim * 2;
      const std::vector<uint32_t>& fp16_tokens = lists[Tier::kFp16];
      const auto [f0, f1] = run(fp16_tokens);
      uint8_t* dst = out + part.fp16_rows + f0 * hd * 2;
      for (size_t i = f0; i < f1; ++i) {
        const uint32_t t = fp16_tokens[i];
        PrefetchToken(rows, fp16_tokens, i, heads, row_bytes);
        for (uint32_t h = 0; h < heads; ++h, dst += uint64_t{dim} * 2) {
          std::memcpy(dst, rows.Row(t, h), uint64_t{dim} * 2);
        }
      }
      if (last_slice) ZeroGap(out, dst - out, part.int8_rows);
      // INT8 rows and scales.
      const std::vector<uint32_t>& int8_tokens = lists[Tier::kInt8];
      const auto [e0, e1] = run(int8_tokens);
      auto* codes8 = reinterpret_cast<int8_t*>(out + part.int8_rows + e0 * hd);
      auto* scales8 = reinterpret_cast<uint16_t*>(out + part.int8_scales) + e0 * heads;
      for (size_t i = e0; i < e1; ++i) {
        const uint32_t t = int8_tokens[i];
        PrefetchToken(rows, int8_tokens, i, heads, row_bytes);
        for (uint32_t h = 0; h < heads; ++h, codes8 += dim, ++scales8) {
          if (!k_.quantize_int8(dtype, rows.Row(t, h), dim, codes8, scales8)) {
            return NonFiniteRowError(l, value, t, h);
          }
        }
      }
      if (last_slice) {
        ZeroGap(out, reinterpret_cast<uint8_t*>(codes8) - out, part.int8_scales);
        ZeroGap(out, reinterpret_cast<uint8_t*>(scales8) - out, part.int4_rows);
      }
      // INT4 rows and scales; keys through the channel factors when enabled.
      const auto [q0, q1] = run(int4_tokens);
      uint8_t* codes4 = out + part.int4_rows + q0 * hd / 2;
      auto* scales4 = reinterpret_cast<uint16_t*>(out + part.int4_scales) + q0 * heads;
      const bool kcn = desc.key_channel_norm() && !value;
      for (size_t i = q0; i < q1; ++i) {
        const uint32_t t = int4_tokens[i];
        PrefetchToken(rows, int4_tokens, i, heads, row_bytes);
        for (uint32_t h = 0; h < heads; ++h, codes4 += dim / 2, ++scales4) {
          const uint16_t* row = rows.Row(t, h);
          const bool ok =
              kcn ? k_.quantize_int4_kcn(dtype, row, dim, &f.offset[uint64_t{h} * dim],
                                         &f.inv_factor[uint64_t{h} * dim], codes4, scales4)
                  : k_.quantize_int4(dtype, row, dim, codes4, scales4);
          if (!ok) {
            return NonFiniteRowError(l, value, t, h);
          }
        }
      }
      if (last_slice) {
        ZeroGap(out, codes4 - out, part.int4_scales);
        ZeroGap(out, reinterpret_cast<uint8_t*>(scales4) - out, part.end);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuCodec::PackProgressiveSlice(const KvBuffer& src, const TierPlan& plan,
                                            ProgressivePart part, uint32_t first_layer,
                                            uint32_t last_layer, uint32_t slice, uint32_t slices,
                                            std::span<uint8_t> payload) {
  const PayloadDesc& desc = plan.desc;
  const WireLayout& wl = plan.layout;
  if (!desc.progressive()) {
    return absl::InvalidArgumentError("PackProgressiveSlice: the plan is not progressive");
  }
  SPECTRUMKV_RETURN_IF_ERROR(CheckPackArgs(src, plan, first_layer, last_layer, payload));
  SPECTRUMKV_RETURN_IF_ERROR(CheckSlice(slice, slices));
  const bool base = part == ProgressivePart::kBase;
  if (!base && plan.tiers.size() != uint64_t{desc.num_maps()} * desc.num_tokens) {
    return absl::InvalidArgumentError("PackProgressiveSlice: the refinements need the tier map");
  }
  const DType dtype = desc.dtype;
  const uint32_t heads = desc.shape.num_kv_heads, dim = desc.shape.head_dim;
  const uint64_t hd = uint64_t{heads} * dim;
  const uint32_t row_bytes = dim * 2;
  const bool last_slice = slice + 1 == slices;
  uint8_t* out = payload.data();
  std::vector<TierLists> all_lists;
  if (!base) all_lists = ListsFor(desc, plan.tiers, first_layer, last_layer);

  for (uint32_t l = first_layer; l < last_layer; ++l) {
    const LayerSection& sec = wl.layers[l];
    for (bool value : {false, true}) {
      const PartLayout& p = value ? sec.value : sec.key;
      const Rows rows(src, l, value);
      if (base) {
        // Every token's INT4 base, in token order.
        const uint32_t n = desc.num_tokens;
        const uint32_t t0 = static_cast<uint32_t>(uint64_t{n} * slice / slices);
        const uint32_t t1 = static_cast<uint32_t>(uint64_t{n} * (slice + 1) / slices);
        uint8_t* codes = out + p.int4_rows + t0 * hd / 2;
        auto* scales = reinterpret_cast<uint16_t*>(out + p.int4_scales) + uint64_t{t0} * heads;
        for (uint32_t t = t0; t < t1; ++t) {
          if (t + kPrefetchAhead < t1) PrefetchRows(rows, t + kPrefetchAhead, heads, row_bytes);
          for (uint32_t h = 0; h < heads; ++h, codes += dim / 2, ++scales) {
            if (!k_.quantize_int4(dtype, rows.Row(t, h), dim, codes, scales)) {
              return NonFiniteRowError(l, value, t, h);
            }
          }
        }
        if (last_slice) {
          ZeroGap(out, codes - out, p.int4_scales);
          ZeroGap(out, reinterpret_cast<uint8_t*>(scales) - out, p.fp16_rows);
        }
        continue;
      }
      // The INT8 tokens' refinement cells, in their list's order.
      const std::vector<uint32_t>& int8_tokens = all_lists[desc.MapForLayer(l)][Tier::kInt8];
      const auto [e0, e1] = SliceRun(int8_tokens, slice, slices);
      uint8_t* cells = out + p.int8_rows + e0 * hd / 2;
      for (size_t i = e0; i < e1; ++i) {
        const uint32_t t = int8_tokens[i];
        PrefetchToken(rows, int8_tokens, i, heads, row_bytes);
        for (uint32_t h = 0; h < heads; ++h, cells += dim / 2) {
          if (!k_.refine_int4(dtype, rows.Row(t, h), dim, cells)) {
            return NonFiniteRowError(l, value, t, h);
          }
        }
      }
      if (last_slice) ZeroGap(out, cells - out, p.end);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuCodec::UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                                    const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                                    VerifyMode verify) {
  return Unpack(prelude, payload, dst, first_layer, last_layer, 0, 1, verify);
}

absl::Status CpuCodec::UnpackLayerSlice(const ParsedPrelude& prelude,
                                        std::span<const uint8_t> payload, const KvBuffer& dst,
                                        uint32_t first_layer, uint32_t last_layer, uint32_t slice,
                                        uint32_t slices) {
  return Unpack(prelude, payload, dst, first_layer, last_layer, slice, slices,
                VerifyMode::kAlreadyVerified);
}

absl::Status CpuCodec::Unpack(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                              const KvBuffer& dst, uint32_t first_layer, uint32_t last_layer,
                              uint32_t slice, uint32_t slices, VerifyMode verify) {
  const WireLayout& wl = prelude.layout;
  const PayloadDesc& desc = wl.desc;
  SPECTRUMKV_RETURN_IF_ERROR(CheckUnpackArgs(prelude, payload, dst, first_layer, last_layer));
  SPECTRUMKV_RETURN_IF_ERROR(CheckSlice(slice, slices));
  const DType dtype = desc.dtype;
  const uint32_t heads = desc.shape.num_kv_heads, dim = desc.shape.head_dim;
  const uint64_t hd = uint64_t{heads} * dim;
  const std::vector<TierLists> all_lists = ListsFor(desc, prelude.tiers, first_layer, last_layer);
  const uint8_t* in = payload.data();
  auto run = [&](const std::vector<uint32_t>& list) { return SliceRun(list, slice, slices); };
  KeyFactors f;
  // Rows may be written with streaming stores: order them before the caller sees this return.
  struct FenceOnExit {
    const RowKernels& k;
    ~FenceOnExit() { k.store_fence(); }
  } fence{k_};

  for (uint32_t l = first_layer; l < last_layer; ++l) {
    if (verify == VerifyMode::kVerify)
      SPECTRUMKV_RETURN_IF_ERROR(VerifyLayerSection(wl, l, payload));
    const LayerSection& sec = wl.layers[l];
    const TierLists& lists = all_lists[desc.MapForLayer(l)];
    if (desc.progressive()) {
      // INT4 tokens from their base; INT8 tokens from their base and refinement cells.
      for (bool value : {false, true}) {
        const PartLayout& part = value ? sec.value : sec.key;
        const Rows rows(dst, l, value);
        const uint8_t* bases = in + part.int4_rows;
        const auto* scales = reinterpret_cast<const uint16_t*>(in + part.int4_scales);
        const std::vector<uint32_t>& int4_list = lists[Tier::kInt4];
        const auto [q0, q1] = run(int4_list);
        for (size_t i = q0; i < q1; ++i) {
          const uint32_t t = int4_list[i];
          for (uint32_t h = 0; h < heads; ++h) {
            const uint64_t row = uint64_t{t} * heads + h;
            k_.dequantize_int4(dtype, bases + row * dim / 2, scales[row], dim, rows.Row(t, h));
          }
        }
        const std::vector<uint32_t>& int8_list = lists[Tier::kInt8];
        const auto [e0, e1] = run(int8_list);
        const uint8_t* cells = in + part.int8_rows + e0 * hd / 2;
        for (size_t i = e0; i < e1; ++i) {
          const uint32_t t = int8_list[i];
          for (uint32_t h = 0; h < heads; ++h, cells += dim / 2) {
            const uint64_t row = uint64_t{t} * heads + h;
            k_.dequantize_refined(dtype, bases + row * dim / 2, cells, scales[row], dim,
                                  rows.Row(t, h));
          }
        }
      }
      continue;
    }
    if (desc.key_channel_norm()) {
      const auto* offsets = reinterpret_cast<const uint16_t*>(in + sec.key_offsets);
      const auto* factors = reinterpret_cast<const uint16_t*>(in + sec.key_factors);
      f.offset.resize(hd);
      f.factor.resize(hd);
      for (uint64_t i = 0; i < hd; ++i) {
        f.offset[i] = ToFloat(dtype, offsets[i]);
        f.factor[i] = ToFloat(dtype, factors[i]);
      }
    }
    for (bool value : {false, true}) {
      const PartLayout& part = value ? sec.value : sec.key;
      const Rows rows(dst, l, value);
      const std::vector<uint32_t>& fp16_tokens = lists[Tier::kFp16];
      const auto [f0, f1] = run(fp16_tokens);
      const uint8_t* src = in + part.fp16_rows + f0 * hd * 2;
      for (size_t i = f0; i < f1; ++i) {
        const uint32_t t = fp16_tokens[i];
        for (uint32_t h = 0; h < heads; ++h, src += uint64_t{dim} * 2) {
          k_.copy_row(reinterpret_cast<const uint16_t*>(src), dim, rows.Row(t, h));
        }
      }
      const std::vector<uint32_t>& int8_tokens = lists[Tier::kInt8];
      const auto [e0, e1] = run(int8_tokens);
      const auto* codes8 = reinterpret_cast<const int8_t*>(in + part.int8_rows + e0 * hd);
      const auto* scales8 = reinterpret_cast<const uint16_t*>(in + part.int8_scales) + e0 * heads;
      for (size_t i = e0; i < e1; ++i) {
        const uint32_t t = int8_tokens[i];
        for (uint32_t h = 0; h < heads; ++h, codes8 += dim, ++scales8) {
          k_.dequantize_int8(dtype, codes8, *scales8, dim, rows.Row(t, h));
        }
      }
      const bool kcn = desc.key_channel_norm() && !value;
      const std::vector<uint32_t>& int4_list = lists[Tier::kInt4];
      const auto [q0, q1] = run(int4_list);
      const uint8_t* codes4 = in + part.int4_rows + q0 * hd / 2;
      const auto* scales4 = reinterpret_cast<const uint16_t*>(in + part.int4_scales) + q0 * heads;
      for (size_t i = q0; i < q1; ++i) {
        const uint32_t t = int4_list[i];
        for (uint32_t h = 0; h < heads; ++h, codes4 += dim / 2, ++scales4) {
          if (kcn) {
            k_.dequantize_int4_kcn(dtype, codes4, *scales4, &f.offset[uint64_t{h} * dim],
                                   &f.factor[uint64_t{h} * dim], dim, rows.Row(t, h));
          } else {
            k_.dequantize_int4(dtype, codes4, *scales4, dim, rows.Row(t, h));
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace spectrumkv
