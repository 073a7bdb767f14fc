// Integration tests: a real spectrumkvd process, driven over its Unix socket with the client
// library and the spectrumkv command. Each error path returns its documented status code and the
// daemon keeps serving afterwards.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "absl/strings/str_format.h"
#include "client/cli/metrics_scrape.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/shm_pool.h"
#include "client/kvgen/synthetic.h"
#include "client/lib/client.h"
#include "common/half.h"
#include "gtest/gtest.h"
#include "proto/layout_convert.h"
#include "tests/testing/subprocess.h"

namespace spectrumkv {
namespace {

using testing::RunCommand;
using testing::Subprocess;

constexpr char kConfig[] = R"(
node_name: itest
metrics: {address: "127.0.0.1:0"}
limits:
  staging_bytes: 512MiB
  staging_prefault: false
  max_inflight_bytes: 512MiB
  early_ttl_s: 5
  default_deadline_s: 20
  result_ttl_s: 60
  drain_timeout_s: 2
codec: {chunk_bytes: 256KiB, worker_threads: 2}
logging: {level: info}
)";

class DaemonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(absl::StrFormat("/tmp/skv-itest-%d", getpid()));
    std::filesystem::create_directories(*dir_);
    std::ofstream(*dir_ + "/daemon.yaml") << kConfig;
    daemon_ = new Subprocess();
    ASSERT_TRUE(daemon_->Start(
        {SPECTRUMKV_DAEMON_BIN, "--config", *dir_ + "/daemon.yaml", "--listen-unix",
         *dir_ + "/d.sock", "--transport-address", absl::StrFormat("itest-%d", getpid())},
        *dir_ + "/daemon.log"));
    client_ = Client::Connect("unix:" + *dir_ + "/d.sock").release();
    for (int i = 0; i < 200; ++i) {
      auto h = client_->Health(1);
      if (h.ok() && *h) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    FAIL() << "the daemon did not become healthy; see " << *dir_ << "/daemon.log";
  }
  static void TearDownTestSuite() {
    if (daemon_ != nullptr) {
      const std::optional<int> code = daemon_->Stop(SIGTERM, 20);
      EXPECT_EQ(code, 0) << "spectrumkvd must exit 0 after SIGTERM";
      EXPECT_FALSE(std::filesystem::exists(*dir_ + "/d.sock")) << "socket left behind";
    }
    delete client_;
    delete daemon_;
    std::filesystem::remove_all(*dir_);
  }

  // A shared-memory pool registered with the daemon, with one request's blocks.
  struct RegisteredPool {
    std::string id;
    std::unique_ptr<kvgen::ShmPool> shm;
    std::vector<uint32_t> blocks;
    KvBuffer View(uint32_t n) const { return shm->View(blocks, n); }
  };
  RegisteredPool Register(const std::string& id, kvgen::PoolLayoutKind kind, ModelShape shape,
                          uint32_t block_size, uint32_t tokens) {
    RegisteredPool p;
    p.id = id;
    kvgen::PoolSpec spec{kind, shape, DType::kFloat16, block_size,
                         kvgen::BlocksFor(tokens, block_size) + 2};
    p.shm = std::move(*kvgen::ShmPool::Create(absl::StrFormat("skv-it-%d-%s", getpid(), id), spec));
    p.blocks = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, tokens, 3);
    v1::RegisterPoolRequest req = RegisterRequest(p);
    auto r = client_->RegisterPool(req, 10);
    EXPECT_TRUE(r.ok()) << r.status();
    return p;
  }
  static v1::RegisterPoolRequest RegisterRequest(const RegisteredPool& p) {
    v1::RegisterPoolRequest req;
    req.set_pool_id(p.id);
    *req.mutable_layout() = LayoutToProto(p.shm->layout());
    for (size_t i = 0; i < p.shm->names().size(); ++i) {
      auto* shm = req.add_regions()->mutable_host_shm();
      shm->set_name(p.shm->names()[i]);
      shm->set_size_bytes(p.shm->regions()[i].size_bytes);
    }
    return req;
  }
  std::string Address() const { return absl::StrFormat("inproc://itest-%d", getpid()); }
  void ExpectStillServing() {
    auto h = client_->Health(5);
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_TRUE(*h);
  }

  static std::string* dir_;
  static Subprocess* daemon_;
  static Client* client_;
};

std::string* DaemonTest::dir_ = nullptr;
Subprocess* DaemonTest::daemon_ = nullptr;
Client* DaemonTest::client_ = nullptr;

constexpr ModelShape kShape{4, 2, 64};

