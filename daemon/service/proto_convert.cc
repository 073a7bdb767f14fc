#include "daemon/service/proto_convert.h"

#include <bit>
#include <cmath>
#include <cstring>

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>

#include "absl/hash/hash.h"
#include "absl/strings/str_format.h"
#include "common/half.h"

namespace spectrumkv {
namespace {

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrFormat("%s: %s", field, why));
}

std::string Fingerprint(const google::protobuf::Message& m) {
  std::string bytes;
  google::protobuf::io::StringOutputStream raw(&bytes);
  {
    google::protobuf::io::CodedOutputStream out(&raw);
    out.SetSerializationDeterministic(true);
    m.SerializeToCodedStream(&out);
  }
  return absl::StrFormat("%016x-%u", absl::Hash<std::string>{}(bytes), bytes.size());
}

}  // namespace

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

bool IsValidRequestId(const std::string& id) {
  if (id.empty() || id.size() > 256) return false;
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-' || c == ':' || c == '/';
    if (!ok) return false;
  }
  return true;
}

absl::StatusOr<PoolSpec> PoolSpecFromProto(const v1::RegisterPoolRequest& p) {
  PoolSpec spec;
  spec.pool_id = p.pool_id();
  spec.model = p.model();
  auto layout = LayoutFromProto(p.layout());
  if (!layout.ok()) return layout.status();
  spec.layout = std::move(*layout);
  for (int i = 0; i < p.regions_size(); ++i) {
    const v1::MemoryHandle& h = p.regions(i);
    const std::string field = absl::StrFormat("regions[%d]", i);
    switch (h.kind_case()) {
      case v1::MemoryHandle::kHostShm:
        spec.regions.push_back(HostShmSpec{h.host_shm().name(), h.host_shm().offset_bytes(),
                                           h.host_shm().size_bytes()});
        break;
      case v1::MemoryHandle::kCudaIpc:
        if (h.cuda_ipc().ipc_handle().size() != 64) {
          return Invalid(field + ".cuda_ipc.ipc_handle", "must be 64 bytes");
        }
        if (h.cuda_ipc().device() < 0) return Invalid(field + ".cuda_ipc.device", "negative");
        spec.regions.push_back(CudaIpcSpec{h.cuda_ipc().ipc_handle(), h.cuda_ipc().device(),
                                           h.cuda_ipc().offset_bytes(), h.cuda_ipc().size_bytes()});
        break;
      case v1::MemoryHandle::KIND_NOT_SET:
        return Invalid(field, "set host_shm or cuda_ipc");
    }
  }
  return spec;
}

