// Two spectrumkvd processes over UCX (TCP on loopback) with KV pools in GPU memory. This test
// plays both frontends: it cudaMallocs the pools, exports their CUDA IPC handles, registers them
// with the daemons and drives Receive and Send. Each daemon imports the handles, packs or unpacks
// with the CUDA codec, and stages every chunk through pinned host memory (Debian's UCX has no
// CUDA transport). What arrives is compared bit for bit with what the CPU reference codec makes
// of the same source and the tier maps the receiver reports. GPU only: skips without a device.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <future>
#include <thread>

#include "absl/strings/str_format.h"
#include "client/cli/metrics_scrape.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/shm_pool.h"
#include "client/kvgen/synthetic.h"
#include "client/lib/client.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_codec.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.h"
#include "proto/layout_convert.h"
#include "tests/testing/daemon_process.h"

namespace spectrumkv {
namespace {

using kvgen::PoolLayoutKind;
using testing::DaemonPair;
using testing::DaemonProcess;

constexpr ModelShape kShape{8, 4, 128};
constexpr uint32_t kTokens = 1000;

std::string DaemonBinary() {
  const char* env = std::getenv("SPECTRUMKV_DAEMON_BIN");
  return env != nullptr ? env : SPECTRUMKV_DAEMON_BIN;
}

void Check(const absl::Status& s) { ASSERT_TRUE(s.ok()) << s; }

// The CUDA backend; small chunks, so that a payload travels as several chunks of whole layers.
constexpr char kSettings[] = R"(limits:
  staging_bytes: 256MiB
  staging_prefault: false
  max_inflight_bytes: 256MiB
  default_deadline_s: 60
  drain_timeout_s: 2
codec: {backend: cuda, chunk_bytes: 1MiB, worker_threads: 2}
)";

// A KV pool in this process's GPU memory, with a host mirror of the same layout for filling and
// checking it.
struct GpuPool {
  std::unique_ptr<kvgen::HostPool> host;
  std::vector<cuda::DeviceBuffer> regions;
  std::vector<uint32_t> table;

  static GpuPool Make(PoolLayoutKind kind, uint32_t block_size, uint64_t seed) {
    GpuPool p;
    kvgen::PoolSpec spec{kind, kShape, DType::kFloat16, block_size,
                         kvgen::BlocksFor(kTokens, block_size) + 2};
    p.host = std::move(*kvgen::HostPool::Create(spec));
    for (const MemoryRegion& r : p.host->regions()) {
      auto b = cuda::DeviceBuffer::Allocate(r.size_bytes);
      EXPECT_TRUE(b.ok()) << b.status();
      p.regions.push_back(std::move(*b));
    }
    p.table = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, kTokens, seed);
    return p;
  }
  KvBuffer HostView() const { return host->View(table, kTokens); }
  void Upload() const {
    for (size_t i = 0; i < regions.size(); ++i) {
      Check(cuda::CopyToDevice(regions[i].data(), host->regions()[i].base,
                               host->regions()[i].size_bytes));
    }
  }
  void Download() const {
    for (size_t i = 0; i < regions.size(); ++i) {
      Check(cuda::CopyToHost(host->regions()[i].base, regions[i].data(),
                             host->regions()[i].size_bytes));
    }
  }
  void Zero() const {
    for (const cuda::DeviceBuffer& r : regions) Check(cuda::FillDevice(r.data(), 0, r.size()));
  }
  v1::RegisterPoolRequest Registration(const std::string& id) const {
    v1::RegisterPoolRequest reg;
    reg.set_pool_id(id);
    *reg.mutable_layout() = LayoutToProto(host->layout());
    for (const cuda::DeviceBuffer& r : regions) {
      auto exported = cuda::ExportIpcHandle(r.data());
      EXPECT_TRUE(exported.ok()) << exported.status();
      v1::CudaIpcMemory* c = reg.add_regions()->mutable_cuda_ipc();
      c->set_ipc_handle(exported->handle);
      c->set_device(0);
      c->set_offset_bytes(exported->offset_bytes);
      c->set_size_bytes(r.size());
    }
    return reg;
  }
};

class CudaIpcDaemonsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const absl::Status device = cuda::CheckDevice(0);
    if (!device.ok()) {
      skip_ = new std::string("no CUDA device: " + device.ToString());
      return;
    }
    setenv("UCX_ERROR_SIGNALS", "", 1);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);
    dir_ = new std::string(absl::StrFormat("/tmp/skv-cuda-ipc-%d", getpid()));
    std::filesystem::create_directories(*dir_);
    daemons_ = new DaemonPair();
    daemons_->Start(DaemonBinary(), *dir_, kSettings);
    prefill_ = daemons_->prefill.get();
    decode_ = daemons_->decode.get();
  }
  static void TearDownTestSuite() {
    if (daemons_ != nullptr) daemons_->Stop();
    delete daemons_;
    daemons_ = nullptr;
    prefill_ = decode_ = nullptr;
    if (dir_ != nullptr) std::filesystem::remove_all(*dir_);
    delete dir_;
    dir_ = nullptr;
  }
  void SetUp() override {
    if (skip_ != nullptr) GTEST_SKIP() << *skip_;
    ASSERT_NE(prefill_, nullptr);
    ASSERT_TRUE(prefill_->process.running() && decode_->process.running());
  }

  // Receive on the decode daemon, then Send from the prefill daemon.
  static std::pair<absl::StatusOr<v1::SendResponse>, absl::StatusOr<v1::ReceiveResponse>> Transfer(
      const std::string& id, const std::string& src_pool, const std::vector<uint32_t>& src_table,
      const std::string& dst_pool, const std::vector<uint32_t>& dst_table, double budget) {
    v1::ReceiveRequest rr;
    rr.set_request_id(id);
    rr.set_pool_id(dst_pool);
    for (uint32_t b : dst_table) rr.add_block_ids(b);
    rr.set_num_tokens(kTokens);
    auto recv = std::async(std::launch::async, [rr] { return decode_->client->Receive(rr, 60); });
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    v1::SendRequest sr;
    sr.set_request_id(id);
    sr.set_pool_id(src_pool);
    for (uint32_t b : src_table) sr.add_block_ids(b);
    sr.set_num_tokens(kTokens);
    sr.set_peer(decode_->ucx_address);
    sr.mutable_compression()->set_budget(budget);
    auto sent = prefill_->client->Send(sr, 60);
    return {std::move(sent), recv.get()};
  }

  // `dst` holds exactly what the CPU reference codec makes of `src` with the tier maps the
  // receiver reported: packed from the same source, unpacked into a zeroed pool of dst's layout.
  static void ExpectLikeTheReference(const KvBuffer& src, const kvgen::HostPool& dst_pool,
                                     const std::vector<uint32_t>& dst_table,
                                     const v1::ReceiveResponse& r) {
    ASSERT_EQ(r.tier_maps_size(), 1);
    std::vector<uint8_t> tiers(kTokens);
    for (uint32_t t = 0; t < kTokens; ++t) {
      tiers[t] = (static_cast<uint8_t>(r.tier_maps(0)[t / 4]) >> (2 * (t % 4))) & 3;
    }
    auto plan =
        PlanFromTiers(kShape, DType::kFloat16, kTokens, tiers, Policy::k3Tier, Quantizer::kAbsmax);
    ASSERT_TRUE(plan.ok()) << plan.status();
    CpuCodec cpu(ScalarRowKernels());
    auto payload = PackPayload(cpu, src, *plan);
    ASSERT_TRUE(payload.ok()) << payload.status();
    EXPECT_EQ(payload->size(), r.stats().wire_bytes());
    auto expect = std::move(*kvgen::HostPool::Create(dst_pool.spec()));
    ASSERT_TRUE(
        UnpackPayload(cpu, *payload, expect->View(dst_table, kTokens), payload->size()).ok());
    for (size_t i = 0; i < expect->regions().size(); ++i) {
      ASSERT_EQ(std::memcmp(expect->regions()[i].base, dst_pool.regions()[i].base,
                            expect->regions()[i].size_bytes),
                0)
          << "region " << i << " differs from the reference";
    }
  }

  static double Metric(DaemonProcess& d, const std::string& name) {
    auto info = d.client->GetDaemonInfo(5);
    EXPECT_TRUE(info.ok());
    auto m = ScrapeMetrics("127.0.0.1", static_cast<int>(info->metrics_port()), 5);
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? (*m)[name] : -1;
  }

  static std::string* skip_;
  static std::string* dir_;
  static DaemonPair* daemons_;
  static DaemonProcess* prefill_;
  static DaemonProcess* decode_;
};

std::string* CudaIpcDaemonsTest::skip_ = nullptr;
std::string* CudaIpcDaemonsTest::dir_ = nullptr;
DaemonPair* CudaIpcDaemonsTest::daemons_ = nullptr;
DaemonProcess* CudaIpcDaemonsTest::prefill_ = nullptr;
DaemonProcess* CudaIpcDaemonsTest::decode_ = nullptr;

