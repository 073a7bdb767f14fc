// The daemon's Prometheus metrics (prefix spectrumkv_, base units, counters end in _total, no
// per-request labels). Every label set exists from start-up, so series are present before the
// first event. prometheus-cpp stays behind this interface (its headers are private to this
// target). Thread-safe: every method may be called from any thread.
#ifndef SPECTRUMKV_DAEMON_METRICS_METRICS_H_
#define SPECTRUMKV_DAEMON_METRICS_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/api/wire_format.h"

namespace spectrumkv {

enum class Direction { kTx = 0, kRx = 1 };  // bytes sent / received
enum class Role { kSend = 0, kReceive = 1 };
enum class Stage { kScore = 0, kPlan, kPack, kStageCopy, kNetwork, kUnpack };
enum class RejectReason { kTransfers = 0, kBytes, kEarlyBuffer, kDraining };

struct BuildInfo {
  std::string version;
  std::string revision;
  std::string cuda;  // "yes"/"no": CUDA backend built
  std::string ucx;   // "yes"/"no": UCX transport built
  std::string backend;
};

class Metrics {
 public:
  explicit Metrics(const BuildInfo& build);
  ~Metrics();
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // One transfer's bytes and tiers, counted once per side when it completes successfully.
  void AddTransferBytes(Direction direction, uint64_t logical_bytes, uint64_t wire_bytes,
                        const TierCounts& tiers);
  void TransferEnded(Role role, absl::StatusCode code, double seconds);
  void ObserveStage(Stage stage, double seconds);
  void SetInflight(uint64_t transfers, uint64_t bytes);
  void SetLimits(uint64_t max_transfers, uint64_t max_bytes);
  void SetEarlyBytes(uint64_t bytes);
  void EarlyPayloadExpired();
  void ChecksumFailure();
  void AdmissionRejected(RejectReason reason);
  void SetPeers(uint64_t up, uint64_t down);
  void SetPools(uint64_t pools);
  void SetReady(bool ready);
  void SetDraining(bool draining);

  // The text exposition of every metric (what a scrape returns).
  std::string Serialize() const;

  // Serves /metrics on `address` ("host:port"; port 0 picks one). UNAVAILABLE if it cannot bind.
  absl::Status StartExposer(const std::string& address);
  // The port the exposer bound (0 if not started).
  int exposer_port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_METRICS_METRICS_H_
