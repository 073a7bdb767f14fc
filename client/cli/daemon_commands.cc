#include "client/cli/daemon_commands.h"

#include <google/protobuf/util/json_util.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "client/lib/client.h"
#include "common/exit_codes.h"

namespace spectrumkv {
namespace {

struct Common {
  std::string daemon = kDefaultDaemonTarget;
  double timeout_s = 10;
  bool json = false;
};

void AddCommon(CLI::App* cmd, Common* c, bool json = true) {
  cmd->add_option("--daemon", c->daemon, "gRPC target: unix:/path.sock or host:port")
      ->capture_default_str();
  cmd->add_option("--timeout-s", c->timeout_s, "Call deadline in seconds")->capture_default_str();
  if (json) cmd->add_flag("--json", c->json, "Print JSON");
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = true;
  o.preserve_proto_field_names = true;
  o.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

int Fail(const char* what, const absl::Status& s) {
  std::fprintf(stderr, "spectrumkv %s: %s\n", what, s.ToString().c_str());
  return ExitCodeFor(s);
}

// Prints a message as JSON or via `text`, returns 0.
template <typename M, typename F>
int Print(const Common& c, const M& m, F text) {
  if (c.json) {
    std::printf("%s", ToJson(m).c_str());
  } else {
    text(m);
  }
  return kExitOk;
}

// Parses "0,1,2" or "0-255" (or a mix) into block ids; false on anything
// else, including a range running backwards or longer than any real pool.
bool ParseBlocks(const std::string& s, std::vector<uint32_t>* out) {
  constexpr uint64_t kMaxBlocks = uint64_t{1} << 24;
  out->clear();
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    if (part.empty()) continue;
    const size_t dash = part.find('-');
    uint32_t a = 0;
    uint32_t b = 0;
    if (dash == absl::string_view::npos) {
      if (!absl::SimpleAtoi(part, &a)) return false;
      b = a;
    } else if (!absl::SimpleAtoi(part.substr(0, dash), &a) ||
               !absl::SimpleAtoi(part.substr(dash + 1), &b) || b < a) {
      return false;
    }
    if (out->size() + (uint64_t{b} - a + 1) > kMaxBlocks) return false;
    for (uint64_t i = a; i <= b; ++i) out->push_back(static_cast<uint32_t>(i));
  }
  return !out->empty();
}

// --request-id and --shard, which name a transfer in every request.
template <typename Req>
void AddTransferKey(CLI::App* cmd, const std::shared_ptr<Req>& req) {
  cmd->add_option("--request-id", *req->mutable_request_id(), "Request id")->required();
  cmd->add_option_function<uint32_t>(
      "--shard", [req](const uint32_t& v) { req->set_shard(v); }, "Tensor-parallel shard index");
}

// --pool, --blocks and --tokens: where a request's KV lives in a pool.
template <typename Req>
void AddPoolBlocks(CLI::App* cmd, const std::shared_ptr<Req>& req, std::string* blocks,
                   const char* pool_help, const char* blocks_help) {
  cmd->add_option("--pool", *req->mutable_pool_id(), pool_help)->required();
  cmd->add_option("--blocks", *blocks, blocks_help)->required();
  cmd->add_option_function<uint32_t>(
         "--tokens", [req](const uint32_t& v) { req->set_num_tokens(v); }, "Prompt tokens")
      ->required();
}

// Fills req's block ids from --blocks; false, after a usage message, when
// the list does not parse.
template <typename Req>
bool SetBlocks(const char* command, const std::string& blocks, Req* req) {
  std::vector<uint32_t> ids;
  if (!ParseBlocks(blocks, &ids)) {
    std::fprintf(stderr,
                 "spectrumkv %s: --blocks: expected block ids such as 0,1,2 or 0-255, got \"%s\"\n",
                 command, blocks.c_str());
    return false;
  }
  for (uint32_t b : ids) req->add_block_ids(b);
  return true;
}

void PrintStats(const v1::TransferStats& s) {
  const auto& t = s.timings();
  std::printf(
      "  bytes   logical %llu  wire %llu  saved %lld  (element budget %.4f, wire budget %.4f)\n"
      "  tiers   fp16 %llu  int8 %llu  int4 %llu  drop %llu  (policy %s, backend %s)\n"
      "  timing  score %.1f ms  plan %.1f ms  pack %.1f ms  stage copy %.1f ms  network %.1f ms"
      "  unpack %.1f ms  total %.1f ms\n",
      static_cast<unsigned long long>(s.logical_bytes()),
      static_cast<unsigned long long>(s.wire_bytes()), static_cast<long long>(s.bytes_saved()),
      s.element_budget(), s.wire_budget(), static_cast<unsigned long long>(s.tiers().fp16()),
      static_cast<unsigned long long>(s.tiers().int8()),
      static_cast<unsigned long long>(s.tiers().int4()),
      static_cast<unsigned long long>(s.tiers().drop()), s.policy().c_str(), s.backend().c_str(),
      t.score_s() * 1e3, t.plan_s() * 1e3, t.pack_s() * 1e3, t.stage_copy_s() * 1e3,
      t.network_s() * 1e3, t.unpack_s() * 1e3, t.total_s() * 1e3);
}

}  // namespace

int ExitCodeFor(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk:
      return kExitOk;
    case absl::StatusCode::kUnavailable:
      return kExitUnavailable;
    case absl::StatusCode::kInvalidArgument:
      return kExitUsage;
    default:
      return kExitFailure;
  }
}