TEST_F(DaemonTest, HealthAndInfo) {
  auto info = client_->GetDaemonInfo(5);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->node_name(), "itest");
  EXPECT_EQ(info->transport(), "inproc");
  EXPECT_EQ(info->transport_address(), Address());
  EXPECT_GT(info->metrics_port(), 0u);
  EXPECT_FALSE(info->draining());
}

TEST_F(DaemonTest, MalformedPoolsAreRejectedWithFieldPaths) {
  RegisteredPool p = Register("good", kvgen::PoolLayoutKind::kVllmNhd, kShape, 16, 64);
  v1::RegisterPoolRequest req = RegisterRequest(p);
  req.set_pool_id("bad1");
  req.mutable_layout()->mutable_values(2)->set_offset_bytes(1ull << 40);
  auto r = client_->RegisterPool(req, 5);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("layout.values[2]"), std::string::npos) << r.status();
  req = RegisterRequest(p);
  req.set_pool_id("bad2");
  req.mutable_layout()->set_head_dim(63);
  EXPECT_EQ(client_->RegisterPool(req, 5).status().code(), absl::StatusCode::kInvalidArgument);
  req = RegisterRequest(p);
  req.set_pool_id("bad3");
  req.mutable_layout()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(client_->RegisterPool(req, 5).status().code(), absl::StatusCode::kInvalidArgument);
  req = RegisterRequest(p);
  req.set_pool_id("bad4");
  req.mutable_regions(0)->mutable_host_shm()->set_name("/skv-does-not-exist");
  EXPECT_EQ(client_->RegisterPool(req, 5).status().code(), absl::StatusCode::kNotFound);
  req = RegisterRequest(p);
  req.set_pool_id("bad5");
  for (auto& region : *req.mutable_regions()) {
    const uint64_t size = region.host_shm().size_bytes();
    region.mutable_cuda_ipc()->set_ipc_handle(std::string(64, '\1'));
    region.mutable_cuda_ipc()->set_size_bytes(size);
  }
  // CUDA IPC regions: refused with the reason by a daemon without the CUDA codec; with it (on a
  // GPU machine), this handle opens nothing.
  const absl::Status cuda_ipc = client_->RegisterPool(req, 5).status();
  auto info = client_->GetDaemonInfo(5);
  ASSERT_TRUE(info.ok());
  if (info->codec_backend() == "cuda") {
    EXPECT_EQ(cuda_ipc.code(), absl::StatusCode::kInvalidArgument) << cuda_ipc;
  } else {
    EXPECT_EQ(cuda_ipc.code(), absl::StatusCode::kUnavailable) << cuda_ipc;
    EXPECT_NE(cuda_ipc.message().find("CUDA IPC memory cannot be used here"), std::string::npos)
        << cuda_ipc;
  }
  req = RegisterRequest(p);  // same id again
  EXPECT_EQ(client_->RegisterPool(req, 5).status().code(), absl::StatusCode::kAlreadyExists);
  req.set_pool_id("has spaces");
  EXPECT_EQ(client_->RegisterPool(req, 5).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->UnregisterPool("nope", 5).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(client_->UnregisterPool("good", 5).ok());
  ExpectStillServing();
}