TEST_F(CudaIpcDaemonsTest, GpuToGpuWithALayoutChange) {
  GpuPool src = GpuPool::Make(PoolLayoutKind::kVllmNhd, 16, 1);
  GpuPool dst = GpuPool::Make(PoolLayoutKind::kVllmHnd, 32, 2);
  kvgen::SyntheticOptions syn;
  syn.seed = 11;
  kvgen::FillSynthetic(src.HostView(), syn);
  src.Upload();
  auto r1 = prefill_->client->RegisterPool(src.Registration("gpu-src"), 30);
  ASSERT_TRUE(r1.ok()) << r1.status() << "\n" << prefill_->Log();
  auto r2 = decode_->client->RegisterPool(dst.Registration("gpu-dst"), 30);
  ASSERT_TRUE(r2.ok()) << r2.status() << "\n" << decode_->Log();
  auto pools = decode_->client->ListPools(5);
  ASSERT_TRUE(pools.ok());
  ASSERT_EQ(pools->pools_size(), 1);
  EXPECT_EQ(pools->pools(0).memory_kind(), "cuda");

  int n = 0;
  for (double budget : {1.0, 0.5, 0.3}) {
    dst.Zero();
    auto [s, r] = Transfer(absl::StrFormat("g2g-%d", n++), "gpu-src", src.table, "gpu-dst",
                           dst.table, budget);
    ASSERT_TRUE(s.ok()) << budget << ": " << s.status() << "\n" << prefill_->Log();
    ASSERT_TRUE(r.ok()) << budget << ": " << r.status() << "\n" << decode_->Log();
    EXPECT_EQ(s->stats().backend(), "cuda");
    EXPECT_EQ(r->stats().backend(), "cuda");
    EXPECT_GT(s->stats().timings().stage_copy_s(), 0.0) << "the sender copies device->host";
    EXPECT_GT(r->stats().timings().stage_copy_s(), 0.0) << "the receiver copies host->device";
    EXPECT_EQ(s->stats().wire_bytes(), r->stats().wire_bytes());
    dst.Download();
    ExpectLikeTheReference(src.HostView(), *dst.host, dst.table, *r);
    std::printf(
        "b=%.1f: %lu wire bytes of %lu; sender pack %.2f ms, stage_copy %.2f ms; "
        "receiver stage_copy %.2f ms, unpack %.2f ms\n",
        budget, static_cast<unsigned long>(s->stats().wire_bytes()),
        static_cast<unsigned long>(s->stats().logical_bytes()), s->stats().timings().pack_s() * 1e3,
        s->stats().timings().stage_copy_s() * 1e3, r->stats().timings().stage_copy_s() * 1e3,
        r->stats().timings().unpack_s() * 1e3);
  }
  EXPECT_GE(Metric(*prefill_, "spectrumkv_stage_duration_seconds_count{stage=\"stage_copy\"}"), 3);
  EXPECT_GE(Metric(*decode_, "spectrumkv_stage_duration_seconds_count{stage=\"stage_copy\"}"), 3);
  for (int i = 0; i < 100 && Metric(*prefill_, "spectrumkv_inflight_bytes") != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Metric(*prefill_, "spectrumkv_inflight_bytes"), 0);
  // Both daemons pinned their staging arenas.
  EXPECT_NE(prefill_->Log().find("pinned for device copies"), std::string::npos) << prefill_->Log();
  EXPECT_NE(decode_->Log().find("pinned for device copies"), std::string::npos) << decode_->Log();
  EXPECT_TRUE(prefill_->client->UnregisterPool("gpu-src", 5).ok());
  EXPECT_TRUE(decode_->client->UnregisterPool("gpu-dst", 5).ok());
}

