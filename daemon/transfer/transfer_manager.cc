#include "daemon/transfer/transfer_manager.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_format.h"
#include "common/crc32c.h"
#include "common/status.h"

namespace spectrumkv {
namespace {

double Since(SteadyClock::time_point a, SteadyClock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string TransferIdString(uint64_t incarnation, uint64_t id) {
  return absl::StrFormat("%016x-%u", incarnation, id);
}

absl::Status WithContext(const absl::Status& s, const std::string& context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrFormat("%s: %s", context, s.message()));
}

// Whether two layouts put every section at the same bytes (what an offer promises).
bool SameSections(const WireLayout& a, const WireLayout& b) {
  if (a.total_bytes != b.total_bytes || a.prelude_bytes != b.prelude_bytes ||
      a.layers.size() != b.layers.size()) {
    return false;
  }
  for (size_t l = 0; l < a.layers.size(); ++l) {
    if (a.layers[l].begin != b.layers[l].begin || a.layers[l].end != b.layers[l].end) return false;
  }
  return true;
}

// Part `part` of `parts` near-equal runs of a layer section's checksummed bytes
// [begin, crc_offset): its [first, second) payload offsets.
std::pair<uint64_t, uint64_t> CrcPart(const LayerSection& sec, uint64_t part, uint64_t parts) {
  const uint64_t bytes = sec.crc_offset - sec.begin;
  return {sec.begin + bytes * part / parts, sec.begin + bytes * (part + 1) / parts};
}

// The CRC32C of CrcPart `part` of `parts` of a section of `payload`.
uint32_t PartCrc(const LayerSection& sec, uint32_t part, uint32_t parts, const uint8_t* payload) {
  const auto [b, e] = CrcPart(sec, part, parts);
  return crc32c::Value(payload + b, e - b);
}

// The CRC32C of a section's checksummed bytes from the CRCs of its `parts` parts, in order.
uint32_t CombinedCrc(const LayerSection& sec, const uint32_t* part_crcs, uint32_t parts) {
  uint32_t crc = 0;
  for (uint32_t q = 0; q < parts; ++q) {
    const auto [b, e] = CrcPart(sec, q, parts);
    crc = crc32c::Combine(crc, part_crcs[q], e - b);
  }
  return crc;
}

// The parts of a layer section a data chunk carries (RecvTransfer::layer_parts): whole
// sections [first_layer, last_layer), or one layer's base or ranked part of a progressive
// payload; 0 if the prelude does not place the chunk so.
constexpr uint8_t kBasePart = 1, kRankedPart = 2, kWholeSection = kBasePart | kRankedPart;
uint8_t ChunkParts(const WireLayout& wl, const DataChunkHeader& c) {
  const uint32_t layers = static_cast<uint32_t>(wl.layers.size());
  if (c.first_layer >= c.last_layer || c.last_layer > layers) return 0;
  const LayerSection& first = wl.layers[c.first_layer];
  const uint64_t end = c.offset + c.size;
  if (c.offset == first.begin && end == wl.layers[c.last_layer - 1].end) return kWholeSection;
  if (c.last_layer != c.first_layer + 1 || first.ranked_begin == first.begin) return 0;
  if (c.offset == first.begin && end == first.ranked_begin) return kBasePart;
  if (c.offset == first.ranked_begin && end == first.end) return kRankedPart;
  return 0;
}

// The scoring inputs of a Send.
ScoreOptions ScoreOptionsFor(const SendArgs& a) {
  ScoreOptions so;
  so.mode = a.scoring;
  so.window_queries = a.window_queries;
  so.window = a.window;
  so.num_q_heads = a.num_q_heads;
  so.pool_kernel = a.pool_kernel;
  so.recency_decay = a.recency_decay;
  so.external_scores = a.external_scores;
  return so;
}

// The plan of a skeleton that needs no scores: a ranked one gives every rank the same tier, so
// any ranking gives the plan.
TierPlan PlanWithoutScores(PlanSkeleton skeleton, uint32_t num_tokens) {
  if (skeleton.ranked) {
    std::vector<uint32_t> identity(num_tokens);
    for (uint32_t i = 0; i < num_tokens; ++i) identity[i] = i;
    AssignByRank(skeleton, identity);
  }
  return std::move(skeleton.plan);
}

// Sets `stopped` when a packing worker leaves with a task it took and did not finish (an error,
// an ended transfer), unless it cleared the guard.
struct StopUnlessDone {
  std::atomic<bool>& stopped;
  bool done = false;
  ~StopUnlessDone() {
    if (!done) stopped.store(true);
  }
};

// A spin-wait's pause.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

std::vector<DataChunkHeader> PlanChunks(const WireLayout& wl, uint64_t transfer_id,
                                        uint64_t chunk_bytes) {
  std::vector<DataChunkHeader> chunks;
  DataChunkHeader prelude;
  prelude.transfer_id = transfer_id;
  prelude.size = wl.prelude_bytes;
  chunks.push_back(prelude);
  const uint32_t layers = static_cast<uint32_t>(wl.layers.size());
  if (wl.desc.progressive()) {
    // Every layer's base, then its ranked part: chunk 1 + 2l and 2 + 2l.
    for (uint32_t l = 0; l < layers; ++l) {
      const LayerSection& sec = wl.layers[l];
      for (const auto& [begin, end] :
           {std::pair{sec.begin, sec.ranked_begin}, std::pair{sec.ranked_begin, sec.end}}) {
        DataChunkHeader c;
        c.transfer_id = transfer_id;
        c.index = static_cast<uint32_t>(chunks.size());
        c.first_layer = l;
        c.last_layer = l + 1;
        c.offset = begin;
        c.size = end - begin;
        chunks.push_back(c);
      }
    }
    return chunks;
  }
  uint32_t first = 0;
  while (first < layers) {
    uint32_t last = first + 1;
    for (; last < layers; ++last) {
      const uint64_t without = wl.layers[last - 1].end - wl.layers[first].begin;
      const uint64_t with = wl.layers[last].end - wl.layers[first].begin;
      if (with > chunk_bytes &&
          (without >= chunk_bytes || with - chunk_bytes > chunk_bytes - without)) {
        break;
      }
    }
    DataChunkHeader c;
    c.transfer_id = transfer_id;
    c.index = static_cast<uint32_t>(chunks.size());
    c.first_layer = first;
    c.last_layer = last;
    c.offset = wl.layers[first].begin;
    c.size = wl.layers[last - 1].end - c.offset;
    chunks.push_back(c);
    first = last;
  }
  return chunks;
}

uint64_t ChunkBytesFor(uint64_t layer_bytes, uint32_t sends_in_flight,
                       const TransferManagerOptions& o) {
  const uint64_t n =
      std::max<uint32_t>(o.target_chunks / std::max<uint32_t>(sends_in_flight, 1), 1);
  const uint64_t even = (layer_bytes + n - 1) / n;
  return std::clamp(even, std::min(o.min_chunk_bytes, o.chunk_bytes), o.chunk_bytes);
}

// ---------------------------------------------------------------------------------------------
// Transfer records

// Work decided under the lock and run after it is released: user callbacks, peer messages.
class TransferManager::Deferred {
 public:
  void Add(std::function<void()> fn) { actions_.push_back(std::move(fn)); }
  // Takes every waiter out of `waiters` and queues its reply: `result` when
  // `status` is OK, else `status`.
  template <typename Result, typename Done>
  void AddReplies(std::map<uint64_t, Done>* waiters, const absl::Status& status,
                  const Result& result) {
    std::map<uint64_t, Done> taken = std::move(*waiters);
    waiters->clear();
    for (auto& [id, cb] : taken) {
      Add([cb = std::move(cb), status, result] {
        if (status.ok()) {
          cb(result);
        } else {
          cb(status);
        }
      });
    }
  }
  void Run() {
    for (auto& fn : actions_) fn();
    actions_.clear();
  }

 private:
  std::vector<std::function<void()>> actions_;
};

struct TransferManager::SendTransfer {
  enum class State { kQueued, kScoring, kSending, kAwaitingAck, kDone, kFailed };
  SendArgs args;
  uint64_t id = 0;
  std::string id_str;
  State state = State::kQueued;
  SteadyClock::time_point created, deadline, ended_at;
  TimerQueue::Id deadline_timer = 0;
  std::map<uint64_t, SendDone> waiters;
  absl::Status status;
  SendResult result;
  TransferStatsData stats;

  std::shared_ptr<Pool> pool;
  bool pool_counted = false;
  bool on_device = false;  // a GPU pool: packed into device_payload, copied into buffer
  StagingBuffer buffer;
  std::unique_ptr<DeviceAllocation> device_payload;
  uint64_t reserved_bytes = 0;  // counted in inflight_bytes_
  uint32_t runners = 0;         // codec tasks using pool, buffer and device_payload
  uint32_t sends_outstanding = 0;
  bool offered = false;
  SteadyClock::time_point first_send;

  bool terminal() const { return state == State::kDone || state == State::kFailed; }
  const char* StateName() const {
    switch (state) {
      case State::kQueued:
        return "queued";
      case State::kScoring:
        return "scoring";
      case State::kSending:
        return "sending";
      case State::kAwaitingAck:
        return "awaiting_ack";
      case State::kDone:
        return "done";
      case State::kFailed:
        return "failed";
    }
    return "unknown";
  }
};

struct TransferManager::RecvTransfer {
  enum class State { kWaiting, kEarly, kReceiving, kDone, kFailed };
  TransferKey key;
  State state = State::kWaiting;
  bool claimed = false;  // a Receive names the destination
  ReceiveArgs args;
  std::shared_ptr<Pool> pool;
  bool pool_counted = false;
  std::map<uint64_t, ReceiveDone> waiters;
  SteadyClock::time_point created, claimed_at, ended_at;
  TimerQueue::Id deadline_timer = 0, early_timer = 0;
  absl::Status status;
  ReceiveResult result;

  // The incoming payload, once offered.
  bool bound = false;
  std::string peer;
  uint64_t wire_id = 0;
  std::string id_str;
  uint64_t total_bytes = 0;
  uint32_t num_chunks = 0;
  StagingBuffer buffer;
  uint64_t reserved_bytes = 0;  // in inflight_bytes_
  uint64_t early_reserved = 0;  // in early_bytes_ while unclaimed
  std::optional<ParsedPrelude> prelude;
  std::vector<bool> chunk_seen;
  uint32_t chunks_received = 0;
  uint32_t data_outstanding = 0;
  std::vector<DataChunkHeader> pending_chunks;  // received, not yet checked/unpacked
  // Per layer, the parts of its section that accepted chunks carry: kBasePart, [begin,
  // ranked_begin), and kRankedPart, the rest (a progressive payload sends them apart; a whole
  // section is both). A layer is unpacked once it has both.
  std::vector<uint8_t> layer_parts;
  bool destination_checked = false;
  uint32_t layers_unpacked = 0;
  uint32_t unpack_tasks = 0;
  double unpack_s = 0;
  double stage_copy_s = 0;
  // A GPU destination: the payload's device copy, made by the first unpack task under device_mu
  // (not mu_: allocating and copying take a while) and freed with `buffer`. Lock order: mu_, then
  // device_mu.
  absl::Mutex device_mu;
  std::unique_ptr<DeviceAllocation> device_payload ABSL_GUARDED_BY(device_mu);
  absl::Status device_status ABSL_GUARDED_BY(device_mu);
  SteadyClock::time_point first_byte, last_byte;
  bool any_byte = false;
  bool any_layer = false;  // a chunk of layers (not the prelude) has begun to arrive

