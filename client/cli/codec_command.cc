#include "client/cli/codec_command.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/model_shapes.h"
#include "client/kvgen/npy.h"
#include "client/kvgen/synthetic.h"
#include "common/exit_codes.h"
#include "common/lcg.h"
#include "common/status.h"
#include "kernels/api/codec.h"
#include "kernels/registry/codec_registry.h"
#include "nlohmann/json.hpp"

namespace spectrumkv {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

template <typename T>
absl::StatusOr<T> ParseOr(std::optional<T> parsed, const char* what, const std::string& value) {
  if (!parsed) return absl::InvalidArgumentError(absl::StrFormat("unknown %s '%s'", what, value));
  return *parsed;
}

// Per-tier reconstruction error between two buffers of the same shape.
void MeasureErrors(const KvBuffer& src, const KvBuffer& dst, const TierPlan& plan,
                   CodecReport* report) {
  const ModelShape& s = plan.desc.shape;
  const DType dtype = plan.desc.dtype;
  struct Acc {
    double err2 = 0, ref2 = 0, max_abs = 0;
    uint64_t rows = 0;
  };
  std::array<std::array<Acc, 2>, kNumTiers> acc{};
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    const std::span<const uint8_t> tiers = plan.MapTiers(plan.desc.MapForLayer(l));
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < plan.desc.num_tokens; ++t) {
        if (tiers[t] == static_cast<uint8_t>(Tier::kDrop)) continue;
        Acc& a = acc[tiers[t]][kind];
        for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
          const uint16_t* x = HostRowPtr(src, l, kind == 1, t, h);
          const uint16_t* y = HostRowPtr(dst, l, kind == 1, t, h);
          for (uint32_t c = 0; c < s.head_dim; ++c) {
            const double xv = ToFloat(dtype, x[c]), d = ToFloat(dtype, y[c]) - xv;
            a.err2 += d * d;
            a.ref2 += xv * xv;
            a.max_abs = std::max(a.max_abs, std::fabs(d));
          }
          ++a.rows;
        }
      }
    }
  }
  for (int t = 0; t < kNumTiers; ++t) {
    for (int k = 0; k < 2; ++k) {
      const Acc& a = acc[t][k];
      TierError& e = report->errors[t][k];
      e.rows = a.rows;
      e.rel_l2 = a.ref2 > 0 ? std::sqrt(a.err2 / a.ref2) : 0.0;
      e.max_abs = a.max_abs;
    }
  }
}