TEST_F(CudaIpcDaemonsTest, GpuAndHostPoolsMix) {
  GpuPool gpu_src = GpuPool::Make(PoolLayoutKind::kTrtllm, 16, 3);
  GpuPool gpu_dst = GpuPool::Make(PoolLayoutKind::kSglang, 1, 4);
  kvgen::SyntheticOptions syn;
  syn.seed = 12;
  kvgen::FillSynthetic(gpu_src.HostView(), syn);
  gpu_src.Upload();
  gpu_dst.Zero();
  kvgen::PoolSpec host_spec{PoolLayoutKind::kVllmNhd, kShape, DType::kFloat16, 16,
                            kvgen::BlocksFor(kTokens, 16) + 2};
  auto shm_dst =
      std::move(*kvgen::ShmPool::Create(absl::StrFormat("skv-cuda-dst-%d", getpid()), host_spec));
  auto shm_src =
      std::move(*kvgen::ShmPool::Create(absl::StrFormat("skv-cuda-src-%d", getpid()), host_spec));
  const std::vector<uint32_t> host_table =
      kvgen::ShuffledBlockTable(host_spec.num_blocks, 16, kTokens, 5);
  kvgen::FillSynthetic(shm_src->View(host_table, kTokens), syn);
  auto shm_registration = [](const std::string& id, const kvgen::ShmPool& shm) {
    v1::RegisterPoolRequest reg;
    reg.set_pool_id(id);
    *reg.mutable_layout() = LayoutToProto(shm.layout());
    for (size_t i = 0; i < shm.names().size(); ++i) {
      auto* h = reg.add_regions()->mutable_host_shm();
      h->set_name(shm.names()[i]);
      h->set_size_bytes(shm.regions()[i].size_bytes);
    }
    return reg;
  };
  ASSERT_TRUE(prefill_->client->RegisterPool(gpu_src.Registration("mix-gpu-src"), 30).ok());
  ASSERT_TRUE(prefill_->client->RegisterPool(shm_registration("mix-host-src", *shm_src), 30).ok());
  ASSERT_TRUE(decode_->client->RegisterPool(gpu_dst.Registration("mix-gpu-dst"), 30).ok());
  ASSERT_TRUE(decode_->client->RegisterPool(shm_registration("mix-host-dst", *shm_dst), 30).ok());

  // GPU -> host: packed on the GPU, unpacked by the CPU codec.
  {
    auto [s, r] = Transfer("g2h", "mix-gpu-src", gpu_src.table, "mix-host-dst", host_table, 0.5);
    ASSERT_TRUE(s.ok()) << s.status() << "\n" << prefill_->Log();
    ASSERT_TRUE(r.ok()) << r.status() << "\n" << decode_->Log();
    EXPECT_EQ(s->stats().backend(), "cuda");
    EXPECT_NE(r->stats().backend(), "cuda");
    EXPECT_EQ(r->stats().timings().stage_copy_s(), 0.0);
    auto mirror = std::move(*kvgen::HostPool::Create(host_spec));
    for (size_t i = 0; i < mirror->regions().size(); ++i) {
      std::memcpy(mirror->regions()[i].base, shm_dst->regions()[i].base,
                  mirror->regions()[i].size_bytes);
    }
    ExpectLikeTheReference(gpu_src.HostView(), *mirror, host_table, *r);
  }
  // Host -> GPU: packed by the CPU codec, unpacked on the GPU.
  {
    auto [s, r] = Transfer("h2g", "mix-host-src", host_table, "mix-gpu-dst", gpu_dst.table, 0.3);
    ASSERT_TRUE(s.ok()) << s.status() << "\n" << prefill_->Log();
    ASSERT_TRUE(r.ok()) << r.status() << "\n" << decode_->Log();
    EXPECT_NE(s->stats().backend(), "cuda");
    EXPECT_EQ(s->stats().timings().stage_copy_s(), 0.0);
    EXPECT_EQ(r->stats().backend(), "cuda");
    gpu_dst.Download();
    ExpectLikeTheReference(shm_src->View(host_table, kTokens), *gpu_dst.host, gpu_dst.table, *r);
  }
  for (const char* id : {"mix-gpu-src", "mix-host-src"}) {
    EXPECT_TRUE(prefill_->client->UnregisterPool(id, 5).ok());
  }
  for (const char* id : {"mix-gpu-dst", "mix-host-dst"}) {
    EXPECT_TRUE(decode_->client->UnregisterPool(id, 5).ok());
  }
}

TEST_F(CudaIpcDaemonsTest, BadRegistrationsAreRefusedWithTheirCodes) {
  GpuPool pool = GpuPool::Make(PoolLayoutKind::kVllmNhd, 16, 6);
  // A region that reaches past the end of its allocation (far past: the driver may round an
  // allocation up to its granularity).
  v1::RegisterPoolRequest reg = pool.Registration("bad");
  reg.mutable_regions(0)->mutable_cuda_ipc()->set_offset_bytes(uint64_t{64} << 20);
  auto r = decode_->client->RegisterPool(reg, 30);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(r.status().message().find("outside the imported allocation"), std::string::npos)
      << r.status();
  // A handle that opens nothing.
  reg = pool.Registration("bad");
  std::string garbage(64, '\x5a');
  reg.mutable_regions(0)->mutable_cuda_ipc()->set_ipc_handle(garbage);
  r = decode_->client->RegisterPool(reg, 30);
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().code(), absl::StatusCode::kInternal) << r.status();
  // Another device than the daemon's.
  reg = pool.Registration("bad");
  reg.mutable_regions(0)->mutable_cuda_ipc()->set_device(1);
  r = decode_->client->RegisterPool(reg, 30);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  // The daemon still serves, and the good registration works.
  auto ok = decode_->client->RegisterPool(pool.Registration("good"), 30);
  EXPECT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(decode_->client->UnregisterPool("good", 5).ok());
}

}  // namespace
}  // namespace spectrumkv
