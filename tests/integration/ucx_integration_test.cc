// Two spectrumkvd processes talking over UCX (TCP on loopback), driven with the spectrumkv
// command and the client library: every policy with a layout change, 64 concurrent transfers,
// a transfer of more than 1 GiB, and a peer killed mid-transfer (the sender fails with
// UNAVAILABLE within its deadline, frees everything, and works again once the peer restarts).
// Every test runs with one UCX lane and with four (chunks spread over four connections, each
// fenced behind its transfer's offer).
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <future>
#include <thread>
#include <type_traits>

#include "absl/strings/str_format.h"
#include "client/cli/metrics_scrape.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/shm_pool.h"
#include "client/kvgen/synthetic.h"
#include "client/lib/client.h"
#include "gtest/gtest.h"
#include "proto/layout_convert.h"
#include "tests/testing/daemon_process.h"
#include "tests/testing/subprocess.h"

namespace spectrumkv {
namespace {

using testing::DaemonPair;
using testing::DaemonProcess;
using testing::RunCommand;

// Limits for a 1 GiB transfer; several chunks per payload, packed by 2 workers.
constexpr char kSettings[] = R"(limits:
  staging_bytes: 1536MiB
  staging_prefault: false
  max_inflight_bytes: 1536MiB
  default_deadline_s: 60
  drain_timeout_s: 2
codec: {chunk_bytes: 8MiB, worker_threads: 2}
)";

template <typename Lanes>
class UcxDaemonsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    setenv("UCX_ERROR_SIGNALS", "", 1);  // no UCX signal handlers under the sanitizers
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
    dir_ = new std::string(absl::StrFormat("/tmp/skv-ucx-%d-%d", getpid(), Lanes::value));
    std::filesystem::create_directories(*dir_);
    daemons_ = new DaemonPair();
    daemons_->Start(SPECTRUMKV_DAEMON_BIN, *dir_, kSettings,
                    absl::StrFormat("ucx_lanes: %d", Lanes::value));
    prefill_ = daemons_->prefill.get();
    decode_ = daemons_->decode.get();
  }
  static void TearDownTestSuite() {
    daemons_->Stop();
    delete daemons_;
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }

  static int FakeFrontend(std::vector<std::string> extra, std::string* out, double timeout = 300) {
    std::vector<std::string> argv = {
        SPECTRUMKV_CLI_BIN, "fake-frontend",           "--sender",       "unix:" + prefill_->socket,
        "--receiver",       "unix:" + decode_->socket, "--check-metrics"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    const int code = RunCommand(argv, timeout, out);
    // A failed run carries the ends of both daemons' logs (the suite's folder goes at its end).
    if (code != 0) {
      for (const DaemonProcess* d : {prefill_, decode_}) {
        const std::string log = d->Log();
        *out += "\n--- " + d->name + " log (end) ---\n" +
                log.substr(log.size() > 6000 ? log.size() - 6000 : 0);
      }
    }
    return code;
  }

  static std::string* dir_;
  static DaemonPair* daemons_;
  static DaemonProcess* prefill_;
  static DaemonProcess* decode_;
};

template <typename Lanes>
std::string* UcxDaemonsTest<Lanes>::dir_ = nullptr;
template <typename Lanes>
DaemonPair* UcxDaemonsTest<Lanes>::daemons_ = nullptr;
template <typename Lanes>
DaemonProcess* UcxDaemonsTest<Lanes>::prefill_ = nullptr;
template <typename Lanes>
DaemonProcess* UcxDaemonsTest<Lanes>::decode_ = nullptr;

struct LaneNames {
  template <typename Lanes>
  static std::string GetName(int) {
    return absl::StrFormat("%dlane", Lanes::value);
  }
};
using LaneCounts = ::testing::Types<std::integral_constant<int, 1>, std::integral_constant<int, 4>>;
TYPED_TEST_SUITE(UcxDaemonsTest, LaneCounts, LaneNames);

TYPED_TEST(UcxDaemonsTest, EveryPolicyWithALayoutChange) {
  for (const char* policy :
       {"3tier", "2tier", "sinkprotect", "uniform_int8", "uniform_int4", "pdtrim", "random_tier"}) {
    std::string out;
    const int code = TestFixture::FakeFrontend(
        {"--model", "qwen2.5-7b", "--tokens", "300", "--src-layout", "vllm-nhd", "--src-block-size",
         "16", "--dst-layout", "trtllm", "--dst-block-size", "64", "--budgets", "0.3", "0.6",
         "--policy", policy},
        &out);
    EXPECT_EQ(code, 0) << policy << "\n" << out;
    EXPECT_NE(out.find("agree on both sides"), std::string::npos) << policy << "\n" << out;
  }
  std::string out;
  EXPECT_EQ(TestFixture::FakeFrontend(
                {"--model", "tiny", "--tokens", "257", "--quantizer", "kcn", "--scoring",
                 "attention", "--src-layout", "sglang", "--src-block-size", "1", "--dst-layout",
                 "vllm-hnd", "--budgets", "0.3"},
                &out),
            0)
      << out;
  // Progressive payloads (bases before the prelude, refinements after, parts of layers as
  // chunks) at 0.3 and 0.4, an absmax one at 0.6 (FP16 tokens), verified on the decode side.
  EXPECT_EQ(TestFixture::FakeFrontend({"--model", "llama3-8b", "--tokens", "300", "--quantizer",
                                       "progressive", "--dst-layout", "sglang", "--dst-block-size",
                                       "1", "--budgets", "0.3", "0.4", "0.6"},
                                      &out),
            0)
      << out;
  EXPECT_NE(out.find("agree on both sides"), std::string::npos) << out;
}