TEST_F(DaemonTest, TransferErrorsHaveTheirCodes) {
  RegisteredPool src = Register("src1", kvgen::PoolLayoutKind::kVllmNhd, kShape, 16, 64);
  RegisteredPool dst = Register("dst1", kvgen::PoolLayoutKind::kTrtllm, kShape, 8, 64);
  kvgen::FillSynthetic(src.View(64), kvgen::SyntheticOptions{});
  auto send_req = [&](const std::string& id) {
    v1::SendRequest s;
    s.set_request_id(id);
    s.set_pool_id(src.id);
    for (uint32_t b : src.blocks) s.add_block_ids(b);
    s.set_num_tokens(64);
    s.set_peer(Address());
    return s;
  };
  auto recv_req = [&](const std::string& id) {
    v1::ReceiveRequest r;
    r.set_request_id(id);
    r.set_pool_id(dst.id);
    for (uint32_t b : dst.blocks) r.add_block_ids(b);
    r.set_num_tokens(64);
    return r;
  };
  // Unknown pools.
  v1::SendRequest s = send_req("e1");
  s.set_pool_id("nope");
  auto sr = client_->Send(s, 5);
  EXPECT_EQ(sr.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(sr.status().message().find("e1"), std::string::npos) << "names the request id";
  v1::ReceiveRequest r = recv_req("e1");
  r.set_pool_id("nope");
  EXPECT_EQ(client_->Receive(r, 5).status().code(), absl::StatusCode::kNotFound);
  // Invalid arguments.
  s = send_req("e2");
  s.mutable_compression()->set_budget(1.5);
  auto bad = client_->Send(s, 5);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("compression.budget"), std::string::npos);
  s = send_req("e3");
  s.mutable_scoring()->mutable_window_queries()->set_window(4);
  s.mutable_scoring()->mutable_window_queries()->set_num_q_heads(4);
  s.mutable_scoring()->mutable_window_queries()->set_data("short");
  bad = client_->Send(s, 5);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("window_queries.data"), std::string::npos) << bad.status();
  s = send_req("bad id with spaces");
  EXPECT_EQ(client_->Send(s, 5).status().code(), absl::StatusCode::kInvalidArgument);
  s = send_req("e4");
  s.clear_block_ids();
  s.add_block_ids(100000);
  EXPECT_EQ(client_->Send(s, 5).status().code(), absl::StatusCode::kInvalidArgument);
  // A peer that does not exist.
  s = send_req("e5");
  s.set_peer("inproc://nobody");
  EXPECT_EQ(client_->Send(s, 5).status().code(), absl::StatusCode::kUnavailable);
  // Expired deadline: a Receive nobody sends to.
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(client_->Receive(recv_req("e6"), 0.3).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(3));
  // Duplicate ids with different content.
  auto pending =
      std::async(std::launch::async, [&] { return client_->Receive(recv_req("e7"), 10); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  v1::ReceiveRequest other = recv_req("e7");
  other.set_num_tokens(63);
  EXPECT_EQ(client_->Receive(other, 5).status().code(), absl::StatusCode::kAlreadyExists);
  // Cancellation through the Cancel RPC.
  v1::CancelRequest c;
  c.set_request_id("e7");
  c.set_reason("integration test");
  auto cr = client_->Cancel(c, 5);
  ASSERT_TRUE(cr.ok()) << cr.status();
  EXPECT_TRUE(cr->cancelled());
  auto cancelled = pending.get();
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(cancelled.status().message().find("integration test"), std::string::npos);
  c.set_request_id("never-existed");
  EXPECT_EQ(client_->Cancel(c, 5).status().code(), absl::StatusCode::kNotFound);
  // Client-side cancellation of the call: the daemon lets go of the transfer.
  {
    auto channel =
        grpc::CreateChannel("unix:" + *dir_ + "/d.sock", grpc::InsecureChannelCredentials());
    auto stub = v1::KvTransfer::NewStub(channel);
    grpc::ClientContext ctx;
    v1::ReceiveResponse resp;
    auto call =
        std::async(std::launch::async, [&] { return stub->Receive(&ctx, recv_req("e8"), &resp); });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ctx.TryCancel();
    EXPECT_EQ(call.get().error_code(), grpc::StatusCode::CANCELLED);
    v1::GetTransferRequest g;
    g.set_request_id("e8");
    for (int i = 0; i < 100; ++i) {
      auto info = client_->GetTransfer(g, 5);
      ASSERT_TRUE(info.ok()) << info.status();
      if (info->state() == "failed") break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(client_->GetTransfer(g, 5)->code(), static_cast<int>(absl::StatusCode::kCancelled));
  }
  // And a good transfer afterwards: the daemon is fine.
  auto recv = std::async(std::launch::async, [&] { return client_->Receive(recv_req("ok1"), 10); });
  auto sent = client_->Send(send_req("ok1"), 10);
  ASSERT_TRUE(sent.ok()) << sent.status();
  auto got = recv.get();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->transfer_id(), sent->transfer_id());
  EXPECT_EQ(got->stats().wire_bytes(), sent->stats().wire_bytes());
  ExpectStillServing();
  auto list = client_->ListTransfers(true, 5);
  ASSERT_TRUE(list.ok());
  EXPECT_GE(list->transfers_size(), 4);
}

TEST_F(DaemonTest, MetricsPassPromtool) {
  auto info = client_->GetDaemonInfo(5);
  ASSERT_TRUE(info.ok());
  auto samples = ScrapeMetrics("127.0.0.1", static_cast<int>(info->metrics_port()), 5);
  ASSERT_TRUE(samples.ok()) << samples.status();
  for (const char* series :
       {"spectrumkv_logical_bytes_total{direction=\"tx\"}",
        "spectrumkv_transfers_total{code=\"DEADLINE_EXCEEDED\",role=\"receive\"}",
        "spectrumkv_inflight_transfers_limit", "spectrumkv_ready",
        "process_resident_memory_bytes"}) {
    EXPECT_TRUE(samples->count(series)) << series;
  }
  bool build_info = false;
  for (const auto& [series, value] : *samples) {
    if (series.rfind("spectrumkv_build_info{", 0) == 0) {
      build_info = value == 1 && series.find("ucx=\"yes\"") != std::string::npos &&
                   series.find("version=\"0.1.0\"") != std::string::npos;
    }
  }
  EXPECT_TRUE(build_info);
  if (access("/usr/bin/promtool", X_OK) != 0) {
    GTEST_SKIP() << "promtool not installed (Debian package prometheus)";
  }
  const std::string script = absl::StrFormat(
      "exec 3<>/dev/tcp/127.0.0.1/%u && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && "
      "sed '1,/^\\r$/d' <&3 | /usr/bin/promtool check metrics",
      info->metrics_port());
  std::string out;
  const int code = RunCommand({"/bin/bash", "-c", script}, 30, &out);
  EXPECT_EQ(code, 0) << out;
}

// Window queries in a shared-memory object (WindowQueries.shm) plan exactly as the same bytes
// sent in the request; bad shm references are INVALID_ARGUMENT naming the field.
TEST_F(DaemonTest, WindowQueriesFromSharedMemory) {
  constexpr uint32_t kTokens = 96, kWindow = 8, kQHeads = 4;
  RegisteredPool src = Register("qsrc", kvgen::PoolLayoutKind::kVllmNhd, kShape, 16, kTokens);
  RegisteredPool dst = Register("qdst", kvgen::PoolLayoutKind::kVllmHnd, kShape, 32, kTokens);
  kvgen::FillSynthetic(src.View(kTokens), kvgen::SyntheticOptions{});
  // Queries that look at tokens 48-63 (scaled copies of their keys), so that the ranking, and
  // with it the tier map, depends on them: without queries the ranking is by position.
  const KvBuffer view = src.View(kTokens);
  std::vector<float> queries;
  for (uint32_t l = 0; l < kShape.num_layers; ++l) {
    for (uint32_t i = 0; i < kWindow; ++i) {
      for (uint32_t h = 0; h < kQHeads; ++h) {
        const uint16_t* k =
            HostRowPtr(view, l, false, 48 + (2 * i + h) % 16, h / (kQHeads / kShape.num_kv_heads));
        for (uint32_t d = 0; d < kShape.head_dim; ++d) {
          queries.push_back(4.0f * ToFloat(DType::kFloat16, k[d]));
        }
      }
    }
  }
  const uint64_t bytes = queries.size() * sizeof(float);
  auto object = kvgen::ShmBytes::Create(absl::StrFormat("/skv-it-%d-queries", getpid()),
                                        std::as_bytes(std::span(queries)), 4096);
  ASSERT_TRUE(object.ok()) << object.status();
  const std::string& name = (*object)->name();

  auto send_req = [&](const std::string& id) {
    v1::SendRequest s;
    s.set_request_id(id);
    s.set_pool_id(src.id);
    for (uint32_t b : src.blocks) s.add_block_ids(b);
    s.set_num_tokens(kTokens);
    s.set_peer(Address());
    s.mutable_compression()->set_budget(0.3);
    v1::WindowQueries* w = s.mutable_scoring()->mutable_window_queries();
    s.mutable_scoring()->set_mode(v1::SCORING_ATTENTION);
    w->set_window(kWindow);
    w->set_num_q_heads(kQHeads);
    return s;
  };
  auto in_shm = [&](v1::SendRequest s, uint64_t offset, uint64_t size) {
    v1::HostSharedMemory* shm = s.mutable_scoring()->mutable_window_queries()->mutable_shm();
    shm->set_name(name);
    shm->set_offset_bytes(offset);
    shm->set_size_bytes(size);
    return s;
  };
  auto transfer = [&](const v1::SendRequest& s) -> std::string {
    v1::ReceiveRequest r;
    r.set_request_id(s.request_id());
    r.set_pool_id(dst.id);
    for (uint32_t b : dst.blocks) r.add_block_ids(b);
    r.set_num_tokens(kTokens);
    auto recv = std::async(std::launch::async, [&] { return client_->Receive(r, 10); });
    auto sent = client_->Send(s, 10);
    auto got = recv.get();
    EXPECT_TRUE(sent.ok()) << sent.status();
    EXPECT_TRUE(got.ok()) << got.status();
    return got.ok() && got->tier_maps_size() == 1 ? got->tier_maps(0) : "";
  };

  v1::SendRequest inline_req = send_req("q-inline");
  inline_req.mutable_scoring()->mutable_window_queries()->set_data(
      reinterpret_cast<const char*>(queries.data()), bytes);
  const std::string from_request = transfer(inline_req);
  const std::string from_shm = transfer(in_shm(send_req("q-shm"), 4096, bytes));
  ASSERT_FALSE(from_request.empty());
  EXPECT_EQ(from_shm, from_request) << "same queries, same tiers";
  // The queries decided the plan: tokens 48-63 (bytes 12-15 of the 2-bit map) are not all in
  // the tier of the earliest non-sink tokens, as a ranking by position would put them.
  EXPECT_NE(from_request.substr(12, 4), std::string(4, from_request[2])) << "queries ignored?";

  auto expect_invalid = [&](const v1::SendRequest& s, const std::string& field) {
    auto r = client_->Send(s, 5);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(field), std::string::npos) << r.status();
  };
  v1::SendRequest both = in_shm(inline_req, 4096, bytes);
  both.set_request_id("q-both");
  expect_invalid(both, "exactly one of data and shm");
  expect_invalid(in_shm(send_req("q-size"), 4096, bytes - 4), "window_queries.shm.size_bytes");
  expect_invalid(in_shm(send_req("q-range"), 8192, bytes), "window_queries.shm");
  v1::SendRequest missing = in_shm(send_req("q-missing"), 0, bytes);
  missing.mutable_scoring()->mutable_window_queries()->mutable_shm()->set_name("/skv-it-nope");
  expect_invalid(missing, "window_queries.shm");
  ExpectStillServing();
}