  bool terminal() const { return state == State::kDone || state == State::kFailed; }
  const char* StateName() const {
    switch (state) {
      case State::kWaiting:
        return "waiting";
      case State::kEarly:
        return "early";
      case State::kReceiving:
        return "receiving";
      case State::kDone:
        return "done";
      case State::kFailed:
        return "failed";
    }
    return "unknown";
  }
};

// ---------------------------------------------------------------------------------------------

TransferManager::TransferManager(TransferManagerOptions options, PoolRegistry& pools,
                                 CodecSet codecs, Transport& transport, StagingArena& staging,
                                 Metrics& metrics, Executor& executor, TimerQueue& timers,
                                 ModelPolicies& models)
    : options_(options),
      pools_(pools),
      codecs_(codecs),
      transport_(transport),
      staging_(staging),
      metrics_(metrics),
      executor_(executor),
      timers_(timers),
      models_(models) {
  SPECTRUMKV_CHECK_MSG(codecs_.device == nullptr || codecs_.device_memory != nullptr,
                       "a device codec needs DeviceMemory for its payload buffers");
  metrics_.SetLimits(options_.max_inflight_transfers, options_.max_inflight_bytes);
  absl::MutexLock lock(&mu_);
  sweep_timer_ =
      timers_.Schedule(SteadyClock::now() + std::chrono::seconds(1), [this] { Sweep(); });
  PublishGauges();
}

TransferManager::~TransferManager() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    timers_.Cancel(sweep_timer_);
  }
  // Fail whatever still runs (callers hear UNAVAILABLE), then make sure no timer callback of ours
  // is still running.
  Drain(std::chrono::milliseconds(0));
  timers_.Flush();
}

SteadyClock::time_point TransferManager::DeadlineFrom(
    std::optional<SteadyClock::time_point> requested) const {
  const auto now = SteadyClock::now();
  const auto max = now + std::chrono::duration_cast<SteadyClock::duration>(
                             std::chrono::duration<double>(options_.max_deadline_s));
  if (!requested) {
    return now + std::chrono::duration_cast<SteadyClock::duration>(
                     std::chrono::duration<double>(options_.default_deadline_s));
  }
  return std::min(*requested, max);
}

std::string TransferManager::Describe(const TransferKey& key, const std::string& peer) const {
  return absl::StrFormat("request %s shard %u peer %s", key.request_id, key.shard,
                         peer.empty() ? "(none yet)" : peer);
}

absl::Status TransferManager::AdmitTransfer(const TransferKey& key, const char* role) {
  if (draining_ || stopping_) {
    metrics_.AdmissionRejected(RejectReason::kDraining);
    return absl::UnavailableError(
        absl::StrFormat("%s %s: the daemon is draining", role, Describe(key, "")));
  }
  if (active_ >= options_.max_inflight_transfers) {
    metrics_.AdmissionRejected(RejectReason::kTransfers);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "%s %s: %u transfers in flight, the configured maximum", role, Describe(key, ""), active_));
  }
  return absl::OkStatus();
}

void TransferManager::PublishGauges() {
  metrics_.SetInflight(active_, inflight_bytes_);
  metrics_.SetEarlyBytes(early_bytes_);
}

// ---------------------------------------------------------------------------------------------
// Sender

uint64_t TransferManager::Send(SendArgs args, SteadyClock::time_point deadline, SendDone done) {
  Deferred d;
  uint64_t waiter = 0;
  {
    absl::MutexLock lock(&mu_);
    waiter = next_waiter_++;
    auto it = sends_.find(args.key);
    if (it != sends_.end()) {
      std::shared_ptr<SendTransfer> t = it->second;
      if (t->args.fingerprint != args.fingerprint) {
        const absl::Status s = absl::AlreadyExistsError(
            absl::StrFormat("Send %s: the request id is in use by a different request",
                            Describe(args.key, args.peer)));
        d.Add([done, s] { done(s); });
      } else if (t->terminal()) {
        const absl::Status s = t->status;
        const SendResult r = t->result;
        d.Add([done, s, r] {
          if (s.ok()) {
            done(r);
          } else {
            done(s);
          }
        });
      } else {
        t->waiters.emplace(waiter, std::move(done));
      }
    } else if (absl::Status s = AdmitTransfer(args.key, "Send"); !s.ok()) {
      metrics_.TransferEnded(Role::kSend, s.code(), 0);
      d.Add([done, s] { done(s); });
    } else {
      auto t = std::make_shared<SendTransfer>();
      t->args = std::move(args);
      t->id = next_transfer_id_++;
      t->id_str = TransferIdString(options_.incarnation, t->id);
      t->created = SteadyClock::now();
      t->deadline = deadline;
      t->waiters.emplace(waiter, std::move(done));
      t->deadline_timer = timers_.Schedule(deadline, [this, t] {
        FinishSend(t, absl::DeadlineExceededError(absl::StrFormat(
                          "Send %s: deadline exceeded", Describe(t->args.key, t->args.peer))));
      });
      sends_[t->args.key] = t;
      sends_by_id_[t->id] = t;
      spdlog::debug("send {}: accepted (request {} shard {})", t->id_str, t->args.key.request_id,
                    t->args.key.shard);
      ++active_;
      ++active_sends_;
      PublishGauges();
      d.Add([this, t] {
        if (!executor_.Post([this, t] { RunSend(t); })) {
          FinishSend(t, absl::UnavailableError("the daemon is shutting down"));
        }
      });
    }
  }
  d.Run();
  return waiter;
}

void TransferManager::RunSend(std::shared_ptr<SendTransfer> t) {
  {
    absl::MutexLock lock(&mu_);
    if (t->terminal()) return;
    t->state = SendTransfer::State::kScoring;
    t->runners = 1;
  }
  spdlog::debug("send {}: running", t->id_str);
  FinishRunner(t, PrepareSend(t));
}

void TransferManager::FinishRunner(const std::shared_ptr<SendTransfer>& t,
                                   const absl::Status& status) {
  {
    absl::MutexLock lock(&mu_);
    --t->runners;
    if (status.ok() && !t->terminal() && t->runners == 0 &&
        t->state == SendTransfer::State::kSending) {
      t->state = SendTransfer::State::kAwaitingAck;
    }
    // Every chunk is packed and copied to the host: the device buffer is no longer needed.
    if (t->runners == 0) t->device_payload.reset();
    ReleaseSendIfIdle(t);
  }
  if (!status.ok()) {
    FinishSend(t, WithContext(status, "Send " + Describe(t->args.key, t->args.peer)));
  }
}

// One payload's packing, shared by the workers that pack its chunks.
struct TransferManager::PackJob {
  std::shared_ptr<SendTransfer> t;
  Codec* codec = nullptr;
  KvBuffer src;
  TierPlan plan;
  std::vector<DataChunkHeader> chunks;
  std::span<uint8_t> payload;  // host staging: what is sent
  // A GPU pool: chunks are packed here (device memory, payload.size() bytes), then copied into
  // `payload` with device_memory.
  uint8_t* device_payload = nullptr;
  DeviceMemory* device_memory = nullptr;
  // Each data chunk is packed in `slices` parts (Codec::PackLayerSlice). The first two chunks of
  // a sliced payload, which the link waits for, also have their checksums computed in
  // `crc_parts[chunk]` parts per layer (CrcPart) by as many tasks right after their slices (a
  // part's worker waits for the slices still running); the worker that ends the last part
  // combines them, writes the trailers and sends the chunk. Other chunks (crc_parts 0) are
  // sealed and sent by the worker that ends their last slice. The workers take the tasks in the
  // order of `tasks`; chunk 0, the prelude, is sent first by the starter.
  struct Task {
    uint32_t chunk;
    uint32_t index;  // slice, or checksum part
    bool checksum;
  };
  std::vector<Task> tasks;
  uint32_t slices = 1;
  std::unique_ptr<std::atomic<uint32_t>[]> slices_left;  // per chunk
  std::atomic<size_t> next{0};
  std::vector<uint32_t> crc_parts;                    // per chunk
  std::unique_ptr<std::atomic<uint32_t>[]> crc_left;  // per chunk
  std::vector<std::vector<uint32_t>> part_crcs;       // per chunk: layer-major, crc_parts each
  // Set when a worker leaves with a task unfinished: nobody waits for that chunk's slices then.
  std::atomic<bool> stopped{false};
  // For the debug log: when packing began, and per chunk when its last slice began and when its
  // slices ended (ns after).
  SteadyClock::time_point begun;
  std::unique_ptr<std::atomic<int64_t>[]> last_slice_began_ns, slices_done_ns;
};

absl::Status TransferManager::PackLoop(PackJob& job) {
  SendTransfer& t = *job.t;
  // Leaving with a task taken and not done (an error, an ended transfer) stops the workers
  // that wait for this chunk's slices.
  StopUnlessDone guard{job.stopped};
  for (;;) {
    const size_t k = job.next.fetch_add(1);
    if (k >= job.tasks.size()) {
      guard.done = true;
      return absl::OkStatus();
    }
    const PackJob::Task task = job.tasks[k];
    const uint32_t i = task.chunk;
    const DataChunkHeader& c = job.chunks[i];
    {
      absl::MutexLock lock(&mu_);
      if (t.terminal()) return absl::OkStatus();
    }
    const std::span<uint8_t> target =
        job.device_payload != nullptr ? std::span<uint8_t>(job.device_payload, job.payload.size())
                                      : job.payload;
    const auto p0 = SteadyClock::now();
    if (!task.checksum) {
      const int64_t began_ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(p0 - job.begun).count();
      for (int64_t seen = job.last_slice_began_ns[i].load(std::memory_order_relaxed);
           seen < began_ns && !job.last_slice_began_ns[i].compare_exchange_weak(seen, began_ns);) {
      }
      // One slice (of one, for whole chunks: PackLayers). The worker that ends a chunk's last
      // slice seals it, unless the chunk has checksum parts, which that decrement lets begin.
      // (The decrement orders this slice's writes before the reads of whoever checksums them.)
      SPECTRUMKV_RETURN_IF_ERROR(job.codec->PackLayerSlice(
          job.src, job.plan, c.first_layer, c.last_layer, task.index, job.slices, target));
      const bool last_slice = job.slices_left[i].fetch_sub(1) == 1;
      const uint32_t parts = job.crc_parts[i];
      if (last_slice) {
        job.slices_done_ns[i] =
            std::chrono::duration_cast<std::chrono::nanoseconds>(SteadyClock::now() - job.begun)
                .count();
        if (parts == 0) {
          SPECTRUMKV_RETURN_IF_ERROR(
              job.codec->SealLayers(job.plan, c.first_layer, c.last_layer, target));
        }
      }
      const auto p1 = SteadyClock::now();
      {
        absl::MutexLock lock(&mu_);
        t.stats.times.pack_s += Since(p0, p1);
      }
      if (!last_slice || parts != 0) continue;
    } else {
      // A checksum part: PartCrc `task.index` of each layer of the chunk, once its slices, all
      // taken before this task and running on other workers, have ended.
      for (uint32_t spins = 0; job.slices_left[i].load() != 0; ++spins) {
        if (job.stopped.load()) return absl::OkStatus();
        if (spins < 4096) {
          CpuRelax();
        } else {
          std::this_thread::yield();  // a slice's worker may be waiting for this core
        }
      }
      const uint32_t parts = job.crc_parts[i];
      const std::vector<LayerSection>& layers = job.plan.layout.layers;
      for (uint32_t l = c.first_layer; l < c.last_layer; ++l) {
        job.part_crcs[i][(l - c.first_layer) * parts + task.index] =
            PartCrc(layers[l], task.index, parts, target.data());
      }
      const bool last_part = job.crc_left[i].fetch_sub(1) == 1;
      if (last_part) {
        for (uint32_t l = c.first_layer; l < c.last_layer; ++l) {
          const uint32_t crc =
              CombinedCrc(layers[l], &job.part_crcs[i][(l - c.first_layer) * parts], parts);
          WriteLayerTrailer(job.plan.layout, l, crc, target);
        }
      }
      {
        absl::MutexLock lock(&mu_);
        t.stats.times.pack_s += Since(p0, SteadyClock::now());
      }
      if (!last_part) continue;
    }
    // The chunk is sealed: (GPU pools) down to the host, then sent.
    const auto c0 = SteadyClock::now();
    if (job.device_payload != nullptr) {
      SPECTRUMKV_RETURN_IF_ERROR(job.device_memory->CopyToHost(
          job.payload.data() + c.offset, job.device_payload + c.offset, c.size));
    }
    const auto c1 = SteadyClock::now();
    {
      absl::MutexLock lock(&mu_);
      if (job.device_payload != nullptr) t.stats.times.stage_copy_s += Since(c0, c1);
      if (t.terminal()) return absl::OkStatus();
      ++t.sends_outstanding;
    }
    const double ms_per_ns = 1e-6;
    spdlog::debug(
        "send {}: chunk {} packed (its last slice began {:.3f} ms after packing began, the "
        "slices ended at {:.3f} ms, sealed at {:.3f} ms)",
        t.id_str, i, job.last_slice_began_ns[i].load() * ms_per_ns,
        job.slices_done_ns[i].load() * ms_per_ns,
        std::chrono::duration_cast<std::chrono::nanoseconds>(c0 - job.begun).count() * ms_per_ns);
    SendChunk(job.t, c, job.payload.subspan(c.offset, c.size));
  }
}

