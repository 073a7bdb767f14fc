// The transfer manager, driven in-process: two "daemons" (each a manager with its own pools,
// staging arena, executor, timers and in-process transport) exchange real payloads.
#include "daemon/transfer/transfer_manager.h"

#include <unistd.h>

#include <atomic>
#include <cstring>
#include <future>
#include <random>
#include <thread>

#include "absl/strings/str_format.h"
#include "client/kvgen/host_pool.h"
#include "client/kvgen/shm_pool.h"
#include "client/kvgen/synthetic.h"
#include "daemon/transport/inproc_transport.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_codec.h"
#include "tests/testing/fake_device.h"
#include "tests/testing/fault_transport.h"

namespace spectrumkv {
namespace {

using kvgen::PoolLayoutKind;

constexpr ModelShape kShape{4, 2, 64};
constexpr uint32_t kTokens = 100;

int node_counter = 0;

// Small chunks: every layer travels as its own chunk, so faults can target one layer.
// One layer per chunk; each chunk of a host payload packed and unpacked in two slices by the
// executor's two workers, the first two checksummed in two parts.
TransferManagerOptions TestOptions() {
  TransferManagerOptions o;
  o.chunk_bytes = 1;
  o.pack_threads = 2;
  o.checksum_parts_bytes = 0;
  return o;
}

// Pool memory lent to the registry without ownership (a fake GPU pool's region).
class BorrowedMemory final : public ImportedMemory {
 public:
  explicit BorrowedMemory(const MemoryRegion& r) : region_(r) {}
  void* data() const override { return region_.base; }
  uint64_t size() const override { return region_.size_bytes; }

 private:
  MemoryRegion region_;
};

// The host CPU codec, recording into how many slices the transfer manager cut its chunks (1: a
// whole-chunk PackLayers / UnpackLayers call), with hooks into its scoring.
class SliceRecordingCodec final : public Codec {
 public:
  SliceRecordingCodec() : inner_(CpuCodec::CreateBest()) {}
  std::string_view name() const override { return inner_->name(); }
  MemoryKind memory_kind() const override { return inner_->memory_kind(); }
  absl::Status Score(const KvBuffer& kv, const ScoreOptions& o, std::span<float> s) override {
    if (on_score) on_score();
    return inner_->Score(kv, o, s);
  }
  absl::StatusOr<TierPlan> ScoreAndPlan(const KvBuffer& kv, const ScoreOptions& so,
                                        const PlanOptions& po) override {
    PlanOptions o = po;
    if (scored_budget > 0) o.budget = scored_budget;
    return Codec::ScoreAndPlan(kv, so, o);
  }
  absl::Status PackLayers(const KvBuffer& src, const TierPlan& plan, uint32_t first, uint32_t last,
                          std::span<uint8_t> payload) override {
    pack_slices = 1;
    return inner_->PackLayers(src, plan, first, last, payload);
  }
  absl::Status UnpackLayers(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                            const KvBuffer& dst, uint32_t first, uint32_t last,
                            VerifyMode verify) override {
    unpack_slices = 1;
    return inner_->UnpackLayers(prelude, payload, dst, first, last, verify);
  }
  uint32_t max_slices() const override { return inner_->max_slices(); }
  absl::Status PackLayerSlice(const KvBuffer& src, const TierPlan& plan, uint32_t first,
                              uint32_t last, uint32_t slice, uint32_t slices,
                              std::span<uint8_t> payload) override {
    pack_slices = slices;
    if (on_pack_slice) {
      if (absl::Status s = on_pack_slice(slice); !s.ok()) return s;
    }
    return inner_->PackLayerSlice(src, plan, first, last, slice, slices, payload);
  }
  absl::Status SealLayers(const TierPlan& plan, uint32_t first, uint32_t last,
                          std::span<uint8_t> payload) override {
    return inner_->SealLayers(plan, first, last, payload);
  }
  absl::Status PackProgressiveSlice(const KvBuffer& src, const TierPlan& plan, ProgressivePart part,
                                    uint32_t first, uint32_t last, uint32_t slice, uint32_t slices,
                                    std::span<uint8_t> payload) override {
    pack_slices = slices;
    if (on_pack_slice) {
      if (absl::Status s = on_pack_slice(slice); !s.ok()) return s;
    }
    return inner_->PackProgressiveSlice(src, plan, part, first, last, slice, slices, payload);
  }
  absl::Status UnpackLayerSlice(const ParsedPrelude& prelude, std::span<const uint8_t> payload,
                                const KvBuffer& dst, uint32_t first, uint32_t last, uint32_t slice,
                                uint32_t slices) override {
    unpack_slices = slices;
    return inner_->UnpackLayerSlice(prelude, payload, dst, first, last, slice, slices);
  }
  std::atomic<uint32_t> pack_slices{0}, unpack_slices{0};  // the last call's
  std::function<void()> on_score;                          // called as a scoring pass starts
  std::function<absl::Status(uint32_t)> on_pack_slice;     // called as a slice is packed
  double scored_budget = 0;  // > 0: the scored plan is made for this budget (a codec bug)

 private:
  std::unique_ptr<CpuCodec> inner_;
};

// One daemon's components. With `gpu`, it also has a fake GPU (tests/testing/fake_device.h): GPU
// pools whose "CUDA IPC handles" name regions of host memory that the fake device memory treats
// as device memory, and (unless `device_codec` is false) a device codec with that memory.
class Node {
 public:
  explicit Node(TransferManagerOptions options = TestOptions(), uint64_t staging_bytes = 64 << 20,
                bool gpu = false, bool device_codec = true)
      : name_(absl::StrFormat("n%d-%d", getpid(), node_counter++)),
        gpu_(gpu),
        metrics_(BuildInfo{"test", "", "no", "no", "cpu"}),
        staging_(std::move(*StagingArena::Create(staging_bytes, false, false))),
        pools_(16,
               [this](const CudaIpcSpec& spec) -> absl::StatusOr<std::unique_ptr<ImportedMemory>> {
                 return ImportGpuRegion(spec);
               }),
        codec_(std::make_unique<SliceRecordingCodec>()),
        device_codec_(*codec_, device_memory_),
        inproc_(name_),
        faults_(inproc_),
        executor_(2, "test"),
        manager_(std::make_unique<TransferManager>(
            options, pools_,
            gpu && device_codec ? CodecSet{codec_.get(), &device_codec_, &device_memory_}
                                : CodecSet{codec_.get(), nullptr},
            faults_, *staging_, metrics_, executor_, timers_, models_)) {
    EXPECT_TRUE(faults_.Start(manager_.get()).ok());
  }
  ~Node() {
    Stop();
    for (const auto& [id, pool] : gpu_pools_) {
      for (const MemoryRegion& r : pool->regions()) device_memory_.RemoveRegion(r.base);
    }
  }
  void Stop() {
    if (!manager_) return;
    faults_.Shutdown();
    executor_.Shutdown();
    manager_.reset();
  }

  // Creates a shared-memory pool (layout `kind`) with one request's blocks and registers it.
  std::string AddPool(PoolLayoutKind kind, uint32_t block_size, ModelShape shape = kShape,
                      uint32_t tokens = kTokens) {
    const std::string id = NewPoolId();
    kvgen::PoolSpec spec{kind, shape, DType::kFloat16, block_size,
                         kvgen::BlocksFor(tokens, block_size) + 1};
    auto& shm = shm_[id] = std::move(*kvgen::ShmPool::Create("skv-" + id, spec));
    PoolSpec ps;
    ps.pool_id = id;
    ps.layout = shm->layout();
    for (size_t i = 0; i < shm->names().size(); ++i) {
      ps.regions.push_back(HostShmSpec{shm->names()[i], 0, shm->regions()[i].size_bytes});
    }
    EXPECT_TRUE(pools_.Register(ps).ok());
    tables_[id] = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, tokens, pools_made_);
    return id;
  }
  // Creates a GPU pool (on the fake GPU) and registers it through "CUDA IPC handles".
  std::string AddGpuPool(PoolLayoutKind kind, uint32_t block_size, ModelShape shape = kShape,
                         uint32_t tokens = kTokens) {
    EXPECT_TRUE(gpu_) << "a GPU pool on a node without a GPU";
    const std::string id = NewPoolId();
    kvgen::PoolSpec spec{kind, shape, DType::kFloat16, block_size,
                         kvgen::BlocksFor(tokens, block_size) + 1};
    auto& pool = gpu_pools_[id] = std::move(*kvgen::HostPool::Create(spec));
    PoolSpec ps;
    ps.pool_id = id;
    ps.layout = pool->layout();
    for (size_t i = 0; i < pool->regions().size(); ++i) {
      device_memory_.AddRegion(pool->regions()[i].base, pool->regions()[i].size_bytes);
      ps.regions.push_back(
          CudaIpcSpec{absl::StrFormat("%s/%u", id, i), 0, 0, pool->regions()[i].size_bytes});
    }
    const absl::StatusOr<std::shared_ptr<Pool>> registered = pools_.Register(ps);
    EXPECT_TRUE(registered.ok()) << registered.status();
    if (registered.ok()) {
      EXPECT_EQ((*registered)->memory_kind(), MemoryKind::kDevice);
    }
    tables_[id] = kvgen::ShuffledBlockTable(spec.num_blocks, block_size, tokens, pools_made_);
    return id;
  }
  // A host view of any pool's memory (a fake GPU's memory is host memory).
  KvBuffer View(const std::string& pool_id, uint32_t tokens = kTokens) {
    if (auto it = gpu_pools_.find(pool_id); it != gpu_pools_.end()) {
      return it->second->View(tables_[pool_id], tokens);
    }
    return shm_.at(pool_id)->View(tables_[pool_id], tokens);
  }
  const std::vector<uint32_t>& Blocks(const std::string& pool_id) { return tables_[pool_id]; }

