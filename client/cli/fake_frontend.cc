#include "client/cli/fake_frontend.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/cli/daemon_commands.h"
#include "client/cli/frontend_pool.h"
#include "client/cli/metrics_scrape.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/model_shapes.h"
#include "client/kvgen/npy.h"
#include "client/kvgen/shm_pool.h"
#include "client/kvgen/synthetic.h"
#include "client/lib/client.h"
#include "common/exit_codes.h"
#include "common/half.h"
#include "common/lcg.h"
#include "nlohmann/json.hpp"
#include "proto/layout_convert.h"

namespace spectrumkv {
namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string sender = kDefaultDaemonTarget;
  std::string receiver;  // default: the sender
  std::string peer;      // default: the receiver's transport address
  std::string model = "llama3-8b";
  std::string kv_file;
  bool kv_file_bf16 = false;
  uint32_t tokens = 4096;
  std::string dtype = "fp16";
  std::string src_layout = "vllm-nhd";
  uint32_t src_block_size = 16;
  std::string dst_layout = "vllm-hnd";
  uint32_t dst_block_size = 32;
  std::string pool_memory = "host";
  std::vector<double> budgets = {0.5};
  std::string budget_kind = "element";
  std::string policy = "3tier";
  std::string scoring = "key_norm";
  std::string queries_via = "request";
  std::string quantizer = "absmax";
  uint32_t window = 32;
  uint32_t q_heads = 0;
  uint32_t concurrency = 1;
  bool streaming = false;
  uint32_t rounds = 1;
  std::string order = "receive-first";
  double timeout_s = 120;
  uint64_t seed = 1;
  bool check_metrics = false;
  std::string metrics_host = "127.0.0.1";
  bool json = false;
};

// Errors of one tier, over every checked row.
struct TierCheck {
  uint64_t rows = 0;
  uint64_t violations = 0;
  double max_abs = 0;
  double err2 = 0, ref2 = 0;
};

struct Verification {
  std::array<TierCheck, kNumTiers> tiers{};
  std::string first_violation;
  bool ok() const {
    for (const auto& t : tiers) {
      if (t.violations) return false;
    }
    return true;
  }
};

// Checks every row of dst against src: FP16 bit-exact, quantized rows within the bound of
// docs/wire-format.md recomputed from the source row (s/2 + half an ulp; kcn INT4 keys, whose
// factors are not known here, within their row's magnitude), dropped rows untouched (zero).
void Verify(const KvBuffer& src, const KvBuffer& dst, const v1::ReceiveResponse& r,
            const std::string& quantizer, Verification* v) {
  const bool kcn = quantizer == "kcn";
  // A progressive INT8 row is its INT4 code refined to a 16th of the INT4 step: error within
  // half a 16th, s4 / 32 (docs/wire-format.md).
  const bool progressive = quantizer == "progressive";
  const ModelShape& s = src.layout->shape;
  const DType dtype = src.layout->dtype;
  const bool per_layer = r.tier_maps_size() > 1;
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    const std::string& map = r.tier_maps(per_layer ? static_cast<int>(l) : 0);
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < src.num_tokens; ++t) {
        const int tier = (static_cast<uint8_t>(map[t / 4]) >> (2 * (t % 4))) & 3;
        TierCheck& c = v->tiers[tier];
        for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
          const uint16_t* x = HostRowPtr(src, l, kind == 1, t, h);
          const uint16_t* y = HostRowPtr(dst, l, kind == 1, t, h);
          ++c.rows;
          float amax = 0;
          for (uint32_t i = 0; i < s.head_dim; ++i)
            amax = std::max(amax, std::fabs(ToFloat(dtype, x[i])));
          const float qmax = tier == 1 && !progressive ? 127.0f : 7.0f;
          const double bound = tier == 1 && progressive ? 1.0 / 32 : 0.5;
          uint16_t sbits = FromFloatUp(dtype, amax / qmax);
          if (amax > 0 && sbits == 0) sbits = 1;
          const float scale = ToFloat(dtype, sbits);
          for (uint32_t i = 0; i < s.head_dim; ++i) {
            const double xv = ToFloat(dtype, x[i]), yv = ToFloat(dtype, y[i]);
            const double d = std::fabs(xv - yv);
            bool bad = false;
            if (tier == 0) {
              bad = x[i] != y[i];
            } else if (tier == 3) {
              bad = y[i] != 0;
            } else if (tier == 2 && kcn && kind == 0) {
              bad = !(d <= 2.0 * amax + 1e-6);
            } else {
              const uint16_t a = y[i] & 0x7FFF;
              const double ulp = ToFloat(dtype, static_cast<uint16_t>(a + 1)) - ToFloat(dtype, a);
              bad = !(d <= scale * bound * 1.00002 + ulp / 2);
            }
            if (tier != 3) {
              c.max_abs = std::max(c.max_abs, d);
              c.err2 += d * d;
              c.ref2 += xv * xv;
            }
            if (bad) {
              if (c.violations++ == 0 && v->first_violation.empty()) {
                v->first_violation = absl::StrFormat(
                    "layer %u %s token %u head %u channel %u tier %s: sent %g, got %g", l,
                    kind ? "V" : "K", t, h, i, TierName(static_cast<Tier>(tier)), xv, yv);
              }
            }
          }
        }
      }
    }
  }
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Round {
  double budget = 0;
  uint32_t ok = 0, failed = 0;
  std::vector<std::string> errors;
  v1::TransferStats send_stats;  // of the first request
  uint64_t wire_bytes = 0, logical_bytes = 0;
  std::vector<double> score, plan, pack, stage, network, unpack, e2e;
  std::vector<double> send_total;  // the sending daemon's clock: Send accepted -> done
  // Per batch of `concurrency` requests (--streaming: the whole stream, one entry): first Send
  // call to the last Send or Receive return, and the logical bytes of its successful transfers
  // (aggregate goodput = bytes / wall).
  std::vector<double> batch_wall;
  uint64_t batch_logical_bytes = 0;
  Verification verify;

  // Aggregate goodput of the batches (or of the one stream), bytes/s; 0 if none succeeded.
  double Goodput() const {
    double wall = 0;
    for (double w : batch_wall) wall += w;
    return wall > 0 ? double(batch_logical_bytes) / wall : 0.0;
  }
};