// A progressive payload's packing and sending (SendProgressive): every layer's base, packed by
// the workers while the caller scores, then, once the tiers are known, the layers' ranked parts
// (the INT8 tokens' refinements), which the workers take before any base left. Each part is
// packed in `slices` tasks; the worker that ends a part checksums it, and the second of a
// layer's two parts to be checksummed writes the layer's trailer (crc32c::Combine). Chunks are
// handed to the transport by PumpProgressive.
struct TransferManager::ProgressiveJob {
  std::shared_ptr<SendTransfer> t;
  Codec* codec = nullptr;
  KvBuffer src;
  TierPlan base_plan;  // the skeleton's: the layout (its tiers are not read)
  TierPlan plan;       // the ranked plan, written before `ranked_ready` is set
  std::atomic<bool> ranked_ready{false};
  std::vector<DataChunkHeader> chunks;  // the prelude, then base and ranked chunk per layer
  std::span<uint8_t> payload;
  uint32_t layers = 0;
  uint32_t slices = 1;
  std::atomic<uint32_t> next_base{0}, next_ranked{0};  // tasks: layer * slices + slice
  std::unique_ptr<std::atomic<uint32_t>[]> base_left, ranked_left, seal_left;  // per layer
  std::vector<uint32_t> base_crc, ranked_crc;  // per layer, written before seal_left drops
  std::atomic<bool> stopped{false};
  SteadyClock::time_point begun;
  // Sending: per chunk 0 waiting, 1 ready, 2 handed to the transport.
  absl::Mutex send_mu;
  std::vector<uint8_t> chunk_state ABSL_GUARDED_BY(send_mu);
  uint32_t in_transport ABSL_GUARDED_BY(send_mu) = 0;

  static uint32_t BaseChunk(uint32_t layer) { return 1 + 2 * layer; }
  static uint32_t RankedChunk(uint32_t layer) { return 2 + 2 * layer; }
  void Ready(uint32_t chunk) {
    spdlog::debug("send {}: chunk {} ready ({:.3f} ms after packing began)", t->id_str, chunk,
                  std::chrono::duration<double, std::milli>(SteadyClock::now() - begun).count());
    absl::MutexLock lock(&send_mu);
    chunk_state[chunk] = 1;
  }
};

bool TransferManager::StartSending(SendTransfer& t, const TierPlan& plan, const Codec& codec,
                                   double score_s) {
  absl::MutexLock lock(&mu_);
  if (t.terminal()) return false;
  t.stats.times.score_s = score_s;
  t.state = SendTransfer::State::kSending;
  t.stats.policy = std::string(PolicyName(plan.desc.policy));
  t.stats.backend = std::string(codec.name());
  t.stats.element_budget = plan.ElementBudget();
  t.stats.wire_budget = plan.WireBudget();
  t.stats.tiers = plan.layout.total_counts;
  return true;
}

absl::StatusOr<std::span<uint8_t>> TransferManager::AllocateSendBuffer(SendTransfer& t,
                                                                       uint64_t bytes) {
  absl::StatusOr<StagingBuffer> buffer = staging_.Allocate(bytes);
  if (!buffer.ok()) {
    metrics_.AdmissionRejected(RejectReason::kBytes);
    return buffer.status();
  }
  const std::span<uint8_t> payload = buffer->span();
  absl::MutexLock lock(&mu_);
  t.buffer = std::move(*buffer);
  return payload;
}

absl::Status TransferManager::SendProgressive(const std::shared_ptr<SendTransfer>& self,
                                              Codec* codec, const KvBuffer& src,
                                              PlanSkeleton skeleton, const PlanOptions& po,
                                              bool need_scores) {
  SendTransfer& t = *self;
  const SendArgs& a = t.args;
  auto terminal = [&] {
    absl::MutexLock lock(&mu_);
    return t.terminal();
  };
  auto job = std::make_shared<ProgressiveJob>();
  job->t = self;
  job->codec = codec;
  job->src = src;
  job->base_plan = skeleton.plan;
  const WireLayout& wl = job->base_plan.layout;
  uint32_t transfers_in_flight = 1;
  SPECTRUMKV_RETURN_IF_ERROR(Offer(self, wl, &job->chunks, &transfers_in_flight));
  if (terminal()) return absl::OkStatus();
  SPECTRUMKV_ASSIGN_OR_RETURN(job->payload, AllocateSendBuffer(t, wl.total_bytes));
  job->layers = static_cast<uint32_t>(wl.layers.size());
  job->slices = SlicesFor(*codec, transfers_in_flight);
  job->base_left = std::make_unique<std::atomic<uint32_t>[]>(job->layers);
  job->ranked_left = std::make_unique<std::atomic<uint32_t>[]>(job->layers);
  job->seal_left = std::make_unique<std::atomic<uint32_t>[]>(job->layers);
  for (uint32_t l = 0; l < job->layers; ++l) {
    job->base_left[l] = job->slices;
    job->ranked_left[l] = job->slices;
    job->seal_left[l] = 2;
  }
  job->base_crc.assign(job->layers, 0);
  job->ranked_crc.assign(job->layers, 0);
  {
    absl::MutexLock lock(&job->send_mu);
    job->chunk_state.assign(job->chunks.size(), 0);
  }
  job->begun = SteadyClock::now();
  spdlog::debug("send {}: packing the bases", t.id_str);
  // The bases, on every worker: this thread scores meanwhile.
  auto post_workers = [&](uint32_t count) {
    for (uint32_t h = 0; h < count; ++h) {
      {
        absl::MutexLock lock(&mu_);
        ++t.runners;
      }
      if (!executor_.Post([this, job] { FinishRunner(job->t, ProgressiveLoop(job)); })) {
        FinishRunner(self, absl::UnavailableError("the daemon is shutting down"));
      }
    }
  };
  const uint32_t workers = std::max<uint32_t>(1, options_.pack_threads);
  post_workers(workers);

  const auto s0 = SteadyClock::now();
  TierPlan plan;
  if (need_scores) {
    ScoreOptions so = ScoreOptionsFor(a);
    so.max_threads = options_.progressive_score_threads;
    SPECTRUMKV_ASSIGN_OR_RETURN(plan, codec->ScoreAndPlan(src, so, po));
    spdlog::debug("send {}: scored", t.id_str);
  } else {
    plan = PlanWithoutScores(std::move(skeleton), a.num_tokens);
  }
  if (!SameSections(wl, plan.layout)) {
    return absl::InternalError("the scored plan's layout differs from the one offered");
  }
  const double score_s = need_scores ? Since(s0, SteadyClock::now()) : 0.0;
  if (!StartSending(t, plan, *codec, score_s)) return absl::OkStatus();
  WritePrelude(plan.layout, plan.tiers, job->payload);
  job->plan = std::move(plan);
  job->ranked_ready.store(true, std::memory_order_release);
  job->Ready(0);
  PumpProgressive(job);
  // The ranked parts: the workers still packing bases take them first; fresh ones join.
  post_workers(workers - 1);
  return ProgressiveLoop(job);
}

absl::Status TransferManager::ProgressiveLoop(const std::shared_ptr<ProgressiveJob>& self) {
  ProgressiveJob& job = *self;
  SendTransfer& t = *job.t;
  // Leaving with a task taken and not done: nobody finishes that part, so nobody else goes on.
  StopUnlessDone guard{job.stopped};
  const uint32_t tasks = job.layers * job.slices;
  const WireLayout& wl = job.base_plan.layout;
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (t.terminal() || job.stopped.load()) return absl::OkStatus();
    }
    uint32_t k = tasks;
    bool ranked = false;
    if (job.ranked_ready.load(std::memory_order_acquire)) {
      k = job.next_ranked.fetch_add(1);
      ranked = k < tasks;
    }
    if (!ranked) k = job.next_base.fetch_add(1);
    if (k >= tasks) {
      guard.done = true;
      return absl::OkStatus();
    }
    const uint32_t l = k / job.slices;
    const auto p0 = SteadyClock::now();
    SPECTRUMKV_RETURN_IF_ERROR(
        job.codec->PackProgressiveSlice(job.src, ranked ? job.plan : job.base_plan,
                                        ranked ? ProgressivePart::kRanked : ProgressivePart::kBase,
                                        l, l + 1, k % job.slices, job.slices, job.payload));
    std::atomic<uint32_t>& left = ranked ? job.ranked_left[l] : job.base_left[l];
    if (left.fetch_sub(1) == 1) {
      // The part is packed. A base leaves now (its checksum is read while it does); the second
      // part of a layer to be checksummed writes the trailer, which lets the ranked part leave.
      const LayerSection& sec = wl.layers[l];
      if (!ranked) {
        job.Ready(ProgressiveJob::BaseChunk(l));
        PumpProgressive(self);
        job.base_crc[l] =
            crc32c::Value(job.payload.data() + sec.begin, sec.ranked_begin - sec.begin);
      } else {
        job.ranked_crc[l] =
            crc32c::Value(job.payload.data() + sec.ranked_begin, sec.crc_offset - sec.ranked_begin);
      }
      if (job.seal_left[l].fetch_sub(1) == 1) {
        const uint32_t crc =
            crc32c::Combine(job.base_crc[l], job.ranked_crc[l], sec.crc_offset - sec.ranked_begin);
        WriteLayerTrailer(wl, l, crc, job.payload);
        job.Ready(ProgressiveJob::RankedChunk(l));
        PumpProgressive(self);
      }
    }
    absl::MutexLock lock(&mu_);
    t.stats.times.pack_s += Since(p0, SteadyClock::now());
  }
}

void TransferManager::PumpProgressive(const std::shared_ptr<ProgressiveJob>& self) {
  ProgressiveJob& job = *self;
  SendTransfer& t = *job.t;
  // Held while handing over, so that chunks reach the transport in the order picked here.
  absl::MutexLock send_lock(&job.send_mu);
  const uint32_t window = std::max<uint32_t>(1, options_.progressive_chunks_in_flight);
  while (job.in_transport < window) {
    // The prelude, then the lowest ready ranked part, then the lowest ready base.
    int pick = job.chunk_state[0] == 1 ? 0 : -1;
    for (uint32_t l = 0; pick < 0 && l < job.layers; ++l) {
      if (job.chunk_state[ProgressiveJob::RankedChunk(l)] == 1)
        pick = static_cast<int>(ProgressiveJob::RankedChunk(l));
    }
    for (uint32_t l = 0; pick < 0 && l < job.layers; ++l) {
      if (job.chunk_state[ProgressiveJob::BaseChunk(l)] == 1)
        pick = static_cast<int>(ProgressiveJob::BaseChunk(l));
    }
    if (pick < 0) return;
    {
      absl::MutexLock lock(&mu_);
      if (t.terminal()) return;
      ++t.sends_outstanding;
      if (t.first_send == SteadyClock::time_point{}) t.first_send = SteadyClock::now();
    }
    job.chunk_state[pick] = 2;
    ++job.in_transport;
    const DataChunkHeader& c = job.chunks[pick];
    spdlog::debug("send {}: chunk {} handed over ({:.3f} ms after packing began)", t.id_str, pick,
                  Since(job.begun, SteadyClock::now()) * 1e3);
    // The transport never runs the callback inside SendData.
    transport_.SendData(
        t.args.peer, c, job.payload.subspan(c.offset, c.size), [this, self](absl::Status s) {
          {
            absl::MutexLock lock(&self->send_mu);
            --self->in_transport;
          }
          {
            absl::MutexLock lock(&mu_);
            --self->t->sends_outstanding;
            ReleaseSendIfIdle(self->t);
          }
          if (!s.ok()) {
            FinishSend(self->t, absl::UnavailableError(absl::StrFormat(
                                    "Send %s: payload send failed: %s",
                                    Describe(self->t->args.key, self->t->args.peer), s.message())));
            return;
          }
          PumpProgressive(self);
        });
  }
}

