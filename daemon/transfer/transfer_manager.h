// The transfer manager: every Send and Receive of this daemon, as explicit state machines.
//
// Sender:   queued -> scoring -> packing/sending -> awaiting_ack -> done | failed
// Receiver: waiting (Receive, no payload yet) or early (payload, no Receive yet)
//           -> receiving -> done | failed
//
// Every transfer has a deadline and ends in exactly one terminal state whose status reaches every
// caller attached to it (duplicates attach), and the peer (PeerAck / PeerCancel). Admission
// control bounds transfers and payload bytes in flight (RESOURCE_EXHAUSTED, never unbounded
// memory); payloads that arrive before their Receive are buffered within their own byte budget
// and expire. Staging memory is released only when no codec task and no transport operation uses
// it any more. Nothing unverified is written into a decode pool: each layer's checksum is checked
// before the layer is unpacked.
//
// Data path. A host pool's KV is packed by the host codec straight into a host staging buffer
// that the transport sends from, and unpacked from the receiver's staging buffer. A GPU pool
// (memory_kind kDevice, CUDA IPC) uses the device codec: the sender packs into a device payload
// buffer allocated per transfer, writes the prelude on the host and copies it up, then copies each
// packed chunk device->host into its host staging buffer and sends it from there; the receiver
// copies the prelude and each arrived chunk host->device into a device payload buffer and unpacks
// there (kVerify: each layer's checksum is checked on the device before the layer is written).
// The copies are the stage_copy stage. Payloads always travel from host memory: UCX 1.13 has no
// CUDA transport. Chunks are packed, copied and sent by up to pack_threads workers, so one
// chunk's copy and send overlap the next chunk's packing in another worker (the codec's calls
// are synchronous, so within one worker pack and copy run one after the other). A host payload's
// chunk may be packed, and on the receiver unpacked, in slices by several workers at once
// (pack_slices). A device payload buffer is as large as the payload, whose bytes are admitted
// under max_inflight_bytes, so device payload memory is bounded by that limit too.
//
// Thread-safety: all public methods may be called from any thread; callbacks run on executor,
// timer or transport threads, never while the manager's lock is held.
#ifndef SPECTRUMKV_DAEMON_TRANSFER_TRANSFER_MANAGER_H_
#define SPECTRUMKV_DAEMON_TRANSFER_TRANSFER_MANAGER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "daemon/common/executor.h"
#include "daemon/common/timer_queue.h"
#include "daemon/metrics/metrics.h"
#include "daemon/pools/pool_registry.h"
#include "daemon/pools/staging_arena.h"
#include "daemon/transfer/model_policies.h"
#include "daemon/transport/transport.h"
#include "kernels/api/codec.h"
#include "kernels/api/device_memory.h"

