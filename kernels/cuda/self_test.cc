// CudaCodec::SelfTest: the known-answer test the backend registry runs before choosing CUDA. The
// answers come from the scalar CPU reference, computed on the same fixed pseudo-random inputs.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/lcg.h"
#include "common/status.h"
#include "kernels/cpu/cpu_codec.h"
#include "kernels/cuda/cuda_codec.h"
#include "kernels/cuda/device.h"

namespace spectrumkv {
namespace {

float Uniform(Lcg& rng) { return static_cast<float>(rng.Next() % 1000003) / 1000003.0f; }
// Roughly gaussian (sum of uniforms).
float Gauss(Lcg& rng) { return Uniform(rng) + Uniform(rng) + Uniform(rng) + Uniform(rng) - 2.0f; }

// A KV in host memory plus a device copy with the same layout: one region per layer and part,
// vLLM NHD-like ([block][slot][head][dim]) or HND-like ([block][head][slot][dim]) rows.
struct SelfTestKv {
  KvLayout layout;
  std::vector<std::vector<uint8_t>> host;
  std::vector<cuda::DeviceBuffer> device;
  std::vector<MemoryRegion> host_regions, device_regions;
  std::vector<uint32_t> table;
  uint32_t tokens = 0;

  KvBuffer Host() const { return {&layout, host_regions, MemoryKind::kHost, table, tokens}; }
  KvBuffer Device() const { return {&layout, device_regions, MemoryKind::kDevice, table, tokens}; }
};

absl::Status MakeKv(const ModelShape& shape, DType dtype, uint32_t block_size, bool hnd,
                    uint32_t tokens, uint64_t seed, bool fill, SelfTestKv* kv) {
  kv->layout.shape = shape;
  kv->layout.dtype = dtype;
  kv->layout.block_size = block_size;
  const uint32_t blocks = (tokens + block_size - 1) / block_size + 1;
  kv->layout.num_blocks = blocks;
  kv->tokens = tokens;
  const uint64_t row = uint64_t{shape.head_dim} * 2;
  const uint64_t block_bytes = row * shape.num_kv_heads * block_size;
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    for (int p = 0; p < 2; ++p) {
      TensorPlacement t;
      t.region = 2 * l + p;
      t.block_stride_bytes = block_bytes;
      t.token_stride_bytes = hnd ? row : row * shape.num_kv_heads;
      t.head_stride_bytes = hnd ? row * block_size : row;
      (p == 0 ? kv->layout.keys : kv->layout.values).push_back(t);
      kv->host.emplace_back(block_bytes * blocks, 0);
    }
  }
  // Blocks in a scrambled order (one spare block left unused).
  Lcg rng(seed);
  for (uint32_t b = 0; b + 1 < blocks; ++b) kv->table.push_back((b * 5 + 1) % blocks);
  if (fill) {
    for (auto& region : kv->host) {
      auto* v = reinterpret_cast<uint16_t*>(region.data());
      const size_t n = region.size() / 2;
      for (size_t i = 0; i < n; i += shape.head_dim) {
        const uint32_t kind = rng.Next() % 16;
        float magnitude = std::exp(Gauss(rng));
        if (kind == 0) magnitude = 0.0f;
        if (kind == 1) magnitude = 1e-5f;
        if (kind == 2) magnitude = 2000.0f;
        for (uint32_t c = 0; c < shape.head_dim; ++c) {
          float x = Gauss(rng) * magnitude;
          if (c == 3 && kind > 2) x += 12.0f;  // an outlier channel
          v[i + c] = FromFloatRne(dtype, x);
        }
      }
    }
  }
  for (auto& region : kv->host) {
    kv->host_regions.push_back({region.data(), region.size()});
    SPECTRUMKV_ASSIGN_OR_RETURN(cuda::DeviceBuffer buffer,
                                cuda::DeviceBuffer::Allocate(region.size()));
    SPECTRUMKV_RETURN_IF_ERROR(cuda::CopyToDevice(buffer.data(), region.data(), region.size()));
    kv->device_regions.push_back({buffer.data(), region.size()});
    kv->device.push_back(std::move(buffer));
  }
  return absl::OkStatus();
}

struct SelfTestCase {
  DType dtype;
  Quantizer quantizer;
  bool per_layer;
  ModelShape shape;
  uint32_t tokens;
};

absl::Status RunCase(CudaCodec& codec, const SelfTestCase& c, uint64_t seed) {
  CpuCodec reference(ScalarRowKernels());
  SelfTestKv src, ours, theirs;
  SPECTRUMKV_RETURN_IF_ERROR(MakeKv(c.shape, c.dtype, 4, false, c.tokens, seed, true, &src));
  SPECTRUMKV_RETURN_IF_ERROR(MakeKv(c.shape, c.dtype, 8, true, c.tokens, seed, false, &ours));
  SPECTRUMKV_RETURN_IF_ERROR(MakeKv(c.shape, c.dtype, 8, true, c.tokens, seed, false, &theirs));
  Lcg rng(seed ^ 0x9E3779B97F4A7C15ull);
  const uint32_t maps = c.per_layer ? c.shape.num_layers : 1;
  std::vector<uint8_t> tiers(uint64_t{maps} * c.tokens);
  for (auto& t : tiers) t = static_cast<uint8_t>(rng.Next() % 4);
  for (uint32_t m = 0; m < maps; ++m) {
    for (uint8_t k = 0; k < 4; ++k) tiers[uint64_t{m} * c.tokens + k] = k;
  }
  SPECTRUMKV_ASSIGN_OR_RETURN(
      TierPlan plan, PlanFromTiers(c.shape, c.dtype, c.tokens, tiers, Policy::k3Tier, c.quantizer));
  SPECTRUMKV_ASSIGN_OR_RETURN(std::vector<uint8_t> expect,
                              PackPayload(reference, src.Host(), plan));

  // Pack on the device, compare every byte.
  SPECTRUMKV_ASSIGN_OR_RETURN(cuda::DeviceBuffer payload,
                              cuda::DeviceBuffer::Allocate(plan.layout.total_bytes));
  SPECTRUMKV_RETURN_IF_ERROR(cuda::FillDevice(payload.data(), 0xA5, payload.size()));
  SPECTRUMKV_RETURN_IF_ERROR(
      cuda::CopyToDevice(payload.data(), expect.data(), plan.layout.prelude_bytes));
  SPECTRUMKV_RETURN_IF_ERROR(
      codec.PackLayers(src.Device(), plan, 0, c.shape.num_layers, payload.span()));
  std::vector<uint8_t> got(payload.size());
  SPECTRUMKV_RETURN_IF_ERROR(cuda::CopyToHost(got.data(), payload.data(), got.size()));
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != expect[i]) {
      return absl::InternalError(
          absl::StrFormat("cuda self-test: pack differs from the reference at byte %u of %u (%s "
                          "%s)",
                          i, got.size(), DTypeName(c.dtype), QuantizerName(c.quantizer)));
    }
  }

  // Unpack the reference payload with both, compare the destination bits.
  SPECTRUMKV_ASSIGN_OR_RETURN(ParsedPrelude prelude, ParsePrelude(expect, expect.size()));
  SPECTRUMKV_RETURN_IF_ERROR(codec.UnpackLayers(prelude, payload.span(), ours.Device(), 0,
                                                c.shape.num_layers, VerifyMode::kVerify));
  SPECTRUMKV_RETURN_IF_ERROR(
      UnpackPayload(reference, expect, theirs.Host(), expect.size()).status());
  for (size_t r = 0; r < ours.host.size(); ++r) {
    SPECTRUMKV_RETURN_IF_ERROR(
        cuda::CopyToHost(ours.host[r].data(), ours.device[r].data(), ours.host[r].size()));
    if (ours.host[r] != theirs.host[r]) {
      return absl::InternalError(
          absl::StrFormat("cuda self-test: unpack differs from the reference in region %u", r));
    }
  }

  // Scores within the conformance tolerance.
  std::vector<float> queries(uint64_t{c.shape.num_layers} * 4 * 2 * c.shape.num_kv_heads *
                             c.shape.head_dim);
  for (float& q : queries) q = Gauss(rng);
  for (ScoringMode mode : {ScoringMode::kKeyNorm, ScoringMode::kAttention}) {
    ScoreOptions o;
    o.mode = mode;
    if (mode == ScoringMode::kAttention) {
      o.window_queries = queries;
      o.window = 4;
      o.num_q_heads = 2 * c.shape.num_kv_heads;
    }
    std::vector<float> a(c.tokens), b(c.tokens);
    SPECTRUMKV_RETURN_IF_ERROR(codec.Score(src.Device(), o, a));
    SPECTRUMKV_RETURN_IF_ERROR(reference.Score(src.Host(), o, b));
    for (uint32_t t = 0; t < c.tokens; ++t) {
      if (!(std::fabs(a[t] - b[t]) <= 1e-4f * std::fabs(b[t]) + 1e-6f)) {
        return absl::InternalError(
            absl::StrFormat("cuda self-test: %s score of token %u is %g, the reference %g",
                            ScoringModeName(mode), t, a[t], b[t]));
      }
    }
  }
  return absl::OkStatus();
}

