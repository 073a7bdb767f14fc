// CUDA codec throughput against a device-to-device copy measured in the same run
// (docs/BENCHMARKS.md, "CUDA codec").
//
// For each model shape and token count, a vLLM NHD paged pool (block 16, shuffled blocks) in
// device memory is scored (key_norm or attention with a window of 32 queries), planned on the
// host (3-tier, element budget b), packed into a device payload and unpacked into a vLLM HND pool
// (block 32) with and without on-device verification. A second table compares planning on the
// device with the host planner (same scores, identical plans checked) and the whole sender path
// score + plan + pack with host planning against CudaCodec::ScorePlanPack (identical payloads
// checked). Device times come from CUDA events the codec records around its device work
// (CudaCodec::last_device_ms); wall times of the whole call are reported beside them. Each step
// runs --warmup times untimed, then --reps times; medians.
//
// Bytes are counted as read + written. Pack moves R + W bytes (R = the FP16 K and V of the
// request, W = the payload), unpack W + R_kept, a copy 2 * its size. The byte floor of a step is
// its bytes over the copy bandwidth measured here.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/model_shapes.h"
#include "common/lcg.h"
#include "kernels/api/codec.h"
#include "kernels/cuda/cuda_codec.h"
#include "kernels/cuda/device.h"

namespace spectrumkv {
namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Die(const absl::Status& s, const char* what) {
  std::fprintf(stderr, "codec_cuda_bench: %s: %s\n", what, s.ToString().c_str());
  std::exit(1);
}
void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) Die(s, what);
}
template <typename T>
T Check(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) Die(v.status(), what);
  return std::move(*v);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Device and wall medians of a codec call, in milliseconds.
struct Timing {
  double device_ms = 0.0;
  double wall_ms = 0.0;
};

// Wall-clock median of a host-side step, in milliseconds.
template <typename F>
double TimeWall(int warmup, int reps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> wall;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    wall.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return Median(wall);
}

template <typename F>
Timing TimeCall(CudaCodec& codec, int warmup, int reps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> device, wall;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    wall.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    device.push_back(codec.last_device_ms());
  }
  return {Median(device), Median(wall)};
}

// Uniform in [-1, 1).
float Symmetric(Lcg& rng) { return static_cast<float>(rng.Next() & 0xFFFFFF) / 8388608.0f - 1.0f; }

// A paged pool in device memory. Its contents are a host sample of `sample_tokens` tokens
// (per-row log-normal magnitudes, a few large "sink" rows, two key outlier channels), repeated.
struct DevicePool {
  kvgen::PoolLayout layout;
  std::vector<cuda::DeviceBuffer> buffers;
  std::vector<MemoryRegion> regions;
  std::vector<uint32_t> table;
  uint32_t tokens = 0;
  KvBuffer View() const { return {&layout.layout, regions, MemoryKind::kDevice, table, tokens}; }
};

DevicePool MakeDevicePool(kvgen::PoolLayoutKind kind, const ModelShape& shape, uint32_t block_size,
                          uint32_t tokens, const std::vector<uint8_t>* sample, uint64_t seed) {
  DevicePool p;
  kvgen::PoolSpec spec;
  spec.kind = kind;
  spec.shape = shape;
  spec.dtype = DType::kFloat16;
  spec.block_size = block_size;
  spec.num_blocks = kvgen::BlocksFor(tokens, block_size) + 2;
  p.layout = kvgen::BuildPoolLayout(spec);
  p.tokens = tokens;
  p.table = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, tokens, seed);
  for (uint64_t size : p.layout.region_sizes) {
    cuda::DeviceBuffer b = Check(cuda::DeviceBuffer::Allocate(size), "cudaMalloc (pool)");
    if (sample != nullptr) {
      for (uint64_t at = 0; at < size; at += sample->size()) {
        const uint64_t n = std::min<uint64_t>(sample->size(), size - at);
        Check(cuda::CopyToDevice(b.data() + at, sample->data(), n), "upload");
      }
    } else {
      Check(cuda::FillDevice(b.data(), 0, size), "memset");
    }
    p.regions.push_back({b.data(), size});
    p.buffers.push_back(std::move(b));
  }
  return p;
}

