// The C API over the codec (spectrumkv_codec.h). Translates C structs into a one-block layout,
// PlanOptions and ScoreOptions, then calls the same functions the daemon calls.
#include "kernels/capi/spectrumkv_codec.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "kernels/api/codec.h"
#include "kernels/api/layout.h"
#include "kernels/api/plan.h"
#include "kernels/registry/codec_registry.h"

struct skv_codec {
  spectrumkv::BackendSelection selection;
  std::string name;  // NUL-terminated copy of the backend name
};

namespace spectrumkv {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

skv_status Report(const absl::Status& status, char* error, size_t error_len) {
  if (error != nullptr && error_len > 0) {
    const std::string message = status.ok() ? std::string() : std::string(status.message());
    const size_t n = std::min(message.size(), error_len - 1);
    std::memcpy(error, message.data(), n);
    error[n] = '\0';
  }
  return static_cast<skv_status>(status.code());
}

// A name parsed by `parse`, or INVALID_ARGUMENT naming the field. NULL means `fallback`.
template <typename T, typename Parse>
absl::StatusOr<T> ParseName(const char* value, const char* field, const char* fallback,
                            Parse parse) {
  const std::string_view name = value != nullptr ? value : fallback;
  const std::optional<T> parsed = parse(name);
  if (!parsed) {
    return absl::InvalidArgumentError(
        absl::StrFormat("options.%s: unknown value '%s'", field, std::string(name)));
  }
  return *parsed;
}

// The dense array described as a layout: one region, one block of num_tokens tokens.
struct DenseView {
  KvLayout layout;
  std::vector<MemoryRegion> src_region, dst_region;
  std::vector<uint32_t> block_table{0};

  KvBuffer Buffer(const std::vector<MemoryRegion>& regions, uint32_t num_tokens) const {
    return KvBuffer{&layout, regions, MemoryKind::kHost, block_table, num_tokens};
  }
};

absl::StatusOr<DType> ParseDType(const char* name) {
  if (name != nullptr && std::string_view(name) == "fp16") return DType::kFloat16;
  if (name != nullptr && std::string_view(name) == "bf16") return DType::kBFloat16;
  return absl::InvalidArgumentError(
      absl::StrFormat("kv.dtype: '%s' is not fp16 or bf16", name ? name : "(null)"));
}

absl::Status CheckMemory(const skv_codec* codec, const skv_dense_kv& kv) {
  const MemoryKind codec_kind = codec->selection.codec->memory_kind();
  if (codec_kind != MemoryKind::kHost) {
    return absl::UnimplementedError(absl::StrFormat(
        "backend %s works on device memory, which this version of the C API does not stage; "
        "use backend cpu",
        std::string(codec->selection.codec->name())));
  }
  if (kv.memory_kind != SKV_MEMORY_HOST) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv.memory_kind: backend %s needs host memory",
                        std::string(codec->selection.codec->name())));
  }
  return absl::OkStatus();
}

// Validates `kv` and builds its layout. `need_dst`: the call unpacks.
absl::StatusOr<std::unique_ptr<DenseView>> MakeView(const skv_dense_kv& kv, bool need_dst) {
  if (kv.num_layers == 0 || kv.num_layers > kMaxLayers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv.num_layers: %u is outside [1, %u]", kv.num_layers, kMaxLayers));
  }
  if (kv.num_kv_heads == 0 || kv.num_kv_heads > kMaxKvHeads) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv.num_kv_heads: %u is outside [1, %u]", kv.num_kv_heads, kMaxKvHeads));
  }
  if (kv.head_dim == 0 || kv.head_dim > kMaxHeadDim || kv.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "kv.head_dim: %u is not a multiple of 8 in [8, %u]", kv.head_dim, kMaxHeadDim));
  }
  if (kv.num_tokens == 0 || kv.num_tokens > kMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("kv.num_tokens: %u is outside [1, %u]", kv.num_tokens, kMaxTokens));
  }
  if (kv.src == nullptr) return absl::InvalidArgumentError("kv.src: null");
  if (need_dst && kv.dst == nullptr) return absl::InvalidArgumentError("kv.dst: null");
  SPECTRUMKV_ASSIGN_OR_RETURN(const DType dtype, ParseDType(kv.dtype));

  // Within the limits above every product fits in 64 bits (< 2^57).
  const uint64_t head_bytes = uint64_t{kv.head_dim} * 2;
  const uint64_t token_bytes = head_bytes * kv.num_kv_heads;
  const uint64_t tensor_bytes = token_bytes * kv.num_tokens;
  const uint64_t total_bytes = tensor_bytes * 2 * kv.num_layers;

  auto view = std::make_unique<DenseView>();
  KvLayout& layout = view->layout;
  layout.shape = ModelShape{kv.num_layers, kv.num_kv_heads, kv.head_dim};
  layout.dtype = dtype;
  layout.block_size = kv.num_tokens;
  layout.num_blocks = 1;
  for (uint32_t l = 0; l < kv.num_layers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      TensorPlacement p;
      p.region = 0;
      p.offset_bytes = (uint64_t{2} * l + kind) * tensor_bytes;
      p.block_stride_bytes = tensor_bytes;
      p.token_stride_bytes = token_bytes;
      p.head_stride_bytes = head_bytes;
      (kind == 0 ? layout.keys : layout.values).push_back(p);
    }
  }
  // The codec never writes through the source view; the region struct is just not const.
  view->src_region.push_back(MemoryRegion{const_cast<void*>(kv.src), total_bytes});
  view->dst_region.push_back(MemoryRegion{need_dst ? kv.dst : nullptr, total_bytes});
  const uint64_t sizes[] = {total_bytes};
  SPECTRUMKV_RETURN_IF_ERROR(ValidateLayout(layout, sizes));
  return view;
}