void TransferManager::SendChunk(const std::shared_ptr<SendTransfer>& self,
                                const DataChunkHeader& chunk, std::span<const uint8_t> bytes) {
  transport_.SendData(self->args.peer, chunk, bytes, [this, self](absl::Status s) {
    {
      absl::MutexLock lock(&mu_);
      --self->sends_outstanding;
      ReleaseSendIfIdle(self);
    }
    if (!s.ok()) {
      FinishSend(self, absl::UnavailableError(absl::StrFormat(
                           "Send %s: payload send failed: %s",
                           Describe(self->args.key, self->args.peer), s.message())));
    }
  });
}

absl::Status TransferManager::Offer(const std::shared_ptr<SendTransfer>& self,
                                    const WireLayout& layout, std::vector<DataChunkHeader>* chunks,
                                    uint32_t* transfers_in_flight) {
  SendTransfer& t = *self;
  const SendArgs& a = t.args;
  const uint64_t total = layout.total_bytes;
  uint32_t sends_in_flight = 1;
  uint64_t logical_bytes = 0;
  {
    absl::MutexLock lock(&mu_);
    if (t.terminal()) return absl::OkStatus();
    logical_bytes = uint64_t{a.num_tokens} * t.pool->layout().shape.Fp16BytesPerToken();
    if (inflight_bytes_ + total > options_.max_inflight_bytes) {
      metrics_.AdmissionRejected(RejectReason::kBytes);
      return absl::ResourceExhaustedError(absl::StrFormat(
          "a %u-byte payload would exceed the in-flight byte limit (%u of %u in use)", total,
          inflight_bytes_, options_.max_inflight_bytes));
    }
    inflight_bytes_ += total;
    t.reserved_bytes = total;
    sends_in_flight = active_sends_;
    *transfers_in_flight = active_;
    PublishGauges();
  }
  *chunks = PlanChunks(
      layout, t.id,
      ChunkBytesFor(layout.total_bytes - layout.prelude_bytes, sends_in_flight, options_));
  v1::PeerMessage message;
  v1::PeerOffer* offer = message.mutable_offer();
  offer->set_request_id(a.key.request_id);
  offer->set_shard(a.key.shard);
  offer->set_transfer_id(t.id);
  offer->set_sender_incarnation(options_.incarnation);
  offer->set_total_bytes(total);
  offer->set_num_chunks(static_cast<uint32_t>(chunks->size()));
  offer->set_logical_bytes(logical_bytes);
  {
    absl::MutexLock lock(&mu_);
    if (t.terminal()) return absl::OkStatus();
    t.offered = true;
    t.stats.logical_bytes = logical_bytes;
    t.stats.wire_bytes = total;
  }
  spdlog::debug("send {}: offering {} bytes in {} chunks", t.id_str, total, chunks->size());
  transport_.SendControl(a.peer, message, [this, self](absl::Status s) {
    if (!s.ok()) {
      FinishSend(self, absl::UnavailableError(absl::StrFormat(
                           "Send %s: cannot reach the peer: %s",
                           Describe(self->args.key, self->args.peer), s.message())));
    }
  });
  return absl::OkStatus();
}

absl::Status TransferManager::PrepareSend(const std::shared_ptr<SendTransfer>& self) {
  SendTransfer& t = *self;
  const SendArgs& a = t.args;
  auto terminal = [&] {
    absl::MutexLock lock(&mu_);
    return t.terminal();
  };
  SPECTRUMKV_ASSIGN_OR_RETURN(std::shared_ptr<Pool> pool, pools_.Get(a.pool_id));
  const bool on_device = pool->memory_kind() == MemoryKind::kDevice;
  Codec* codec = on_device ? codecs_.device : codecs_.host;
  if (codec == nullptr) {
    return absl::UnavailableError("no codec backend for this pool's memory on this daemon");
  }
  {
    absl::MutexLock lock(&mu_);
    if (t.terminal()) return absl::OkStatus();
    t.on_device = on_device;
    t.pool = pool;
    t.pool_counted = true;
    pool->active_transfers.fetch_add(1);
  }
  const KvBuffer src = pool->View(a.blocks, a.num_tokens);
  SPECTRUMKV_RETURN_IF_ERROR(ValidateKvBuffer(src));
  const std::string model = a.model.empty() ? pool->model() : a.model;
  SPECTRUMKV_ASSIGN_OR_RETURN(const Policy policy, models_.Resolve(model, a.plan.policy));

  PlanOptions po = a.plan;
  po.policy = policy;
  po.scoring = static_cast<uint8_t>(a.scoring);
  // Progressive payloads are packed from host pools only (the CUDA codec has no progressive
  // kernels, and a GPU pool's scoring pass is short): a GPU pool's payload is an absmax one.
  if (on_device && po.quantizer == Quantizer::kProgressive) po.quantizer = Quantizer::kAbsmax;
  const ModelShape& shape = pool->layout().shape;
  const DType dtype = pool->layout().dtype;

  // Plan what does not depend on the scores (tier counts, layout) on the host. A plan that does
  // not depend on the ranking (pdtrim, random_tier, or one tier for every token: an uncompressed
  // transfer, a uniform policy within budget) needs no scoring pass over the KV.
  auto t0 = SteadyClock::now();
  absl::StatusOr<PlanSkeleton> skeleton = PlanSkeletonFor(shape, dtype, a.num_tokens, po);
  const auto uniform = [](const WireLayout& l) {
    for (const TierCounts& c : l.map_counts) {
      int used = 0;
      for (uint32_t n : c.n) used += n > 0;
      if (used > 1) return false;
    }
    return true;
  };
  const bool need_scores = !skeleton.ok() || (skeleton->ranked && !uniform(skeleton->plan.layout));
  if (skeleton.ok() && skeleton->plan.desc.progressive()) {
    t.stats.times.plan_s = Since(t0, SteadyClock::now());
    return SendProgressive(self, codec, src, std::move(*skeleton), po, need_scores);
  }
  TierPlan plan;
  if (!need_scores) plan = PlanWithoutScores(std::move(*skeleton), a.num_tokens);
  auto t1 = SteadyClock::now();
  t.stats.times.plan_s = Since(t0, t1);

  // Offer as soon as the payload's size and chunks are known: they follow from the tier counts,
  // not from which token gets which tier, so a transfer that scores offers before its scoring
  // pass and the receiver binds the offer and allocates its staging meanwhile.
  std::vector<DataChunkHeader> chunks;
  uint32_t transfers_in_flight = 1;
  std::optional<WireLayout> offered;  // before the scoring pass
  if (need_scores && skeleton.ok()) {
    SPECTRUMKV_RETURN_IF_ERROR(Offer(self, skeleton->plan.layout, &chunks, &transfers_in_flight));
    if (terminal()) return absl::OkStatus();
    offered = std::move(skeleton->plan.layout);
  }

  // Score and rank. The codec plans where it scores: the CUDA backend ranks on the device and
  // copies back only the tier codes, so score_s then includes the ranking.
  const auto s0 = SteadyClock::now();
  if (need_scores) {
    SPECTRUMKV_ASSIGN_OR_RETURN(plan, codec->ScoreAndPlan(src, ScoreOptionsFor(a), po));
  }
  const double score_s = need_scores ? Since(s0, SteadyClock::now()) : 0.0;
  if (need_scores) spdlog::debug("send {}: scored", t.id_str);
  if (terminal()) return absl::OkStatus();
  if (!offered) {
    SPECTRUMKV_RETURN_IF_ERROR(Offer(self, plan.layout, &chunks, &transfers_in_flight));
    if (terminal()) return absl::OkStatus();
  } else if (!SameSections(*offered, plan.layout)) {
    return absl::InternalError("the scored plan's layout differs from the one offered");
  }
  const uint64_t total = plan.layout.total_bytes;
  if (!StartSending(t, plan, *codec, score_s)) return absl::OkStatus();
  SPECTRUMKV_ASSIGN_OR_RETURN(const std::span<uint8_t> payload, AllocateSendBuffer(t, total));
  WritePrelude(plan.layout, plan.tiers, payload);
  // A GPU pool is packed into device memory; the prelude, written on the host, goes up too so
  // that the device buffer holds the whole payload. Its chunks come down into `payload`, which
  // the transport sends from.
  uint8_t* device_payload = nullptr;
  if (on_device) {
    SPECTRUMKV_ASSIGN_OR_RETURN(std::unique_ptr<DeviceAllocation> allocated,
                                AllocateDevicePayload(total));
    device_payload = allocated->data();
    const auto c0 = SteadyClock::now();
    {
      absl::MutexLock lock(&mu_);
      t.device_payload = std::move(allocated);
    }
    SPECTRUMKV_RETURN_IF_ERROR(codecs_.device_memory->CopyToDevice(device_payload, payload.data(),
                                                                   plan.layout.prelude_bytes));
    const double copy_s = Since(c0, SteadyClock::now());
    absl::MutexLock lock(&mu_);
    t.stats.times.stage_copy_s += copy_s;
  }

  // The prelude first, then the chunks, packed by up to pack_threads workers in parallel, each
  // sent as soon as it is packed: packing overlaps sending.
  {
    absl::MutexLock lock(&mu_);
    if (t.terminal()) return absl::OkStatus();
    t.first_send = SteadyClock::now();
    ++t.sends_outstanding;
  }
  SendChunk(self, chunks[0], payload.subspan(0, chunks[0].size));
  auto job = std::make_shared<PackJob>();
  job->t = self;
  job->codec = codec;
  job->src = src;
  job->plan = std::move(plan);
  job->chunks = chunks;
  job->payload = payload;
  job->device_payload = device_payload;
  job->device_memory = codecs_.device_memory;
  const uint32_t workers = std::max<uint32_t>(1, options_.pack_threads);
  // Host payloads: every worker packs a part of each chunk, chunk after chunk, so that the first
  // chunk leaves after a fraction of one chunk's packing (a slice per worker) and chunks leave in
  // order. The device codec packs a chunk in one launch.
  // The first two chunks' checksums are then computed in as many parts, not on one core after
  // the last slice (measured on a 16-core host: a 5.2 MB first chunk was sealed 0.4 ms sooner,
  // docs/BENCHMARKS.md, "the first layer chunk").
  if (device_payload == nullptr) job->slices = SlicesFor(*codec, transfers_in_flight);
  const uint32_t n = static_cast<uint32_t>(chunks.size());
  job->crc_parts.assign(n, 0);
  for (uint32_t i = 1; i < n; ++i) {
    const bool parts = job->slices > 1 && i <= 2 && chunks[i].size >= options_.checksum_parts_bytes;
    job->crc_parts[i] = parts ? job->slices : 0;
    for (uint32_t k = 0; k < job->slices; ++k) job->tasks.push_back({i, k, false});
    for (uint32_t k = 0; k < job->crc_parts[i]; ++k) job->tasks.push_back({i, k, true});
  }
  const size_t tasks = job->tasks.size();
  job->slices_left = std::make_unique<std::atomic<uint32_t>[]>(chunks.size());
  job->crc_left = std::make_unique<std::atomic<uint32_t>[]>(chunks.size());
  job->part_crcs.resize(chunks.size());
  job->last_slice_began_ns = std::make_unique<std::atomic<int64_t>[]>(chunks.size());
  job->slices_done_ns = std::make_unique<std::atomic<int64_t>[]>(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    job->slices_left[i] = job->slices;
    job->crc_left[i] = job->crc_parts[i];
    if (i > 0) {
      job->part_crcs[i].resize(size_t{chunks[i].last_layer - chunks[i].first_layer} *
                               job->crc_parts[i]);
    }
    job->last_slice_began_ns[i] = 0;
    job->slices_done_ns[i] = 0;
  }
  job->begun = SteadyClock::now();
  spdlog::debug("send {}: packing", t.id_str);
  const size_t helpers = std::min<size_t>(workers - 1, tasks > 1 ? tasks - 1 : 0);
  for (size_t h = 0; h < helpers; ++h) {
    {
      absl::MutexLock lock(&mu_);
      ++t.runners;
    }
    if (!executor_.Post([this, job] { FinishRunner(job->t, PackLoop(*job)); })) {
      FinishRunner(self, absl::UnavailableError("the daemon is shutting down"));
    }
  }
  return PackLoop(*job);
}