std::string Bytes(double b) {
  if (b >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  if (b >= 1e6) return absl::StrFormat("%.1f MB", b / 1e6);
  if (b >= 1e3) return absl::StrFormat("%.1f kB", b / 1e3);
  return absl::StrFormat("%.0f B", b);
}

nlohmann::json ReportJson(const CodecCommandOptions& o, const CodecReport& r) {
  nlohmann::json j;
  j["backend"] = r.backend;
  j["model"] = r.model;
  j["layers"] = r.shape.num_layers;
  j["kv_heads"] = r.shape.num_kv_heads;
  j["head_dim"] = r.shape.head_dim;
  j["dtype"] = DTypeName(r.dtype);
  j["tokens"] = r.tokens;
  j["policy"] = o.policy;
  j["scoring"] = o.scoring;
  j["quantizer"] = o.quantizer;
  j["payload_quantizer"] = r.payload_quantizer;
  j["budget"] = {{"requested", o.budget}, {"kind", o.budget_kind}};
  j["src_layout"] = absl::StrFormat("%s/%u", o.src_layout, o.src_block_size);
  j["dst_layout"] = absl::StrFormat("%s/%u", o.dst_layout, o.dst_block_size);
  j["element_budget"] = r.element_budget;
  j["wire_budget"] = r.wire_budget;
  j["fp16_bytes"] = r.fp16_bytes;
  j["wire_bytes"] = r.wire_bytes;
  const double element_bytes = r.element_budget * static_cast<double>(r.fp16_bytes);
  j["metadata_bytes"] = static_cast<double>(r.wire_bytes) - element_bytes;
  j["bytes_saved"] = static_cast<int64_t>(r.fp16_bytes) - static_cast<int64_t>(r.wire_bytes);
  j["saved_fraction"] = 1.0 - r.wire_budget;
  j["tier_maps"] = r.num_maps;
  j["tiers"] = {{"fp16", r.counts[Tier::kFp16]},
                {"int8", r.counts[Tier::kInt8]},
                {"int4", r.counts[Tier::kInt4]},
                {"drop", r.counts[Tier::kDrop]}};
  j["dropped_positions"] = r.dropped_positions;
  nlohmann::json err;
  for (int t = 0; t < 3; ++t) {
    nlohmann::json e;
    for (int k = 0; k < 2; ++k) {
      const TierError& te = r.errors[t][k];
      e[k == 0 ? "k" : "v"] = {{"rows", te.rows}, {"rel_l2", te.rel_l2}, {"max_abs", te.max_abs}};
    }
    err[std::string(TierName(static_cast<Tier>(t)))] = e;
  }
  j["error"] = err;
  j["timing_s"] = {
      {"score", r.score_s}, {"plan", r.plan_s}, {"pack", r.pack_s}, {"unpack", r.unpack_s}};
  const double fp16 = static_cast<double>(r.fp16_bytes);
  j["throughput_gbps"] = {{"pack", r.pack_s > 0 ? fp16 / r.pack_s / 1e9 : 0.0},
                          {"unpack", r.unpack_s > 0 ? fp16 / r.unpack_s / 1e9 : 0.0}};
  j["repeat"] = o.repeat;
  return j;
}

void PrintText(const CodecCommandOptions& o, const CodecReport& r) {
  const double fp16 = static_cast<double>(r.fp16_bytes), wire = static_cast<double>(r.wire_bytes);
  std::printf("SpectrumKV codec round trip (backend %s: %s)\n", r.backend.c_str(),
              r.backend_reason.c_str());
  std::printf("  model      %s: %u layers, %u KV heads, head_dim %u, %s, %u tokens\n",
              r.model.c_str(), r.shape.num_layers, r.shape.num_kv_heads, r.shape.head_dim,
              DTypeName(r.dtype), r.tokens);
  std::printf("  method     policy %s, scoring %s, quantizer %s%s, %s budget %.4g%s\n",
              o.policy.c_str(), o.scoring.c_str(), o.quantizer.c_str(),
              r.payload_quantizer != o.quantizer ? " (an absmax payload: this plan is not "
                                                   "progressive)"
                                                 : "",
              o.budget_kind.c_str(), o.budget, r.num_maps > 1 ? " (per-layer tier maps)" : "");
  std::printf("  layouts    %s/%u -> %s/%u\n", o.src_layout.c_str(), o.src_block_size,
              o.dst_layout.c_str(), o.dst_block_size);
  std::printf("  tiers      fp16 %u  int8 %u  int4 %u  drop %u%s\n", r.counts[Tier::kFp16],
              r.counts[Tier::kInt8], r.counts[Tier::kInt4], r.counts[Tier::kDrop],
              r.num_maps > 1 ? " (summed over layers)" : "");
  std::printf("  budget     element %.4f  wire %.4f (scales, tier maps and headers counted)\n",
              r.element_budget, r.wire_budget);
  std::printf("  bytes      fp16 %s  wire %s  saved %s (%.1f%%)\n", Bytes(fp16).c_str(),
              Bytes(wire).c_str(), Bytes(fp16 - wire).c_str(), 100.0 * (1.0 - wire / fp16));
  std::printf("  error      tier   rows(K)     K rel-L2   K max-abs   V rel-L2   V max-abs\n");
  for (int t = 0; t < 3; ++t) {
    const TierError& k = r.errors[t][0];
    const TierError& v = r.errors[t][1];
    if (k.rows == 0) continue;
    std::printf("             %-5s %9llu   %9.3e   %9.3e   %9.3e   %9.3e\n",
                std::string(TierName(static_cast<Tier>(t))).c_str(),
                static_cast<unsigned long long>(k.rows), k.rel_l2, k.max_abs, v.rel_l2, v.max_abs);
  }
  if (r.dropped_positions > 0) {
    std::printf("             dropped positions reported to the decode side: %llu\n",
                static_cast<unsigned long long>(r.dropped_positions));
  }
  std::printf(
      "  timing     score %.1f ms  plan %.1f ms  pack %.1f ms (%.2f GB/s)  unpack %.1f ms "
      "(%.2f GB/s)%s\n",
      r.score_s * 1e3, r.plan_s * 1e3, r.pack_s * 1e3, r.pack_s > 0 ? fp16 / r.pack_s / 1e9 : 0.0,
      r.unpack_s * 1e3, r.unpack_s > 0 ? fp16 / r.unpack_s / 1e9 : 0.0,
      o.repeat > 1 ? absl::StrFormat(" (median of %u)", o.repeat).c_str() : "");
}

}  // namespace