  TransferManager& manager() { return *manager_; }
  testing::FaultTransport& faults() { return faults_; }
  StagingArena& staging() { return *staging_; }
  Metrics& metrics() { return metrics_; }
  ModelPolicies& models() { return models_; }
  testing::FakeDeviceMemory& device_memory() { return device_memory_; }
  testing::FakeDeviceCodec& device_codec() { return device_codec_; }
  SliceRecordingCodec& host_codec() { return *codec_; }
  std::string address() const { return inproc_.address(); }

 private:
  std::string NewPoolId() { return absl::StrFormat("%s-p%d", name_, pools_made_++); }

  // The handle of a fake GPU region is "<pool id>/<region index>".
  absl::StatusOr<std::unique_ptr<ImportedMemory>> ImportGpuRegion(const CudaIpcSpec& spec) {
    if (!gpu_) return absl::UnavailableError("no GPU");
    const size_t slash = spec.handle.rfind('/');
    auto it = gpu_pools_.find(spec.handle.substr(0, slash));
    if (slash == std::string::npos || it == gpu_pools_.end()) {
      return absl::InvalidArgumentError("unknown fake handle " + spec.handle);
    }
    const size_t region = std::stoul(spec.handle.substr(slash + 1));
    return std::make_unique<BorrowedMemory>(it->second->regions()[region]);
  }

  std::string name_;
  bool gpu_;
  Metrics metrics_;
  std::unique_ptr<StagingArena> staging_;
  testing::FakeDeviceMemory device_memory_;
  std::map<std::string, std::unique_ptr<kvgen::HostPool>> gpu_pools_;
  std::map<std::string, std::unique_ptr<kvgen::ShmPool>> shm_;
  PoolRegistry pools_;
  ModelPolicies models_;
  std::unique_ptr<SliceRecordingCodec> codec_;
  testing::FakeDeviceCodec device_codec_;
  TimerQueue timers_;
  InprocTransport inproc_;
  testing::FaultTransport faults_;
  Executor executor_;
  std::unique_ptr<TransferManager> manager_;
  std::map<std::string, std::vector<uint32_t>> tables_;
  int pools_made_ = 0;
};

SendArgs MakeSend(const std::string& id, Node& from, const std::string& pool, const Node& to,
                  double budget = 0.3) {
  SendArgs a;
  a.key = {id, 0};
  a.pool_id = pool;
  a.blocks = from.Blocks(pool);
  a.num_tokens = kTokens;
  a.peer = to.address();
  a.plan.budget = budget;
  a.scoring = ScoringMode::kKeyNorm;
  a.fingerprint = absl::StrFormat("%s-%s-%g", id, pool, budget);
  return a;
}

ReceiveArgs MakeReceive(const std::string& id, Node& on, const std::string& pool) {
  ReceiveArgs a;
  a.key = {id, 0};
  a.pool_id = pool;
  a.blocks = on.Blocks(pool);
  a.num_tokens = kTokens;
  a.fingerprint = id + pool;
  return a;
}

SteadyClock::time_point In(double s) {
  return SteadyClock::now() +
         std::chrono::duration_cast<SteadyClock::duration>(std::chrono::duration<double>(s));
}

template <typename T>
struct Pending {
  std::shared_ptr<std::promise<absl::StatusOr<T>>> p =
      std::make_shared<std::promise<absl::StatusOr<T>>>();
  std::future<absl::StatusOr<T>> f = p->get_future();
  std::function<void(absl::StatusOr<T>)> cb() {
    auto q = p;
    return [q](absl::StatusOr<T> r) { q->set_value(std::move(r)); };
  }
  absl::StatusOr<T> Get() {
    EXPECT_EQ(f.wait_for(std::chrono::seconds(20)), std::future_status::ready);
    return f.get();
  }
};

// Every value of every kept row arrived within the tier bounds (spot check: all rows close to
// the source, dropped rows never written).
void ExpectArrived(const KvBuffer& src, const KvBuffer& dst, const ReceiveResult& r) {
  ASSERT_EQ(r.dropped.size(), 1u);
  std::vector<bool> dropped(kTokens);
  for (uint32_t t : r.dropped[0]) dropped[t] = true;
  for (uint32_t l = 0; l < kShape.num_layers; ++l) {
    for (uint32_t t = 0; t < kTokens; ++t) {
      const uint16_t* x = HostRowPtr(src, l, true, t, 1);
      const uint16_t* y = HostRowPtr(dst, l, true, t, 1);
      double num = 0, den = 0;
      for (uint32_t c = 0; c < kShape.head_dim; ++c) {
        const double d = HalfToFloat(x[c]) - HalfToFloat(y[c]);
        num += d * d;
        den += double(HalfToFloat(x[c])) * HalfToFloat(x[c]);
      }
      if (dropped[t]) {
        EXPECT_EQ(num, den) << "a dropped row was written";
      } else {
        // Loose: INT4 rows of gaussian data reach ~0.3; exact bounds are the conformance
        // suite's and fake-frontend's business.
        EXPECT_LT(std::sqrt(num / den), 0.4) << "layer " << l << " token " << t;
      }
    }
  }
}

// Waits for the node to go idle: no transfer, no staging or (fake) device memory held.
void ExpectIdle(Node& n) {
  for (int i = 0; i < 200 && (n.manager().active() > 0 || n.staging().used() > 0 ||
                              n.device_memory().live_allocations() > 0);
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(n.manager().active(), 0u);
  EXPECT_EQ(n.staging().used(), 0u) << "staging memory leaked";
  EXPECT_EQ(n.device_memory().live_allocations(), 0u) << "device memory leaked";
}

class TransferManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_pool_ = a_.AddPool(PoolLayoutKind::kVllmNhd, 16);
    dst_pool_ = b_.AddPool(PoolLayoutKind::kVllmHnd, 8);
    kvgen::SyntheticOptions syn;
    syn.seed = std::random_device{}();
    kvgen::FillSynthetic(a_.View(src_pool_), syn);
  }
  void ExpectArrived(const ReceiveResult& r) {
    spectrumkv::ExpectArrived(a_.View(src_pool_), b_.View(dst_pool_), r);
  }

  Node a_, b_;
  std::string src_pool_, dst_pool_;
};

TEST_F(TransferManagerTest, ReceiveFirstThenSend) {
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("r1", b_, dst_pool_), In(10), recv.cb());
  a_.manager().Send(MakeSend("r1", a_, src_pool_, b_), In(10), send.cb());
  auto s = send.Get();
  auto r = recv.Get();
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(s->transfer_id, r->transfer_id);
  EXPECT_EQ(s->stats.wire_bytes, r->stats.wire_bytes);
  EXPECT_EQ(s->stats.logical_bytes, uint64_t{kTokens} * kShape.Fp16BytesPerToken());
  EXPECT_NEAR(s->stats.element_budget, 0.3, 1e-9);
  EXPECT_EQ(s->stats.tiers[Tier::kInt8] + s->stats.tiers[Tier::kInt4], kTokens);
  EXPECT_EQ(r->peer, a_.address());
  ASSERT_EQ(r->tier_maps.size(), 1u);
  ExpectArrived(*r);
  ExpectIdle(a_);
  ExpectIdle(b_);
  // Metrics agree on both sides.
  const std::string ma = a_.metrics().Serialize(), mb = b_.metrics().Serialize();
  EXPECT_NE(ma.find(absl::StrFormat("spectrumkv_wire_bytes_total{direction=\"tx\"} %u",
                                    s->stats.wire_bytes)),
            std::string::npos)
      << ma;
  EXPECT_NE(mb.find(absl::StrFormat("spectrumkv_wire_bytes_total{direction=\"rx\"} %u",
                                    s->stats.wire_bytes)),
            std::string::npos);
  EXPECT_NE(ma.find("spectrumkv_transfers_total{code=\"OK\",role=\"send\"} 1"), std::string::npos);
}