void TransferManager::FinishSend(const std::shared_ptr<SendTransfer>& t, absl::Status status,
                                 bool tell_peer) {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    FinishSendLocked(t, std::move(status), tell_peer, d);
  }
  d.Run();
}

void TransferManager::FinishSendLocked(const std::shared_ptr<SendTransfer>& t, absl::Status status,
                                       bool tell_peer, Deferred& d) {
  if (t->terminal()) return;
  const auto now = SteadyClock::now();
  t->state = status.ok() ? SendTransfer::State::kDone : SendTransfer::State::kFailed;
  t->status = status;
  t->ended_at = now;
  timers_.Cancel(t->deadline_timer);
  t->stats.times.total_s = Since(t->created, now);
  --active_;
  --active_sends_;
  metrics_.TransferEnded(Role::kSend, status.code(), t->stats.times.total_s);
  if (status.ok()) {
    t->result.transfer_id = t->id_str;
    t->result.stats = t->stats;
    metrics_.AddTransferBytes(Direction::kTx, t->stats.logical_bytes, t->stats.wire_bytes,
                              t->stats.tiers);
    metrics_.ObserveStage(Stage::kScore, t->stats.times.score_s);
    metrics_.ObserveStage(Stage::kPlan, t->stats.times.plan_s);
    metrics_.ObserveStage(Stage::kPack, t->stats.times.pack_s);
    if (t->on_device) metrics_.ObserveStage(Stage::kStageCopy, t->stats.times.stage_copy_s);
    metrics_.ObserveStage(Stage::kNetwork, t->stats.times.network_s);
    spdlog::debug("send {}: done", t->id_str);
  } else {
    spdlog::info("transfer {} failed: {}", t->id_str, status.ToString());
  }
  if (!status.ok() && tell_peer && t->offered) {
    d.Add([this, t, status] { SendCancel(t->args.peer, t->id, t->args.key, status, false); });
  }
  d.AddReplies(&t->waiters, status, t->result);
  ReleaseSendIfIdle(t);
  PublishGauges();
}

void TransferManager::ReleaseSendIfIdle(const std::shared_ptr<SendTransfer>& t) {
  if (!t->terminal() || t->runners > 0 || t->sends_outstanding > 0) return;
  t->buffer = StagingBuffer();
  t->device_payload.reset();
  inflight_bytes_ -= t->reserved_bytes;
  t->reserved_bytes = 0;
  if (t->pool_counted) {
    t->pool->active_transfers.fetch_sub(1);
    t->pool_counted = false;
  }
  t->pool.reset();
  PublishGauges();
}

// ---------------------------------------------------------------------------------------------
// Receiver

uint64_t TransferManager::Receive(ReceiveArgs args, SteadyClock::time_point deadline,
                                  ReceiveDone done) {
  Deferred d;
  uint64_t waiter = 0;
  {
    absl::MutexLock lock(&mu_);
    waiter = next_waiter_++;
    auto fail_now = [&](absl::Status s) { d.Add([done, s] { done(s); }); };
    std::shared_ptr<RecvTransfer> t;
    if (auto it = recvs_.find(args.key); it != recvs_.end()) {
      t = it->second;
      if (t->claimed) {
        if (t->args.fingerprint != args.fingerprint) {
          fail_now(absl::AlreadyExistsError(
              absl::StrFormat("Receive %s: the request id is in use by a different request",
                              Describe(args.key, t->peer))));
        } else if (t->terminal()) {
          const absl::Status s = t->status;
          const ReceiveResult r = t->result;
          d.Add([done, s, r] {
            if (s.ok()) {
              done(r);
            } else {
              done(s);
            }
          });
        } else {
          t->waiters.emplace(waiter, std::move(done));
        }
        d.Run();
        return waiter;
      }
      if (t->terminal()) {  // an early payload that expired or failed: start afresh
        recvs_.erase(it);
        t.reset();
      }
    }
    // A new Receive, or one claiming a payload that arrived first.
    if (!t) {
      if (absl::Status s = AdmitTransfer(args.key, "Receive"); !s.ok()) {
        metrics_.TransferEnded(Role::kReceive, s.code(), 0);
        fail_now(s);
        d.Run();
        return waiter;
      }
    } else if (draining_ || stopping_) {
      fail_now(absl::UnavailableError("Receive " + Describe(args.key, t->peer) +
                                      ": the daemon is draining"));
      d.Run();
      return waiter;
    }
    absl::StatusOr<std::shared_ptr<Pool>> pool = pools_.Get(args.pool_id);
    absl::Status check = pool.status();
    if (check.ok()) check = ValidateKvBuffer((*pool)->View(args.blocks, args.num_tokens));
    if (!check.ok()) {
      check = WithContext(check, "Receive " + Describe(args.key, t ? t->peer : ""));
      if (!t) {
        metrics_.TransferEnded(Role::kReceive, check.code(), 0);
        fail_now(check);
        d.Run();
        return waiter;
      }
      // The early payload cannot go anywhere: fail it, and this call.
      t->claimed = true;
      t->args = std::move(args);
      t->waiters.emplace(waiter, std::move(done));
      FinishRecvLocked(t, check, true, d);
      d.Run();
      return waiter;
    }
    const bool is_new = !t;
    if (is_new) {
      t = std::make_shared<RecvTransfer>();
      t->key = args.key;
      t->created = SteadyClock::now();
      t->state = RecvTransfer::State::kWaiting;
      recvs_[t->key] = t;
      ++active_;
    } else {
      timers_.Cancel(t->early_timer);
      early_bytes_ -= t->early_reserved;
      t->early_reserved = 0;
      t->state = RecvTransfer::State::kReceiving;
    }
    t->claimed = true;
    t->claimed_at = SteadyClock::now();
    t->args = std::move(args);
    t->pool = *pool;
    t->pool_counted = true;
    t->pool->active_transfers.fetch_add(1);
    t->waiters.emplace(waiter, std::move(done));
    t->deadline_timer = timers_.Schedule(deadline, [this, t] {
      Deferred dd;
      {
        absl::MutexLock l(&mu_);
        FinishRecvLocked(t,
                         absl::DeadlineExceededError(absl::StrFormat(
                             "Receive %s: deadline exceeded (%u of %u chunks arrived)",
                             Describe(t->key, t->peer), t->chunks_received, t->num_chunks)),
                         true, dd);
      }
      dd.Run();
    });
    Advance(t, d);
    PublishGauges();
  }
  d.Run();
  return waiter;
}

absl::Status TransferManager::BindOffer(const std::shared_ptr<RecvTransfer>& t,
                                        const std::string& peer, const v1::PeerOffer& offer) {
  const uint64_t total = offer.total_bytes();
  if (offer.num_chunks() < 2 || offer.num_chunks() > (1u << 20) || total < kWireHeaderBytes) {
    return absl::InvalidArgumentError("malformed offer (chunk count or size)");
  }
  if (inflight_bytes_ + total > options_.max_inflight_bytes) {
    metrics_.AdmissionRejected(RejectReason::kBytes);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "a %u-byte payload would exceed the receiver's in-flight byte limit (%u of %u in use)",
        total, inflight_bytes_, options_.max_inflight_bytes));
  }
  absl::StatusOr<StagingBuffer> buffer = staging_.Allocate(total);
  if (!buffer.ok()) {
    metrics_.AdmissionRejected(RejectReason::kBytes);
    return buffer.status();
  }
  inflight_bytes_ += total;
  t->reserved_bytes = total;
  t->buffer = std::move(*buffer);
  t->bound = true;
  t->peer = peer;
  t->wire_id = offer.transfer_id();
  t->id_str = TransferIdString(offer.sender_incarnation(), offer.transfer_id());
  t->total_bytes = total;
  t->num_chunks = offer.num_chunks();
  t->chunk_seen.assign(offer.num_chunks(), false);
  recvs_by_wire_[{peer, t->wire_id}] = t;
  spdlog::debug("receive {} from {}: offer of {} bytes in {} chunks accepted", t->id_str, peer,
                total, t->num_chunks);
  return absl::OkStatus();
}

void TransferManager::HandleOffer(const std::string& peer, const v1::PeerOffer& offer,
                                  Deferred& d) {
  const TransferKey key{offer.request_id(), offer.shard()};
  auto reject = [&](const absl::Status& s) {
    d.Add([this, peer, id = offer.transfer_id(), s] { SendAck(peer, id, s, 0, 0); });
  };
  std::shared_ptr<RecvTransfer> t;
  if (auto it = recvs_.find(key); it != recvs_.end()) {
    t = it->second;
    if (t->bound) {
      if (t->peer == peer && t->wire_id == offer.transfer_id()) return;  // duplicate offer
      if (!t->terminal()) {
        reject(absl::AlreadyExistsError(
            absl::StrFormat("request %s shard %u is already being received from %s", key.request_id,
                            key.shard, t->peer)));
        return;
      }
      if (t->claimed) {  // the Receive already ended: tell the new sender how
        reject(t->status.ok() ? absl::AlreadyExistsError("the request was already received")
                              : t->status);
        return;
      }
      recvs_.erase(it);  // an expired early payload: start afresh
      t.reset();
    } else if (t->terminal()) {
      reject(t->status);
      return;
    }
  }
  if (t) {  // a waiting Receive
    const absl::Status s = BindOffer(t, peer, offer);
    if (!s.ok()) {
      t->peer = peer;
      t->wire_id = offer.transfer_id();
      t->bound = true;  // so the failure reaches this sender
      FinishRecvLocked(t, WithContext(s, "Receive " + Describe(key, peer)), true, d);
      return;
    }
    t->state = RecvTransfer::State::kReceiving;
    return;
  }
  // No Receive yet: buffer the payload within the early budget, for at most early_ttl_s.
  absl::Status s = AdmitTransfer(key, "incoming transfer");
  if (s.ok() && early_bytes_ + offer.total_bytes() > options_.early_buffer_bytes) {
    metrics_.AdmissionRejected(RejectReason::kEarlyBuffer);
    s = absl::ResourceExhaustedError(absl::StrFormat(
        "request %s shard %u arrived before its Receive and the early buffer is full (%u of %u "
        "bytes)",
        key.request_id, key.shard, early_bytes_, options_.early_buffer_bytes));
  }
  t = std::make_shared<RecvTransfer>();
  t->key = key;
  t->created = SteadyClock::now();
  t->state = RecvTransfer::State::kEarly;
  if (s.ok()) s = BindOffer(t, peer, offer);
  if (!s.ok()) {
    reject(s);
    return;
  }
  early_bytes_ += t->total_bytes;
  t->early_reserved = t->total_bytes;
  recvs_[key] = t;
  ++active_;
  t->early_timer = timers_.Schedule(
      t->created + std::chrono::duration_cast<SteadyClock::duration>(
                       std::chrono::duration<double>(options_.early_ttl_s)),
      [this, t] {
        Deferred dd;
        {
          absl::MutexLock l(&mu_);
          if (!t->claimed && !t->terminal()) {
            metrics_.EarlyPayloadExpired();
            FinishRecvLocked(t,
                             absl::DeadlineExceededError(absl::StrFormat(
                                 "request %s shard %u: no Receive claimed the payload within "
                                 "%gs of its arrival",
                                 t->key.request_id, t->key.shard, options_.early_ttl_s)),
                             true, dd);
          }
        }
        dd.Run();
      });
  PublishGauges();
}