namespace spectrumkv {

using SteadyClock = std::chrono::steady_clock;

struct TransferKey {
  std::string request_id;
  uint32_t shard = 0;
  bool operator<(const TransferKey& o) const {
    return request_id != o.request_id ? request_id < o.request_id : shard < o.shard;
  }
  bool operator==(const TransferKey&) const = default;
};

struct StageTimes {
  double score_s = 0, plan_s = 0, pack_s = 0, stage_copy_s = 0, network_s = 0, unpack_s = 0,
         total_s = 0;
};

struct TransferStatsData {
  uint64_t logical_bytes = 0;
  uint64_t wire_bytes = 0;
  double element_budget = 0;
  double wire_budget = 0;
  TierCounts tiers;
  StageTimes times;
  std::string backend;
  std::string policy;
};

struct SendArgs {
  TransferKey key;
  std::string pool_id;
  std::vector<uint32_t> blocks;
  uint32_t num_tokens = 0;
  std::string peer;
  std::string model;  // empty: the pool's model
  PlanOptions plan;   // resolved against the daemon defaults by the caller
  ScoringMode scoring = ScoringMode::kKeyNorm;
  std::vector<float> window_queries;  // attention
  uint32_t window = 0, num_q_heads = 0, pool_kernel = 5;
  double recency_decay = 0;
  std::vector<float> external_scores;  // external
  std::string fingerprint;             // identity of the request content (duplicate detection)
};

struct SendResult {
  std::string transfer_id;
  TransferStatsData stats;
};

struct ReceiveArgs {
  TransferKey key;
  std::string pool_id;
  std::vector<uint32_t> blocks;
  uint32_t num_tokens = 0;
  std::string fingerprint;
};

struct ReceiveResult {
  std::string transfer_id;
  uint32_t num_tokens = 0;
  bool per_layer = false;
  std::vector<std::vector<uint32_t>> dropped;  // one list per tier map
  std::vector<std::string> tier_maps;          // packed 2-bit codes, one per tier map
  TransferStatsData stats;
  std::string peer;
};

enum class TransferRole { kSend, kReceive };

struct TransferInfoData {
  TransferKey key;
  TransferRole role = TransferRole::kSend;
  std::string transfer_id;
  std::string state;
  std::string peer;
  std::string pool_id;
  absl::Status status;  // OK while running or when done
  bool ended = false;
  double age_s = 0;
  TransferStatsData stats;
};

using SendDone = std::function<void(absl::StatusOr<SendResult>)>;
using ReceiveDone = std::function<void(absl::StatusOr<ReceiveResult>)>;

// Codec backends by the memory they work on; a backend may be absent (no GPU). Not owned; they
// must outlive the manager.
struct CodecSet {
  Codec* host = nullptr;
  Codec* device = nullptr;
  // Device payload buffers and host<->device copies for `device`'s transfers; required with it.
  DeviceMemory* device_memory = nullptr;
};

struct TransferManagerOptions {
  uint32_t max_inflight_transfers = 64;
  uint64_t max_inflight_bytes = 4ull << 30;
  uint64_t early_buffer_bytes = 1ull << 30;
  double early_ttl_s = 30;
  double default_deadline_s = 30;
  double max_deadline_s = 600;
  double result_ttl_s = 300;
  // Payload chunks are runs of whole layers, each as near chunk_bytes as whole layers allow. A
  // payload is cut finer, into target_chunks / (sends in flight) chunks, where that keeps them
  // at least min_chunk_bytes (or chunk_bytes, if smaller): a lone transfer puts several chunks
  // on every lane, so that its first bytes leave after a short pack and its last chunk's unpack
  // is short, while many transfers in flight keep the lanes busy with large chunks. The daemon
  // sets target_chunks to kChunksPerLane per transport lane.
  uint64_t chunk_bytes = 4ull << 20;
  uint64_t min_chunk_bytes = 1ull << 20;
  uint32_t target_chunks = 1;
  uint32_t pack_threads = 1;  // executor workers that pack one payload's chunks in parallel
  // Parts each chunk of a host-memory payload is packed and unpacked in, by as many workers at
  // once (Codec::PackLayerSlice, UnpackLayerSlice; capped by the codec's max_slices). 0: sized
  // to the load, pack_threads shared among the transfers in flight (Sends and Receives): a lone
  // transfer's chunks are cut pack_threads ways, and as many transfers as workers keep whole
  // chunks. 1: always whole chunks, several at once.
  uint32_t pack_slices = 0;
  // A sliced payload's first two chunks, when at least this large, have their checksums computed
  // in as many parts as slices (their first byte leaves sooner); smaller ones, and every later
  // chunk, are checksummed whole by the worker that ends their last slice.
  uint64_t checksum_parts_bytes = 4ull << 20;
  // A progressive payload (quantizer progressive: every layer's base packed and sent while the
  // tokens are scored, the refinements after) is handed to the transport at most this many
  // chunks at a time, by priority (the prelude, then refinements, then bases, each in layer
  // order), so that the refinements of layers already sent do not queue behind every base.
  uint32_t progressive_chunks_in_flight = 8;
  // Threads of a progressive Send's scoring pass (ScoreOptions::max_threads; 0: the codec's own
  // count). The pass is hidden behind the bases on the link and needs only to end before them;
  // given every core it starves the threads that drive the link (docs/BENCHMARKS.md).
  uint32_t progressive_score_threads = 4;
  uint64_t incarnation = 0;
};

// TransferManagerOptions::target_chunks per transport lane (docs/BENCHMARKS.md, "chunks sized to
// the load").
inline constexpr uint32_t kChunksPerLane = 8;

// How a payload is cut (exposed for tests). The chunk size for a payload whose layers take
// `layer_bytes` while `sends_in_flight` sends run (this one included): see
// TransferManagerOptions.
uint64_t ChunkBytesFor(uint64_t layer_bytes, uint32_t sends_in_flight,
                       const TransferManagerOptions& o);
// The prelude as chunk 0, then runs of whole layers, each as near `chunk_bytes` as whole layers
// allow (a layer is added while that brings the run nearer; a layer larger than `chunk_bytes`
// travels alone).
std::vector<DataChunkHeader> PlanChunks(const WireLayout& wl, uint64_t transfer_id,
                                        uint64_t chunk_bytes);

class TransferManager final : public TransportHandler {
 public:
  TransferManager(TransferManagerOptions options, PoolRegistry& pools, CodecSet codecs,
                  Transport& transport, StagingArena& staging, Metrics& metrics, Executor& executor,
                  TimerQueue& timers, ModelPolicies& models);
  ~TransferManager() override;