void AddDaemonCommands(CLI::App& app, int* exit_code) {
  // health
  {
    auto c = std::make_shared<Common>();
    CLI::App* cmd =
        app.add_subcommand("health",
                           "grpc.health.v1 check of a daemon: exit 0 if serving, 1 if not, 69 if "
                           "unreachable");
    AddCommon(cmd, c.get(), false);
    cmd->callback([c, exit_code] {
      auto r = Client::Connect(c->daemon)->Health(c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("health", r.status());
        return;
      }
      std::printf("%s\n", *r ? "SERVING" : "NOT_SERVING");
      *exit_code = *r ? kExitOk : kExitFailure;
    });
  }
  // info
  {
    auto c = std::make_shared<Common>();
    CLI::App* cmd = app.add_subcommand("info", "Describe a daemon (version, backend, transport)");
    AddCommon(cmd, c.get());
    cmd->callback([c, exit_code] {
      auto r = Client::Connect(c->daemon)->GetDaemonInfo(c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("info", r.status());
        return;
      }
      *exit_code = Print(*c, *r, [](const v1::DaemonInfo& i) {
        std::printf(
            "spectrumkvd %s node %s incarnation %016llx\n  codec %s  transport %s %s"
            "  metrics port %u  draining %s\n",
            i.version().c_str(), i.node_name().c_str(),
            static_cast<unsigned long long>(i.incarnation()), i.codec_backend().c_str(),
            i.transport().c_str(), i.transport_address().c_str(), i.metrics_port(),
            i.draining() ? "yes" : "no");
      });
    });
  }
  // pools
  {
    auto c = std::make_shared<Common>();
    CLI::App* cmd = app.add_subcommand("pools", "List the registered KV pools");
    AddCommon(cmd, c.get());
    cmd->callback([c, exit_code] {
      auto r = Client::Connect(c->daemon)->ListPools(c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("pools", r.status());
        return;
      }
      *exit_code = Print(*c, *r, [](const v1::ListPoolsResponse& l) {
        for (const auto& p : l.pools()) {
          std::printf("%s  %s  %llu bytes  %u layers  %u active transfers  model %s\n",
                      p.pool_id().c_str(), p.memory_kind().c_str(),
                      static_cast<unsigned long long>(p.total_bytes()), p.layout().num_layers(),
                      p.active_transfers(), p.model().empty() ? "-" : p.model().c_str());
        }
      });
    });
  }
  // send
  {
    auto c = std::make_shared<Common>();
    c->timeout_s = 60;
    auto req = std::make_shared<v1::SendRequest>();
    auto blocks = std::make_shared<std::string>();
    auto budget = std::make_shared<double>(-1);
    auto policy = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand(
        "send", "Send a request's KV from a registered pool to a peer daemon (prefill side)");
    AddCommon(cmd, c.get());
    AddTransferKey(cmd, req);
    AddPoolBlocks(cmd, req, blocks.get(), "Source pool id", "Block ids, e.g. 0,1,2 or 0-255");
    cmd->add_option("--peer", *req->mutable_peer(), "The decode daemon's transport address")
        ->required();
    cmd->add_option("--budget", *budget, "Budget in (0, 1] (default: the daemon's)");
    cmd->add_option("--policy", *policy,
                    "3tier, 2tier, sinkprotect, uniform_int8, uniform_int4, pdtrim, random_tier");
    cmd->add_option("--model", *req->mutable_model(), "Model name for the tier policy");
    cmd->callback([c, req, blocks, budget, policy, exit_code] {
      if (!SetBlocks("send", *blocks, req.get())) {
        *exit_code = kExitUsage;
        return;
      }
      if (*budget >= 0) req->mutable_compression()->set_budget(*budget);
      if (!policy->empty()) {
        v1::Policy p;
        const std::string name = "POLICY_" + [&] {
          std::string u = *policy;
          for (char& ch : u) ch = static_cast<char>(std::toupper(ch));
          return u;
        }();
        if (!v1::Policy_Parse(name, &p)) {
          std::fprintf(stderr, "spectrumkv send: unknown policy %s\n", policy->c_str());
          *exit_code = kExitUsage;
          return;
        }
        req->mutable_compression()->set_policy(p);
      }
      auto r = Client::Connect(c->daemon)->Send(*req, c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("send", r.status());
        return;
      }
      *exit_code = Print(*c, *r, [](const v1::SendResponse& s) {
        std::printf("sent, transfer %s\n", s.transfer_id().c_str());
        PrintStats(s.stats());
      });
    });
  }
  // receive
  {
    auto c = std::make_shared<Common>();
    c->timeout_s = 60;
    auto req = std::make_shared<v1::ReceiveRequest>();
    auto blocks = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand(
        "receive", "Receive a request's KV into blocks of a registered pool (decode side)");
    AddCommon(cmd, c.get());
    AddTransferKey(cmd, req);
    AddPoolBlocks(cmd, req, blocks.get(), "Destination pool id",
                  "Destination block ids, e.g. 0,1,2 or 0-255");
    cmd->callback([c, req, blocks, exit_code] {
      if (!SetBlocks("receive", *blocks, req.get())) {
        *exit_code = kExitUsage;
        return;
      }
      auto r = Client::Connect(c->daemon)->Receive(*req, c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("receive", r.status());
        return;
      }
      *exit_code = Print(*c, *r, [](const v1::ReceiveResponse& s) {
        std::printf("received, transfer %s from %s, %u tokens, %d dropped\n",
                    s.transfer_id().c_str(), s.peer().c_str(), s.num_tokens(),
                    s.dropped_positions_size());
        PrintStats(s.stats());
      });
    });
  }
  // transfers
  {
    auto c = std::make_shared<Common>();
    auto ended = std::make_shared<bool>(false);
    CLI::App* cmd = app.add_subcommand("transfers", "List running (and recently ended) transfers");
    AddCommon(cmd, c.get());
    cmd->add_flag("--all", *ended, "Include ended transfers");
    cmd->callback([c, ended, exit_code] {
      auto r = Client::Connect(c->daemon)->ListTransfers(*ended, c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("transfers", r.status());
        return;
      }
      *exit_code = Print(*c, *r, [](const v1::ListTransfersResponse& l) {
        for (const auto& t : l.transfers()) {
          std::printf("%-8s %s/%u  %-12s peer %s  %.1fs  %s\n",
                      t.role() == v1::ROLE_SEND ? "send" : "receive", t.request_id().c_str(),
                      t.shard(), t.state().c_str(), t.peer().c_str(), t.age_s(),
                      t.code() == 0 ? "" : t.message().c_str());
        }
      });
    });
  }
  // cancel
  {
    auto c = std::make_shared<Common>();
    auto req = std::make_shared<v1::CancelRequest>();
    CLI::App* cmd = app.add_subcommand("cancel", "Cancel a transfer (the peer's side ends too)");
    AddCommon(cmd, c.get());
    AddTransferKey(cmd, req);
    cmd->add_option("--reason", *req->mutable_reason(), "Reason reported to both sides");
    cmd->callback([c, req, exit_code] {
      auto r = Client::Connect(c->daemon)->Cancel(*req, c->timeout_s);
      if (!r.ok()) {
        *exit_code = Fail("cancel", r.status());
        return;
      }
      *exit_code = Print(*c, *r, [](const v1::CancelResponse& s) {
        std::printf("%s\n", s.cancelled() ? "cancelled" : "already ended");
      });
    });
  }
  // policy
  {
    auto c = std::make_shared<Common>();
    auto req = std::make_shared<v1::ModelPolicy>();
    auto int4 = std::make_shared<std::string>();
    CLI::App* cmd = app.add_subcommand(
        "policy", "Set a model's tier policy (--model and --int4 yes|no), or list them");
    AddCommon(cmd, c.get());
    cmd->add_option("--model", *req->mutable_model(), "Model name");
    cmd->add_option("--int4", *int4, "yes or no: may the model use INT4")
        ->check(CLI::IsMember({"yes", "no"}));
    cmd->add_option("--source", *req->mutable_source(), "Where the verdict comes from");
    cmd->callback([c, req, int4, exit_code] {
      auto client = Client::Connect(c->daemon);
      if (!req->model().empty()) {
        if (int4->empty()) {
          std::fprintf(stderr, "spectrumkv policy: --int4 yes|no is required with --model\n");
          *exit_code = kExitUsage;
          return;
        }
        req->set_allow_int4(*int4 == "yes");
        req->set_allow_int8(true);
        auto r = client->SetModelPolicy(*req, c->timeout_s);
        if (!r.ok()) {
          *exit_code = Fail("policy", r.status());
          return;
        }
      }
      auto l = client->ListModelPolicies(c->timeout_s);
      if (!l.ok()) {
        *exit_code = Fail("policy", l.status());
        return;
      }
      *exit_code = Print(*c, *l, [](const v1::ListModelPoliciesResponse& r) {
        for (const auto& p : r.policies()) {
          std::printf("%s  int4 %s  int8 %s  %s\n", p.model().c_str(),
                      p.allow_int4() ? "yes" : "no", p.allow_int8() ? "yes" : "no",
                      p.source().c_str());
        }
      });
    });
  }
}

}  // namespace spectrumkv