absl::StatusOr<std::span<uint8_t>> TransferManager::OnDataBegin(const std::string& peer,
                                                                const DataChunkHeader& h) {
  absl::MutexLock lock(&mu_);
  auto it = recvs_by_wire_.find({peer, h.transfer_id});
  if (it == recvs_by_wire_.end()) {
    return absl::NotFoundError(absl::StrFormat("no transfer %u from %s", h.transfer_id, peer));
  }
  const std::shared_ptr<RecvTransfer>& t = it->second;
  if (t->terminal()) return absl::CancelledError("the transfer has ended");
  uint64_t end;
  if (h.index >= t->num_chunks || t->chunk_seen[h.index] || h.size == 0 ||
      __builtin_add_overflow(h.offset, h.size, &end) || end > t->total_bytes) {
    return absl::InvalidArgumentError(absl::StrFormat("chunk %u [%u, +%u) does not fit transfer %u",
                                                      h.index, h.offset, h.size, h.transfer_id));
  }
  t->chunk_seen[h.index] = true;
  ++t->data_outstanding;
  if (!t->any_byte) {
    t->any_byte = true;
    t->first_byte = SteadyClock::now();
    spdlog::debug("receive {}: first chunk in", t->id_str);
  }
  if (h.index > 0 && !t->any_layer) {
    t->any_layer = true;
    spdlog::debug("receive {}: first layer chunk in", t->id_str);
  }
  return t->buffer.span().subspan(h.offset, h.size);
}

void TransferManager::OnDataEnd(const std::string& peer, const DataChunkHeader& h,
                                absl::Status status) {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    auto it = recvs_by_wire_.find({peer, h.transfer_id});
    if (it == recvs_by_wire_.end()) return;
    std::shared_ptr<RecvTransfer> t = it->second;
    --t->data_outstanding;
    if (t->terminal()) {
      ReleaseRecvIfIdle(t);
    } else if (!status.ok()) {
      FinishRecvLocked(t,
                       absl::UnavailableError(
                           absl::StrFormat("Receive %s: chunk %u was not received: %s",
                                           Describe(t->key, peer), h.index, status.message())),
                       true, d);
    } else {
      ++t->chunks_received;
      t->last_byte = SteadyClock::now();
      spdlog::debug("receive {}: chunk {} in", t->id_str, h.index);
      if (t->chunks_received == t->num_chunks) {
        spdlog::debug("receive {} from {}: all {} chunks in", t->id_str, peer, t->num_chunks);
      }
      t->pending_chunks.push_back(h);
      Advance(t, d);
    }
  }
  d.Run();
}

void TransferManager::Advance(const std::shared_ptr<RecvTransfer>& t, Deferred& d) {
  if (t->terminal() || !t->bound) return;
  const std::string context = "Receive " + Describe(t->key, t->peer);
  // The prelude first: nothing else can be checked without it.
  if (!t->prelude) {
    auto p = std::find_if(t->pending_chunks.begin(), t->pending_chunks.end(),
                          [](const DataChunkHeader& c) { return c.index == 0; });
    if (p == t->pending_chunks.end()) return;
    const DataChunkHeader c = *p;
    t->pending_chunks.erase(p);
    absl::StatusOr<ParsedPrelude> parsed =
        c.offset == 0 ? ParsePrelude(t->buffer.span().subspan(0, c.size), t->total_bytes)
                      : absl::InvalidArgumentError("the prelude chunk is not at offset 0");
    if (parsed.ok() &&
        (parsed->layout.total_bytes != t->total_bytes || parsed->layout.prelude_bytes != c.size ||
         t->num_chunks >
             (parsed->layout.desc.progressive() ? 2 : 1) * parsed->layout.layers.size() + 1)) {
      parsed = absl::InvalidArgumentError("the prelude disagrees with the offer's sizes");
    }
    if (!parsed.ok()) {
      if (parsed.status().code() == absl::StatusCode::kDataLoss) metrics_.ChecksumFailure();
      FinishRecvLocked(t, WithContext(parsed.status(), context), true, d);
      return;
    }
    t->prelude = std::move(*parsed);
    t->layer_parts.assign(t->prelude->layout.layers.size(), 0);
  }
  if (!t->claimed) return;  // an early payload: keep it until its Receive arrives
  if (!t->destination_checked) {
    // First time with both a prelude and a destination: they must agree.
    const absl::Status s = CheckBufferMatches(t->pool->View(t->args.blocks, t->args.num_tokens),
                                              t->prelude->layout.desc, "destination");
    if (!s.ok()) {
      FinishRecvLocked(t, WithContext(s, context), true, d);
      return;
    }
    t->destination_checked = true;
  }
  const WireLayout& wl = t->prelude->layout;
  for (const DataChunkHeader& c : t->pending_chunks) {
    const uint8_t parts = ChunkParts(wl, c);
    bool overlaps = parts == 0;
    for (uint32_t l = c.first_layer; parts != 0 && l < c.last_layer; ++l) {
      overlaps |= (t->layer_parts[l] & parts) != 0;
    }
    if (overlaps) {
      FinishRecvLocked(t,
                       absl::InvalidArgumentError(absl::StrFormat(
                           "%s: chunk %u claims layers [%u, %u) at [%u, +%u), which the "
                           "prelude does not place there",
                           context, c.index, c.first_layer, c.last_layer, c.offset, c.size)),
                       true, d);
      return;
    }
    // Whole sections are unpacked as the chunk's layer range; a part completes its layer or
    // waits for the other part.
    uint32_t first = c.first_layer, last = c.last_layer;
    for (uint32_t l = c.first_layer; l < c.last_layer; ++l) t->layer_parts[l] |= parts;
    if (parts != kWholeSection && t->layer_parts[first] != kWholeSection) continue;
    ++t->unpack_tasks;
    d.Add([this, t, first, last] {
      if (!executor_.Post([this, t, first, last] { RunUnpack(t, first, last); })) {
        Deferred dd;
        {
          absl::MutexLock lock(&mu_);
          --t->unpack_tasks;
          FinishRecvLocked(t, absl::UnavailableError("the daemon is shutting down"), true, dd);
        }
        dd.Run();
      }
    });
  }
  t->pending_chunks.clear();
}

absl::StatusOr<std::unique_ptr<DeviceAllocation>> TransferManager::AllocateDevicePayload(
    uint64_t bytes) {
  absl::StatusOr<std::unique_ptr<DeviceAllocation>> allocated =
      codecs_.device_memory->Allocate(bytes);
  if (!allocated.ok()) {
    if (allocated.status().code() == absl::StatusCode::kResourceExhausted) {
      metrics_.AdmissionRejected(RejectReason::kBytes);
    }
    return WithContext(allocated.status(), "device payload buffer");
  }
  return allocated;
}