std::string PolicyEnumName(const std::string& policy) {
  std::string u = "POLICY_" + policy;
  for (char& c : u) c = static_cast<char>(std::toupper(c));
  return u;
}

int Run(const Options& o) {
  const std::string receiver_target = o.receiver.empty() ? o.sender : o.receiver;
  auto sender = Client::Connect(o.sender);
  auto receiver = Client::Connect(receiver_target);
  absl::StatusOr<v1::DaemonInfo> sinfo = sender->GetDaemonInfo(10);
  if (!sinfo.ok()) {
    std::fprintf(stderr, "fake-frontend: sender %s: %s\n", o.sender.c_str(),
                 sinfo.status().ToString().c_str());
    return ExitCodeFor(sinfo.status());
  }
  absl::StatusOr<v1::DaemonInfo> rinfo = receiver->GetDaemonInfo(10);
  if (!rinfo.ok()) {
    std::fprintf(stderr, "fake-frontend: receiver %s: %s\n", receiver_target.c_str(),
                 rinfo.status().ToString().c_str());
    return ExitCodeFor(rinfo.status());
  }
  const std::string peer = o.peer.empty() ? rinfo->transport_address() : o.peer;

  // Shape and source data.
  kvgen::DenseKv dense;
  ModelShape shape;
  DType dtype = o.dtype == "bf16" ? DType::kBFloat16 : DType::kFloat16;
  uint32_t n = o.tokens;
  if (!o.kv_file.empty()) {
    auto read = kvgen::ReadNpy(o.kv_file, o.kv_file_bf16);
    if (!read.ok()) {
      std::fprintf(stderr, "fake-frontend: %s\n", read.status().ToString().c_str());
      return kExitUsage;
    }
    dense = std::move(*read);
    shape = dense.shape;
    dtype = dense.dtype;
    n = dense.num_tokens;
  } else {
    auto s = kvgen::LookupModelShape(o.model);
    if (!s) {
      std::fprintf(stderr, "fake-frontend: unknown model %s (known: %s)\n", o.model.c_str(),
                   absl::StrJoin(kvgen::ModelShapeNames(), ", ").c_str());
      return kExitUsage;
    }
    shape = *s;
  }
  const auto src_kind = kvgen::ParsePoolLayoutKind(o.src_layout);
  const auto dst_kind = kvgen::ParsePoolLayoutKind(o.dst_layout);
  if (!src_kind || !dst_kind || n == 0 || n > kMaxTokens || o.concurrency == 0 ||
      o.src_block_size == 0 || o.dst_block_size == 0 || o.rounds == 0) {
    std::fprintf(stderr, "fake-frontend: bad layout, tokens, block size, rounds or concurrency\n");
    return kExitUsage;
  }
  v1::Policy policy;
  if (!v1::Policy_Parse(PolicyEnumName(o.policy), &policy)) {
    std::fprintf(stderr, "fake-frontend: unknown policy %s\n", o.policy.c_str());
    return kExitUsage;
  }

  // Pools (shared host memory or GPU memory) with room for `concurrency` requests each, in
  // shuffled blocks.
  const uint32_t c = o.concurrency;
  const PoolMemory memory = o.pool_memory == "cuda" ? PoolMemory::kCuda : PoolMemory::kHostShm;
  auto make = [&](kvgen::PoolLayoutKind kind, uint32_t bs,
                  const std::string& side) -> absl::StatusOr<std::unique_ptr<FrontendPool>> {
    kvgen::PoolSpec spec{kind, shape, dtype, bs, kvgen::BlocksFor(n, bs) * c + 1};
    return FrontendPool::Create(memory, absl::StrFormat("skv-ff-%d-%s", getpid(), side), spec);
  };
  auto src_pool = make(*src_kind, o.src_block_size, "src");
  if (!src_pool.ok()) {
    std::fprintf(stderr, "fake-frontend: %s\n", src_pool.status().ToString().c_str());
    return ExitCodeFor(src_pool.status());
  }
  auto dst_pool = make(*dst_kind, o.dst_block_size, "dst");
  if (!dst_pool.ok()) {
    std::fprintf(stderr, "fake-frontend: %s\n", dst_pool.status().ToString().c_str());
    return ExitCodeFor(dst_pool.status());
  }
  auto tables = [&](const FrontendPool& pool, uint32_t bs, uint64_t seed) {
    const uint64_t blocks = pool.layout().num_blocks;
    const auto all = kvgen::ShuffledBlockTable(blocks, 1, static_cast<uint32_t>(blocks), seed);
    const uint64_t need = kvgen::BlocksFor(n, bs);
    std::vector<std::vector<uint32_t>> out(c);
    for (uint32_t i = 0; i < c; ++i)
      out[i].assign(all.begin() + i * need, all.begin() + (i + 1) * need);
    return out;
  };
  const auto src_tables = tables(**src_pool, o.src_block_size, o.seed);
  const auto dst_tables = tables(**dst_pool, o.dst_block_size, o.seed + 7);
  std::vector<std::vector<float>> queries(c);
  std::vector<std::unique_ptr<kvgen::ShmBytes>> query_shms;  // --queries-via shm: one per request
  const uint32_t q_heads = o.q_heads ? o.q_heads : 4 * shape.num_kv_heads;
  for (uint32_t i = 0; i < c; ++i) {
    const KvBuffer view = (*src_pool)->View(src_tables[i], n);
    if (!o.kv_file.empty()) {
      kvgen::CopyDenseToBuffer(dense, view);
    } else {
      kvgen::SyntheticOptions syn;
      syn.seed = o.seed + i;
      kvgen::FillSynthetic(view, syn);
    }
    if (o.scoring == "attention") {
      queries[i] = kvgen::SyntheticWindowQueries(view, std::min(o.window, n), q_heads, o.seed + i);
      if (o.queries_via == "shm") {
        auto q = kvgen::ShmBytes::Create(absl::StrFormat("/skv-ff-%d-q%u", getpid(), i),
                                         std::as_bytes(std::span(queries[i])));
        if (!q.ok()) {
          std::fprintf(stderr, "fake-frontend: %s\n", q.status().ToString().c_str());
          return ExitCodeFor(q.status());
        }
        query_shms.push_back(std::move(*q));
      }
    }
  }
  if (absl::Status s = (*src_pool)->Publish(); !s.ok()) {
    std::fprintf(stderr, "fake-frontend: filling the source pool: %s\n", s.ToString().c_str());
    return ExitCodeFor(s);
  }

  // Register both pools.
  auto register_pool = [&](Client& client, const FrontendPool& pool, const std::string& id) {
    v1::RegisterPoolRequest req;
    req.set_pool_id(id);
    req.set_model(o.kv_file.empty() ? o.model : "");
    *req.mutable_layout() = LayoutToProto(pool.layout());
    if (absl::Status s = pool.AddRegions(&req); !s.ok()) return s;
    return client.RegisterPool(req, 30).status();
  };
  const std::string src_id = absl::StrFormat("ff-src-%d", getpid());
  const std::string dst_id = absl::StrFormat("ff-dst-%d", getpid());
  if (absl::Status s = register_pool(*sender, **src_pool, src_id); !s.ok()) {
    std::fprintf(stderr, "fake-frontend: RegisterPool on the sender: %s\n", s.ToString().c_str());
    return ExitCodeFor(s);
  }
  if (absl::Status s = register_pool(*receiver, **dst_pool, dst_id); !s.ok()) {
    std::fprintf(stderr, "fake-frontend: RegisterPool on the receiver: %s\n", s.ToString().c_str());
    (void)sender->UnregisterPool(src_id, 10);
    return ExitCodeFor(s);
  }

  std::map<std::string, double> metrics_before_tx, metrics_before_rx;
  auto scrape = [&](const v1::DaemonInfo& info) -> absl::StatusOr<std::map<std::string, double>> {
    if (info.metrics_port() == 0) return absl::FailedPreconditionError("metrics are disabled");
    return ScrapeMetrics(o.metrics_host, static_cast<int>(info.metrics_port()), 10);
  };
  if (o.check_metrics) {
    auto a = scrape(*sinfo), b = scrape(*rinfo);
    if (!a.ok() || !b.ok()) {
      std::fprintf(stderr, "fake-frontend: metrics: %s\n",
                   (a.ok() ? b.status() : a.status()).ToString().c_str());
      return kExitFailure;
    }
    metrics_before_tx = *a;
    metrics_before_rx = *b;
  }

  std::vector<Round> rounds;
  uint64_t total_logical = 0, total_wire = 0, total_saved = 0;
  for (size_t bi = 0; bi < o.budgets.size(); ++bi) {
    Round round;
    round.budget = o.budgets[bi];
    // The Receive and Send requests of slot i (its blocks in both pools) under request id `rid`.
    auto requests = [&](uint32_t i, const std::string& rid) {
      v1::ReceiveRequest rr;
      rr.set_request_id(rid);
      rr.set_pool_id(dst_id);
      for (uint32_t b : dst_tables[i]) rr.add_block_ids(b);
      rr.set_num_tokens(n);
      v1::SendRequest sr;
      sr.set_request_id(rid);
      sr.set_pool_id(src_id);
      for (uint32_t b : src_tables[i]) sr.add_block_ids(b);
      sr.set_num_tokens(n);
      sr.set_peer(peer);
      sr.set_model(o.kv_file.empty() ? o.model : "");
      v1::CompressionOptions* co = sr.mutable_compression();
      co->set_budget(round.budget);
      co->set_policy(policy);
      co->set_budget_kind(o.budget_kind == "wire" ? v1::BUDGET_KIND_WIRE : v1::BUDGET_KIND_ELEMENT);
      co->set_quantizer(o.quantizer == "kcn"           ? v1::QUANTIZER_KEY_CHANNEL_NORM
                        : o.quantizer == "progressive" ? v1::QUANTIZER_PROGRESSIVE
                                                       : v1::QUANTIZER_ABSMAX);
      co->set_seed(o.seed);
      v1::ScoringInputs* si = sr.mutable_scoring();
      if (o.scoring == "attention") {
        si->set_mode(v1::SCORING_ATTENTION);
        v1::WindowQueries* w = si->mutable_window_queries();
        w->set_window(std::min(o.window, n));
        w->set_num_q_heads(q_heads);
        if (query_shms.empty()) {
          w->set_data(reinterpret_cast<const char*>(queries[i].data()), queries[i].size() * 4);
        } else {
          w->mutable_shm()->set_name(query_shms[i]->name());
          w->mutable_shm()->set_size_bytes(queries[i].size() * 4);
        }
      } else if (o.scoring == "positional") {
        si->set_mode(v1::SCORING_POSITIONAL);
      } else if (o.scoring == "external") {
        // Scores the frontend computed itself (seeded stand-ins here): no scoring pass over
        // the KV on the daemon.
        si->set_mode(v1::SCORING_EXTERNAL);
        Lcg rng(o.seed + i);
        for (uint32_t t = 0; t < n; ++t) si->add_token_scores(rng.Unit());
      } else {
        si->set_mode(v1::SCORING_KEY_NORM);
      }
      return std::make_pair(rr, sr);
    };
    // One finished transfer of slot i: its stage times and bytes, and (if `verify`) the rows
    // that arrived in the destination pool, which the caller has fetched.
    auto account = [&](uint32_t i, const absl::StatusOr<v1::SendResponse>& send,
                       const absl::StatusOr<v1::ReceiveResponse>& recv, Clock::time_point start,
                       Clock::time_point end, bool verify) {
      if (!send.ok() || !recv.ok()) {
        ++round.failed;
        round.errors.push_back(!send.ok() ? "Send: " + send.status().ToString()
                                          : "Receive: " + recv.status().ToString());
        return uint64_t{0};
      }
      ++round.ok;
      const v1::TransferStats& ss = send->stats();
      const v1::TransferStats& rs = recv->stats();
      if (round.ok == 1) round.send_stats = ss;
      round.wire_bytes += ss.wire_bytes();
      round.logical_bytes += ss.logical_bytes();
      // The daemons count savings per transfer and never negative (a counter only grows).
      total_saved +=
          ss.logical_bytes() > ss.wire_bytes() ? ss.logical_bytes() - ss.wire_bytes() : 0;
      round.score.push_back(ss.timings().score_s());
      round.plan.push_back(ss.timings().plan_s());
      round.pack.push_back(ss.timings().pack_s());
      round.stage.push_back(ss.timings().stage_copy_s());
      round.network.push_back(rs.timings().network_s());
      round.unpack.push_back(rs.timings().unpack_s());
      round.e2e.push_back(std::chrono::duration<double>(end - start).count());
      round.send_total.push_back(ss.timings().total_s());
      if (verify) {
        Verify((*src_pool)->View(src_tables[i], n), (*dst_pool)->View(dst_tables[i], n), *recv,
               o.quantizer, &round.verify);
      }
      return ss.logical_bytes();
    };
    auto add_batch = [&](Clock::time_point begin, Clock::time_point end, uint64_t bytes) {
      if (bytes == 0) return;
      round.batch_wall.push_back(std::chrono::duration<double>(end - begin).count());
      round.batch_logical_bytes += bytes;
    };

    if (o.streaming) {
      // Every slot runs its `rounds` transfers back to back (Receive and Send at once, the next
      // as soon as both returned); the pools' contents are the same for every transfer of a
      // slot, so its last one is verified.
      if (absl::Status s = (*dst_pool)->Zero(); !s.ok()) {
        round.failed += c * o.rounds;
        round.errors.push_back("zeroing the destination pool: " + s.ToString());
      } else {
        struct Done {
          absl::StatusOr<v1::SendResponse> send = absl::UnknownError("not run");
          absl::StatusOr<v1::ReceiveResponse> recv = absl::UnknownError("not run");
          Clock::time_point start, end;
        };
        std::vector<std::vector<Done>> done(c, std::vector<Done>(o.rounds));
        std::vector<std::thread> slots;
        const Clock::time_point begin = Clock::now();
        for (uint32_t i = 0; i < c; ++i) {
          slots.emplace_back([&, i] {
            for (uint32_t rep = 0; rep < o.rounds; ++rep) {
              const auto req =
                  requests(i, absl::StrFormat("ff-%d-b%u-r%u-s%u", getpid(), bi, rep, i));
              const v1::ReceiveRequest& rr = req.first;
              const v1::SendRequest& sr = req.second;
              Done& d = done[i][rep];
              Clock::time_point end_recv;
              std::thread receive([&] {
                d.recv = receiver->Receive(rr, o.timeout_s);
                end_recv = Clock::now();
              });
              d.start = Clock::now();
              d.send = sender->Send(sr, o.timeout_s);
              const Clock::time_point end_send = Clock::now();
              receive.join();
              d.end = std::max(end_send, end_recv);
            }
          });
        }
        for (auto& t : slots) t.join();
        Clock::time_point end = begin;
        for (const auto& slot : done)
          for (const Done& d : slot) end = std::max(end, d.end);
        if (absl::Status fetched = (*dst_pool)->Fetch(); !fetched.ok()) {
          round.failed += c * o.rounds;
          round.errors.push_back("reading the destination pool: " + fetched.ToString());
        } else {
          uint64_t bytes = 0;
          for (uint32_t i = 0; i < c; ++i) {
            for (uint32_t rep = 0; rep < o.rounds; ++rep) {
              const Done& d = done[i][rep];
              bytes += account(i, d.send, d.recv, d.start, d.end, rep + 1 == o.rounds);
            }
          }
          add_batch(begin, end, bytes);
        }
      }
    }
    for (uint32_t rep = 0; !o.streaming && rep < o.rounds; ++rep) {
      if (absl::Status s = (*dst_pool)->Zero(); !s.ok()) {
        round.failed += c;
        round.errors.push_back("zeroing the destination pool: " + s.ToString());
        continue;
      }
      std::vector<absl::StatusOr<v1::SendResponse>> sends(c, absl::UnknownError("not run"));
      std::vector<absl::StatusOr<v1::ReceiveResponse>> recvs(c, absl::UnknownError("not run"));
      std::vector<Clock::time_point> start(c), end_send(c), end_recv(c);
      std::vector<std::thread> threads;
      for (uint32_t i = 0; i < c; ++i) {
        const auto req = requests(i, absl::StrFormat("ff-%d-b%u-r%u-s%u", getpid(), bi, rep, i));
        const v1::ReceiveRequest& rr = req.first;
        const v1::SendRequest& sr = req.second;
        const bool send_first = o.order == "send-first";
        auto recv_returned = std::make_shared<std::atomic<bool>>(false);
        auto do_recv = [&, i, rr, recv_returned] {
          recvs[i] = receiver->Receive(rr, o.timeout_s);
          end_recv[i] = Clock::now();
          recv_returned->store(true);
        };
        auto do_send = [&, i, sr] {
          start[i] = Clock::now();
          sends[i] = sender->Send(sr, o.timeout_s);
          end_send[i] = Clock::now();
        };
        if (o.order == "concurrent") {
          threads.emplace_back(do_recv);
          threads.emplace_back(do_send);
        } else if (send_first) {
          threads.emplace_back(do_send);
          threads.emplace_back([do_recv] {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
            do_recv();
          });
        } else {
          // Receive first, for sure: the Send starts once the receiving daemon lists the Receive
          // (or the Receive has returned). A payload larger than the receiver's early buffer
          // whose offer won the race would be refused (RESOURCE_EXHAUSTED).
          threads.emplace_back(do_recv);
          threads.emplace_back([&, do_send, rr, recv_returned] {
            v1::GetTransferRequest q;
            q.set_request_id(rr.request_id());
            q.set_shard(rr.shard());
            q.set_role(v1::ROLE_RECEIVE);
            const auto give_up = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                                    std::chrono::duration<double>(o.timeout_s));
            while (!recv_returned->load() && !receiver->GetTransfer(q, o.timeout_s).ok() &&
                   Clock::now() < give_up) {
              std::this_thread::sleep_for(std::chrono::milliseconds(1));
            }
            do_send();
          });
        }
      }
      for (auto& t : threads) t.join();
      if (absl::Status s = (*dst_pool)->Fetch(); !s.ok()) {
        round.failed += c;
        round.errors.push_back("reading the destination pool: " + s.ToString());
        continue;
      }
      Clock::time_point batch_begin = Clock::time_point::max(), batch_end{};
      uint64_t batch_bytes = 0;
      for (uint32_t i = 0; i < c; ++i) {
        const Clock::time_point end = std::max(end_send[i], end_recv[i]);
        const uint64_t bytes = account(i, sends[i], recvs[i], start[i], end, true);
        if (bytes == 0) continue;
        batch_begin = std::min(batch_begin, start[i]);
        batch_end = std::max(batch_end, end);
        batch_bytes += bytes;
      }
      add_batch(batch_begin, batch_end, batch_bytes);
    }
    total_logical += round.logical_bytes;
    total_wire += round.wire_bytes;
    rounds.push_back(std::move(round));
  }

  // Metrics: the counters moved by exactly what the transfers reported.
  std::vector<std::string> metric_problems;
  nlohmann::json metrics_json;
  if (o.check_metrics) {
    auto a = scrape(*sinfo), b = scrape(*rinfo);
    if (!a.ok() || !b.ok()) {
      metric_problems.push_back("scrape failed after the transfers");
    } else {
      const bool same = o.sender == receiver_target;
      auto delta = [](const std::map<std::string, double>& before,
                      const std::map<std::string, double>& after, const std::string& series) {
        auto g = [&](const std::map<std::string, double>& m) {
          auto it = m.find(series);
          return it == m.end() ? 0.0 : it->second;
        };
        return g(after) - g(before);
      };
      const std::pair<const char*, uint64_t> checks[] = {
          {"spectrumkv_logical_bytes_total{direction=\"tx\"}", total_logical},
          {"spectrumkv_wire_bytes_total{direction=\"tx\"}", total_wire},
          {"spectrumkv_bytes_saved_total{direction=\"tx\"}", total_saved},
          {"spectrumkv_logical_bytes_total{direction=\"rx\"}", total_logical},
          {"spectrumkv_wire_bytes_total{direction=\"rx\"}", total_wire},
          {"spectrumkv_bytes_saved_total{direction=\"rx\"}", total_saved},
      };
      for (const auto& [series, expect] : checks) {
        const bool rx = std::string(series).find("rx") != std::string::npos;
        const double got =
            rx ? delta(metrics_before_rx, *b, series)
               : delta(same ? metrics_before_rx : metrics_before_tx, same ? *b : *a, series);
        metrics_json[series] = {{"delta", got}, {"expected", expect}};
        if (std::fabs(got - double(expect)) > 0.5) {
          metric_problems.push_back(
              absl::StrFormat("%s moved by %.0f, the transfers report %u", series, got, expect));
        }
      }
    }
  }
  (void)sender->UnregisterPool(src_id, 10);
  (void)receiver->UnregisterPool(dst_id, 10);

  bool all_ok = metric_problems.empty();
  for (const Round& r : rounds) all_ok &= r.failed == 0 && r.verify.ok();

  if (o.json) {
    nlohmann::json j;
    j["sender"] = o.sender;
    j["receiver"] = receiver_target;
    j["peer"] = peer;
    j["model"] = o.kv_file.empty() ? o.model : o.kv_file;
    j["tokens"] = n;
    j["concurrency"] = c;
    j["streaming"] = o.streaming;
    j["rounds"] = nlohmann::json::array();
    for (const Round& r : rounds) {
      nlohmann::json x;
      x["budget"] = r.budget;
      x["ok"] = r.ok;
      x["failed"] = r.failed;
      x["errors"] = r.errors;
      x["logical_bytes"] = r.logical_bytes;
      x["wire_bytes"] = r.wire_bytes;
      x["bytes_saved"] = static_cast<int64_t>(r.logical_bytes) - static_cast<int64_t>(r.wire_bytes);
      x["element_budget"] = r.send_stats.element_budget();
      x["wire_budget"] = r.send_stats.wire_budget();
      x["tiers"] = {{"fp16", r.send_stats.tiers().fp16()},
                    {"int8", r.send_stats.tiers().int8()},
                    {"int4", r.send_stats.tiers().int4()},
                    {"drop", r.send_stats.tiers().drop()}};
      x["median_s"] = {{"score", Median(r.score)},     {"plan", Median(r.plan)},
                       {"pack", Median(r.pack)},       {"stage_copy", Median(r.stage)},
                       {"network", Median(r.network)}, {"unpack", Median(r.unpack)},
                       {"end_to_end", Median(r.e2e)},  {"send_total", Median(r.send_total)}};
      // Aggregate goodput of the batches (or of the one stream): transfers overlap there.
      x["batch_wall_s"] = Median(r.batch_wall);
      x["goodput_Bps"] = r.Goodput();
      x["verified"] = r.verify.ok();
      x["first_violation"] = r.verify.first_violation;
      nlohmann::json tiers;
      for (int t = 0; t < kNumTiers; ++t) {
        const TierCheck& tc = r.verify.tiers[t];
        tiers[std::string(TierName(static_cast<Tier>(t)))] = {
            {"rows", tc.rows},
            {"violations", tc.violations},
            {"max_abs", tc.max_abs},
            {"rel_l2", tc.ref2 > 0 ? std::sqrt(tc.err2 / tc.ref2) : 0.0}};
      }
      x["verify"] = tiers;
      j["rounds"].push_back(x);
    }
    if (o.check_metrics) {
      j["metrics"] = metrics_json;
      j["metrics_agree"] = metric_problems.empty();
    }
    j["ok"] = all_ok;
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("SpectrumKV fake frontend: sender %s, receiver %s, peer %s\n", o.sender.c_str(),
                receiver_target.c_str(), peer.c_str());
    std::printf(
        "  KV %s: %u layers, %u KV heads, head_dim %u, %s, %u tokens; %s/%u -> %s/%u; "
        "%u request(s) at a time%s, %u round(s); policy %s, scoring %s, quantizer %s\n",
        o.kv_file.empty() ? o.model.c_str() : o.kv_file.c_str(), shape.num_layers,
        shape.num_kv_heads, shape.head_dim, DTypeName(dtype), n, o.src_layout.c_str(),
        o.src_block_size, o.dst_layout.c_str(), o.dst_block_size, c,
        o.streaming ? " (streaming)" : "", o.rounds, o.policy.c_str(), o.scoring.c_str(),
        o.quantizer.c_str());
    std::printf("\n%-7s %-23s %10s %10s %7s %8s %8s %8s %8s %8s %9s  %s\n", "budget",
                "tiers fp16/int8/int4/drop", "wire MB", "saved MB", "saved", "score ms", "pack ms",
                "stage ms", "net ms", "unpack ms", "e2e ms", "verified");
    for (const Round& r : rounds) {
      const auto& t = r.send_stats.tiers();
      const double saved = double(r.logical_bytes) - double(r.wire_bytes);
      std::printf("%-7.2f %-23s %10.1f %10.1f %6.1f%% %8.1f %8.1f %8.1f %8.1f %8.1f %9.1f  %s\n",
                  r.budget,
                  absl::StrFormat("%u/%u/%u/%u", t.fp16(), t.int8(), t.int4(), t.drop()).c_str(),
                  double(r.wire_bytes) / 1e6 / std::max(1u, r.ok), saved / 1e6 / std::max(1u, r.ok),
                  r.logical_bytes ? 100.0 * saved / double(r.logical_bytes) : 0.0,
                  Median(r.score) * 1e3, Median(r.pack) * 1e3, Median(r.stage) * 1e3,
                  Median(r.network) * 1e3, Median(r.unpack) * 1e3, Median(r.e2e) * 1e3,
                  r.failed ? absl::StrFormat("%u FAILED", r.failed).c_str()
                           : (r.verify.ok() ? "yes" : "NO"));
      for (const std::string& e : r.errors) std::printf("    error: %s\n", e.c_str());
      if (!r.verify.first_violation.empty()) {
        std::printf("    first violation: %s\n", r.verify.first_violation.c_str());
      }
    }
    std::printf(
        "\n  per request; times are medians. score/pack/stage: sender; net/unpack: "
        "receiver (first to last byte; unpack work); e2e: Send call to both calls "
        "returning, as the client saw it\n");
    if (c > 1 || o.streaming) {
      for (const Round& r : rounds) {
        std::printf("  budget %.2f: %.2f GB/s of KV over the wall time of the %s\n", r.budget,
                    r.Goodput() / 1e9, o.streaming ? "stream" : "batches");
      }
    }
    if (o.check_metrics) {
      std::printf("  metrics: %s\n", metric_problems.empty()
                                         ? "logical, wire and saved bytes agree on both sides"
                                         : absl::StrJoin(metric_problems, "; ").c_str());
    }
  }
  return all_ok ? kExitOk : kExitFailure;
}

}  // namespace