absl::StatusOr<CodecReport> RunCodecRoundTrip(const CodecCommandOptions& o) {
  CodecReport report;
  SPECTRUMKV_ASSIGN_OR_RETURN(const Policy policy,
                              ParseOr(ParsePolicy(o.policy), "policy", o.policy));
  SPECTRUMKV_ASSIGN_OR_RETURN(const ScoringMode scoring,
                              ParseOr(ParseScoringMode(o.scoring), "scoring mode", o.scoring));
  SPECTRUMKV_ASSIGN_OR_RETURN(const Quantizer quantizer,
                              ParseOr(ParseQuantizer(o.quantizer), "quantizer", o.quantizer));
  SPECTRUMKV_ASSIGN_OR_RETURN(
      const kvgen::PoolLayoutKind src_kind,
      ParseOr(kvgen::ParsePoolLayoutKind(o.src_layout), "layout", o.src_layout));
  SPECTRUMKV_ASSIGN_OR_RETURN(
      const kvgen::PoolLayoutKind dst_kind,
      ParseOr(kvgen::ParsePoolLayoutKind(o.dst_layout), "layout", o.dst_layout));
  SPECTRUMKV_ASSIGN_OR_RETURN(const BackendChoice backend,
                              ParseOr(ParseBackendChoice(o.backend), "backend", o.backend));
  if (o.budget_kind != "element" && o.budget_kind != "wire") {
    return absl::InvalidArgumentError("--budget-kind must be element or wire");
  }
  if (o.on_unreachable != "drop" && o.on_unreachable != "reject") {
    return absl::InvalidArgumentError("--on-unreachable must be drop or reject");
  }
  if (o.repeat == 0 || o.repeat > 100) {
    return absl::InvalidArgumentError("--repeat must be in [1, 100]");
  }
  if (o.src_block_size == 0 || o.dst_block_size == 0) {
    return absl::InvalidArgumentError("block sizes must be at least 1");
  }

  // Source KV: a file, or a synthetic cache of a named shape.
  kvgen::DenseKv dense;
  if (!o.kv_file.empty()) {
    SPECTRUMKV_ASSIGN_OR_RETURN(dense, kvgen::ReadNpy(o.kv_file, o.kv_file_bf16));
    report.model = o.kv_file;
    report.shape = dense.shape;
    report.dtype = dense.dtype;
    report.tokens = dense.num_tokens;
  } else {
    const std::optional<ModelShape> shape = kvgen::LookupModelShape(o.model);
    if (!shape) {
      return absl::InvalidArgumentError(
          absl::StrFormat("unknown model '%s' (known: %s)", o.model,
                          absl::StrJoin(kvgen::ModelShapeNames(), ", ")));
    }
    if (o.dtype != "fp16" && o.dtype != "bf16") {
      return absl::InvalidArgumentError("--dtype must be fp16 or bf16");
    }
    if (o.tokens == 0 || o.tokens > kMaxTokens) {
      return absl::InvalidArgumentError(absl::StrFormat("--tokens must be in [1, %u]", kMaxTokens));
    }
    report.model = o.model;
    report.shape = *shape;
    report.dtype = o.dtype == "fp16" ? DType::kFloat16 : DType::kBFloat16;
    report.tokens = o.tokens;
  }
  const uint32_t n = report.tokens;

  auto make_pool =
      [&](kvgen::PoolLayoutKind kind, uint32_t block_size, uint64_t seed,
          std::vector<uint32_t>* table) -> absl::StatusOr<std::unique_ptr<kvgen::HostPool>> {
    kvgen::PoolSpec spec;
    spec.kind = kind;
    spec.shape = report.shape;
    spec.dtype = report.dtype;
    spec.block_size = block_size;
    spec.num_blocks = kvgen::BlocksFor(n, block_size) + 3;  // spare blocks: a real pool is shared
    SPECTRUMKV_ASSIGN_OR_RETURN(auto pool, kvgen::HostPool::Create(spec));
    *table = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, n, seed);
    return pool;
  };
  std::vector<uint32_t> src_table, dst_table;
  SPECTRUMKV_ASSIGN_OR_RETURN(auto src_pool,
                              make_pool(src_kind, o.src_block_size, o.seed, &src_table));
  SPECTRUMKV_ASSIGN_OR_RETURN(auto dst_pool,
                              make_pool(dst_kind, o.dst_block_size, o.seed + 1, &dst_table));
  const KvBuffer src = src_pool->View(src_table, n);
  const KvBuffer dst = dst_pool->View(dst_table, n);
  if (!o.kv_file.empty()) {
    kvgen::CopyDenseToBuffer(dense, src);
    dense.data = {};
  } else {
    kvgen::SyntheticOptions syn;
    syn.seed = o.seed;
    syn.outlier_channels = o.outlier_channels;
    kvgen::FillSynthetic(src, syn);
  }

  // The pools here are host memory: a device backend is not an option.
  SPECTRUMKV_ASSIGN_OR_RETURN(BackendSelection selection,
                              CreateCodec(backend, CodecRequirements{.host_memory_only = true}));
  Codec& codec = *selection.codec;
  report.backend = std::string(codec.name());
  report.backend_reason = selection.reason;

  ScoreOptions score_options;
  score_options.mode = scoring;
  std::vector<float> queries, external;
  if (scoring == ScoringMode::kAttention) {
    score_options.window = std::min(o.window, n);
    score_options.num_q_heads = o.q_heads ? o.q_heads : 4 * report.shape.num_kv_heads;
    score_options.pool_kernel = o.pool_kernel;
    score_options.recency_decay = o.recency_decay;
    if (score_options.num_q_heads % report.shape.num_kv_heads != 0) {
      return absl::InvalidArgumentError("--q-heads must be a multiple of the KV heads");
    }
    queries =
        kvgen::SyntheticWindowQueries(src, score_options.window, score_options.num_q_heads, o.seed);
    score_options.window_queries = queries;
  } else if (scoring == ScoringMode::kExternal) {
    // No frontend here: stand-in scores, seeded, so the external path is exercised end to end.
    external.resize(n);
    Lcg rng(o.seed);
    for (float& s : external) s = rng.Unit();
    score_options.external_scores = external;
  }

  PlanOptions plan_options;
  plan_options.policy = policy;
  plan_options.budget = o.budget;
  plan_options.budget_kind = o.budget_kind == "wire" ? BudgetKind::kWire : BudgetKind::kElement;
  plan_options.on_unreachable =
      o.on_unreachable == "reject" ? OnUnreachable::kReject : OnUnreachable::kDrop;
  plan_options.sink_tokens = o.sinks;
  plan_options.first_ratio = o.first_ratio;
  plan_options.seed = o.seed;
  plan_options.per_layer = o.per_layer || o.layer_slope != 0.0;
  plan_options.layer_slope = o.layer_slope;
  plan_options.quantizer = quantizer;
  plan_options.scoring = static_cast<uint8_t>(scoring);

  std::vector<double> score_t, plan_t, pack_t, unpack_t;
  std::vector<float> scores(n);
  TierPlan plan;
  std::vector<uint8_t> payload;
  UnpackResult unpacked;
  for (uint32_t r = 0; r < o.repeat; ++r) {
    const auto t0 = Clock::now();
    SPECTRUMKV_RETURN_IF_ERROR(codec.Score(src, score_options, scores));
    const auto t1 = Clock::now();
    SPECTRUMKV_ASSIGN_OR_RETURN(plan,
                                PlanTiers(report.shape, report.dtype, n, scores, plan_options));
    const auto t2 = Clock::now();
    // A staging buffer reused across repetitions, as the daemon reuses its staging pool: the
    // first touch of fresh pages is not the codec's cost.
    if (payload.size() != plan.layout.total_bytes) payload.assign(plan.layout.total_bytes, 0);
    const auto t2c = Clock::now();
    SPECTRUMKV_RETURN_IF_ERROR(PackPayloadInto(codec, src, plan, payload));
    const auto t3 = Clock::now();
    SPECTRUMKV_ASSIGN_OR_RETURN(unpacked, UnpackPayload(codec, payload, dst, payload.size()));
    const auto t4 = Clock::now();
    score_t.push_back(Seconds(t0, t1));
    plan_t.push_back(Seconds(t1, t2));
    pack_t.push_back(Seconds(t2c, t3));
    unpack_t.push_back(Seconds(t3, t4));
  }
  report.score_s = Median(score_t);
  report.plan_s = Median(plan_t);
  report.pack_s = Median(pack_t);
  report.unpack_s = Median(unpack_t);

  if (!o.save_payload.empty()) {
    std::ofstream out(o.save_payload, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(payload.data()),
              static_cast<std::streamsize>(payload.size()));
    if (!out) return absl::PermissionDeniedError("cannot write " + o.save_payload);
  }

  report.counts = plan.layout.total_counts;
  report.num_maps = plan.desc.num_maps();
  report.payload_quantizer =
      o.quantizer == "progressive" && !plan.desc.progressive() ? "absmax" : o.quantizer;
  report.element_budget = plan.ElementBudget();
  report.wire_budget = plan.WireBudget();
  report.fp16_bytes = uint64_t{n} * report.shape.Fp16BytesPerToken();
  report.wire_bytes = payload.size();
  for (const auto& d : unpacked.dropped) report.dropped_positions += d.size();
  MeasureErrors(src, dst, plan, &report);
  return report;
}