// The payload's size and chunks follow from the tier counts, not from the scores: the offer
// goes out before the scoring pass, and the receiver binds it while the sender scores.
TEST_F(TransferManagerTest, TheOfferIsBoundWhileTheSenderScores) {
  std::atomic<bool> bound_while_scoring{false};
  a_.host_codec().on_score = [&] {
    for (int i = 0; i < 500; ++i) {
      absl::StatusOr<TransferInfoData> info =
          b_.manager().Get({"early", 0}, TransferRole::kReceive);
      if (info.ok() && info->state == "receiving") {
        bound_while_scoring = true;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  };
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("early", b_, dst_pool_), In(20), recv.cb());
  a_.manager().Send(MakeSend("early", a_, src_pool_, b_), In(20), send.cb());
  ASSERT_TRUE(send.Get().ok());
  auto r = recv.Get();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(bound_while_scoring) << "the receiver had no offer while the sender scored";
  ExpectArrived(*r);
  ExpectIdle(a_);
  ExpectIdle(b_);
}

// A scored plan whose layout is not the one offered (a codec that planned another budget) fails
// both sides at once and holds nothing.
TEST_F(TransferManagerTest, AScoredPlanThatBreaksTheOfferFailsBothSides) {
  a_.host_codec().scored_budget = 0.5;
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("broken", b_, dst_pool_), In(20), recv.cb());
  a_.manager().Send(MakeSend("broken", a_, src_pool_, b_, 0.3), In(20), send.cb());
  auto s = send.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInternal) << s.status();
  EXPECT_FALSE(recv.Get().ok());
  ExpectIdle(a_);
  ExpectIdle(b_);
}

TEST_F(TransferManagerTest, SendFirstIsBufferedUntilTheReceive) {
  Pending<SendResult> send;
  a_.manager().Send(MakeSend("r2", a_, src_pool_, b_, 0.5), In(10), send.cb());
  for (int i = 0; i < 200 && b_.manager().active() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_NE(send.f.wait_for(std::chrono::milliseconds(0)), std::future_status::ready)
      << "Send must wait for the receiver's acknowledgement";
  Pending<ReceiveResult> recv;
  b_.manager().Receive(MakeReceive("r2", b_, dst_pool_), In(10), recv.cb());
  ASSERT_TRUE(send.Get().ok());
  auto r = recv.Get();
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectArrived(*r);
  ExpectIdle(b_);
}

TEST_F(TransferManagerTest, EarlyPayloadExpires) {
  TransferManagerOptions o = TestOptions();
  o.early_ttl_s = 0.2;
  Node c(o);
  Pending<SendResult> send;
  a_.manager().Send(MakeSend("r3", a_, src_pool_, c), In(10), send.cb());
  auto s = send.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kDeadlineExceeded) << s.status();
  EXPECT_NE(s.status().message().find("no Receive claimed"), std::string::npos) << s.status();
  ExpectIdle(c);
  ExpectIdle(a_);
  EXPECT_NE(c.metrics().Serialize().find("spectrumkv_early_payloads_expired_total 1"),
            std::string::npos);
}

TEST_F(TransferManagerTest, DuplicateRequestIds) {
  Pending<ReceiveResult> recv;
  b_.manager().Receive(MakeReceive("r4", b_, dst_pool_), In(10), recv.cb());
  // Same content twice: both calls get the one outcome. Different content: ALREADY_EXISTS.
  Pending<SendResult> s1, s2, s3;
  a_.manager().Send(MakeSend("r4", a_, src_pool_, b_), In(10), s1.cb());
  a_.manager().Send(MakeSend("r4", a_, src_pool_, b_), In(10), s2.cb());
  a_.manager().Send(MakeSend("r4", a_, src_pool_, b_, 0.7), In(10), s3.cb());
  EXPECT_EQ(s3.Get().status().code(), absl::StatusCode::kAlreadyExists);
  auto r1 = s1.Get(), r2 = s2.Get();
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(r1->transfer_id, r2->transfer_id);
  ASSERT_TRUE(recv.Get().ok());
  // A retry after completion returns the recorded result without a new transfer.
  Pending<SendResult> s4;
  a_.manager().Send(MakeSend("r4", a_, src_pool_, b_), In(10), s4.cb());
  auto r4 = s4.Get();
  ASSERT_TRUE(r4.ok());
  EXPECT_EQ(r4->transfer_id, r1->transfer_id);
  Pending<ReceiveResult> recv2;
  b_.manager().Receive(MakeReceive("r4", b_, dst_pool_), In(10), recv2.cb());
  EXPECT_TRUE(recv2.Get().ok());
}