void AddFakeFrontendCommand(CLI::App& app, int* exit_code) {
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "fake-frontend",
      "Play the prefill and decode frontends against one or two daemons: shared-memory or GPU "
      "pools, "
      "Receive + Send per budget, verification of every row against its tier's error bound");
  cmd->add_option("--sender", o->sender, "Prefill daemon (gRPC target)")->capture_default_str();
  cmd->add_option("--receiver", o->receiver, "Decode daemon (default: the sender)");
  cmd->add_option("--peer", o->peer,
                  "Transport address of the decode daemon (default: asked from it)");
  cmd->add_option("--model", o->model, "Synthetic KV shape")->capture_default_str();
  cmd->add_option("--kv-file", o->kv_file, ".npy KV [layers, 2, tokens, kv_heads, head_dim]");
  cmd->add_flag("--kv-file-bf16", o->kv_file_bf16, "The --kv-file holds bfloat16 bits");
  cmd->add_option("--tokens", o->tokens, "Prompt tokens")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "fp16 or bf16")
      ->check(CLI::IsMember({"fp16", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--src-layout", o->src_layout, "Prefill pool layout")->capture_default_str();
  cmd->add_option("--src-block-size", o->src_block_size, "Prefill tokens per block")
      ->capture_default_str();
  cmd->add_option("--dst-layout", o->dst_layout, "Decode pool layout")->capture_default_str();
  cmd->add_option("--dst-block-size", o->dst_block_size, "Decode tokens per block")
      ->capture_default_str();
  cmd->add_option("--pool-memory", o->pool_memory,
                  "host (shared memory) or cuda (GPU memory of this process, exported through "
                  "CUDA IPC handles; needs a build with CUDA and a GPU)")
      ->check(CLI::IsMember({"host", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--budgets", o->budgets, "Budgets to run, e.g. --budgets 1.0 0.5 0.3")
      ->capture_default_str();
  cmd->add_option("--budget-kind", o->budget_kind, "element or wire")
      ->check(CLI::IsMember({"element", "wire"}))
      ->capture_default_str();
  cmd->add_option("--policy", o->policy, "Tier policy")->capture_default_str();
  cmd->add_option("--scoring", o->scoring,
                  "attention (synthetic window queries), key_norm, positional, or external "
                  "(seeded stand-in scores sent by the frontend)")
      ->check(CLI::IsMember({"attention", "key_norm", "positional", "external"}))
      ->capture_default_str();
  cmd->add_option("--quantizer", o->quantizer, "absmax, kcn or progressive")
      ->check(CLI::IsMember({"absmax", "kcn", "progressive"}))
      ->capture_default_str();
  cmd->add_option("--window", o->window, "attention: window queries")->capture_default_str();
  cmd->add_option("--queries-via", o->queries_via,
                  "attention: send the window queries in the request, or in a shared-memory "
                  "object the daemon reads (shm)")
      ->check(CLI::IsMember({"request", "shm"}))
      ->capture_default_str();
  cmd->add_option("--q-heads", o->q_heads, "attention: query heads (default 4 x KV heads)");
  cmd->add_option("--concurrency", o->concurrency, "Requests in flight at once")
      ->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "Repetitions per budget")->capture_default_str();
  cmd->add_flag("--streaming", o->streaming,
                "Keep --concurrency requests in flight for all --rounds: each slot starts its next "
                "transfer (Receive and Send at once, --order is not used) as soon as the last one "
                "returned, instead of rounds of requests started together; goodput is every byte "
                "over the whole wall time; each slot's last transfer is verified");
  cmd->add_option("--order", o->order, "receive-first, send-first or concurrent")
      ->check(CLI::IsMember({"receive-first", "send-first", "concurrent"}))
      ->capture_default_str();
  cmd->add_option("--timeout-s", o->timeout_s, "Deadline of each Send and Receive")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed of the synthetic KV and block tables")
      ->capture_default_str();
  cmd->add_flag("--check-metrics", o->check_metrics,
                "Scrape both daemons' metrics before and after and check the byte counters");
  cmd->add_option("--metrics-host", o->metrics_host, "Host of the daemons' metrics endpoints")
      ->capture_default_str();
  cmd->add_flag("--json", o->json, "Print JSON");
  cmd->callback([o, exit_code] { *exit_code = Run(*o); });
}

}  // namespace spectrumkv