// ScoreOptions from the C options. `queries`/`external` spans point into the caller's arrays.
// With `scores_given` only the mode is read (the scores were computed before).
absl::StatusOr<ScoreOptions> MakeScoreOptions(const skv_options& o, const skv_dense_kv& kv,
                                              bool scores_given) {
  ScoreOptions s;
  SPECTRUMKV_ASSIGN_OR_RETURN(
      s.mode, ParseName<ScoringMode>(o.scoring, "scoring", "key_norm", ParseScoringMode));
  if (scores_given) return s;
  if (s.mode == ScoringMode::kAttention) {
    if (o.window_queries == nullptr) {
      return absl::InvalidArgumentError("options.window_queries: null with scoring attention");
    }
    if (o.window == 0 || o.window > kv.num_tokens || o.num_q_heads == 0 ||
        o.num_q_heads > 64 * kv.num_kv_heads) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "options.window (%u) or options.num_q_heads (%u) is out of range for %u tokens and %u "
          "KV heads",
          o.window, o.num_q_heads, kv.num_tokens, kv.num_kv_heads));
    }
    const uint64_t count = uint64_t{kv.num_layers} * o.window * o.num_q_heads * kv.head_dim;
    s.window_queries = std::span<const float>(o.window_queries, count);
    s.window = o.window;
    s.num_q_heads = o.num_q_heads;
    s.pool_kernel = o.pool_kernel;
    s.recency_decay = o.recency_decay;
  } else if (s.mode == ScoringMode::kExternal) {
    if (o.external_scores == nullptr) {
      return absl::InvalidArgumentError("options.external_scores: null with scoring external");
    }
    s.external_scores = std::span<const float>(o.external_scores, kv.num_tokens);
  }
  return s;
}

absl::StatusOr<PlanOptions> MakePlanOptions(const skv_options& o, ScoringMode scoring) {
  PlanOptions p;
  SPECTRUMKV_ASSIGN_OR_RETURN(p.policy,
                              ParseName<Policy>(o.policy, "policy", "3tier", ParsePolicy));
  SPECTRUMKV_ASSIGN_OR_RETURN(
      p.quantizer, ParseName<Quantizer>(o.quantizer, "quantizer", "absmax", ParseQuantizer));
  const std::string_view kind = o.budget_kind != nullptr ? o.budget_kind : "element";
  if (kind != "element" && kind != "wire") {
    return absl::InvalidArgumentError(
        absl::StrFormat("options.budget_kind: '%s' is not element or wire", std::string(kind)));
  }
  const std::string_view unreachable = o.on_unreachable != nullptr ? o.on_unreachable : "drop";
  if (unreachable != "drop" && unreachable != "reject") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "options.on_unreachable: '%s' is not drop or reject", std::string(unreachable)));
  }
  p.budget = o.budget;
  p.budget_kind = kind == "wire" ? BudgetKind::kWire : BudgetKind::kElement;
  p.on_unreachable = unreachable == "reject" ? OnUnreachable::kReject : OnUnreachable::kDrop;
  p.sink_tokens = o.sinks;
  p.first_ratio = o.first_ratio;
  p.seed = o.seed;
  p.per_layer = o.per_layer != 0 || o.layer_slope != 0.0;
  p.layer_slope = o.layer_slope;
  p.scoring = static_cast<uint8_t>(scoring);
  return p;
}