absl::Status TransferManager::UnpackProgressiveToDevice(RecvTransfer& t, uint32_t first,
                                                        uint32_t last, double* unpack_seconds,
                                                        double* copy_seconds) {
  const WireLayout& wl = t.prelude->layout;
  const PayloadDesc& desc = wl.desc;
  const std::span<const uint8_t> payload = t.buffer.span();
  if (codecs_.host == nullptr || codecs_.device_memory == nullptr) {
    return absl::UnavailableError("a progressive payload into a GPU pool needs the host codec");
  }
  for (uint32_t l = first; l < last; ++l) {
    SPECTRUMKV_RETURN_IF_ERROR(VerifyLayerSection(wl, l, payload));
  }
  // A one-layer payload of FP16 rows only: its prelude and layout.
  PayloadDesc one = desc;
  one.shape.num_layers = 1;
  one.flags = 0;
  TierCounts all_fp16;
  all_fp16[Tier::kFp16] = desc.num_tokens;
  SPECTRUMKV_ASSIGN_OR_RETURN(WireLayout one_layout,
                              ComputeWireLayout(one, std::vector<TierCounts>{all_fp16}));
  ParsedPrelude one_prelude{std::move(one_layout), std::vector<uint8_t>(desc.num_tokens, 0)};
  const WireLayout& ol = one_prelude.layout;
  // Not zeroed: the rows are written for every layer; the prelude and trailer once here.
  const std::unique_ptr<uint8_t[]> host_bytes =
      std::make_unique_for_overwrite<uint8_t[]>(ol.total_bytes);
  const std::span<uint8_t> host(host_bytes.get(), ol.total_bytes);
  WritePrelude(ol, one_prelude.tiers, host);
  const LayerSection& sec = ol.layers[0];
  std::memset(host.data() + sec.crc_offset, 0, ol.total_bytes - sec.crc_offset);
  // Its rows, [n][H][D] for K then for V, as a host pool of one block whose every layer is
  // there: the host codec decodes layer l into it.
  const uint64_t kv_bytes = sec.value.fp16_rows - sec.key.fp16_rows;
  const ModelShape& shape = desc.shape;
  KvLayout rows_layout;
  rows_layout.shape = shape;
  rows_layout.dtype = desc.dtype;
  rows_layout.block_size = desc.num_tokens;
  rows_layout.num_blocks = 1;
  const uint64_t token_stride = uint64_t{shape.num_kv_heads} * shape.head_dim * 2;
  const TensorPlacement k{0, 0, 0, token_stride, uint64_t{shape.head_dim} * 2};
  TensorPlacement v = k;
  v.offset_bytes = kv_bytes;
  rows_layout.keys.assign(shape.num_layers, k);
  rows_layout.values.assign(shape.num_layers, v);
  const MemoryRegion rows_region{host.data() + sec.key.fp16_rows, 2 * kv_bytes};
  const uint32_t block = 0;
  const KvBuffer rows{
      &rows_layout, {&rows_region, 1}, MemoryKind::kHost, {&block, 1}, desc.num_tokens};
  // The pool's layer l as a one-layer pool.
  const KvBuffer pool = t.pool->View(t.args.blocks, t.args.num_tokens);
  KvLayout pool_layer = *pool.layout;
  pool_layer.shape.num_layers = 1;
  SPECTRUMKV_ASSIGN_OR_RETURN(std::unique_ptr<DeviceAllocation> device,
                              AllocateDevicePayload(ol.total_bytes));
  for (uint32_t l = first; l < last; ++l) {
    const auto t0 = SteadyClock::now();
    SPECTRUMKV_RETURN_IF_ERROR(codecs_.host->UnpackLayers(*t.prelude, payload, rows, l, l + 1,
                                                          VerifyMode::kAlreadyVerified));
    const auto t1 = SteadyClock::now();
    SPECTRUMKV_RETURN_IF_ERROR(
        codecs_.device_memory->CopyToDevice(device->data(), host.data(), host.size()));
    const auto t2 = SteadyClock::now();
    pool_layer.keys = {pool.layout->keys[l]};
    pool_layer.values = {pool.layout->values[l]};
    KvBuffer dst = pool;
    dst.layout = &pool_layer;
    SPECTRUMKV_RETURN_IF_ERROR(codecs_.device->UnpackLayers(
        one_prelude, std::span<const uint8_t>(device->data(), host.size()), dst, 0, 1,
        VerifyMode::kAlreadyVerified));
    *unpack_seconds += Since(t0, t1) + Since(t2, SteadyClock::now());
    *copy_seconds += Since(t1, t2);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::span<const uint8_t>> TransferManager::StageToDevice(RecvTransfer& t,
                                                                        uint32_t first,
                                                                        uint32_t last,
                                                                        double* seconds) {
  const WireLayout& wl = t.prelude->layout;
  double copy_s = 0;  // copies only: allocating the buffer is not stage_copy time
  uint8_t* device = nullptr;
  {
    absl::MutexLock lock(&t.device_mu);
    if (t.device_payload == nullptr && t.device_status.ok()) {
      absl::StatusOr<std::unique_ptr<DeviceAllocation>> allocated =
          AllocateDevicePayload(wl.total_bytes);
      if (!allocated.ok()) {
        t.device_status = allocated.status();
      } else {
        // The prelude too, so that the device holds the whole payload as it was sent.
        const auto c0 = SteadyClock::now();
        t.device_status = codecs_.device_memory->CopyToDevice((*allocated)->data(), t.buffer.data(),
                                                              wl.prelude_bytes);
        copy_s += Since(c0, SteadyClock::now());
        t.device_payload = std::move(*allocated);
      }
    }
    SPECTRUMKV_RETURN_IF_ERROR(t.device_status);
    device = t.device_payload->data();
  }
  // Chunks carry disjoint layer ranges: the unpack tasks copy without holding a lock.
  const uint64_t begin = wl.layers[first].begin, end = wl.layers[last - 1].end;
  const auto c1 = SteadyClock::now();
  SPECTRUMKV_RETURN_IF_ERROR(
      codecs_.device_memory->CopyToDevice(device + begin, t.buffer.data() + begin, end - begin));
  *seconds = copy_s + Since(c1, SteadyClock::now());
  return std::span<const uint8_t>(device, wl.total_bytes);
}

uint32_t TransferManager::SlicesFor(const Codec& codec, uint32_t load) const {
  const uint32_t workers = std::max<uint32_t>(1, options_.pack_threads);
  const uint32_t sharing = std::max<uint32_t>(1, load);
  const uint32_t wanted =
      options_.pack_slices != 0 ? options_.pack_slices : (workers + sharing - 1) / sharing;
  return std::clamp<uint32_t>(wanted, 1, codec.max_slices());
}

// A chunk of a host payload verified and unpacked by several workers: its layers' CRC32Cs in
// `slices` parts per layer, then its slices, each taken by whichever task asks first.
struct TransferManager::UnpackSlices {
  UnpackSlices(Codec* c, uint32_t n, uint32_t layers)
      : codec(c), slices(n), parts(n * layers), part_crcs(parts), started(SteadyClock::now()) {}
  Codec* const codec;
  const uint32_t slices;
  const uint32_t parts;             // CRC parts: `slices` per layer, layer-major
  std::vector<uint32_t> part_crcs;  // written by the part's task, read under mu after all end
  const SteadyClock::time_point started;
  std::atomic<uint32_t> next_part{0}, next_slice{0};
  absl::Mutex mu;
  uint32_t parts_done ABSL_GUARDED_BY(mu) = 0;
  bool verdict ABSL_GUARDED_BY(mu) = false;  // every part ended and the trailers were checked
  absl::Status verify_status ABSL_GUARDED_BY(mu);
  SteadyClock::time_point verified_at ABSL_GUARDED_BY(mu);
  // Guarded by the manager's mu_.
  uint32_t slices_done = 0;
  absl::Status status;  // the first failure of a slice
  // For the debug line of the chunk's end: the latest start of a slice after the verdict, the
  // longest run of one.
  double last_start_s = 0, longest_s = 0;
};

void TransferManager::RunUnpack(std::shared_ptr<RecvTransfer> t, uint32_t first, uint32_t last) {
  const bool on_device = t->pool->memory_kind() == MemoryKind::kDevice;
  Codec* codec = on_device ? codecs_.device : codecs_.host;
  absl::Status s = absl::OkStatus();
  double seconds = 0, copy_seconds = 0;
  uint32_t transfers_in_flight = 1;
  {
    absl::MutexLock lock(&mu_);
    if (t->terminal()) s = absl::CancelledError("ended");
    transfers_in_flight = active_;
  }
  if (s.ok() && codec == nullptr) {
    s = absl::UnavailableError("no codec backend for this pool's memory on this daemon");
  }
  const uint32_t slices = s.ok() && !on_device ? SlicesFor(*codec, transfers_in_flight) : 1;
  if (s.ok() && slices > 1) {
    // The chunk keeps this task's count in unpack_tasks (its buffer stays) until it ends; the
    // helpers are not counted: one that starts after the last slice was taken touches only the
    // job.
    auto job = std::make_shared<UnpackSlices>(codec, slices, last - first);
    for (uint32_t i = 1; i < slices; ++i) {
      // During shutdown a helper may not be posted: the tasks that run take every part.
      executor_.Post([this, t, first, last, job] { UnpackSlicesTask(t, first, last, job); });
    }
    UnpackSlicesTask(t, first, last, job);
    return;
  } else if (s.ok() && on_device && t->prelude->layout.desc.progressive()) {
    s = UnpackProgressiveToDevice(*t, first, last, &seconds, &copy_seconds);
  } else if (s.ok()) {
    absl::StatusOr<std::span<const uint8_t>> payload = t->buffer.span();
    if (on_device) payload = StageToDevice(*t, first, last, &copy_seconds);
    s = payload.status();
    if (s.ok()) {
      const auto t0 = SteadyClock::now();
      s = codec->UnpackLayers(*t->prelude, *payload,
                              t->pool->View(t->args.blocks, t->args.num_tokens), first, last,
                              VerifyMode::kVerify);
      seconds = Since(t0, SteadyClock::now());
    }
  }
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    --t->unpack_tasks;
    t->unpack_s += seconds;
    t->stage_copy_s += copy_seconds;
    EndUnpackLocked(t, first, last, s, d);
  }
  d.Run();
}

void TransferManager::UnpackSlicesTask(std::shared_ptr<RecvTransfer> t, uint32_t first,
                                       uint32_t last, std::shared_ptr<UnpackSlices> job) {
  // The transfer's buffer and prelude are read only with a part or a slice taken: until the
  // chunk ends they stay (the chunk holds a count in unpack_tasks); a helper that starts later
  // takes nothing and touches only the job.
  double seconds = 0;
  // Verified once, before any slice writes a byte of these layers.
  for (uint32_t k = job->next_part.fetch_add(1); k < job->parts; k = job->next_part.fetch_add(1)) {
    const auto t0 = SteadyClock::now();
    const WireLayout& wl = t->prelude->layout;
    const std::span<const uint8_t> payload = t->buffer.span();
    job->part_crcs[k] =
        PartCrc(wl.layers[first + k / job->slices], k % job->slices, job->slices, payload.data());
    seconds += Since(t0, SteadyClock::now());
    absl::MutexLock lock(&job->mu);
    if (++job->parts_done < job->parts) continue;
    // The last part: every layer's CRC from its parts, against its trailer.
    absl::Status v = absl::OkStatus();
    for (uint32_t l = first; l < last && v.ok(); ++l) {
      v = CheckLayerTrailer(
          wl, l, payload,
          CombinedCrc(wl.layers[l], &job->part_crcs[(l - first) * job->slices], job->slices));
    }
    job->verify_status = v;
    job->verified_at = SteadyClock::now();
    job->verdict = true;
    if (v.ok()) {
      spdlog::debug("receive {}: layers {} to {} verified in {:.3f} ms", t->id_str, first, last - 1,
                    Since(job->started, job->verified_at) * 1e3);
    }
  }
  absl::Status verify_status;
  SteadyClock::time_point verified_at;
  {
    // Every part is taken: wait for those still being computed.
    absl::MutexLock lock(&job->mu);
    job->mu.Await(absl::Condition(&job->verdict));
    verify_status = job->verify_status;
    verified_at = job->verified_at;
  }
  Deferred d;
  if (!verify_status.ok()) {
    // One task (the first to get here) ends the chunk.
    absl::MutexLock lock(&mu_);
    t->unpack_s += seconds;
    if (job->slices_done == 0) {
      job->slices_done = job->slices;
      --t->unpack_tasks;
      EndUnpackLocked(t, first, last, verify_status, d);
    }
  } else {
    // No check for an ended transfer: a verified chunk is unpacked whole (as UnpackLayers
    // does), so that each layer of the decode pool is either written in full or untouched.
    for (uint32_t slice = job->next_slice.fetch_add(1); slice < job->slices;
         slice = job->next_slice.fetch_add(1)) {
      const auto t0 = SteadyClock::now();
      const absl::Status s = job->codec->UnpackLayerSlice(
          *t->prelude, t->buffer.span(), t->pool->View(t->args.blocks, t->args.num_tokens), first,
          last, slice, job->slices);
      const double dt = Since(t0, SteadyClock::now());
      absl::MutexLock lock(&mu_);
      t->unpack_s += seconds + dt;
      seconds = 0;
      if (!s.ok() && job->status.ok()) job->status = s;
      job->last_start_s = std::max(job->last_start_s, Since(verified_at, t0));
      job->longest_s = std::max(job->longest_s, dt);
      if (++job->slices_done < job->slices) continue;
      // The last slice ends the chunk.
      spdlog::debug(
          "receive {}: layers {} to {} in {} slices: the last began {:.3f} ms after "
          "the verification, the longest ran {:.3f} ms",
          t->id_str, first, last - 1, job->slices, job->last_start_s * 1e3, job->longest_s * 1e3);
      --t->unpack_tasks;
      EndUnpackLocked(t, first, last, job->status, d);
    }
    if (seconds > 0) {
      absl::MutexLock lock(&mu_);
      t->unpack_s += seconds;
    }
  }
  d.Run();
}

void TransferManager::EndUnpackLocked(const std::shared_ptr<RecvTransfer>& t, uint32_t first,
                                      uint32_t last, const absl::Status& s, Deferred& d) {
  if (t->terminal()) {
    ReleaseRecvIfIdle(t);
  } else if (!s.ok()) {
    if (s.code() == absl::StatusCode::kDataLoss) metrics_.ChecksumFailure();
    FinishRecvLocked(t, WithContext(s, "Receive " + Describe(t->key, t->peer)), true, d);
  } else {
    spdlog::debug("receive {}: layers {} to {} unpacked", t->id_str, first, last - 1);
    t->layers_unpacked += last - first;
    const uint32_t layers = static_cast<uint32_t>(t->prelude->layout.layers.size());
    if (t->layers_unpacked == layers && t->chunks_received == t->num_chunks &&
        t->unpack_tasks == 0) {
      FinishRecvLocked(t, absl::OkStatus(), true, d);
    }
  }
}

void TransferManager::FinishRecvLocked(const std::shared_ptr<RecvTransfer>& t, absl::Status status,
                                       bool tell_peer, Deferred& d) {
  if (t->terminal()) return;
  const auto now = SteadyClock::now();
  t->state = status.ok() ? RecvTransfer::State::kDone : RecvTransfer::State::kFailed;
  t->status = status;
  t->ended_at = now;
  timers_.Cancel(t->deadline_timer);
  timers_.Cancel(t->early_timer);
  --active_;
  const double network_s = t->any_byte ? Since(t->first_byte, t->last_byte) : 0.0;
  const double total_s = Since(t->claimed ? t->claimed_at : t->created, now);
  metrics_.TransferEnded(Role::kReceive, status.code(), total_s);
  if (status.ok()) {
    ReceiveResult& r = t->result;
    const WireLayout& wl = t->prelude->layout;
    r.transfer_id = t->id_str;
    r.num_tokens = wl.desc.num_tokens;
    r.per_layer = wl.desc.per_layer_tiers();
    r.peer = t->peer;
    r.dropped.resize(wl.desc.num_maps());
    r.tier_maps.resize(wl.desc.num_maps());
    for (uint32_t m = 0; m < wl.desc.num_maps(); ++m) {
      const uint8_t* map = t->prelude->tiers.data() + uint64_t{m} * wl.desc.num_tokens;
      std::string& packed = r.tier_maps[m];
      packed.assign((wl.desc.num_tokens + 3) / 4, '\0');
      for (uint32_t i = 0; i < wl.desc.num_tokens; ++i) {
        if (map[i] == static_cast<uint8_t>(Tier::kDrop)) r.dropped[m].push_back(i);
        packed[i / 4] = static_cast<char>(static_cast<uint8_t>(packed[i / 4]) |
                                          ((map[i] & 3u) << (2 * (i % 4))));
      }
    }
    TransferStatsData& st = r.stats;
    st.logical_bytes = uint64_t{wl.desc.num_tokens} * wl.desc.shape.Fp16BytesPerToken();
    st.wire_bytes = wl.total_bytes;
    st.element_budget = ElementBudgetOf(wl);
    st.wire_budget = WireBudgetOf(wl);
    st.tiers = wl.total_counts;
    st.times.network_s = network_s;
    st.times.stage_copy_s = t->stage_copy_s;
    st.times.unpack_s = t->unpack_s;
    st.times.total_s = total_s;
    st.policy = std::string(PolicyName(wl.desc.policy));
    Codec* codec = t->pool->memory_kind() == MemoryKind::kHost ? codecs_.host : codecs_.device;
    if (codec != nullptr) st.backend = std::string(codec->name());
    metrics_.AddTransferBytes(Direction::kRx, st.logical_bytes, st.wire_bytes, st.tiers);
    if (t->pool->memory_kind() == MemoryKind::kDevice) {
      metrics_.ObserveStage(Stage::kStageCopy, t->stage_copy_s);
    }
    metrics_.ObserveStage(Stage::kUnpack, t->unpack_s);
    spdlog::debug("receive {}: done", t->id_str);
  } else {
    spdlog::info("receive of request {} shard {} failed: {}", t->key.request_id, t->key.shard,
                 status.ToString());
  }
  if (t->bound && tell_peer) {
    const double unpack_s = t->unpack_s;
    d.Add([this, peer = t->peer, id = t->wire_id, status, network_s, unpack_s] {
      SendAck(peer, id, status, network_s, unpack_s);
    });
  }
  d.AddReplies(&t->waiters, status, t->result);
  ReleaseRecvIfIdle(t);
  PublishGauges();
}

void TransferManager::ReleaseRecvIfIdle(const std::shared_ptr<RecvTransfer>& t) {
  if (!t->terminal() || t->data_outstanding > 0 || t->unpack_tasks > 0) return;
  t->buffer = StagingBuffer();
  {
    absl::MutexLock device_lock(&t->device_mu);
    t->device_payload.reset();
  }
  inflight_bytes_ -= t->reserved_bytes;
  t->reserved_bytes = 0;
  early_bytes_ -= t->early_reserved;
  t->early_reserved = 0;
  if (t->pool_counted) {
    t->pool->active_transfers.fetch_sub(1);
    t->pool_counted = false;
  }
  PublishGauges();
}

// ---------------------------------------------------------------------------------------------
// Peer messages

void TransferManager::SendAck(const std::string& peer, uint64_t transfer_id,
                              const absl::Status& status, double network_s, double unpack_s) {
  v1::PeerMessage m;
  v1::PeerAck* ack = m.mutable_ack();
  ack->set_transfer_id(transfer_id);
  ack->set_code(static_cast<int32_t>(status.code()));
  ack->set_message(std::string(status.message()));
  ack->set_receiver_network_s(network_s);
  ack->set_receiver_unpack_s(unpack_s);
  ack->set_receiver_incarnation(options_.incarnation);
  transport_.SendControl(peer, m, [](absl::Status) {});
}

void TransferManager::SendCancel(const std::string& peer, uint64_t transfer_id,
                                 const TransferKey& key, const absl::Status& status,
                                 bool to_sender) {
  v1::PeerMessage m;
  v1::PeerCancel* c = m.mutable_cancel();
  c->set_transfer_id(transfer_id);
  c->set_request_id(key.request_id);
  c->set_shard(key.shard);
  c->set_code(static_cast<int32_t>(status.code()));
  c->set_reason(std::string(status.message()));
  c->set_to_sender(to_sender);
  transport_.SendControl(peer, m, [](absl::Status) {});
}

void TransferManager::OnControl(const std::string& peer, const v1::PeerMessage& message) {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    switch (message.body_case()) {
      case v1::PeerMessage::kOffer:
        HandleOffer(peer, message.offer(), d);
        break;
      case v1::PeerMessage::kAck: {
        const v1::PeerAck& ack = message.ack();
        auto it = sends_by_id_.find(ack.transfer_id());
        if (it == sends_by_id_.end()) break;
        std::shared_ptr<SendTransfer> t = it->second;
        if (t->terminal()) break;
        t->stats.times.network_s = Since(t->first_send, SteadyClock::now());
        t->stats.times.unpack_s = ack.receiver_unpack_s();
        const int code = ack.code();
        absl::Status s = absl::OkStatus();
        if (code != 0) {
          const auto c = code > 0 && code <= 16 ? static_cast<absl::StatusCode>(code)
                                                : absl::StatusCode::kUnknown;
          s = absl::Status(c, absl::StrFormat("Send %s: the receiver reports: %s",
                                              Describe(t->args.key, t->args.peer), ack.message()));
        }
        FinishSendLocked(t, s, false, d);
        break;
      }
      case v1::PeerMessage::kCancel: {
        const v1::PeerCancel& c = message.cancel();
        const int code = c.code();
        const auto sc = code > 0 && code <= 16 ? static_cast<absl::StatusCode>(code)
                                               : absl::StatusCode::kCancelled;
        if (c.to_sender()) {
          auto it = sends_by_id_.find(c.transfer_id());
          if (it == sends_by_id_.end()) break;
          FinishSendLocked(
              it->second,
              absl::Status(sc, absl::StrFormat("Send %s: cancelled by the receiver: %s",
                                               Describe(it->second->args.key, peer), c.reason())),
              false, d);
        } else {
          auto it = recvs_by_wire_.find({peer, c.transfer_id()});
          if (it == recvs_by_wire_.end()) break;
          FinishRecvLocked(
              it->second,
              absl::Status(sc, absl::StrFormat("Receive %s: cancelled by the "
                                               "sender: %s",
                                               Describe(it->second->key, peer), c.reason())),
              false, d);
        }
        break;
      }
      case v1::PeerMessage::BODY_NOT_SET:
        break;
    }
  }
  d.Run();
}