TEST_F(TransferManagerTest, DeadlinesAndCancellation) {
  Pending<ReceiveResult> recv;
  b_.manager().Receive(MakeReceive("r5", b_, dst_pool_), In(0.2), recv.cb());
  EXPECT_EQ(recv.Get().status().code(), absl::StatusCode::kDeadlineExceeded);

  // Cancelled by the receiver: the sender hears it.
  b_.faults().drop_acks = true;  // keep the transfer open
  Pending<ReceiveResult> recv2;
  Pending<SendResult> send2;
  b_.manager().Receive(MakeReceive("r6", b_, dst_pool_), In(10), recv2.cb());
  a_.manager().Send(MakeSend("r6", a_, src_pool_, b_), In(10), send2.cb());
  ASSERT_TRUE(recv2.Get().ok());  // it completed, but its ack was lost
  EXPECT_EQ(b_.manager().Cancel({"r6", 0}, "test").value(), false);
  a_.manager().Cancel({"r6", 0}, "operator said so").IgnoreError();
  auto s2 = send2.Get();
  EXPECT_EQ(s2.status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(s2.status().message().find("operator said so"), std::string::npos);
  b_.faults().drop_acks = false;

  // Cancelled on the receiving side while the sender waits: the sender gets CANCELLED.
  a_.faults().drop_chunk = 2;  // the payload never completes
  Pending<ReceiveResult> recv3;
  Pending<SendResult> send3;
  b_.manager().Receive(MakeReceive("r7", b_, dst_pool_), In(10), recv3.cb());
  a_.manager().Send(MakeSend("r7", a_, src_pool_, b_), In(10), send3.cb());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(b_.manager().Cancel({"r7", 0}, "decode gave up").value(), true);
  EXPECT_EQ(recv3.Get().status().code(), absl::StatusCode::kCancelled);
  auto s3 = send3.Get();
  EXPECT_EQ(s3.status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(s3.status().message().find("decode gave up"), std::string::npos) << s3.status();
  a_.faults().drop_chunk = -1;
  EXPECT_EQ(a_.manager().Cancel({"nope", 0}, "").status().code(), absl::StatusCode::kNotFound);
  ExpectIdle(a_);
  ExpectIdle(b_);
}

TEST_F(TransferManagerTest, DetachCancelsOnlyWhenNobodyWaits) {
  a_.faults().drop_chunk = 1;
  Pending<ReceiveResult> recv;
  b_.manager().Receive(MakeReceive("r8", b_, dst_pool_), In(10), recv.cb());
  Pending<SendResult> s1, s2;
  const uint64_t w1 = a_.manager().Send(MakeSend("r8", a_, src_pool_, b_), In(10), s1.cb());
  const uint64_t w2 = a_.manager().Send(MakeSend("r8", a_, src_pool_, b_), In(10), s2.cb());
  a_.manager().Detach({"r8", 0}, TransferRole::kSend, w1);
  EXPECT_EQ(s1.Get().status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(s2.f.wait_for(std::chrono::milliseconds(50)), std::future_status::ready);
  a_.manager().Detach({"r8", 0}, TransferRole::kSend, w2);
  EXPECT_EQ(s2.Get().status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(recv.Get().status().code(), absl::StatusCode::kCancelled);
  a_.faults().drop_chunk = -1;
  ExpectIdle(a_);
  ExpectIdle(b_);
}

TEST_F(TransferManagerTest, CorruptPayloadIsDataLossAndNeverWritten) {
  a_.faults().corrupt_chunk = 2;  // the second layer chunk (chunk 1 is layer 0...)
  a_.faults().corrupt_offset = 12345;
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("r9", b_, dst_pool_), In(10), recv.cb());
  a_.manager().Send(MakeSend("r9", a_, src_pool_, b_, 0.5), In(10), send.cb());
  EXPECT_EQ(recv.Get().status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(send.Get().status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(b_.metrics().Serialize().find("spectrumkv_checksum_failures_total 1"),
            std::string::npos);
  a_.faults().corrupt_chunk = -1;
  ExpectIdle(b_);
}

// A sliced chunk's checksum parts wait for its slices: a slice that fails (after the other
// worker packed its own slice and took a checksum part) fails the Send, nobody waits forever,
// and the next Send goes through.
TEST_F(TransferManagerTest, ASliceThatFailsEndsTheChecksumPartsWaitingForIt) {
  std::atomic<bool> failed{false};
  a_.host_codec().on_pack_slice = [&](uint32_t slice) -> absl::Status {
    if (slice != 1 || failed.exchange(true)) return absl::OkStatus();
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return absl::InternalError("injected slice failure");
  };
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("r10", b_, dst_pool_), In(10), recv.cb());
  a_.manager().Send(MakeSend("r10", a_, src_pool_, b_, 0.5), In(10), send.cb());
  auto s = send.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInternal) << s.status();
  EXPECT_NE(s.status().message().find("injected slice failure"), std::string::npos) << s.status();
  EXPECT_FALSE(recv.Get().ok());
  EXPECT_EQ(a_.host_codec().pack_slices, 2u);
  ExpectIdle(a_);
  ExpectIdle(b_);
  Pending<ReceiveResult> recv2;
  Pending<SendResult> send2;
  b_.manager().Receive(MakeReceive("r11", b_, dst_pool_), In(10), recv2.cb());
  a_.manager().Send(MakeSend("r11", a_, src_pool_, b_, 0.5), In(10), send2.cb());
  EXPECT_TRUE(send2.Get().ok());
  EXPECT_TRUE(recv2.Get().ok());
}

// Rows of 8 heads x 64 dims: an NHD block of 16 tokens is a 16 KiB run of the pool.
constexpr ModelShape kWide{4, 8, 64};

class UncompressedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_pool_ = a_.AddPool(PoolLayoutKind::kVllmNhd, 16, kWide);
    dst_pool_ = b_.AddPool(PoolLayoutKind::kVllmHnd, 8, kWide);
    kvgen::SyntheticOptions syn;
    syn.seed = std::random_device{}();
    kvgen::FillSynthetic(a_.View(src_pool_), syn);
  }
  Node a_, b_;
  std::string src_pool_, dst_pool_;
};

// Sends an uncompressed payload (budget 1.0) from `src_pool` on `a` to `dst_pool` on `b` and
// expects it bit-exact (across the pools' layout change); returns the sender's data chunk count.
uint64_t ExpectUncompressedBitExact(Node& a, const std::string& src_pool, Node& b,
                                    const std::string& dst_pool, const std::string& id) {
  const uint64_t chunks_before = a.faults().data_chunks_sent;
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b.manager().Receive(MakeReceive(id, b, dst_pool), In(10), recv.cb());
  a.manager().Send(MakeSend(id, a, src_pool, b, 1.0), In(10), send.cb());
  auto s = send.Get();
  auto r = recv.Get();
  EXPECT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(r.ok()) << r.status();
  if (!s.ok() || !r.ok()) return 0;
  EXPECT_EQ(s->stats.tiers[Tier::kFp16], kTokens);
  const KvBuffer src = a.View(src_pool), dst = b.View(dst_pool);
  for (uint32_t l = 0; l < kWide.num_layers; ++l) {
    for (bool value : {false, true}) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        for (uint32_t h = 0; h < kWide.num_kv_heads; ++h) {
          EXPECT_EQ(std::memcmp(HostRowPtr(src, l, value, t, h), HostRowPtr(dst, l, value, t, h),
                                kWide.head_dim * 2),
                    0)
              << "layer " << l << " token " << t;
        }
      }
    }
  }
  ExpectIdle(a);
  ExpectIdle(b);
  return a.faults().data_chunks_sent - chunks_before - 1;  // the prelude is not a layer chunk
}

// An uncompressed payload (budget 1.0) arrives bit-exact, across a layout change.
TEST_F(UncompressedTest, UncompressedPayloadArrivesBitExact) {
  EXPECT_EQ(ExpectUncompressedBitExact(a_, src_pool_, b_, dst_pool_, "z1"), kWide.num_layers);
}

// How a payload is cut (TransferManagerOptions): chunks of whole layers, each as near
// chunk_bytes as whole layers allow, and target_chunks of them as long as they stay at least
// min_chunk_bytes; the payload arrives bit-exact whatever the cut. kWide at b = 1.0 is four
// layers of a little over 200 KiB.
TEST(ChunkingTest, PayloadsAreCutIntoWholeLayerChunksOfTheConfiguredSizes) {
  struct Case {
    uint64_t chunk_bytes, min_chunk_bytes;
    uint32_t target_chunks;
    uint64_t chunks, largest_layers;
  };
  const Case cases[] = {
      {1 << 20, 64 << 10, 1, 1, 4},    // the whole payload fits one chunk
      {1 << 20, 64 << 10, 4, 4, 1},    // four asked for: one layer each
      {1 << 20, 64 << 10, 64, 4, 1},   // more asked for than layers: never below a layer
      {1 << 20, 420 << 10, 4, 2, 2},   // four asked for, but not below 420 KiB: two layers each
      {300 << 10, 64 << 10, 1, 4, 1},  // about 300 KiB: one layer each (two are further off)
      {400 << 10, 64 << 10, 1, 2, 2},  // about 400 KiB: two layers, a few bytes more
      {1, 512 << 10, 4, 4, 1},         // a chunk_bytes below min_chunk_bytes wins
  };
  int n = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrFormat("chunk_bytes %u min_chunk_bytes %u target_chunks %u",
                                 c.chunk_bytes, c.min_chunk_bytes, c.target_chunks));
    TransferManagerOptions o;
    o.chunk_bytes = c.chunk_bytes;
    o.min_chunk_bytes = c.min_chunk_bytes;
    o.target_chunks = c.target_chunks;
    Node a(o), b(o);
    const std::string src = a.AddPool(PoolLayoutKind::kVllmNhd, 16, kWide);
    const std::string dst = b.AddPool(PoolLayoutKind::kVllmHnd, 8, kWide);
    kvgen::SyntheticOptions syn;
    syn.seed = std::random_device{}();
    kvgen::FillSynthetic(a.View(src), syn);
    EXPECT_EQ(ExpectUncompressedBitExact(a, src, b, dst, absl::StrFormat("cut%d", n++)), c.chunks);
    const uint64_t layer = uint64_t{kTokens} * kWide.Fp16BytesPerToken() / kWide.num_layers;
    EXPECT_GE(a.faults().largest_chunk_bytes, c.largest_layers * layer);
    EXPECT_LT(a.faults().largest_chunk_bytes, (c.largest_layers + 1) * layer);
  }
}

// A corrupted chunk of an uncompressed payload is DATA_LOSS, and its layer is never written:
// every layer of the destination is either exactly the source (verified) or untouched (zero).
TEST_F(UncompressedTest, CorruptUncompressedChunkIsDataLossAndNeverWritten) {
  a_.faults().corrupt_chunk = 2;  // layer 1
  a_.faults().corrupt_offset = 777;
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("z2", b_, dst_pool_), In(10), recv.cb());
  a_.manager().Send(MakeSend("z2", a_, src_pool_, b_, 1.0), In(10), send.cb());
  EXPECT_EQ(recv.Get().status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(send.Get().status().code(), absl::StatusCode::kDataLoss);
  a_.faults().corrupt_chunk = -1;
  ExpectIdle(b_);
  const KvBuffer src = a_.View(src_pool_), dst = b_.View(dst_pool_);
  const std::vector<uint16_t> zero(kWide.head_dim, 0);
  for (uint32_t l = 0; l < kWide.num_layers; ++l) {
    uint32_t same = 0, untouched = 0, rows = 0;
    for (bool value : {false, true}) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        for (uint32_t h = 0; h < kWide.num_kv_heads; ++h, ++rows) {
          const uint16_t* y = HostRowPtr(dst, l, value, t, h);
          same += std::memcmp(HostRowPtr(src, l, value, t, h), y, kWide.head_dim * 2) == 0;
          untouched += std::memcmp(zero.data(), y, kWide.head_dim * 2) == 0;
        }
      }
    }
    EXPECT_TRUE(same == rows || untouched == rows) << "layer " << l << " was partly written";
    if (l == 1) {
      EXPECT_EQ(untouched, rows) << "the corrupted layer was written";
    }
  }
}