absl::Status CheckCommon(const skv_codec* codec, const skv_dense_kv* kv,
                         const skv_options* options) {
  if (codec == nullptr) return absl::InvalidArgumentError("codec: null");
  if (kv == nullptr) return absl::InvalidArgumentError("kv: null");
  if (options == nullptr) return absl::InvalidArgumentError("options: null");
  if (options->struct_size != sizeof(skv_options)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "options.struct_size: %u, but this library's skv_options is %u bytes (C API version %d); "
        "call skv_options_init with a matching header",
        options->struct_size, sizeof(skv_options), SKV_CAPI_VERSION));
  }
  return CheckMemory(codec, *kv);
}

absl::Status Score(skv_codec* codec, const skv_dense_kv* kv, const skv_options* options,
                   float* scores) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckCommon(codec, kv, options));
  if (scores == nullptr) return absl::InvalidArgumentError("scores: null");
  SPECTRUMKV_ASSIGN_OR_RETURN(std::unique_ptr<DenseView> view, MakeView(*kv, false));
  SPECTRUMKV_ASSIGN_OR_RETURN(const ScoreOptions score_options,
                              MakeScoreOptions(*options, *kv, false));
  return codec->selection.codec->Score(view->Buffer(view->src_region, kv->num_tokens),
                                       score_options, std::span<float>(scores, kv->num_tokens));
}

absl::Status RoundTrip(skv_codec* codec, const skv_dense_kv* kv, const skv_options* options,
                       skv_outputs* out) {
  SPECTRUMKV_RETURN_IF_ERROR(CheckCommon(codec, kv, options));
  SPECTRUMKV_ASSIGN_OR_RETURN(std::unique_ptr<DenseView> view, MakeView(*kv, true));
  SPECTRUMKV_ASSIGN_OR_RETURN(
      const ScoreOptions score_options,
      MakeScoreOptions(*options, *kv, options->precomputed_scores != nullptr));
  SPECTRUMKV_ASSIGN_OR_RETURN(const PlanOptions plan_options,
                              MakePlanOptions(*options, score_options.mode));
  Codec& c = *codec->selection.codec;
  const uint32_t n = kv->num_tokens;
  const KvBuffer src = view->Buffer(view->src_region, n);
  const KvBuffer dst = view->Buffer(view->dst_region, n);

  const auto t0 = Clock::now();
  std::vector<float> scores(n);
  if (options->precomputed_scores != nullptr) {
    std::copy(options->precomputed_scores, options->precomputed_scores + n, scores.begin());
  } else {
    SPECTRUMKV_RETURN_IF_ERROR(c.Score(src, score_options, scores));
  }
  const auto t1 = Clock::now();
  SPECTRUMKV_ASSIGN_OR_RETURN(const TierPlan plan, PlanTiers(view->layout.shape, view->layout.dtype,
                                                             n, scores, plan_options));
  const auto t2 = Clock::now();
  SPECTRUMKV_ASSIGN_OR_RETURN(const std::vector<uint8_t> payload, PackPayload(c, src, plan));
  const auto t3 = Clock::now();
  SPECTRUMKV_ASSIGN_OR_RETURN(const UnpackResult unpacked,
                              UnpackPayload(c, payload, dst, payload.size()));
  const auto t4 = Clock::now();

  if (out == nullptr) return absl::OkStatus();
  const uint32_t maps = plan.desc.num_maps();
  if (out->tiers != nullptr) std::copy(plan.tiers.begin(), plan.tiers.end(), out->tiers);
  if (out->scores != nullptr) std::copy(scores.begin(), scores.end(), out->scores);
  uint64_t dropped = 0;
  for (const std::vector<uint32_t>& list : unpacked.dropped) {
    if (out->dropped != nullptr) std::copy(list.begin(), list.end(), out->dropped + dropped);
    dropped += list.size();
  }
  if (out->payload != nullptr && out->payload_capacity >= payload.size()) {
    std::copy(payload.begin(), payload.end(), out->payload);
  }
  out->num_maps = maps;
  for (int t = 0; t < kNumTiers; ++t) out->counts[t] = unpacked.counts.n[t];
  out->num_dropped = dropped;
  out->element_budget = plan.ElementBudget();
  out->wire_budget = plan.WireBudget();
  out->payload_bytes = payload.size();
  out->fp16_bytes = uint64_t{n} * view->layout.shape.Fp16BytesPerToken();
  out->score_s = Seconds(t0, t1);
  out->plan_s = Seconds(t1, t2);
  out->pack_s = Seconds(t2, t3);
  out->unpack_s = Seconds(t3, t4);
  return absl::OkStatus();
}