TEST_F(DaemonTest, FakeFrontendMovesALlamaShapedKv) {
  std::string out;
  const int code =
      RunCommand({SPECTRUMKV_CLI_BIN, "fake-frontend", "--sender", "unix:" + *dir_ + "/d.sock",
                  "--model", "llama3-8b", "--tokens", "512", "--budgets", "1.0", "0.5", "0.3",
                  "--check-metrics", "--timeout-s", "60"},
                 240, &out);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("logical, wire and saved bytes agree on both sides"), std::string::npos)
      << out;
}

TEST_F(DaemonTest, CliCommandsAndExitCodes) {
  const std::string target = "unix:" + *dir_ + "/d.sock";
  std::string out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "health", "--daemon", target}, 20, &out), 0) << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "health", "--daemon", "unix:/tmp/skv-nobody.sock",
                        "--timeout-s", "1"},
                       20, &out),
            69)
      << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "info", "--daemon", target, "--json"}, 20, &out), 0);
  EXPECT_NE(out.find("\"transport\": \"inproc\""), std::string::npos) << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "policy", "--daemon", target, "--model", "qwen2.5-7b",
                        "--int4", "no", "--source", "test"},
                       20, &out),
            0)
      << out;
  EXPECT_NE(out.find("qwen2.5-7b  int4 no"), std::string::npos) << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "cancel", "--daemon", target, "--request-id", "zz"}, 20,
                       &out),
            1)
      << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "send", "--daemon", target}, 20, &out), 64) << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_CLI_BIN, "transfers", "--daemon", target, "--all"}, 20, &out),
            0);
}