TYPED_TEST(UcxDaemonsTest, SixtyFourConcurrentTransfers) {
  std::string out;
  const int code =
      TestFixture::FakeFrontend({"--model", "tiny", "--tokens", "1024", "--budgets", "0.5",
                                 "--concurrency", "64", "--order", "concurrent"},
                                &out);
  EXPECT_EQ(code, 0) << out;
}

TYPED_TEST(UcxDaemonsTest, StreamedTransfersBackToBack) {
  // 8 slots x 6 transfers each, every slot starting its next Receive + Send as soon as the last
  // returned: request ids never collide, the metrics count all 48 per budget, the last transfer
  // of each slot is verified.
  std::string out;
  const int code =
      TestFixture::FakeFrontend({"--model", "tiny", "--tokens", "700", "--budgets", "1.0", "0.3",
                                 "--concurrency", "8", "--rounds", "6", "--streaming"},
                                &out);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("8 request(s) at a time (streaming), 6 round(s)"), std::string::npos) << out;
  EXPECT_NE(out.find("GB/s of KV over the wall time of the stream"), std::string::npos) << out;
  EXPECT_NE(out.find("agree on both sides"), std::string::npos) << out;
  EXPECT_EQ(out.find("FAILED"), std::string::npos) << out;
}

TYPED_TEST(UcxDaemonsTest, OneGibibyteTransfer) {
  std::string out;
  // llama3-8b at 8192 tokens is 1.07 GB of FP16 KV; b = 1.0 sends all of it.
  const int code = TestFixture::FakeFrontend(
      {"--model", "llama3-8b", "--tokens", "8192", "--budgets", "1.0", "--timeout-s", "240"}, &out,
      600);
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("1073.7"), std::string::npos) << out;
}

TYPED_TEST(UcxDaemonsTest, PeerKilledMidTransferThenRestarted) {
  // A big transfer so that it is surely in flight when the decode daemon dies.
  const ModelShape shape{32, 8, 128};
  const uint32_t n = 4096;
  kvgen::PoolSpec spec{kvgen::PoolLayoutKind::kVllmNhd, shape, DType::kFloat16, 16,
                       kvgen::BlocksFor(n, 16)};
  auto shm = std::move(*kvgen::ShmPool::Create(absl::StrFormat("skv-kill-%d", getpid()), spec));
  std::vector<uint32_t> blocks(spec.num_blocks);
  for (uint32_t i = 0; i < blocks.size(); ++i) blocks[i] = i;
  kvgen::FillSynthetic(shm->View(blocks, n), kvgen::SyntheticOptions{});
  v1::RegisterPoolRequest reg;
  reg.set_pool_id("kill-src");
  *reg.mutable_layout() = LayoutToProto(shm->layout());
  for (size_t i = 0; i < shm->names().size(); ++i) {
    auto* h = reg.add_regions()->mutable_host_shm();
    h->set_name(shm->names()[i]);
    h->set_size_bytes(shm->regions()[i].size_bytes);
  }
  ASSERT_TRUE(TestFixture::prefill_->client->RegisterPool(reg, 10).ok());
  v1::SendRequest send;
  send.set_request_id("killed-peer");
  send.set_pool_id("kill-src");
  for (uint32_t b : blocks) send.add_block_ids(b);
  send.set_num_tokens(n);
  send.set_peer(TestFixture::decode_->ucx_address);
  send.mutable_compression()->set_budget(1.0);
  // No Receive on the decode side: the payload streams into its early buffer, and the Send waits
  // for an acknowledgement that never comes.
  const auto t0 = std::chrono::steady_clock::now();
  auto pending =
      std::async(std::launch::async, [&] { return TestFixture::prefill_->client->Send(send, 30); });
  v1::GetTransferRequest get;
  get.set_request_id("killed-peer");
  for (int i = 0; i < 200; ++i) {
    auto info = TestFixture::prefill_->client->GetTransfer(get, 5);
    if (info.ok() && (info->state() == "sending" || info->state() == "awaiting_ack")) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(TestFixture::decode_->process.Stop(SIGKILL, 10).has_value());
  auto result = pending.get();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable) << result.status();
  EXPECT_LT(seconds, 30.0) << "the failure must arrive within the deadline";

  // The survivor is healthy and holds nothing for the dead transfer.
  auto health = TestFixture::prefill_->client->Health(5);
  ASSERT_TRUE(health.ok() && *health);
  auto info = TestFixture::prefill_->client->GetDaemonInfo(5);
  ASSERT_TRUE(info.ok());
  for (int i = 0; i < 100; ++i) {
    auto m = ScrapeMetrics("127.0.0.1", static_cast<int>(info->metrics_port()), 5);
    ASSERT_TRUE(m.ok());
    if ((*m)["spectrumkv_inflight_bytes"] == 0 && (*m)["spectrumkv_inflight_transfers"] == 0) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto m = *ScrapeMetrics("127.0.0.1", static_cast<int>(info->metrics_port()), 5);
  EXPECT_EQ(m["spectrumkv_inflight_bytes"], 0);
  EXPECT_EQ(m["spectrumkv_inflight_transfers"], 0);
  EXPECT_GE(m["spectrumkv_transfers_total{code=\"UNAVAILABLE\",role=\"send\"}"], 1);
  ASSERT_TRUE(TestFixture::prefill_->client->UnregisterPool("kill-src", 5).ok());

  // The restarted peer, on the same address, is usable again.
  TestFixture::decode_->Start();
  std::string out;
  EXPECT_EQ(
      TestFixture::FakeFrontend({"--model", "tiny", "--tokens", "300", "--budgets", "0.5"}, &out),
      0)
      << out;
}

}  // namespace
}  // namespace spectrumkv