std::vector<uint8_t> MakeSample(const ModelShape& shape, uint64_t bytes, uint64_t seed) {
  std::vector<uint8_t> out(bytes / 256 * 256);
  auto* v = reinterpret_cast<uint16_t*>(out.data());
  const uint64_t n = out.size() / 2;
  Lcg rng(seed);
  for (uint64_t row = 0; row * shape.head_dim < n; ++row) {
    // log-normal-ish magnitude, 1 row in 64 a large "sink" row.
    const float u = Symmetric(rng) + Symmetric(rng) + Symmetric(rng);
    float magnitude = std::exp(0.6f * u);
    if (rng.Next() % 64 == 0) magnitude *= 6.0f;
    for (uint32_t c = 0; c < shape.head_dim && row * shape.head_dim + c < n; ++c) {
      float x = magnitude * (Symmetric(rng) + Symmetric(rng));
      if (c == 5 || c == 77 % shape.head_dim) x += 8.0f;
      v[row * shape.head_dim + c] = FloatToHalfRne(x);
    }
  }
  return out;
}

struct Row {
  std::string model, scoring;
  uint32_t tokens = 0;
  double budget = 0;
  double read_gb = 0, payload_gb = 0;
  double copy_gbps = 0;
  Timing score, pack, unpack_verify, unpack_verified;
  double plan_ms = 0;
  // Planning on the device (second table).
  Timing device_plan, score_and_plan, e2e_device;
  double score_then_plan_ms = 0;  // wall: Score (scores to the host) + PlanTiers
  double e2e_host_ms = 0;         // wall: Score + PlanTiers + prelude upload + PackLayers
  double floor_ms = 0;
  bool tensor = false;
};