// The chunk size: target_chunks shared among the sends in flight, within [min_chunk_bytes,
// chunk_bytes].
TEST(ChunkingTest, ChunkSizeSpreadsTheTargetOverTheSendsInFlight) {
  TransferManagerOptions o;
  o.chunk_bytes = 4 << 20;
  o.min_chunk_bytes = 1 << 20;
  o.target_chunks = 32;                                         // 8 per lane, 4 lanes
  EXPECT_EQ(ChunkBytesFor(16 << 20, 1, o), 1u << 20);           // floor: 16 of 1 MiB
  EXPECT_EQ(ChunkBytesFor(64 << 20, 1, o), 2u << 20);           // 32 of 2 MiB
  EXPECT_EQ(ChunkBytesFor(64 << 20, 0, o), 2u << 20);           // 0 counts as 1
  EXPECT_EQ(ChunkBytesFor(256 << 20, 1, o), 4u << 20);          // ceiling
  EXPECT_EQ(ChunkBytesFor(64 << 20, 4, o), 4u << 20);           // 8 each for 4 sends: ceiling
  EXPECT_EQ(ChunkBytesFor(16 << 20, 2, o), 1u << 20);           // 16 each for 2 sends
  EXPECT_EQ(ChunkBytesFor(16 << 20, 8, o), 4u << 20);           // 4 each for 8 sends
  EXPECT_EQ(ChunkBytesFor(16 << 20, 64, o), 4u << 20);          // at least one chunk each
  EXPECT_EQ(ChunkBytesFor(3 * (1 << 20) + 1, 1, o), 1u << 20);  // small: chunks of the floor
  o.min_chunk_bytes = 8 << 20;  // above chunk_bytes: chunk_bytes wins
  EXPECT_EQ(ChunkBytesFor(1 << 20, 1, o), 4u << 20);
}

// Runs of whole layers as near the chunk size as whole layers allow: 2 MiB layers with a 16-byte
// trailer make 4 MiB chunks of two (not one) layers at chunk_bytes = 4 MiB; a layer larger than
// the chunk size travels alone; every layer is in exactly one chunk, in order.
TEST(ChunkingTest, ChunksAreRunsOfWholeLayersNearestTheChunkSize) {
  auto layout = [](std::vector<uint64_t> sizes) {
    WireLayout wl;
    wl.prelude_bytes = 4096;
    uint64_t at = wl.prelude_bytes;
    for (uint64_t size : sizes) {
      LayerSection l;
      l.begin = at;
      l.end = at += size;
      wl.layers.push_back(l);
    }
    wl.total_bytes = at;
    return wl;
  };
  auto runs = [](const WireLayout& wl, uint64_t chunk_bytes) {
    std::vector<uint32_t> layers;
    const std::vector<DataChunkHeader> chunks = PlanChunks(wl, 7, chunk_bytes);
    EXPECT_EQ(chunks[0].size, wl.prelude_bytes);
    uint32_t next = 0;
    for (size_t i = 1; i < chunks.size(); ++i) {
      const DataChunkHeader& c = chunks[i];
      EXPECT_EQ(c.index, i);
      EXPECT_EQ(c.transfer_id, 7u);
      EXPECT_EQ(c.first_layer, next);
      EXPECT_EQ(c.offset, wl.layers[c.first_layer].begin);
      EXPECT_EQ(c.offset + c.size, wl.layers[c.last_layer - 1].end);
      layers.push_back(c.last_layer - c.first_layer);
      next = c.last_layer;
    }
    EXPECT_EQ(next, wl.layers.size());
    return layers;
  };
  const uint64_t mib = 1 << 20;
  const WireLayout even = layout(std::vector<uint64_t>(8, 2 * mib + 16));
  EXPECT_EQ(runs(even, 4 * mib), (std::vector<uint32_t>{2, 2, 2, 2}));
  EXPECT_EQ(runs(even, 5 * mib), (std::vector<uint32_t>{2, 2, 2, 2}));  // 3 would be 6 MiB
  EXPECT_EQ(runs(even, 1 * mib), (std::vector<uint32_t>{1, 1, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(runs(even, 64 * mib), (std::vector<uint32_t>{8}));
  const WireLayout mixed = layout({mib, mib, 6 * mib, mib, 3 * mib / 2});
  EXPECT_EQ(runs(mixed, 2 * mib), (std::vector<uint32_t>{2, 1, 2}));
}

// Chunks of a host payload packed in slices by several workers (pack_slices) deliver exactly
// what chunks packed whole deliver: the same source, plan and destination layout give the same
// destination bytes, for both quantizers, at several budgets and chunk sizes.
TEST(ChunkingTest, ChunksPackedInSlicesDeliverWhatWholeChunksDeliver) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrFormat("seed %u", seed));
  int n = 0;
  for (Quantizer quantizer : {Quantizer::kAbsmax, Quantizer::kKeyChannelNorm}) {
    for (double budget : {1.0, 0.5, 0.3}) {
      for (uint64_t chunk_bytes : {uint64_t{1}, uint64_t{1} << 20}) {
        SCOPED_TRACE(absl::StrFormat("quantizer %d budget %g chunk_bytes %u",
                                     static_cast<int>(quantizer), budget, chunk_bytes));
        std::vector<std::vector<uint16_t>> arrived;
        for (uint32_t slices : {1u, 2u, 3u}) {
          TransferManagerOptions o;
          o.chunk_bytes = chunk_bytes;
          o.min_chunk_bytes = 1;
          o.pack_threads = 2;
          o.pack_slices = slices;
          Node a(o), b(o);
          const std::string src = a.AddPool(PoolLayoutKind::kVllmNhd, 16, kWide);
          const std::string dst = b.AddPool(PoolLayoutKind::kVllmHnd, 8, kWide);
          kvgen::SyntheticOptions syn;
          syn.seed = seed;
          kvgen::FillSynthetic(a.View(src), syn);
          const std::string id = absl::StrFormat("slices%d", n++);
          SendArgs args = MakeSend(id, a, src, b, budget);
          args.plan.quantizer = quantizer;
          Pending<ReceiveResult> recv;
          Pending<SendResult> send;
          b.manager().Receive(MakeReceive(id, b, dst), In(10), recv.cb());
          a.manager().Send(args, In(10), send.cb());
          auto s = send.Get();
          auto r = recv.Get();
          ASSERT_TRUE(s.ok()) << s.status();
          ASSERT_TRUE(r.ok()) << r.status();
          std::vector<uint16_t> rows;
          const KvBuffer view = b.View(dst);
          for (uint32_t l = 0; l < kWide.num_layers; ++l) {
            for (bool value : {false, true}) {
              for (uint32_t t = 0; t < kTokens; ++t) {
                for (uint32_t h = 0; h < kWide.num_kv_heads; ++h) {
                  const uint16_t* row = HostRowPtr(view, l, value, t, h);
                  rows.insert(rows.end(), row, row + kWide.head_dim);
                }
              }
            }
          }
          arrived.push_back(std::move(rows));
          ExpectIdle(a);
          ExpectIdle(b);
        }
        EXPECT_TRUE(arrived[1] == arrived[0]) << "2 slices differ from whole chunks";
        EXPECT_TRUE(arrived[2] == arrived[0]) << "3 slices differ from whole chunks";
      }
    }
  }
}

// The rows `got` holds equal what the codec alone delivers for the tiers `r` reports: the same
// source packed with the progressive quantizer and unpacked into a fresh `layout` pool of `on`.
void ExpectCodecDelivery(const KvBuffer& src, const KvBuffer& got, const ReceiveResult& r, Node& on,
                         PoolLayoutKind layout, uint32_t block_size, ModelShape shape) {
  ASSERT_EQ(r.tier_maps.size(), 1u);
  std::vector<uint8_t> tiers(kTokens);
  for (uint32_t t = 0; t < kTokens; ++t) {
    tiers[t] = (static_cast<uint8_t>(r.tier_maps[0][t / 4]) >> (2 * (t % 4))) & 3;
  }
  const TierPlan plan = *PlanFromTiers(shape, DType::kFloat16, kTokens, tiers, Policy::k3Tier,
                                       Quantizer::kProgressive);
  auto codec = CpuCodec::CreateBest();
  const std::vector<uint8_t> payload = *PackPayload(*codec, src, plan);
  const std::string ref = on.AddPool(layout, block_size, shape);
  const KvBuffer want = on.View(ref);
  ASSERT_TRUE(UnpackPayload(*codec, payload, want, payload.size()).ok());
  for (uint32_t l = 0; l < shape.num_layers; ++l) {
    for (bool value : {false, true}) {
      for (uint32_t t = 0; t < kTokens; ++t) {
        for (uint32_t h = 0; h < shape.num_kv_heads; ++h) {
          ASSERT_EQ(std::memcmp(HostRowPtr(got, l, value, t, h), HostRowPtr(want, l, value, t, h),
                                shape.head_dim * 2),
                    0)
              << "layer " << l << (value ? " V" : " K") << " token " << t << " head " << h;
        }
      }
    }
  }
}

// A progressive payload (bases packed and sent while the sender scores, refinements after,
// handed to the transport a few chunks at a time) delivers exactly what the codec's own pack and
// unpack of the same plan deliver, whole or in slices, with one or several chunks in flight;
// both nodes end idle. (At b = 0.7, with FP16 tokens, the payload is an absmax one.)
TEST(ProgressiveTest, DeliversWhatTheCodecDelivers) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrFormat("seed %u", seed));
  auto codec = CpuCodec::CreateBest();
  int n = 0;
  for (double budget : {0.3, 0.45, 0.7}) {
    for (uint32_t slices : {1u, 3u}) {
      for (uint32_t window : {1u, 3u}) {
        SCOPED_TRACE(absl::StrFormat("budget %g slices %u window %u", budget, slices, window));
        TransferManagerOptions o = TestOptions();
        o.pack_slices = slices;
        o.progressive_chunks_in_flight = window;
        Node a(o), b(o);
        const std::string src = a.AddPool(PoolLayoutKind::kVllmNhd, 16, kWide);
        const std::string dst = b.AddPool(PoolLayoutKind::kVllmHnd, 8, kWide);
        kvgen::SyntheticOptions syn;
        syn.seed = seed;
        kvgen::FillSynthetic(a.View(src), syn);
        const std::string id = absl::StrFormat("progressive%d", n++);
        SendArgs args = MakeSend(id, a, src, b, budget);
        args.plan.quantizer = Quantizer::kProgressive;
        Pending<ReceiveResult> recv;
        Pending<SendResult> send;
        b.manager().Receive(MakeReceive(id, b, dst), In(10), recv.cb());
        a.manager().Send(args, In(10), send.cb());
        auto s = send.Get();
        auto r = recv.Get();
        ASSERT_TRUE(s.ok()) << s.status();
        ASSERT_TRUE(r.ok()) << r.status();
        EXPECT_GT(s->stats.tiers[Tier::kInt8], 0u);
        EXPECT_EQ(s->stats.tiers[Tier::kInt4] > 0, budget < 0.5);
        // The reference: the tiers that arrived, packed and unpacked by the codec alone.
        ExpectCodecDelivery(a.View(src), b.View(dst), *r, b, PoolLayoutKind::kVllmHnd, 8, kWide);
        ExpectIdle(a);
        ExpectIdle(b);
      }
    }
  }
}