absl::StatusOr<SendArgs> SendArgsFromProto(const v1::SendRequest& p, const CodecConfig& defaults,
                                           const KvLayout& layout, const ShmReader& read_shm,
                                           uint64_t max_shm_bytes) {
  SendArgs a;
  if (!IsValidRequestId(p.request_id())) {
    return Invalid("request_id", "must be 1-256 characters of [A-Za-z0-9._:/-]");
  }
  if (p.num_tokens() == 0) return Invalid("num_tokens", "must be at least 1");
  if (p.peer().empty() || p.peer().size() > 512) return Invalid("peer", "must be 1-512 bytes");
  a.key = TransferKey{p.request_id(), p.shard()};
  a.pool_id = p.pool_id();
  a.blocks.assign(p.block_ids().begin(), p.block_ids().end());
  a.num_tokens = p.num_tokens();
  a.peer = p.peer();
  a.model = p.model();

  const v1::CompressionOptions& c = p.compression();
  PlanOptions& o = a.plan;
  o.budget = c.has_budget() ? c.budget() : defaults.budget;
  if (!(o.budget > 0.0 && o.budget <= 1.0)) {
    return Invalid("compression.budget", absl::StrFormat("%g is outside (0, 1]", o.budget));
  }
  switch (c.budget_kind()) {
    case v1::BUDGET_KIND_UNSPECIFIED:
      o.budget_kind = defaults.budget_kind == "wire" ? BudgetKind::kWire : BudgetKind::kElement;
      break;
    case v1::BUDGET_KIND_ELEMENT:
      o.budget_kind = BudgetKind::kElement;
      break;
    case v1::BUDGET_KIND_WIRE:
      o.budget_kind = BudgetKind::kWire;
      break;
    default:
      return Invalid("compression.budget_kind", "unknown value");
  }
  if (c.policy() == v1::POLICY_UNSPECIFIED) {
    o.policy = *ParsePolicy(defaults.policy);
  } else if (c.policy() >= 1 && c.policy() <= 7) {
    o.policy = static_cast<Policy>(c.policy());
  } else {
    return Invalid("compression.policy", "unknown value");
  }
  switch (c.quantizer()) {
    case v1::QUANTIZER_UNSPECIFIED:
      o.quantizer = *ParseQuantizer(defaults.quantizer);
      break;
    case v1::QUANTIZER_ABSMAX:
      o.quantizer = Quantizer::kAbsmax;
      break;
    case v1::QUANTIZER_KEY_CHANNEL_NORM:
      o.quantizer = Quantizer::kKeyChannelNorm;
      break;
    case v1::QUANTIZER_PROGRESSIVE:
      o.quantizer = Quantizer::kProgressive;
      break;
    default:
      return Invalid("compression.quantizer", "unknown value");
  }
  switch (c.on_unreachable()) {
    case v1::ON_UNREACHABLE_UNSPECIFIED:
      o.on_unreachable =
          defaults.on_unreachable == "reject" ? OnUnreachable::kReject : OnUnreachable::kDrop;
      break;
    case v1::ON_UNREACHABLE_DROP:
      o.on_unreachable = OnUnreachable::kDrop;
      break;
    case v1::ON_UNREACHABLE_REJECT:
      o.on_unreachable = OnUnreachable::kReject;
      break;
    default:
      return Invalid("compression.on_unreachable", "unknown value");
  }
  o.sink_tokens = c.has_sink_tokens() ? c.sink_tokens() : defaults.sink_tokens;
  if (o.sink_tokens > kMaxTokens) return Invalid("compression.sink_tokens", "too large");
  o.first_ratio = c.has_first_ratio() ? c.first_ratio() : 0.0;
  if (!(o.first_ratio >= 0.0 && o.first_ratio <= 1.0)) {
    return Invalid("compression.first_ratio", "must be in [0, 1]");
  }
  if (c.has_layer_slope()) {
    if (!std::isfinite(c.layer_slope())) return Invalid("compression.layer_slope", "not finite");
    o.per_layer = true;
    o.layer_slope = c.layer_slope();
  }
  o.seed = c.seed();

  // Scoring inputs.
  const v1::ScoringInputs& s = p.scoring();
  ScoringMode mode;
  switch (s.mode()) {
    case v1::SCORING_UNSPECIFIED:
      if (s.has_window_queries()) {
        mode = ScoringMode::kAttention;
      } else if (s.token_scores_size() > 0) {
        mode = ScoringMode::kExternal;
      } else {
        mode = *ParseScoringMode(defaults.scoring);
      }
      break;
    case v1::SCORING_ATTENTION:
    case v1::SCORING_KEY_NORM:
    case v1::SCORING_EXTERNAL:
    case v1::SCORING_POSITIONAL:
      mode = static_cast<ScoringMode>(s.mode());
      break;
    default:
      return Invalid("scoring.mode", "unknown value");
  }
  a.scoring = mode;
  if (mode == ScoringMode::kAttention) {
    if (!s.has_window_queries()) {
      return Invalid("scoring.window_queries", "required for SCORING_ATTENTION");
    }
    const v1::WindowQueries& w = s.window_queries();
    a.window = w.window();
    a.num_q_heads = w.num_q_heads();
    a.pool_kernel = w.pool_kernel() == 0 ? 5 : w.pool_kernel();
    a.recency_decay = w.recency_decay();
    if (a.window == 0 || a.window > p.num_tokens() || a.num_q_heads == 0 ||
        a.num_q_heads > 64 * layout.shape.num_kv_heads) {
      return Invalid("scoring.window_queries", "window or num_q_heads out of range");
    }
    const uint64_t count =
        uint64_t{layout.shape.num_layers} * a.window * a.num_q_heads * layout.shape.head_dim;
    const uint64_t elem = w.dtype() == v1::DTYPE_UNSPECIFIED ? 4 : 2;
    if (w.dtype() != v1::DTYPE_UNSPECIFIED && w.dtype() != v1::DTYPE_FP16 &&
        w.dtype() != v1::DTYPE_BF16) {
      return Invalid("scoring.window_queries.dtype", "unknown value");
    }
    const bool in_shm = w.has_shm();
    if (in_shm == !w.data().empty()) {
      return Invalid("scoring.window_queries", "set exactly one of data and shm");
    }
    const uint64_t expected = count * elem;
    const uint64_t given = in_shm ? w.shm().size_bytes() : w.data().size();
    if (given != expected) {
      return Invalid(
          in_shm ? "scoring.window_queries.shm.size_bytes" : "scoring.window_queries.data",
          absl::StrFormat("%u bytes, expected %u (layers x window x q_heads x "
                          "head_dim x %u)",
                          given, expected, elem));
    }
    if (in_shm && expected > max_shm_bytes) {
      return Invalid("scoring.window_queries.shm.size_bytes",
                     absl::StrFormat("%u bytes, more than the %u a request may carry", expected,
                                     max_shm_bytes));
    }
    a.window_queries.resize(count);
    // Little-endian float32 as the wire says goes in with one copy (tens of MB per request).
    const bool raw = elem == 4 && std::endian::native == std::endian::little;
    std::vector<uint8_t> staged;
    const auto* bytes = reinterpret_cast<const uint8_t*>(w.data().data());
    if (in_shm) {
      if (!read_shm) return Invalid("scoring.window_queries.shm", "not supported here");
      void* out = a.window_queries.data();
      if (!raw) {
        staged.resize(expected);
        out = staged.data();
        bytes = staged.data();
      }
      if (absl::Status read = read_shm(w.shm(), out, expected); !read.ok()) {
        return Invalid("scoring.window_queries.shm", std::string(read.message()));
      }
    } else if (raw) {
      std::memcpy(a.window_queries.data(), bytes, expected);
    }
    if (!raw) {
      for (uint64_t i = 0; i < count; ++i) {
        if (elem == 4) {
          uint32_t u = uint32_t{bytes[4 * i]} | (uint32_t{bytes[4 * i + 1]} << 8) |
                       (uint32_t{bytes[4 * i + 2]} << 16) | (uint32_t{bytes[4 * i + 3]} << 24);
          a.window_queries[i] = BitsFloat(u);
        } else {
          const uint16_t h = static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
          a.window_queries[i] =
              ToFloat(w.dtype() == v1::DTYPE_FP16 ? DType::kFloat16 : DType::kBFloat16, h);
        }
      }
    }
  } else if (mode == ScoringMode::kExternal) {
    if (static_cast<uint64_t>(s.token_scores_size()) != p.num_tokens()) {
      return Invalid(
          "scoring.token_scores",
          absl::StrFormat("%d scores for %u tokens", s.token_scores_size(), p.num_tokens()));
    }
    a.external_scores.assign(s.token_scores().begin(), s.token_scores().end());
  }
  a.fingerprint = Fingerprint(p);
  return a;
}

