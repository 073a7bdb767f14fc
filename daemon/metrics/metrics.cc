#include "daemon/metrics/metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>
#include <unistd.h>

#include <dirent.h>
#include <array>
#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"

namespace spectrumkv {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

constexpr const char* kDirections[] = {"tx", "rx"};
constexpr const char* kRoles[] = {"send", "receive"};
constexpr const char* kStages[] = {"score", "plan", "pack", "stage_copy", "network", "unpack"};
constexpr const char* kReasons[] = {"transfers", "bytes", "early_buffer", "draining"};
constexpr const char* kTiers[] = {"fp16", "int8", "int4", "drop"};
constexpr int kNumCodes = 17;  // absl::StatusCode 0..16

// Latency buckets from 100 µs to ~40 s, x2.5 per step.
prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (double v = 1e-4; v < 50; v *= 2.5) b.push_back(v);
  return b;
}

// process_* metrics from /proc/self (prometheus-cpp has no process collector).
class ProcessCollector final : public prometheus::Collectable {
 public:
  ProcessCollector()
      : start_time_s_(
            std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
                .count()) {}

  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    auto gauge = [&](const char* name, const char* help, double v,
                     prometheus::MetricType type = prometheus::MetricType::Gauge) {
      prometheus::MetricFamily f;
      f.name = name;
      f.help = help;
      f.type = type;
      prometheus::ClientMetric m;
      if (type == prometheus::MetricType::Counter) {
        m.counter.value = v;
      } else {
        m.gauge.value = v;
      }
      f.metric.push_back(m);
      out.push_back(std::move(f));
    };
    const long page = sysconf(_SC_PAGESIZE), ticks = sysconf(_SC_CLK_TCK);
    std::ifstream stat("/proc/self/stat");
    std::string content((std::istreambuf_iterator<char>(stat)), {});
    const size_t paren = content.rfind(')');
    if (paren != std::string::npos) {
      std::istringstream rest(content.substr(paren + 2));
      std::vector<std::string> f;
      std::string tok;
      while (rest >> tok) f.push_back(tok);
      // Fields after ")" start at field 3 (state): utime 14, stime 15, rss 24.
      if (f.size() > 21) {
        const double cpu = (std::stod(f[11]) + std::stod(f[12])) / double(ticks);
        gauge("process_cpu_seconds_total", "User and system CPU time spent in seconds.", cpu,
              prometheus::MetricType::Counter);
        gauge("process_resident_memory_bytes", "Resident memory size in bytes.",
              std::stod(f[21]) * double(page));
        gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", std::stod(f[20]));
      }
    }
    double fds = 0;
    if (DIR* d = opendir("/proc/self/fd")) {
      while (readdir(d) != nullptr) ++fds;
      closedir(d);
      fds -= 2;  // . and ..
    }
    gauge("process_open_fds", "Number of open file descriptors.", fds);
    gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
          start_time_s_);
    return out;
  }

 private:
  double start_time_s_;
};

}  // namespace

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::shared_ptr<ProcessCollector> process = std::make_shared<ProcessCollector>();
  std::unique_ptr<prometheus::Exposer> exposer;

  std::array<prometheus::Counter*, 2> logical{}, wire{}, saved{};
  std::array<std::array<prometheus::Counter*, 4>, 2> tokens{};
  std::array<std::array<prometheus::Counter*, kNumCodes>, 2> transfers{};
  std::array<prometheus::Histogram*, 2> duration{};
  std::array<prometheus::Histogram*, 6> stage{};
  std::array<prometheus::Counter*, 4> rejected{};
  prometheus::Gauge *inflight_transfers = nullptr, *inflight_bytes = nullptr,
                    *inflight_transfers_limit = nullptr, *inflight_bytes_limit = nullptr,
                    *early_bytes = nullptr, *peers_up = nullptr, *peers_down = nullptr,
                    *pools = nullptr, *ready = nullptr, *draining = nullptr;
  prometheus::Counter *checksum_failures = nullptr, *early_expired = nullptr;
};