// pack_slices 0: the workers are shared among the transfers in flight on the daemon. A lone
// transfer's chunks are cut pack_threads ways on both sides; with as many transfers in flight as
// workers (here: Receives waiting for other requests), chunks are packed and unpacked whole.
TEST(ChunkingTest, SlicesAreTheWorkersSharedAmongTheTransfersInFlight) {
  TransferManagerOptions o = TestOptions();
  o.pack_threads = 4;
  Node a(o), b(o);
  const std::string src = a.AddPool(PoolLayoutKind::kVllmNhd, 16);
  const std::string dst = b.AddPool(PoolLayoutKind::kVllmHnd, 8);
  const std::string spare_a = a.AddPool(PoolLayoutKind::kVllmHnd, 8);
  kvgen::SyntheticOptions syn;
  syn.seed = std::random_device{}();
  kvgen::FillSynthetic(a.View(src), syn);
  auto transfer = [&](const std::string& id) {
    Pending<ReceiveResult> recv;
    Pending<SendResult> send;
    b.manager().Receive(MakeReceive(id, b, dst), In(10), recv.cb());
    a.manager().Send(MakeSend(id, a, src, b), In(10), send.cb());
    EXPECT_TRUE(send.Get().ok());
    EXPECT_TRUE(recv.Get().ok());
  };
  transfer("alone");
  EXPECT_EQ(a.host_codec().pack_slices, 4u);
  EXPECT_EQ(b.host_codec().unpack_slices, 4u);

  // Three Receives wait on each node for requests that never come: with the transfer, four in
  // flight on each side for four workers.
  std::vector<Pending<ReceiveResult>> waiting(6);
  for (int i = 0; i < 3; ++i) {
    a.manager().Receive(MakeReceive(absl::StrFormat("idle-a%d", i), a, spare_a), In(10),
                        waiting[i].cb());
    b.manager().Receive(MakeReceive(absl::StrFormat("idle-b%d", i), b, dst), In(10),
                        waiting[3 + i].cb());
  }
  transfer("crowded");
  EXPECT_EQ(a.host_codec().pack_slices, 1u);
  EXPECT_EQ(b.host_codec().unpack_slices, 1u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(a.manager().Cancel({absl::StrFormat("idle-a%d", i), 0}, "test").ok());
    EXPECT_TRUE(b.manager().Cancel({absl::StrFormat("idle-b%d", i), 0}, "test").ok());
  }
  for (auto& w : waiting) EXPECT_EQ(w.Get().status().code(), absl::StatusCode::kCancelled);
}

TEST_F(TransferManagerTest, AdmissionControl) {
  TransferManagerOptions o = TestOptions();
  o.max_inflight_transfers = 1;
  Node c(o);
  const std::string pool = c.AddPool(PoolLayoutKind::kVllmNhd, 16);
  c.faults().drop_chunk = 1;
  Pending<SendResult> s1, s2;
  c.manager().Send(MakeSend("x1", c, pool, b_), In(10), s1.cb());
  c.manager().Send(MakeSend("x2", c, pool, b_), In(10), s2.cb());
  EXPECT_EQ(s2.Get().status().code(), absl::StatusCode::kResourceExhausted);
  c.manager().Cancel({"x1", 0}, "").IgnoreError();
  EXPECT_EQ(s1.Get().status().code(), absl::StatusCode::kCancelled);

  TransferManagerOptions small = TestOptions();
  small.max_inflight_bytes = 1000;  // smaller than any payload
  Node d(small);
  const std::string pool2 = d.AddPool(PoolLayoutKind::kVllmNhd, 16);
  Pending<SendResult> s3;
  d.manager().Send(MakeSend("x3", d, pool2, b_), In(10), s3.cb());
  EXPECT_EQ(s3.Get().status().code(), absl::StatusCode::kResourceExhausted);

  TransferManagerOptions no_early = TestOptions();
  no_early.early_buffer_bytes = 0;
  Node e(no_early);
  Pending<SendResult> s4;
  a_.manager().Send(MakeSend("x4", a_, src_pool_, e), In(10), s4.cb());
  auto r4 = s4.Get();
  EXPECT_EQ(r4.status().code(), absl::StatusCode::kResourceExhausted) << r4.status();
  ExpectIdle(c);
  ExpectIdle(d);
  ExpectIdle(e);
}