TEST(DaemonConfigCheckTest, CheckConfigExitCodes) {
  const std::string dir = absl::StrFormat("/tmp/skv-cfg-%d", getpid());
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/ok.yaml") << kConfig;
  std::ofstream(dir + "/bad.yaml") << "limits:\n  max_pools: many\ncodec:\n  polcy: 3tier\n";
  std::string out;
  EXPECT_EQ(
      RunCommand({SPECTRUMKV_DAEMON_BIN, "--config", dir + "/ok.yaml", "--check-config"}, 20, &out),
      0)
      << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_DAEMON_BIN, "--config", dir + "/bad.yaml", "--check-config"}, 20,
                       &out),
            78);
  EXPECT_NE(out.find("bad.yaml:2:14: limits.max_pools"), std::string::npos) << out;
  EXPECT_NE(out.find("bad.yaml:4:3: codec.polcy: unknown key"), std::string::npos) << out;
  EXPECT_EQ(RunCommand({SPECTRUMKV_DAEMON_BIN, "--config", dir + "/missing.yaml"}, 20, &out), 78);
  EXPECT_EQ(RunCommand({SPECTRUMKV_DAEMON_BIN, "--no-such-flag"}, 20, &out), 64);
  EXPECT_EQ(RunCommand({SPECTRUMKV_DAEMON_BIN, "--config", dir + "/ok.yaml", "--listen-unix",
                        "/tmp/x.sock", "--print-config"},
                       20, &out),
            0);
  EXPECT_NE(out.find("unix_socket: /tmp/x.sock"), std::string::npos) << out;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace spectrumkv