void AddCodecCommand(CLI::App& app, int* exit_code) {
  auto o = std::make_shared<CodecCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "codec",
      "Pack and unpack a KV cache through the real codec (synthetic KV of a named model shape, "
      "or a .npy file) and report budgets, bytes saved, tier counts, reconstruction error per "
      "tier and throughput.");
  cmd->add_option("--model", o->model,
                  "Synthetic KV shape: " + absl::StrJoin(kvgen::ModelShapeNames(), ", "))
      ->capture_default_str();
  cmd->add_option("--kv-file", o->kv_file,
                  ".npy KV [layers, 2, tokens, kv_heads, head_dim] (fp16 '<f2'; bf16 bit "
                  "patterns '<u2' with --kv-file-bf16); replaces --model and --tokens");
  cmd->add_flag("--kv-file-bf16", o->kv_file_bf16, "The --kv-file holds bfloat16 bit patterns");
  cmd->add_option("--tokens", o->tokens, "Prompt tokens")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "Synthetic KV dtype: fp16 or bf16")->capture_default_str();
  cmd->add_option("--budget", o->budget, "Budget as a fraction of the FP16 KV bytes, in (0, 1]")
      ->capture_default_str();
  cmd->add_option("--budget-kind", o->budget_kind,
                  "element (the paper's b) or wire (every byte on the wire counted)")
      ->capture_default_str();
  cmd->add_option("--policy", o->policy,
                  "3tier, 2tier, sinkprotect, uniform_int8, uniform_int4, pdtrim, random_tier")
      ->capture_default_str();
  cmd->add_option("--scoring", o->scoring,
                  "attention (synthetic window queries), key_norm, external (seeded stand-in "
                  "scores), positional")
      ->capture_default_str();
  cmd->add_option("--quantizer", o->quantizer,
                  "absmax (the paper's per-token-head), kcn (key-channel-normalized INT4) or "
                  "progressive (INT8 as INT4 plus a 4-bit refinement where a plan has INT8 and "
                  "INT4 tokens only, else absmax)")
      ->capture_default_str();
  cmd->add_option("--on-unreachable", o->on_unreachable,
                  "drop (lowest-ranked non-sinks) or reject, when the policy's tiers cannot meet "
                  "the budget")
      ->capture_default_str();
  cmd->add_option("--sinks", o->sinks, "Sink tokens ranked first and never dropped")
      ->capture_default_str();
  cmd->add_option("--first-ratio", o->first_ratio, "pdtrim: share of kept tokens from the front")
      ->capture_default_str();
  cmd->add_flag("--per-layer", o->per_layer, "One tier map per layer");
  cmd->add_option("--layer-slope", o->layer_slope,
                  "Per-layer budgets b + (l - (L-1)/2) * slope (implies --per-layer)")
      ->capture_default_str();
  cmd->add_option("--window", o->window, "attention: window queries per layer")
      ->capture_default_str();
  cmd->add_option("--q-heads", o->q_heads, "attention: query heads (default 4 x KV heads)");
  cmd->add_option("--pool-kernel", o->pool_kernel, "attention: max-pool width (odd)")
      ->capture_default_str();
  cmd->add_option("--recency-decay", o->recency_decay, "attention: recency decay lambda")
      ->capture_default_str();
  cmd->add_option("--src-layout", o->src_layout,
                  "Sender pool layout: " + absl::StrJoin(kvgen::PoolLayoutKindNames(), ", "))
      ->capture_default_str();
  cmd->add_option("--src-block-size", o->src_block_size, "Sender tokens per block")
      ->capture_default_str();
  cmd->add_option("--dst-layout", o->dst_layout, "Receiver pool layout")->capture_default_str();
  cmd->add_option("--dst-block-size", o->dst_block_size, "Receiver tokens per block")
      ->capture_default_str();
  cmd->add_option("--backend", o->backend, "auto, cpu, cpu-scalar or cuda")->capture_default_str();
  cmd->add_option("--outlier-channels", o->outlier_channels,
                  "Synthetic KV: outlier key channels per layer and head")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed of synthetic data, block tables and random_tier")
      ->capture_default_str();
  cmd->add_option("--repeat", o->repeat, "Timed repetitions (medians are reported)")
      ->capture_default_str();
  cmd->add_option("--save-payload", o->save_payload, "Write the payload bytes to this file");
  cmd->add_flag("--json", o->json, "Print one JSON object instead of text");
  cmd->callback([o, exit_code] {
    absl::StatusOr<CodecReport> report = RunCodecRoundTrip(*o);
    if (!report.ok()) {
      std::fprintf(stderr, "spectrumkv codec: %s\n", report.status().ToString().c_str());
      *exit_code =
          report.status().code() == absl::StatusCode::kInvalidArgument ? kExitUsage : kExitFailure;
      return;
    }
    if (o->json) {
      std::printf("%s\n", ReportJson(*o, *report).dump(2).c_str());
    } else {
      PrintText(*o, *report);
    }
    *exit_code = kExitOk;
  });
}

}  // namespace spectrumkv