// The offer leaves before the sender's staging is allocated: when that allocation fails, the
// receiver hears it at once (a PeerCancel), not at its deadline, and neither side keeps memory.
TEST_F(TransferManagerTest, SenderStagingExhaustedAfterTheOfferFailsBothSidesAtOnce) {
  Node tiny(TestOptions(), /*staging_bytes=*/64 << 10);  // smaller than the 200 KiB payload
  const std::string pool = tiny.AddPool(PoolLayoutKind::kVllmNhd, 16);
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  const auto start = SteadyClock::now();
  b_.manager().Receive(MakeReceive("st1", b_, dst_pool_), In(20), recv.cb());
  tiny.manager().Send(MakeSend("st1", tiny, pool, b_, 1.0), In(20), send.cb());
  auto s = send.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted) << s.status();
  auto r = recv.Get();
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("staging"), std::string::npos) << r.status();
  EXPECT_LT(SteadyClock::now() - start, std::chrono::seconds(5)) << "the receiver waited";
  ExpectIdle(tiny);
  ExpectIdle(b_);
}

TEST_F(TransferManagerTest, BadRequestsFailWithTheirCodes) {
  Pending<SendResult> s1;
  SendArgs bad = MakeSend("y1", a_, src_pool_, b_);
  bad.pool_id = "no-such-pool";
  a_.manager().Send(bad, In(5), s1.cb());
  EXPECT_EQ(s1.Get().status().code(), absl::StatusCode::kNotFound);
  Pending<SendResult> s2;
  bad = MakeSend("y2", a_, src_pool_, b_);
  bad.blocks[0] = 999;  // outside the pool
  a_.manager().Send(bad, In(5), s2.cb());
  EXPECT_EQ(s2.Get().status().code(), absl::StatusCode::kInvalidArgument);
  Pending<SendResult> s3;
  bad = MakeSend("y3", a_, src_pool_, b_);
  bad.peer = "inproc://nobody-here";
  a_.manager().Send(bad, In(5), s3.cb());
  EXPECT_EQ(s3.Get().status().code(), absl::StatusCode::kUnavailable);
  Pending<ReceiveResult> r1;
  a_.manager().Receive(MakeReceive("y4", b_, "no-such-pool"), In(5), r1.cb());
  EXPECT_EQ(r1.Get().status().code(), absl::StatusCode::kNotFound);
  // A destination whose shape differs from the payload's: INVALID_ARGUMENT on both sides.
  const std::string other = b_.AddPool(PoolLayoutKind::kVllmNhd, 16, ModelShape{4, 1, 64}, kTokens);
  Pending<ReceiveResult> r2;
  Pending<SendResult> s5;
  b_.manager().Receive(MakeReceive("y5", b_, other), In(5), r2.cb());
  a_.manager().Send(MakeSend("y5", a_, src_pool_, b_), In(5), s5.cb());
  EXPECT_EQ(r2.Get().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s5.Get().status().code(), absl::StatusCode::kInvalidArgument);
  ExpectIdle(a_);
  ExpectIdle(b_);
}

TEST_F(TransferManagerTest, PeerDownFailsTransfersWithUnavailable) {
  auto c = std::make_unique<Node>();
  const std::string pool = c->AddPool(PoolLayoutKind::kVllmHnd, 8);
  a_.faults().drop_chunk = 2;  // hold the transfer open
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  c->manager().Receive(MakeReceive("z1", *c, pool), In(10), recv.cb());
  a_.manager().Send(MakeSend("z1", a_, src_pool_, *c), In(10), send.cb());
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  c->Stop();  // the peer dies
  EXPECT_EQ(send.Get().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(recv.Get().status().code(), absl::StatusCode::kUnavailable);
  a_.faults().drop_chunk = -1;
  ExpectIdle(a_);
}

TEST_F(TransferManagerTest, ModelPolicyTurns3TierInto2Tier) {
  ASSERT_TRUE(a_.models().Set({"m-no-int4", false, true, "probe 0/3"}).ok());
  Pending<ReceiveResult> recv;
  Pending<SendResult> send;
  b_.manager().Receive(MakeReceive("m1", b_, dst_pool_), In(10), recv.cb());
  SendArgs args = MakeSend("m1", a_, src_pool_, b_, 0.3);
  args.model = "m-no-int4";
  a_.manager().Send(args, In(10), send.cb());
  auto s = send.Get();
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->stats.policy, "2tier");
  EXPECT_EQ(s->stats.tiers[Tier::kInt4], 0u);
  EXPECT_EQ(s->stats.tiers[Tier::kDrop], 40u);
  auto r = recv.Get();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->dropped[0].size(), 40u);
  ExpectArrived(*r);
}

TEST_F(TransferManagerTest, DrainRefusesNewWork) {
  a_.manager().Drain(std::chrono::milliseconds(10));
  Pending<SendResult> s;
  a_.manager().Send(MakeSend("d1", a_, src_pool_, b_), In(5), s.cb());
  EXPECT_EQ(s.Get().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(a_.manager().draining());
}

TEST_F(TransferManagerTest, ListAndGet) {
  Pending<ReceiveResult> recv;
  b_.manager().Receive(MakeReceive("l1", b_, dst_pool_), In(10), recv.cb());
  auto info = b_.manager().Get({"l1", 0}, TransferRole::kReceive);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->state, "waiting");
  EXPECT_EQ(b_.manager().List(false).size(), 1u);
  Pending<SendResult> send;
  a_.manager().Send(MakeSend("l1", a_, src_pool_, b_), In(10), send.cb());
  ASSERT_TRUE(send.Get().ok());
  ASSERT_TRUE(recv.Get().ok());
  info = a_.manager().Get({"l1", 0}, std::nullopt);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->state, "done");
  EXPECT_TRUE(info->ended);
  EXPECT_EQ(b_.manager().List(false).size(), 0u);
  EXPECT_EQ(b_.manager().List(true).size(), 1u);
}

// GPU pools (on fake GPUs, so that this runs without one): the sender packs with the device
// codec into a device payload buffer and copies each chunk down into host staging for the
// network; the receiver copies the prelude and each chunk up and unpacks on the device.
class DevicePathTest : public ::testing::Test {
 protected:
  DevicePathTest() : c_(TestOptions(), 64 << 20, true), d_(TestOptions(), 64 << 20, true) {}
  void SetUp() override {
    gpu_src_ = c_.AddGpuPool(PoolLayoutKind::kVllmNhd, 16);
    gpu_dst_ = d_.AddGpuPool(PoolLayoutKind::kVllmHnd, 8);
    kvgen::SyntheticOptions syn;
    syn.seed = std::random_device{}();
    kvgen::FillSynthetic(c_.View(gpu_src_), syn);
  }

  // Receive on `on`, then Send from `from`; both results.
  std::pair<absl::StatusOr<SendResult>, absl::StatusOr<ReceiveResult>> Transfer(
      const std::string& id, Node& from, const std::string& src, Node& on, const std::string& dst,
      double budget = 0.3, Quantizer quantizer = Quantizer::kAbsmax) {
    Pending<ReceiveResult> recv;
    Pending<SendResult> send;
    on.manager().Receive(MakeReceive(id, on, dst), In(10), recv.cb());
    SendArgs args = MakeSend(id, from, src, on, budget);
    args.plan.quantizer = quantizer;
    from.manager().Send(args, In(10), send.cb());
    auto s = send.Get();
    return {std::move(s), recv.Get()};
  }

  static uint64_t StageCopyCount(Node& n) {
    const std::string m = n.metrics().Serialize();
    const std::string key = "spectrumkv_stage_duration_seconds_count{stage=\"stage_copy\"} ";
    const size_t at = m.find(key);
    return at == std::string::npos ? ~uint64_t{0} : std::stoull(m.substr(at + key.size()));
  }

  Node c_, d_;
  std::string gpu_src_, gpu_dst_;
};

// The progressive quantizer is a host pools' matter: a GPU pool's Send makes an absmax payload;
// a GPU pool takes a progressive one through the host codec (each layer decoded to FP16 rows on
// the host, then unpacked on the device), bit for bit what the codec alone delivers.
TEST_F(DevicePathTest, ProgressiveIsForHostPools) {
  auto [s, r] = Transfer("gp", c_, gpu_src_, d_, gpu_dst_, 0.3, Quantizer::kProgressive);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectArrived(c_.View(gpu_src_), d_.View(gpu_dst_), *r);

  Node host;
  const std::string src = host.AddPool(PoolLayoutKind::kVllmNhd, 16);
  kvgen::SyntheticOptions syn;
  kvgen::FillSynthetic(host.View(src), syn);
  auto [s2, r2] = Transfer("hp", host, src, d_, gpu_dst_, 0.3, Quantizer::kProgressive);
  ASSERT_TRUE(r2.ok()) << r2.status();
  ASSERT_TRUE(s2.ok()) << s2.status();
  ExpectCodecDelivery(host.View(src), d_.View(gpu_dst_), *r2, host, PoolLayoutKind::kVllmHnd, 8,
                      kShape);
  ExpectIdle(host);
  ExpectIdle(c_);
  ExpectIdle(d_);
}