  // Deadlines are clamped to max_deadline_s; nullopt means default_deadline_s.
  SteadyClock::time_point DeadlineFrom(std::optional<SteadyClock::time_point> requested) const;

  // Starts (or attaches to) a send. `done` runs exactly once. Returns a waiter id for Detach.
  uint64_t Send(SendArgs args, SteadyClock::time_point deadline, SendDone done);
  uint64_t Receive(ReceiveArgs args, SteadyClock::time_point deadline, ReceiveDone done);

  // A caller gave up (its RPC was cancelled): its callback runs now with CANCELLED; the transfer
  // itself is cancelled if nobody else waits for it.
  void Detach(const TransferKey& key, TransferRole role, uint64_t waiter);

  // Cancels the send and/or receive of `key`. NOT_FOUND if neither exists; returns whether a
  // running transfer was cancelled.
  absl::StatusOr<bool> Cancel(const TransferKey& key, const std::string& reason);

  absl::StatusOr<TransferInfoData> Get(const TransferKey& key,
                                       std::optional<TransferRole> role) const;
  std::vector<TransferInfoData> List(bool include_ended) const;

  // Drain: new transfers get UNAVAILABLE; returns once nothing runs or `timeout` passes, then
  // fails what is left with UNAVAILABLE.
  void Drain(std::chrono::milliseconds timeout);
  bool draining() const;
  size_t active() const;

  // TransportHandler
  void OnControl(const std::string& peer, const v1::PeerMessage& message) override;
  absl::StatusOr<std::span<uint8_t>> OnDataBegin(const std::string& peer,
                                                 const DataChunkHeader& header) override;
  void OnDataEnd(const std::string& peer, const DataChunkHeader& header,
                 absl::Status status) override;
  void OnPeerDown(const std::string& peer, const absl::Status& reason) override;

 private:
  struct SendTransfer;
  struct RecvTransfer;
  class Deferred;