absl::StatusOr<ReceiveArgs> ReceiveArgsFromProto(const v1::ReceiveRequest& p) {
  if (!IsValidRequestId(p.request_id())) {
    return Invalid("request_id", "must be 1-256 characters of [A-Za-z0-9._:/-]");
  }
  if (p.num_tokens() == 0) return Invalid("num_tokens", "must be at least 1");
  ReceiveArgs a;
  a.key = TransferKey{p.request_id(), p.shard()};
  a.pool_id = p.pool_id();
  a.blocks.assign(p.block_ids().begin(), p.block_ids().end());
  a.num_tokens = p.num_tokens();
  a.fingerprint = Fingerprint(p);
  return a;
}

void StatsToProto(const TransferStatsData& s, v1::TransferStats* out) {
  out->set_logical_bytes(s.logical_bytes);
  out->set_wire_bytes(s.wire_bytes);
  out->set_bytes_saved(static_cast<int64_t>(s.logical_bytes) - static_cast<int64_t>(s.wire_bytes));
  out->set_element_budget(s.element_budget);
  out->set_wire_budget(s.wire_budget);
  v1::TierCounts* t = out->mutable_tiers();
  t->set_fp16(s.tiers[Tier::kFp16]);
  t->set_int8(s.tiers[Tier::kInt8]);
  t->set_int4(s.tiers[Tier::kInt4]);
  t->set_drop(s.tiers[Tier::kDrop]);
  v1::StageTimings* m = out->mutable_timings();
  m->set_score_s(s.times.score_s);
  m->set_plan_s(s.times.plan_s);
  m->set_pack_s(s.times.pack_s);
  m->set_stage_copy_s(s.times.stage_copy_s);
  m->set_network_s(s.times.network_s);
  m->set_unpack_s(s.times.unpack_s);
  m->set_total_s(s.times.total_s);
  out->set_backend(s.backend);
  out->set_policy(s.policy);
}

void InfoToProto(const TransferInfoData& i, v1::TransferInfo* out) {
  out->set_request_id(i.key.request_id);
  out->set_shard(i.key.shard);
  out->set_role(i.role == TransferRole::kSend ? v1::ROLE_SEND : v1::ROLE_RECEIVE);
  out->set_transfer_id(i.transfer_id);
  out->set_state(i.state);
  out->set_peer(i.peer);
  out->set_pool_id(i.pool_id);
  out->set_code(static_cast<int32_t>(i.status.code()));
  out->set_message(std::string(i.status.message()));
  out->set_age_s(i.age_s);
  StatsToProto(i.stats, out->mutable_stats());
}

}  // namespace spectrumkv