Metrics::Metrics(const BuildInfo& build) : impl_(std::make_unique<Impl>()) {
  prometheus::Registry& r = *impl_->registry;
  Impl& m = *impl_;
  auto& logical = BuildCounter()
                      .Name("spectrumkv_logical_bytes_total")
                      .Help("FP16/BF16 KV bytes of completed transfers (what was moved logically).")
                      .Register(r);
  auto& wire = BuildCounter()
                   .Name("spectrumkv_wire_bytes_total")
                   .Help("Payload bytes of completed transfers on the wire.")
                   .Register(r);
  auto& saved =
      BuildCounter()
          .Name("spectrumkv_bytes_saved_total")
          .Help(
              "Logical bytes minus wire bytes of completed transfers (per transfer, never "
              "negative).")
          .Register(r);
  auto& tokens = BuildCounter()
                     .Name("spectrumkv_tokens_total")
                     .Help("Prompt tokens of completed transfers, by precision tier.")
                     .Register(r);
  for (int d = 0; d < 2; ++d) {
    m.logical[d] = &logical.Add({{"direction", kDirections[d]}});
    m.wire[d] = &wire.Add({{"direction", kDirections[d]}});
    m.saved[d] = &saved.Add({{"direction", kDirections[d]}});
    for (int t = 0; t < 4; ++t) {
      m.tokens[d][t] = &tokens.Add({{"direction", kDirections[d]}, {"tier", kTiers[t]}});
    }
  }
  auto& transfers = BuildCounter()
                        .Name("spectrumkv_transfers_total")
                        .Help("Ended transfers by role and canonical status code.")
                        .Register(r);
  auto& duration = BuildHistogram()
                       .Name("spectrumkv_transfer_duration_seconds")
                       .Help("End-to-end duration of ended transfers, by role.")
                       .Register(r);
  for (int role = 0; role < 2; ++role) {
    for (int c = 0; c < kNumCodes; ++c) {
      m.transfers[role][c] =
          &transfers.Add({{"role", kRoles[role]},
                          {"code", absl::StatusCodeToString(static_cast<absl::StatusCode>(c))}});
    }
    m.duration[role] = &duration.Add({{"role", kRoles[role]}}, LatencyBuckets());
  }
  auto& stage = BuildHistogram()
                    .Name("spectrumkv_stage_duration_seconds")
                    .Help(
                        "Duration of each stage of a transfer (score, plan, pack, stage_copy, "
                        "network, unpack).")
                    .Register(r);
  for (int s = 0; s < 6; ++s) m.stage[s] = &stage.Add({{"stage", kStages[s]}}, LatencyBuckets());
  auto& rejected = BuildCounter()
                       .Name("spectrumkv_admission_rejected_total")
                       .Help("Transfers refused by admission control, by reason.")
                       .Register(r);
  for (int i = 0; i < 4; ++i) m.rejected[i] = &rejected.Add({{"reason", kReasons[i]}});
  auto gauge = [&](const char* name, const char* help) {
    return &BuildGauge().Name(name).Help(help).Register(r).Add({});
  };
  m.inflight_transfers = gauge("spectrumkv_inflight_transfers", "Transfers in progress.");
  m.inflight_transfers_limit =
      gauge("spectrumkv_inflight_transfers_limit", "Admission limit on transfers in progress.");
  m.inflight_bytes = gauge("spectrumkv_inflight_bytes", "Payload bytes held by transfers.");
  m.inflight_bytes_limit =
      gauge("spectrumkv_inflight_bytes_limit", "Admission limit on payload bytes held.");
  m.early_bytes =
      gauge("spectrumkv_early_payload_bytes", "Bytes of payloads buffered before their Receive.");
  m.pools = gauge("spectrumkv_pools", "Registered KV pools.");
  m.ready = gauge("spectrumkv_ready", "1 when the daemon accepts transfers.");
  m.draining = gauge("spectrumkv_draining", "1 while the daemon drains.");
  auto& peers =
      BuildGauge().Name("spectrumkv_peers").Help("Peer daemons by connection state.").Register(r);
  m.peers_up = &peers.Add({{"state", "up"}});
  m.peers_down = &peers.Add({{"state", "down"}});
  m.checksum_failures = &BuildCounter()
                             .Name("spectrumkv_checksum_failures_total")
                             .Help("Payload layers or preludes that failed their CRC32C.")
                             .Register(r)
                             .Add({});
  m.early_expired = &BuildCounter()
                         .Name("spectrumkv_early_payloads_expired_total")
                         .Help("Payloads dropped because no Receive claimed them in time.")
                         .Register(r)
                         .Add({});
  BuildGauge()
      .Name("spectrumkv_build_info")
      .Help("Build information; always 1.")
      .Register(r)
      .Add({{"version", build.version},
            {"revision", build.revision},
            {"cuda", build.cuda},
            {"ucx", build.ucx}})
      .Set(1);
  BuildGauge()
      .Name("spectrumkv_kernel_backend_info")
      .Help("The codec backend in use; always 1.")
      .Register(r)
      .Add({{"backend", build.backend}})
      .Set(1);
}