int Run(int argc, char** argv) {
  std::vector<std::string> models = {"llama3-8b", "qwen2.5-7b"};
  std::vector<uint32_t> token_counts = {4096, 16384, 32768};
  std::vector<double> budgets = {0.3, 0.5};
  std::vector<std::string> scorings = {"key_norm", "attention"};
  uint32_t window = 32, small_tokens = 256;
  int warmup = 2, reps = 7;
  uint64_t copy_mb = 1024;
  std::string out_path;
  bool self_test = true;
  CLI::App app{"CUDA codec throughput vs a device-to-device copy (docs/BENCHMARKS.md)"};
  app.add_option("--models", models, "KV shapes")->capture_default_str();
  app.add_option("--tokens", token_counts, "Token counts")->capture_default_str();
  app.add_option("--budgets", budgets, "3-tier element budgets")->capture_default_str();
  app.add_option("--scorings", scorings, "key_norm and/or attention")->capture_default_str();
  app.add_option("--window", window, "Attention window queries")->capture_default_str();
  app.add_option("--small-tokens", small_tokens, "Small-transfer case (0: none)")
      ->capture_default_str();
  app.add_option("--warmup", warmup, "Untimed runs per step")->capture_default_str();
  app.add_option("--reps", reps, "Timed runs per step (median)")->capture_default_str();
  app.add_option("--copy-mb", copy_mb, "Size of the baseline copy")->capture_default_str();
  app.add_option("--out", out_path, "Also write the markdown table here");
  app.add_flag("!--no-self-test", self_test, "Skip the codec's self-test (diagnosis only)");
  CLI11_PARSE(app, argc, argv);

  const cuda::DeviceInfo info = Check(cuda::GetDeviceInfo(), "device");
  std::unique_ptr<CudaCodec> codec = Check(CudaCodec::Create(), "CudaCodec::Create");
  if (self_test) Check(codec->SelfTest(), "self-test");

  // The copy baseline, same run: cudaMemcpyAsync device to device, bytes read + written.
  const uint64_t copy_bytes = copy_mb << 20;
  cuda::DeviceBuffer ca = Check(cuda::DeviceBuffer::Allocate(copy_bytes), "cudaMalloc");
  cuda::DeviceBuffer cb = Check(cuda::DeviceBuffer::Allocate(copy_bytes), "cudaMalloc");
  Check(cuda::FillDevice(ca.data(), 1, copy_bytes), "memset");
  const double copy_ms =
      Check(cuda::TimeDeviceCopyMs(cb.data(), ca.data(), copy_bytes, 3, 21), "copy baseline");
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  ca = cuda::DeviceBuffer();
  cb = cuda::DeviceBuffer();

  std::vector<std::string> lines;
  auto emit = [&](const std::string& s) {
    std::printf("%s\n", s.c_str());
    std::fflush(stdout);
    lines.push_back(s);
  };
  emit(
      absl::StrFormat("Card: %s (%d SMs, L2 %u MB). Copy baseline: %.0f GB/s (read + write, "
                      "%u MiB cudaMemcpyAsync D2D, median of 21).",
                      info.name, info.multiprocessors, info.l2_bytes >> 20, copy_gbps, copy_mb));
  emit("");
  emit(
      "| model | tokens | scoring | b | R+W GB | score ms | pack ms | pack GB/s | pack/copy | "
      "(score+pack)/floor | unpack ms | unpack GB/s | unpack/copy | unpack (pre-verified) "
      "/copy | plan ms (host) |");
  emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");

  std::vector<Row> plan_rows;
  for (const std::string& model : models) {
    const ModelShape shape = *kvgen::LookupModelShape(model);
    const uint32_t q_heads = model == "qwen2.5-7b" ? 28 : 32;
    std::vector<uint32_t> counts = token_counts;
    if (small_tokens > 0) counts.insert(counts.begin(), small_tokens);
    const uint64_t sample_bytes = uint64_t{4096} * shape.Fp16BytesPerToken() / shape.num_layers;
    const std::vector<uint8_t> sample = MakeSample(shape, sample_bytes, 7);
    for (uint32_t n : counts) {
      DevicePool src = MakeDevicePool(kvgen::PoolLayoutKind::kVllmNhd, shape, 16, n, &sample, 1);
      DevicePool dst = MakeDevicePool(kvgen::PoolLayoutKind::kVllmHnd, shape, 32, n, nullptr, 2);
      const double read_bytes = double(n) * double(shape.Fp16BytesPerToken());
      std::vector<float> queries(uint64_t{shape.num_layers} * window * q_heads * shape.head_dim);
      Lcg qrng(11);
      for (float& q : queries) q = Symmetric(qrng) + Symmetric(qrng);
      for (const std::string& scoring : scorings) {
        ScoreOptions so;
        so.mode = scoring == "attention" ? ScoringMode::kAttention : ScoringMode::kKeyNorm;
        if (so.mode == ScoringMode::kAttention) {
          so.window = std::min(window, n);
          so.num_q_heads = q_heads;
          so.window_queries = std::span<const float>(queries).first(
              uint64_t{shape.num_layers} * so.window * q_heads * shape.head_dim);
        }
        std::vector<float> scores(n);
        cuda::DeviceBuffer device_scores =
            Check(cuda::DeviceBuffer::Allocate(4 * uint64_t{n}), "cudaMalloc (scores)");
        Row base;
        base.model = model;
        base.scoring = scoring;
        base.tokens = n;
        base.copy_gbps = copy_gbps;
        base.read_gb = read_bytes / 1e9;
        base.score = TimeCall(*codec, warmup, reps,
                              [&] { Check(codec->Score(src.View(), so, scores), "score"); });
        base.tensor = codec->last_attention_used_tensor_cores();
        for (double b : budgets) {
          Row r = base;
          r.budget = b;
          PlanOptions po;
          po.budget = b;
          po.scoring = static_cast<uint8_t>(so.mode);
          const TierPlan plan = Check(PlanTiers(shape, DType::kFloat16, n, scores, po), "plan");
          r.plan_ms = TimeWall(warmup, reps, [&] {
            Check(PlanTiers(shape, DType::kFloat16, n, scores, po).status(), "plan");
          });
          // Device planning from device-resident scores (the same scores), checked against the
          // host plan before it is timed.
          Check(cuda::CopyToDevice(device_scores.data(), scores.data(), 4 * uint64_t{n}), "scores");
          const std::span<const float> dev_scores(
              reinterpret_cast<const float*>(device_scores.data()), n);
          if (Check(codec->PlanOnDevice(dev_scores, shape, DType::kFloat16, po), "device plan")
                  .tiers != plan.tiers) {
            Die(absl::InternalError("device plan differs from the host plan"), "device plan");
          }
          r.device_plan = TimeCall(*codec, warmup, reps, [&] {
            Check(codec->PlanOnDevice(dev_scores, shape, DType::kFloat16, po).status(), "plan");
          });
          cuda::DeviceBuffer payload =
              Check(cuda::DeviceBuffer::Allocate(plan.layout.total_bytes), "cudaMalloc (payload)");
          std::vector<uint8_t> prelude(plan.layout.prelude_bytes);
          WritePrelude(plan.layout, plan.tiers, prelude);
          Check(cuda::CopyToDevice(payload.data(), prelude.data(), prelude.size()), "prelude");
          r.payload_gb = plan.layout.total_bytes / 1e9;
          r.pack = TimeCall(*codec, warmup, reps, [&] {
            Check(codec->PackLayers(src.View(), plan, 0, shape.num_layers, payload.span()), "pack");
          });
          const ParsedPrelude parsed =
              Check(ParsePrelude(prelude, plan.layout.total_bytes), "parse");
          r.unpack_verify = TimeCall(*codec, warmup, reps, [&] {
            Check(codec->UnpackLayers(parsed, payload.span(), dst.View(), 0, shape.num_layers,
                                      VerifyMode::kVerify),
                  "unpack");
          });
          r.unpack_verified = TimeCall(*codec, warmup, reps, [&] {
            Check(codec->UnpackLayers(parsed, payload.span(), dst.View(), 0, shape.num_layers,
                                      VerifyMode::kAlreadyVerified),
                  "unpack");
          });
          // The whole sender path, before (host planning between score and pack) and after
          // (ScorePlanPack: no host round trip); the two payloads must be identical.
          cuda::DeviceBuffer payload2 =
              Check(cuda::DeviceBuffer::Allocate(plan.layout.total_bytes), "cudaMalloc (payload)");
          std::vector<float> scores2(n);
          std::vector<uint8_t> prelude2(plan.layout.prelude_bytes);
          r.e2e_host_ms = TimeWall(warmup, reps, [&] {
            Check(codec->Score(src.View(), so, scores2), "score");
            const TierPlan p = Check(PlanTiers(shape, DType::kFloat16, n, scores2, po), "plan");
            WritePrelude(p.layout, p.tiers, prelude2);
            Check(cuda::CopyToDevice(payload2.data(), prelude2.data(), prelude2.size()), "prelude");
            Check(codec->PackLayers(src.View(), p, 0, shape.num_layers, payload2.span()), "pack");
          });
          r.score_then_plan_ms = TimeWall(warmup, reps, [&] {
            Check(codec->Score(src.View(), so, scores2), "score");
            Check(PlanTiers(shape, DType::kFloat16, n, scores2, po).status(), "plan");
          });
          r.score_and_plan = TimeCall(*codec, warmup, reps, [&] {
            Check(codec->ScoreAndPlan(src.View(), so, po).status(), "score and plan");
          });
          r.e2e_device = TimeCall(*codec, warmup, reps, [&] {
            Check(codec->ScorePlanPack(src.View(), so, po, payload.span()).status(), "e2e");
          });
          {
            std::vector<uint8_t> a(plan.layout.total_bytes), b2(plan.layout.total_bytes);
            Check(cuda::CopyToHost(a.data(), payload.data(), a.size()), "download");
            Check(cuda::CopyToHost(b2.data(), payload2.data(), b2.size()), "download");
            if (a != b2) {
              Die(absl::InternalError("ScorePlanPack payload differs from the host-planned one"),
                  "e2e");
            }
          }
          const double w = double(plan.layout.total_bytes);
          const uint64_t kept = n - plan.layout.total_counts[Tier::kDrop] /
                                        std::max<uint32_t>(1, plan.desc.num_maps());
          const double written = double(kept) * double(shape.Fp16BytesPerToken());
          const double pack_gbps = (read_bytes + w) / (r.pack.device_ms * 1e-3) / 1e9;
          const double unpack_gbps = (w + written) / (r.unpack_verify.device_ms * 1e-3) / 1e9;
          const double unpack2_gbps = (w + written) / (r.unpack_verified.device_ms * 1e-3) / 1e9;
          const double floor_ms = (read_bytes + w) / (copy_gbps * 1e9) * 1e3;
          r.floor_ms = floor_ms;
          plan_rows.push_back(r);
          emit(absl::StrFormat(
              "| %s | %u | %s%s | %.1f | %.3f | %.3f (%.3f) | %.3f (%.3f) | %.0f | %.2f | %.2f | "
              "%.3f (%.3f) | %.0f | %.2f | %.2f | %.1f |",
              model, n, scoring,
              so.mode == ScoringMode::kAttention ? (r.tensor ? " (TC)" : " (CC)") : "", b,
              (read_bytes + w) / 1e9, r.score.device_ms, r.score.wall_ms, r.pack.device_ms,
              r.pack.wall_ms, pack_gbps, pack_gbps / copy_gbps,
              (r.score.device_ms + r.pack.device_ms) / floor_ms, r.unpack_verify.device_ms,
              r.unpack_verify.wall_ms, unpack_gbps, unpack_gbps / copy_gbps,
              unpack2_gbps / copy_gbps, r.plan_ms));
        }
      }
    }
  }
  emit("");
  emit(
      "Times are device times from CUDA events (wall time of the whole synchronous call in "
      "parentheses). R+W: FP16 K and V read plus payload written; the byte floor is R+W over the "
      "copy bandwidth. TC/CC: attention on tensor cores / CUDA cores.");
  emit("");
  emit(
      "| model | tokens | scoring | b | plan: host ms | plan: device ms | host/device | "
      "score+plan: "
      "host-planned ms | score+plan: ScoreAndPlan ms | e2e: host-planned ms | e2e: "
      "ScorePlanPack ms | e2e before/after | e2e (device)/floor |");
  emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
  for (const Row& r : plan_rows) {
    emit(absl::StrFormat(
        "| %s | %u | %s | %.1f | %.3f | %.3f (%.3f) | %.1f | %.3f | %.3f (%.3f) | %.3f | "
        "%.3f (%.3f) | %.2f | %.2f |",
        r.model, r.tokens, r.scoring, r.budget, r.plan_ms, r.device_plan.device_ms,
        r.device_plan.wall_ms, r.plan_ms / r.device_plan.wall_ms, r.score_then_plan_ms,
        r.score_and_plan.device_ms, r.score_and_plan.wall_ms, r.e2e_host_ms, r.e2e_device.device_ms,
        r.e2e_device.wall_ms, r.e2e_host_ms / r.e2e_device.wall_ms,
        r.e2e_device.device_ms / r.floor_ms));
  }
  emit("");
  emit(
      "Planning table: wall medians unless marked; device times (CUDA events) with the wall time "
      "in parentheses. plan: host = PlanTiers on host scores, device = PlanOnDevice on the same "
      "scores in device memory (tiers copied back; checked identical). score+plan: Score (scores "
      "to the host) then PlanTiers, vs ScoreAndPlan (ranked on the device, tier codes back). e2e: "
      "Score + PlanTiers + prelude upload + PackLayers, vs ScorePlanPack (one call, no host "
      "round trip; payloads checked identical). floor: R+W over the copy bandwidth.");
  if (!out_path.empty()) {
    FILE* f = std::fopen(out_path.c_str(), "w");
    if (f != nullptr) {
      for (const std::string& s : lines) std::fprintf(f, "%s\n", s.c_str());
      std::fclose(f);
    }
  }
  return 0;
}

}  // namespace
}  // namespace spectrumkv

int main(int argc, char** argv) { return spectrumkv::Run(argc, argv); }