TEST_F(DevicePathTest, GpuToGpuStagesEveryChunkThroughHostMemory) {
  auto [s, r] = Transfer("g1", c_, gpu_src_, d_, gpu_dst_);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectArrived(c_.View(gpu_src_), d_.View(gpu_dst_), *r);
  EXPECT_EQ(s->stats.backend, "fake-device");
  EXPECT_EQ(r->stats.backend, "fake-device");
  EXPECT_GT(s->stats.times.stage_copy_s, 0.0);
  EXPECT_GT(r->stats.times.stage_copy_s, 0.0);
  const uint64_t wire = s->stats.wire_bytes;
  // Sender: one device payload buffer; the prelude up, each of the 4 layer chunks down; every
  // layer packed by the device codec.
  testing::FakeDeviceMemory& sm = c_.device_memory();
  EXPECT_EQ(sm.allocations_made, 1u);
  EXPECT_EQ(sm.copies_to_device, 1u);
  EXPECT_EQ(sm.copies_to_host, kShape.num_layers);
  EXPECT_EQ(sm.bytes_to_device + sm.bytes_to_host, wire);
  EXPECT_EQ(c_.device_codec().packs, kShape.num_layers);
  // Receiver: the prelude and each chunk up, nothing down, every layer unpacked on the device.
  testing::FakeDeviceMemory& rm = d_.device_memory();
  EXPECT_EQ(rm.allocations_made, 1u);
  EXPECT_EQ(rm.copies_to_device, 1u + kShape.num_layers);
  EXPECT_EQ(rm.bytes_to_device, wire);
  EXPECT_EQ(rm.copies_to_host, 0u);
  EXPECT_EQ(d_.device_codec().unpacks, kShape.num_layers);
  ExpectIdle(c_);
  ExpectIdle(d_);
  EXPECT_EQ(StageCopyCount(c_), 1u);
  EXPECT_EQ(StageCopyCount(d_), 1u);
}

TEST_F(DevicePathTest, HostAndGpuPoolsMix) {
  // GPU -> host: the receiver uses the host codec and no device memory.
  const std::string host_dst = d_.AddPool(PoolLayoutKind::kTrtllm, 32);
  auto [s1, r1] = Transfer("m1", c_, gpu_src_, d_, host_dst, 0.5);
  ASSERT_TRUE(s1.ok()) << s1.status();
  ASSERT_TRUE(r1.ok()) << r1.status();
  ExpectArrived(c_.View(gpu_src_), d_.View(host_dst), *r1);
  EXPECT_EQ(d_.device_memory().allocations_made, 0u);
  EXPECT_EQ(d_.device_codec().unpacks, 0u);
  EXPECT_EQ(r1->stats.times.stage_copy_s, 0.0);
  EXPECT_NE(r1->stats.backend, "fake-device");

  // Host -> GPU: the sender packs on the host straight into staging.
  const std::string host_src = c_.AddPool(PoolLayoutKind::kSglang, 1);
  kvgen::SyntheticOptions syn;
  syn.seed = 7;
  kvgen::FillSynthetic(c_.View(host_src), syn);
  const uint64_t packs = c_.device_codec().packs, copies = c_.device_memory().copies_to_host;
  auto [s2, r2] = Transfer("m2", c_, host_src, d_, gpu_dst_, 0.5);
  ASSERT_TRUE(s2.ok()) << s2.status();
  ASSERT_TRUE(r2.ok()) << r2.status();
  ExpectArrived(c_.View(host_src), d_.View(gpu_dst_), *r2);
  EXPECT_EQ(c_.device_codec().packs, packs);
  EXPECT_EQ(c_.device_memory().copies_to_host, copies);
  EXPECT_EQ(s2->stats.times.stage_copy_s, 0.0);
  EXPECT_EQ(d_.device_codec().unpacks, kShape.num_layers);
  ExpectIdle(c_);
  ExpectIdle(d_);
}

TEST_F(DevicePathTest, DeviceMemoryExhaustionFailsCleanly) {
  // The receiver cannot get a device payload buffer: both sides hear RESOURCE_EXHAUSTED and
  // nothing reaches the destination.
  d_.device_memory().fail_allocations = true;
  auto [s1, r1] = Transfer("x1", c_, gpu_src_, d_, gpu_dst_);
  EXPECT_EQ(r1.status().code(), absl::StatusCode::kResourceExhausted) << r1.status();
  EXPECT_EQ(s1.status().code(), absl::StatusCode::kResourceExhausted) << s1.status();
  EXPECT_NE(r1.status().message().find("device payload buffer"), std::string::npos);
  EXPECT_NE(
      d_.metrics().Serialize().find("spectrumkv_admission_rejected_total{reason=\"bytes\"} 1"),
      std::string::npos);
  const KvBuffer dst = d_.View(gpu_dst_);
  for (uint32_t t = 0; t < kTokens; ++t) {
    EXPECT_EQ(HostRowPtr(dst, 0, false, t, 0)[0], 0) << "token " << t << " was written";
  }
  d_.device_memory().fail_allocations = false;
  ExpectIdle(c_);
  ExpectIdle(d_);

  // The sender cannot: its Send fails before anything is offered, and is counted.
  c_.device_memory().fail_allocations = true;
  Pending<SendResult> send;
  c_.manager().Send(MakeSend("x2", c_, gpu_src_, d_), In(10), send.cb());
  auto s2 = send.Get();
  EXPECT_EQ(s2.status().code(), absl::StatusCode::kResourceExhausted) << s2.status();
  EXPECT_NE(
      c_.metrics().Serialize().find("spectrumkv_admission_rejected_total{reason=\"bytes\"} 1"),
      std::string::npos);
  c_.device_memory().fail_allocations = false;
  ExpectIdle(c_);
  ExpectIdle(d_);
  // Both work again.
  auto [s3, r3] = Transfer("x3", c_, gpu_src_, d_, gpu_dst_);
  ASSERT_TRUE(s3.ok()) << s3.status();
  ASSERT_TRUE(r3.ok()) << r3.status();
  ExpectArrived(c_.View(gpu_src_), d_.View(gpu_dst_), *r3);
}

TEST_F(DevicePathTest, CorruptChunkIsDataLossOnTheDeviceToo) {
  c_.faults().corrupt_chunk = 2;  // layer 1
  c_.faults().corrupt_offset = 777;
  auto [s, r] = Transfer("c1", c_, gpu_src_, d_, gpu_dst_, 0.5);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss) << r.status();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kDataLoss) << s.status();
  EXPECT_NE(d_.metrics().Serialize().find("spectrumkv_checksum_failures_total 1"),
            std::string::npos);
  const KvBuffer dst = d_.View(gpu_dst_);
  for (uint32_t t = 0; t < kTokens; ++t) {
    EXPECT_EQ(HostRowPtr(dst, 1, true, t, 1)[3], 0) << "layer 1 token " << t << " was written";
  }
  c_.faults().corrupt_chunk = -1;
  ExpectIdle(c_);
  ExpectIdle(d_);
}

TEST_F(DevicePathTest, GpuPoolWithoutADeviceCodecIsUnavailable) {
  // GPU pools registered on a node that has no device codec (spectrumkvd refuses to register
  // them in the first place; the manager must still fail cleanly).
  Node plain(TestOptions(), 64 << 20, /*gpu=*/true, /*device_codec=*/false);
  const std::string src = plain.AddGpuPool(PoolLayoutKind::kVllmNhd, 16);
  const std::string dst = plain.AddGpuPool(PoolLayoutKind::kVllmHnd, 8);
  Pending<SendResult> send;
  plain.manager().Send(MakeSend("u1", plain, src, d_), In(10), send.cb());
  auto s = send.Get();
  EXPECT_EQ(s.status().code(), absl::StatusCode::kUnavailable) << s.status();
  EXPECT_NE(s.status().message().find("no codec backend"), std::string::npos) << s.status();
  auto [s2, r2] = Transfer("u2", c_, gpu_src_, plain, dst);
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kUnavailable) << r2.status();
  EXPECT_EQ(s2.status().code(), absl::StatusCode::kUnavailable) << s2.status();
  ExpectIdle(plain);
  ExpectIdle(c_);
}

}  // namespace
}  // namespace spectrumkv