void TransferManager::OnPeerDown(const std::string& peer, const absl::Status& reason) {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [key, t] : sends_) {
      if (t->terminal() || t->args.peer != peer) continue;
      FinishSendLocked(
          t,
          absl::UnavailableError(absl::StrFormat("Send %s: the peer went down: %s",
                                                 Describe(key, peer), reason.message())),
          false, d);
    }
    for (auto& [key, t] : recvs_) {
      if (t->terminal() || !t->bound || t->peer != peer) continue;
      FinishRecvLocked(
          t,
          absl::UnavailableError(absl::StrFormat("Receive %s: the peer went down: %s",
                                                 Describe(key, peer), reason.message())),
          false, d);
    }
  }
  d.Run();
}

// ---------------------------------------------------------------------------------------------
// Control from the frontend

void TransferManager::Detach(const TransferKey& key, TransferRole role, uint64_t waiter) {
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    const absl::Status cancelled = absl::CancelledError(absl::StrFormat(
        "request %s shard %u: the client cancelled the call", key.request_id, key.shard));
    if (role == TransferRole::kSend) {
      auto it = sends_.find(key);
      if (it == sends_.end()) return;
      std::shared_ptr<SendTransfer> t = it->second;
      auto w = t->waiters.find(waiter);
      if (w == t->waiters.end()) return;
      SendDone cb = std::move(w->second);
      t->waiters.erase(w);
      d.Add([cb, cancelled] { cb(cancelled); });
      if (t->waiters.empty()) FinishSendLocked(t, cancelled, true, d);
    } else {
      auto it = recvs_.find(key);
      if (it == recvs_.end()) return;
      std::shared_ptr<RecvTransfer> t = it->second;
      auto w = t->waiters.find(waiter);
      if (w == t->waiters.end()) return;
      ReceiveDone cb = std::move(w->second);
      t->waiters.erase(w);
      d.Add([cb, cancelled] { cb(cancelled); });
      if (t->waiters.empty()) FinishRecvLocked(t, cancelled, true, d);
    }
  }
  d.Run();
}

absl::StatusOr<bool> TransferManager::Cancel(const TransferKey& key, const std::string& reason) {
  Deferred d;
  bool found = false, cancelled = false;
  {
    absl::MutexLock lock(&mu_);
    const std::string why = reason.empty() ? "cancelled by the frontend" : reason;
    if (auto it = sends_.find(key); it != sends_.end()) {
      found = true;
      if (!it->second->terminal()) {
        cancelled = true;
        FinishSendLocked(it->second,
                         absl::CancelledError(absl::StrFormat(
                             "Send %s: %s", Describe(key, it->second->args.peer), why)),
                         true, d);
      }
    }
    if (auto it = recvs_.find(key); it != recvs_.end()) {
      found = true;
      if (!it->second->terminal()) {
        cancelled = true;
        std::shared_ptr<RecvTransfer> t = it->second;
        const absl::Status s =
            absl::CancelledError(absl::StrFormat("Receive %s: %s", Describe(key, t->peer), why));
        FinishRecvLocked(t, s, false, d);
        if (t->bound) {
          d.Add([this, t, s] { SendCancel(t->peer, t->wire_id, t->key, s, true); });
        }
      }
    }
  }
  d.Run();
  if (!found) {
    return absl::NotFoundError(
        absl::StrFormat("no transfer for request %s shard %u", key.request_id, key.shard));
  }
  return cancelled;
}

absl::StatusOr<TransferInfoData> TransferManager::Get(const TransferKey& key,
                                                      std::optional<TransferRole> role) const {
  for (const TransferInfoData& info : List(true)) {
    if (info.key == key && (!role || *role == info.role)) return info;
  }
  return absl::NotFoundError(
      absl::StrFormat("no transfer for request %s shard %u", key.request_id, key.shard));
}

std::vector<TransferInfoData> TransferManager::List(bool include_ended) const {
  absl::MutexLock lock(&mu_);
  const auto now = SteadyClock::now();
  std::vector<TransferInfoData> out;
  for (const auto& [key, t] : sends_) {
    if (t->terminal() && !include_ended) continue;
    TransferInfoData i;
    i.key = key;
    i.role = TransferRole::kSend;
    i.transfer_id = t->id_str;
    i.state = t->StateName();
    i.peer = t->args.peer;
    i.pool_id = t->args.pool_id;
    i.status = t->status;
    i.ended = t->terminal();
    i.age_s = Since(t->created, now);
    i.stats = t->stats;
    out.push_back(std::move(i));
  }
  for (const auto& [key, t] : recvs_) {
    if (t->terminal() && !include_ended) continue;
    TransferInfoData i;
    i.key = key;
    i.role = TransferRole::kReceive;
    i.transfer_id = t->id_str;
    i.state = t->StateName();
    i.peer = t->peer;
    i.pool_id = t->args.pool_id;
    i.status = t->status;
    i.ended = t->terminal();
    i.age_s = Since(t->created, now);
    i.stats = t->result.stats;
    out.push_back(std::move(i));
  }
  return out;
}

void TransferManager::Drain(std::chrono::milliseconds timeout) {
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    mu_.AwaitWithTimeout(absl::Condition(
                             +[](TransferManager* m)
                                  ABSL_EXCLUSIVE_LOCKS_REQUIRED(m->mu_) { return m->active_ == 0; },
                             this),
                         absl::FromChrono(timeout));
  }
  Deferred d;
  {
    absl::MutexLock lock(&mu_);
    const absl::Status s = absl::UnavailableError("the daemon is shutting down");
    for (auto& [key, t] : sends_) FinishSendLocked(t, s, true, d);
    for (auto& [key, t] : recvs_) FinishRecvLocked(t, s, true, d);
  }
  d.Run();
}

bool TransferManager::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

size_t TransferManager::active() const {
  absl::MutexLock lock(&mu_);
  return active_;
}

void TransferManager::Sweep() {
  absl::MutexLock lock(&mu_);
  if (stopping_) return;
  const auto now = SteadyClock::now();
  const auto ttl = std::chrono::duration_cast<SteadyClock::duration>(
      std::chrono::duration<double>(options_.result_ttl_s));
  for (auto it = sends_.begin(); it != sends_.end();) {
    const auto& t = it->second;
    if (t->terminal() && t->reserved_bytes == 0 && t->runners == 0 && t->sends_outstanding == 0 &&
        now - t->ended_at > ttl) {
      sends_by_id_.erase(t->id);
      it = sends_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = recvs_.begin(); it != recvs_.end();) {
    const auto& t = it->second;
    if (t->terminal() && t->reserved_bytes == 0 && t->data_outstanding == 0 &&
        t->unpack_tasks == 0 && now - t->ended_at > ttl) {
      if (t->bound) recvs_by_wire_.erase({t->peer, t->wire_id});
      it = recvs_.erase(it);
    } else {
      ++it;
    }
  }
  sweep_timer_ = timers_.Schedule(now + std::chrono::seconds(1), [this] { Sweep(); });
}

}  // namespace spectrumkv
