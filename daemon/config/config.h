// The daemon's configuration: defaults < YAML file < command-line flags.
//
// ParseConfig reads YAML text and reports every problem at once, each as
// "FILE:LINE:COLUMN: key.path: reason" — unknown keys, duplicate keys, wrong types and values out
// of range are all errors. config/reference.md documents every key; keep the two in step.
#ifndef SPECTRUMKV_DAEMON_CONFIG_CONFIG_H_
#define SPECTRUMKV_DAEMON_CONFIG_CONFIG_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace spectrumkv {

struct ListenConfig {
  std::string unix_socket = "/run/spectrumkv/spectrumkvd.sock";  // "" disables
  std::string tcp;                                               // host:port, "" disables
};

struct MetricsConfig {
  std::string address = "127.0.0.1:9464";  // Prometheus scrape address; "" disables
};

struct TransportConfig {
  std::string kind = "inproc";  // "inproc" (peers in this process) or "ucx"
  // inproc: this daemon's name (default: node_name). ucx: the listen address host:port
  // (default 0.0.0.0:13337; port 0 picks one).
  std::string address;
  std::string advertise_host;   // ucx: the host peers use (default: listen host or hostname)
  std::string ucx_tls = "tcp";  // ucx: UCX_TLS, e.g. tcp, "posix,tcp", "rc,tcp"; "" = all
  std::map<std::string, std::string> ucx_options;  // ucx: further UCX settings (no UCX_ prefix)
  uint32_t ucx_lanes = 4;  // ucx: UCX workers (progress threads), each with its own connection
  uint32_t ucx_chunks_in_flight = 2;  // ucx: data chunks posted at once per peer and lane
};

struct LimitsConfig {
  uint32_t max_inflight_transfers = 64;      // sends + receives in progress
  uint64_t max_inflight_bytes = 4ull << 30;  // payload bytes held by in-flight transfers
  uint64_t staging_bytes = 2ull << 30;       // the fixed staging arena
  bool staging_prefault = true;              // touch the arena's pages at start-up
  bool staging_lock = false;                 // mlock the arena (needs LimitMEMLOCK)
  uint64_t early_buffer_bytes = 1ull << 30;  // payloads that arrive before their Receive
  double early_ttl_s = 30.0;                 // how long such payloads are kept
  double default_deadline_s = 30.0;          // for calls without a deadline
  double max_deadline_s = 600.0;             // longer deadlines are shortened to this
  double result_ttl_s = 300.0;               // ended transfers kept for GetTransfer/retries
  uint64_t max_message_bytes = 64ull << 20;  // gRPC receive limit (window queries)
  uint32_t max_pools = 64;
  double drain_timeout_s = 30.0;  // SIGTERM: wait this long for transfers to end
};

struct CodecConfig {
  std::string backend = "auto";         // auto, cpu, cpu-scalar, cuda
  double budget = 0.5;                  // default budget, (0, 1]
  std::string budget_kind = "element";  // element or wire
  std::string policy = "3tier";
  std::string scoring = "key_norm";     // used when a Send gives no scoring inputs
  std::string quantizer = "absmax";     // absmax or kcn
  std::string on_unreachable = "drop";  // drop or reject
  uint32_t sink_tokens = 4;
  uint64_t chunk_bytes = 4ull << 20;   // data chunk size (whole layers, the nearest)
  uint64_t min_chunk_bytes = 1 << 20;  // smallest chunk when a payload is cut finer
  uint32_t worker_threads = 2;         // codec and transfer work
  uint32_t score_threads = 0;          // CPU key_norm scoring of one Send; 0: worker_threads
  uint32_t pack_slices = 0;            // parts of a host chunk; 0: workers / transfers in flight
  uint32_t progressive_chunks_in_flight = 8;  // a progressive Send's chunks in the transport
  uint32_t progressive_score_threads = 4;     // its scoring pass's threads (at most score_threads)
  uint32_t worker_nice = 0;                   // workers' nice above the daemon's (0-19)
};

struct ModelPolicyConfig {
  std::string model;
  bool allow_int4 = true;
  bool allow_int8 = true;
  std::string source;
};

struct LoggingConfig {
  std::string level = "info";   // trace, debug, info, warn, error
  std::string format = "text";  // text or json
};

struct DaemonConfig {
  std::string node_name = "spectrumkvd";
  ListenConfig listen;
  MetricsConfig metrics;
  TransportConfig transport;
  LimitsConfig limits;
  CodecConfig codec;
  std::vector<ModelPolicyConfig> models;
  LoggingConfig logging;
};

// Parses `yaml` (named `filename` in messages) over the defaults. INVALID_ARGUMENT listing every
// problem, one per line.
absl::StatusOr<DaemonConfig> ParseConfig(const std::string& yaml, const std::string& filename);

// Reads and parses a file. NOT_FOUND if it cannot be read.
absl::StatusOr<DaemonConfig> LoadConfigFile(const std::string& path);

// Cross-field checks, run after flags are applied (e.g. chunk_bytes <= staging_bytes, a listen
// address present). INVALID_ARGUMENT listing every problem.
absl::Status ValidateConfig(const DaemonConfig& config);

// The effective configuration as YAML (what --print-config shows).
std::string ConfigToYaml(const DaemonConfig& config);

// Parses "4GiB", "512MiB", "64KiB", "1GB", "1000" and the like. INVALID_ARGUMENT otherwise.
absl::StatusOr<uint64_t> ParseByteSize(const std::string& text);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_CONFIG_CONFIG_H_