Metrics::~Metrics() = default;

void Metrics::AddTransferBytes(Direction direction, uint64_t logical_bytes, uint64_t wire_bytes,
                               const TierCounts& tiers) {
  const int d = static_cast<int>(direction);
  impl_->logical[d]->Increment(static_cast<double>(logical_bytes));
  impl_->wire[d]->Increment(static_cast<double>(wire_bytes));
  if (logical_bytes > wire_bytes) {
    impl_->saved[d]->Increment(static_cast<double>(logical_bytes - wire_bytes));
  }
  for (int t = 0; t < 4; ++t) impl_->tokens[d][t]->Increment(tiers.n[t]);
}

void Metrics::TransferEnded(Role role, absl::StatusCode code, double seconds) {
  const int c = static_cast<int>(code);
  impl_->transfers[static_cast<int>(role)][c >= 0 && c < kNumCodes ? c : 2]->Increment();
  impl_->duration[static_cast<int>(role)]->Observe(seconds);
}

void Metrics::ObserveStage(Stage stage, double seconds) {
  impl_->stage[static_cast<int>(stage)]->Observe(seconds);
}

void Metrics::SetInflight(uint64_t transfers, uint64_t bytes) {
  impl_->inflight_transfers->Set(static_cast<double>(transfers));
  impl_->inflight_bytes->Set(static_cast<double>(bytes));
}

void Metrics::SetLimits(uint64_t max_transfers, uint64_t max_bytes) {
  impl_->inflight_transfers_limit->Set(static_cast<double>(max_transfers));
  impl_->inflight_bytes_limit->Set(static_cast<double>(max_bytes));
}

void Metrics::SetEarlyBytes(uint64_t bytes) { impl_->early_bytes->Set(static_cast<double>(bytes)); }
void Metrics::EarlyPayloadExpired() { impl_->early_expired->Increment(); }
void Metrics::ChecksumFailure() { impl_->checksum_failures->Increment(); }
void Metrics::AdmissionRejected(RejectReason reason) {
  impl_->rejected[static_cast<int>(reason)]->Increment();
}
void Metrics::SetPeers(uint64_t up, uint64_t down) {
  impl_->peers_up->Set(static_cast<double>(up));
  impl_->peers_down->Set(static_cast<double>(down));
}
void Metrics::SetPools(uint64_t pools) { impl_->pools->Set(static_cast<double>(pools)); }
void Metrics::SetReady(bool ready) { impl_->ready->Set(ready ? 1 : 0); }
void Metrics::SetDraining(bool draining) { impl_->draining->Set(draining ? 1 : 0); }

std::string Metrics::Serialize() const {
  std::vector<prometheus::MetricFamily> families = impl_->registry->Collect();
  for (auto& f : impl_->process->Collect()) families.push_back(std::move(f));
  return prometheus::TextSerializer().Serialize(families);
}

absl::Status Metrics::StartExposer(const std::string& address) {
  try {
    impl_->exposer = std::make_unique<prometheus::Exposer>(address, /*num_threads=*/1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrFormat("cannot serve metrics on %s: %s", address, e.what()));
  }
  impl_->exposer->RegisterCollectable(impl_->registry);
  impl_->exposer->RegisterCollectable(impl_->process);
  return absl::OkStatus();
}

int Metrics::exposer_port() const {
  if (!impl_->exposer) return 0;
  const std::vector<int> ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports[0];
}

}  // namespace spectrumkv