absl::Status Create(const char* backend, skv_codec** codec) {
  if (codec == nullptr) return absl::InvalidArgumentError("codec: null");
  *codec = nullptr;
  const std::string_view name = backend != nullptr ? backend : "auto";
  const std::optional<BackendChoice> choice = ParseBackendChoice(name);
  if (!choice) {
    return absl::InvalidArgumentError(
        absl::StrFormat("backend: unknown '%s' (auto, cpu, cpu-scalar, cuda)", std::string(name)));
  }
  SPECTRUMKV_ASSIGN_OR_RETURN(BackendSelection selection, CreateCodec(*choice));
  if (*choice == BackendChoice::kAuto && selection.codec->memory_kind() != MemoryKind::kHost) {
    // "auto" means the best backend this API can drive: host memory only for now.
    const std::string skipped(selection.codec->name());
    SPECTRUMKV_ASSIGN_OR_RETURN(selection, CreateCodec(BackendChoice::kCpu));
    selection.reason += " (C API: host memory only, " + skipped + " not used)";
  }
  const std::string backend_name(selection.codec->name());
  *codec = new skv_codec{std::move(selection), backend_name};
  return absl::OkStatus();
}

// Runs `fn`, reporting its status; no exception (std::bad_alloc from a huge request) crosses
// the C boundary.
template <typename Fn>
skv_status Guard(char* error, size_t error_len, Fn fn) {
  try {
    return Report(fn(), error, error_len);
  } catch (const std::bad_alloc&) {
    return Report(absl::ResourceExhaustedError("out of memory"), error, error_len);
  } catch (const std::exception& e) {
    return Report(absl::InternalError(e.what()), error, error_len);
  }
}

}  // namespace
}  // namespace spectrumkv

extern "C" {

int skv_capi_version(void) { return SKV_CAPI_VERSION; }

void skv_options_init(skv_options* options) {
  if (options == nullptr) return;
  std::memset(options, 0, sizeof(*options));
  options->struct_size = sizeof(skv_options);
  options->policy = "3tier";
  options->budget = 0.5;
  options->budget_kind = "element";
  options->on_unreachable = "drop";
  options->sinks = 4;
  options->quantizer = "absmax";
  options->scoring = "key_norm";
  options->pool_kernel = 5;
}

skv_status skv_codec_create(const char* backend, skv_codec** codec, char* error, size_t error_len) {
  return spectrumkv::Guard(error, error_len, [&] { return spectrumkv::Create(backend, codec); });
}

void skv_codec_destroy(skv_codec* codec) { delete codec; }

const char* skv_codec_name(const skv_codec* codec) {
  return codec != nullptr ? codec->name.c_str() : "";
}

const char* skv_codec_reason(const skv_codec* codec) {
  return codec != nullptr ? codec->selection.reason.c_str() : "";
}

skv_memory_kind skv_codec_memory_kind(const skv_codec* codec) {
  return codec != nullptr &&
                 codec->selection.codec->memory_kind() == spectrumkv::MemoryKind::kDevice
             ? SKV_MEMORY_DEVICE
             : SKV_MEMORY_HOST;
}

skv_status skv_score(skv_codec* codec, const skv_dense_kv* kv, const skv_options* options,
                     float* scores, char* error, size_t error_len) {
  return spectrumkv::Guard(error, error_len,
                           [&] { return spectrumkv::Score(codec, kv, options, scores); });
}

skv_status skv_round_trip(skv_codec* codec, const skv_dense_kv* kv, const skv_options* options,
                          skv_outputs* outputs, char* error, size_t error_len) {
  return spectrumkv::Guard(error, error_len,
                           [&] { return spectrumkv::RoundTrip(codec, kv, options, outputs); });
}

}  // extern "C"