// Device planning must give the host plan exactly: scores with ties, both zeros, NaN and
// infinities, across two list chunks, 3tier with sinks and per-layer sinkprotect budgets.
absl::Status RunPlanCase(CudaCodec& codec, uint64_t seed) {
  Lcg rng(seed);
  const uint32_t n = 4099;
  const float specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()};
  std::vector<float> scores(n);
  for (float& x : scores) x = rng.Next() % 2 ? specials[rng.Next() % 6] : Gauss(rng);
  SPECTRUMKV_ASSIGN_OR_RETURN(cuda::DeviceBuffer device, cuda::DeviceBuffer::Allocate(4 * n));
  SPECTRUMKV_RETURN_IF_ERROR(cuda::CopyToDevice(device.data(), scores.data(), 4 * n));
  const std::span<const float> device_scores(reinterpret_cast<const float*>(device.data()), n);
  const ModelShape shape{4, 2, 128};
  for (int k = 0; k < 2; ++k) {
    PlanOptions o;
    o.policy = k == 0 ? Policy::k3Tier : Policy::kSinkProtect;
    o.budget = k == 0 ? 0.3 : 0.45;
    o.per_layer = k == 1;
    o.layer_slope = 0.05;
    SPECTRUMKV_ASSIGN_OR_RETURN(const TierPlan host,
                                PlanTiers(shape, DType::kFloat16, n, scores, o));
    SPECTRUMKV_ASSIGN_OR_RETURN(const TierPlan ours,
                                codec.PlanOnDevice(device_scores, shape, DType::kFloat16, o));
    if (ours.tiers != host.tiers || ours.layout.total_bytes != host.layout.total_bytes) {
      return absl::InternalError(absl::StrFormat(
          "cuda self-test: the device plan (%s) differs from the host plan", PolicyName(o.policy)));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaCodec::SelfTest() {
  static constexpr SelfTestCase kCases[] = {
      {DType::kFloat16, Quantizer::kAbsmax, false, {2, 2, 128}, 45},
      {DType::kBFloat16, Quantizer::kKeyChannelNorm, true, {2, 3, 64}, 37},
      {DType::kFloat16, Quantizer::kKeyChannelNorm, false, {1, 1, 72}, 19},
  };
  uint64_t seed = 0x5EC7A1;
  for (const SelfTestCase& c : kCases) SPECTRUMKV_RETURN_IF_ERROR(RunCase(*this, c, ++seed));
  return RunPlanCase(*this, ++seed);
}

}  // namespace spectrumkv