  // Sender steps (executor).
  void RunSend(std::shared_ptr<SendTransfer> t);
  absl::Status PrepareSend(const std::shared_ptr<SendTransfer>& self);
  // PrepareSend for a progressive plan (host pools): offers, packs and sends the bases while it
  // scores, then the prelude and the refinements.
  struct ProgressiveJob;
  absl::Status SendProgressive(const std::shared_ptr<SendTransfer>& self, Codec* codec,
                               const KvBuffer& src, PlanSkeleton skeleton, const PlanOptions& po,
                               bool need_scores);
  // A Send's plan is known: the stats it reports (with its scoring pass's seconds), and the
  // state kSending. False if the Send has ended meanwhile.
  bool StartSending(SendTransfer& t, const TierPlan& plan, const Codec& codec, double score_s);
  // The Send's host staging buffer (RESOURCE_EXHAUSTED, counted, if the arena is full).
  absl::StatusOr<std::span<uint8_t>> AllocateSendBuffer(SendTransfer& t, uint64_t bytes);
  absl::Status ProgressiveLoop(const std::shared_ptr<ProgressiveJob>& job);
  // Hands the job's ready chunks to the transport, by priority, up to
  // progressive_chunks_in_flight in flight.
  void PumpProgressive(const std::shared_ptr<ProgressiveJob>& job);
  // Admits a payload of `layout` on bytes, cuts it into chunks and offers it to the peer; from
  // here on a failure reaches the peer as a PeerCancel. `transfers_in_flight`: the daemon's load
  // when admitted. OK without an offer if the transfer already ended.
  absl::Status Offer(const std::shared_ptr<SendTransfer>& self, const WireLayout& layout,
                     std::vector<DataChunkHeader>* chunks, uint32_t* transfers_in_flight);
  struct PackJob;
  // Packs and sends chunks of `job` until none is left; run by up to pack_threads workers.
  absl::Status PackLoop(PackJob& job);
  // Hands a packed chunk (counted in sends_outstanding by the caller) to the transport; its
  // completion gives the count back and fails the transfer if the send failed.
  void SendChunk(const std::shared_ptr<SendTransfer>& self, const DataChunkHeader& chunk,
                 std::span<const uint8_t> bytes);
  // A pack worker is done (status of its chunks).
  void FinishRunner(const std::shared_ptr<SendTransfer>& t, const absl::Status& status);
  // Ends a send (no-op if it already ended). `tell_peer`: send a PeerCancel if it failed after
  // the offer (false when the failure came from the peer).
  void FinishSend(const std::shared_ptr<SendTransfer>& t, absl::Status status,
                  bool tell_peer = true);
  void FinishSendLocked(const std::shared_ptr<SendTransfer>& t, absl::Status status, bool tell_peer,
                        Deferred& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseSendIfIdle(const std::shared_ptr<SendTransfer>& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Receiver steps.
  void HandleOffer(const std::string& peer, const v1::PeerOffer& offer, Deferred& d)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status BindOffer(const std::shared_ptr<RecvTransfer>& t, const std::string& peer,
                         const v1::PeerOffer& offer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Checks received chunks against the prelude and queues their unpacking when possible.
  void Advance(const std::shared_ptr<RecvTransfer>& t, Deferred& d)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Unpacks a received chunk (layers [first, last)). A host pool's chunk cut in slices is
  // shared by several workers: this task hands helpers to the others (they wake while it works)
  // and joins them in UnpackSlicesTask.
  void RunUnpack(std::shared_ptr<RecvTransfer> t, uint32_t first, uint32_t last);
  struct UnpackSlices;
  // One worker's share of a chunk cut in slices: it takes parts of the chunk's CRC32Cs until none
  // is left (whoever ends the last part checks the trailers), waits for that verdict (only parts
  // already being computed), then takes slices to unpack until none is left; whoever ends the
  // last slice, or finds a checksum wrong, ends the chunk (EndUnpackLocked).
  void UnpackSlicesTask(std::shared_ptr<RecvTransfer> t, uint32_t first, uint32_t last,
                        std::shared_ptr<UnpackSlices> job);
  // A chunk's unpacking ended with `s` (its tasks already given back).
  void EndUnpackLocked(const std::shared_ptr<RecvTransfer>& t, uint32_t first, uint32_t last,
                       const absl::Status& s, Deferred& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Parts a chunk of a host payload is packed or unpacked in: options.pack_slices, or (0) the
  // workers shared among `load`, the transfers in flight on this daemon.
  uint32_t SlicesFor(const Codec& codec, uint32_t load) const;
  // A device buffer for a payload of `bytes` on a GPU pool; a RESOURCE_EXHAUSTED from the device
  // also counts as an admission rejection for bytes.
  absl::StatusOr<std::unique_ptr<DeviceAllocation>> AllocateDevicePayload(uint64_t bytes);
  // A GPU destination: copies layers [first, last) (and, the first time, allocates the device
  // payload buffer and copies the prelude) host->device; returns the device payload.
  // A progressive payload into a GPU pool (the device codec has no progressive kernels): each
  // layer verified and decoded on the host into the FP16 rows of a one-layer payload, which goes
  // up and is unpacked by the device codec (bit for bit the host codec's reconstruction).
  absl::Status UnpackProgressiveToDevice(RecvTransfer& t, uint32_t first, uint32_t last,
                                         double* unpack_seconds, double* copy_seconds);
  absl::StatusOr<std::span<const uint8_t>> StageToDevice(RecvTransfer& t, uint32_t first,
                                                         uint32_t last, double* seconds);
  void FinishRecvLocked(const std::shared_ptr<RecvTransfer>& t, absl::Status status, bool tell_peer,
                        Deferred& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseRecvIfIdle(const std::shared_ptr<RecvTransfer>& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void SendAck(const std::string& peer, uint64_t transfer_id, const absl::Status& status,
               double network_s, double unpack_s);
  void SendCancel(const std::string& peer, uint64_t transfer_id, const TransferKey& key,
                  const absl::Status& status, bool to_sender);

  // Admission and bookkeeping.
  absl::Status AdmitTransfer(const TransferKey& key, const char* role)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishGauges() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Sweep();
  std::string Describe(const TransferKey& key, const std::string& peer) const;

  const TransferManagerOptions options_;
  PoolRegistry& pools_;
  const CodecSet codecs_;
  Transport& transport_;
  StagingArena& staging_;
  Metrics& metrics_;
  Executor& executor_;
  TimerQueue& timers_;
  ModelPolicies& models_;

  mutable absl::Mutex mu_;
  std::map<TransferKey, std::shared_ptr<SendTransfer>> sends_ ABSL_GUARDED_BY(mu_);
  std::map<TransferKey, std::shared_ptr<RecvTransfer>> recvs_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<SendTransfer>> sends_by_id_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, uint64_t>, std::shared_ptr<RecvTransfer>> recvs_by_wire_
      ABSL_GUARDED_BY(mu_);
  uint64_t next_transfer_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t next_waiter_ ABSL_GUARDED_BY(mu_) = 1;
  uint32_t active_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t active_sends_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t inflight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t early_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  TimerQueue::Id sweep_timer_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_TRANSFER_TRANSFER_MANAGER_H_
