// spectrumkvd: the SpectrumKV node daemon. The composition root: the only file that knows every
// implementation and wires them together.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <malloc.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "common/exit_codes.h"
#include "daemon/common/executor.h"
#include "daemon/common/logging.h"
#include "daemon/common/timer_queue.h"
#include "daemon/config/config.h"
#include "daemon/metrics/metrics.h"
#include "daemon/pools/pool_registry.h"
#include "daemon/pools/staging_arena.h"
#include "daemon/service/kv_transfer_service.h"
#include "daemon/transfer/model_policies.h"
#include "daemon/transfer/transfer_manager.h"
#include "daemon/transport/inproc_transport.h"
#include "daemon/transport/ucx/ucx_transport.h"
#include "kernels/cpu/cpu_codec.h"
#include "kernels/registry/codec_registry.h"

namespace spectrumkv {
namespace {

constexpr char kVersion[] = "0.1.0";

// Tells systemd (Type=notify) about our state; a no-op without NOTIFY_SOCKET.
void SdNotify(const std::string& state) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (path == nullptr || path[0] == '\0') return;
  const int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
  if (addr.sun_path[0] == '@') addr.sun_path[0] = '\0';  // abstract namespace
  sendto(fd, state.data(), state.size(), 0, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  close(fd);
}

// A GPU region of a pool: memory of the frontend's process, opened through its CUDA IPC handle.
class ImportedDeviceMemory final : public ImportedMemory {
 public:
  explicit ImportedDeviceMemory(std::unique_ptr<DeviceAllocation> memory)
      : memory_(std::move(memory)) {}
  void* data() const override { return memory_->data(); }
  uint64_t size() const override { return memory_->size(); }

 private:
  std::unique_ptr<DeviceAllocation> memory_;
};

// Imports the CUDA IPC regions of GPU pools, which the device codec packs and unpacks. Where this
// daemon runs no device codec, every such region is refused with UNAVAILABLE and `why_not`.
CudaIpcImporter MakeCudaIpcImporter(bool have_device_codec, std::string why_not) {
  if (!have_device_codec) {
    return [why_not](const CudaIpcSpec&) -> absl::StatusOr<std::unique_ptr<ImportedMemory>> {
      return absl::UnavailableError("CUDA IPC memory cannot be used here: " + why_not);
    };
  }
  return [](const CudaIpcSpec& spec) -> absl::StatusOr<std::unique_ptr<ImportedMemory>> {
    if (spec.device != kCudaCodecDevice) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "cuda_ipc.device %d: this daemon's CUDA codec runs on device %d (one daemon per GPU; "
          "CUDA_VISIBLE_DEVICES chooses it)",
          spec.device, kCudaCodecDevice));
    }
    absl::StatusOr<std::unique_ptr<DeviceAllocation>> memory =
        ImportCudaIpcMemory(spec.handle, spec.device, spec.offset_bytes, spec.size_bytes);
    if (!memory.ok()) return memory.status();
    return std::make_unique<ImportedDeviceMemory>(std::move(*memory));
  };
}

struct Flags {
  std::string config_path;
  bool check_config = false;
  bool print_config = false;
  std::string node_name, listen_unix, listen_tcp, metrics_address, transport, transport_address,
      backend, log_level, log_format;
  bool set_listen_unix = false;
  bool set_metrics_address = false;
};

void ApplyFlags(const Flags& f, DaemonConfig& c) {
  if (!f.node_name.empty()) c.node_name = f.node_name;
  if (f.set_listen_unix) c.listen.unix_socket = f.listen_unix;
  if (!f.listen_tcp.empty()) c.listen.tcp = f.listen_tcp;
  if (f.set_metrics_address) c.metrics.address = f.metrics_address;
  if (!f.transport.empty()) c.transport.kind = f.transport;
  if (!f.transport_address.empty()) c.transport.address = f.transport_address;
  if (!f.backend.empty()) c.codec.backend = f.backend;
  if (!f.log_level.empty()) c.logging.level = f.log_level;
  if (!f.log_format.empty()) c.logging.format = f.log_format;
}

// Removes a stale Unix socket file left by a previous run; refuses to touch a live one.
absl::Status PrepareUnixSocket(const std::string& path) {
  const std::filesystem::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  if (!std::filesystem::exists(p, ec)) return absl::OkStatus();
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  const bool live = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  if (live) {
    return absl::UnavailableError("another daemon is listening on " + path);
  }
  std::filesystem::remove(p, ec);
  return absl::OkStatus();
}

int Run(int argc, char** argv) {
  // A Send with attention scoring carries its window queries (16.8 MB for llama3-8b at w = 32),
  // parsed into fresh buffers of that size. glibc maps such buffers and unmaps them on free, so
  // every request paid for faulting in and zeroing thousands of new pages; these settings keep
  // buffers up to 32 MiB in the heap for reuse (the heap is trimmed above 256 MiB free).
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  Flags f;
  CLI::App app{"spectrumkvd: the SpectrumKV KV-cache transfer daemon (one per GPU node)"};
  app.set_version_flag("--version", std::string("spectrumkvd ") + kVersion +
                                        (CudaBackendBuilt() ? " (CUDA backend built)" : ""));
  app.add_option("--config", f.config_path, "YAML configuration file (config/reference.md)");
  app.add_flag("--check-config", f.check_config,
               "Validate the configuration (file and flags) and exit: 0 if valid, 78 if not");
  app.add_flag("--print-config", f.print_config,
               "Print the effective configuration as YAML and exit");
  app.add_option("--node-name", f.node_name, "Overrides node_name");
  app.add_option("--listen-unix", f.listen_unix,
                 "Overrides listen.unix_socket (\"\" disables the Unix socket)")
      ->each([&](const std::string&) { f.set_listen_unix = true; });
  app.add_option("--listen-tcp", f.listen_tcp, "Overrides listen.tcp (host:port)");
  app.add_option("--metrics-address", f.metrics_address,
                 "Overrides metrics.address (host:port, port 0 picks one, \"\" disables)")
      ->each([&](const std::string&) { f.set_metrics_address = true; });
  app.add_option("--transport", f.transport, "Overrides transport.kind (inproc, ucx)");
  app.add_option("--transport-address", f.transport_address, "Overrides transport.address");
  app.add_option("--backend", f.backend, "Overrides codec.backend (auto, cpu, cpu-scalar, cuda)");
  app.add_option("--log-level", f.log_level, "Overrides logging.level");
  app.add_option("--log-format", f.log_format, "Overrides logging.format (text, json)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? kExitOk : kExitUsage;
  }

  DaemonConfig config;
  if (!f.config_path.empty()) {
    absl::StatusOr<DaemonConfig> loaded = LoadConfigFile(f.config_path);
    if (!loaded.ok()) {
      std::fprintf(stderr, "spectrumkvd: %s\n", std::string(loaded.status().message()).c_str());
      return kExitConfig;
    }
    config = std::move(*loaded);
  }
  ApplyFlags(f, config);
  if (config.transport.address.empty()) {
    config.transport.address =
        config.transport.kind == "ucx" ? std::string("0.0.0.0:13337") : config.node_name;
  }
  if (absl::Status s = ValidateConfig(config); !s.ok()) {
    std::fprintf(stderr, "spectrumkvd: invalid configuration:\n%s\n",
                 std::string(s.message()).c_str());
    return kExitConfig;
  }
  if (f.check_config) {
    std::printf("configuration is valid\n");
    return kExitOk;
  }
  if (f.print_config) {
    std::printf("%s", ConfigToYaml(config).c_str());
    return kExitOk;
  }
  if (absl::Status s = SetUpLogging(config.logging.level, config.logging.format); !s.ok()) {
    std::fprintf(stderr, "spectrumkvd: %s\n", std::string(s.message()).c_str());
    return kExitConfig;
  }

  // Signals are taken synchronously by the main thread; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::random_device rd;
  const uint64_t incarnation = (uint64_t{rd()} << 32) ^ rd();

  // Codec backends: the selected one, plus the CPU backend for host-memory pools.
  absl::StatusOr<BackendSelection> selected =
      CreateCodec(*ParseBackendChoice(config.codec.backend));
  if (!selected.ok()) {
    spdlog::error("codec backend: {}", selected.status().ToString());
    return kExitUnavailable;
  }
  std::unique_ptr<Codec> device_codec, host_codec;
  if (selected->codec->memory_kind() == MemoryKind::kDevice) {
    device_codec = std::move(selected->codec);
    host_codec = std::move(CreateCodec(BackendChoice::kCpu)->codec);
  } else {
    host_codec = std::move(selected->codec);
  }
  if (auto* cpu = dynamic_cast<CpuCodec*>(host_codec.get())) {
    cpu->set_score_threads(config.codec.score_threads != 0 ? config.codec.score_threads
                                                           : config.codec.worker_threads);
  }
  const std::string backend_name(device_codec ? device_codec->name() : host_codec->name());
  spdlog::info("codec backend {}: {}", backend_name, selected->reason);
  // GPU pools: device payload buffers and copies next to the device codec.
  std::unique_ptr<DeviceMemory> device_memory;
  if (device_codec) {
    absl::StatusOr<std::unique_ptr<DeviceMemory>> created = CreateDeviceMemory(kCudaCodecDevice);
    if (!created.ok()) {
      spdlog::error("device memory: {}", created.status().ToString());
      return kExitUnavailable;
    }
    device_memory = std::move(*created);
  }

  Metrics metrics(BuildInfo{kVersion, SPECTRUMKV_REVISION, CudaBackendBuilt() ? "yes" : "no", "yes",
                            backend_name});
  if (!config.metrics.address.empty()) {
    if (absl::Status s = metrics.StartExposer(config.metrics.address); !s.ok()) {
      spdlog::error("{}", s.ToString());
      return kExitUnavailable;
    }
  }
  absl::StatusOr<std::unique_ptr<StagingArena>> staging = StagingArena::Create(
      config.limits.staging_bytes, config.limits.staging_prefault, config.limits.staging_lock);
  if (!staging.ok()) {
    spdlog::error("{}", staging.status().ToString());
    return kExitUnavailable;
  }
  // With a GPU, the staging arena is pinned so that device<->host chunk copies run by DMA at full
  // speed. Without it they still work, through the driver's bounce buffers: degraded, not fatal.
  std::unique_ptr<PinnedHostMemory> pinned_staging;
  if (device_memory) {
    absl::StatusOr<std::unique_ptr<PinnedHostMemory>> pinned =
        PinHostMemory((*staging)->base(), (*staging)->capacity());
    if (pinned.ok()) {
      pinned_staging = std::move(*pinned);
      spdlog::info("staging arena of {} bytes pinned for device copies", (*staging)->capacity());
    } else {
      spdlog::warn("staging arena not pinned, device copies will be slower: {}",
                   pinned.status().ToString());
    }
  }
  PoolRegistry pools(
      config.limits.max_pools,
      MakeCudaIpcImporter(device_codec != nullptr,
                          CudaBackendBuilt()
                              ? absl::StrFormat("this daemon runs the %s codec, not CUDA (%s)",
                                                backend_name, selected->reason)
                              : std::string("this daemon was built without the CUDA backend")));
  ModelPolicies models;
  for (const ModelPolicyConfig& m : config.models) {
    if (absl::Status s = models.Set({m.model, m.allow_int4, m.allow_int8, m.source}); !s.ok()) {
      spdlog::error("{}", s.ToString());
      return kExitConfig;
    }
  }
  std::unique_ptr<Transport> transport;
  if (config.transport.kind == "ucx") {
    UcxTransportOptions ucx;
    ucx.listen_address = config.transport.address;
    ucx.advertise_host = config.transport.advertise_host;
    ucx.tls = config.transport.ucx_tls;
    ucx.ucx_options = config.transport.ucx_options;
    ucx.lanes = static_cast<int>(config.transport.ucx_lanes);
    ucx.chunks_in_flight = static_cast<int>(config.transport.ucx_chunks_in_flight);
    absl::StatusOr<std::unique_ptr<UcxTransport>> created = UcxTransport::Create(ucx);
    if (!created.ok()) {
      spdlog::error("transport: {}", created.status().ToString());
      return created.status().code() == absl::StatusCode::kInvalidArgument ? kExitConfig
                                                                           : kExitUnavailable;
    }
    transport = std::move(*created);
  } else {
    transport = std::make_unique<InprocTransport>(config.transport.address);
  }
  Executor executor(static_cast<int>(config.codec.worker_threads), "skv-worker",
                    static_cast<int>(config.codec.worker_nice));
  TimerQueue timers;
  TransferManagerOptions options;
  options.max_inflight_transfers = config.limits.max_inflight_transfers;
  options.max_inflight_bytes = config.limits.max_inflight_bytes;
  options.early_buffer_bytes = config.limits.early_buffer_bytes;
  options.early_ttl_s = config.limits.early_ttl_s;
  options.default_deadline_s = config.limits.default_deadline_s;
  options.max_deadline_s = config.limits.max_deadline_s;
  options.result_ttl_s = config.limits.result_ttl_s;
  options.chunk_bytes = config.codec.chunk_bytes;
  options.min_chunk_bytes = config.codec.min_chunk_bytes;
  options.target_chunks =
      kChunksPerLane * (config.transport.kind == "ucx" ? config.transport.ucx_lanes : 1);
  options.pack_threads = config.codec.worker_threads;
  options.pack_slices = config.codec.pack_slices;
  options.progressive_chunks_in_flight = config.codec.progressive_chunks_in_flight;
  options.progressive_score_threads = config.codec.progressive_score_threads;
  options.incarnation = incarnation;
  auto manager = std::make_unique<TransferManager>(
      options, pools, CodecSet{host_codec.get(), device_codec.get(), device_memory.get()},
      *transport, **staging, metrics, executor, timers, models);
  if (absl::Status s = transport->Start(manager.get()); !s.ok()) {
    spdlog::error("transport: {}", s.ToString());
    return kExitUnavailable;
  }

  v1::DaemonInfo info;
  info.set_version(kVersion);
  info.set_node_name(config.node_name);
  info.set_incarnation(incarnation);
  info.set_codec_backend(backend_name);
  info.set_transport(transport->kind());
  info.set_transport_address(transport->address());
  info.set_max_inflight_transfers(config.limits.max_inflight_transfers);
  info.set_max_inflight_bytes(config.limits.max_inflight_bytes);
  info.set_metrics_port(static_cast<uint32_t>(metrics.exposer_port()));
  KvTransferService service(config, pools, *manager, models, metrics, info);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.limits.max_message_bytes));
  if (!config.listen.unix_socket.empty()) {
    if (absl::Status s = PrepareUnixSocket(config.listen.unix_socket); !s.ok()) {
      spdlog::error("{}", s.ToString());
      return kExitUnavailable;
    }
    builder.AddListeningPort("unix:" + config.listen.unix_socket,
                             grpc::InsecureServerCredentials());
  }
  int tcp_port = 0;
  if (!config.listen.tcp.empty()) {
    builder.AddListeningPort(config.listen.tcp, grpc::InsecureServerCredentials(), &tcp_port);
  }
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || (!config.listen.tcp.empty() && tcp_port == 0)) {
    spdlog::error("cannot listen on {} {}", config.listen.unix_socket, config.listen.tcp);
    return kExitUnavailable;
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  metrics.SetReady(true);
  spdlog::info(
      "spectrumkvd {} ready: node {} incarnation {:016x} grpc unix:{} tcp:{} metrics port {} "
      "transport {}",
      kVersion, config.node_name, incarnation, config.listen.unix_socket,
      tcp_port ? std::to_string(tcp_port) : "-", metrics.exposer_port(), transport->address());
  SdNotify("READY=1\nSTATUS=serving");

  // Wait for a signal: TERM/INT drain and exit; a second one exits at once; HUP is logged.
  for (;;) {
    int sig = 0;
    if (sigwait(&signals, &sig) != 0) continue;
    if (sig == SIGHUP) {
      spdlog::warn("SIGHUP: configuration reload is not supported; restart to apply changes");
      continue;
    }
    spdlog::info("signal {}: draining (up to {}s)", sig, config.limits.drain_timeout_s);
    break;
  }
  SdNotify("STOPPING=1\nSTATUS=draining");
  metrics.SetReady(false);
  metrics.SetDraining(true);
  server->GetHealthCheckService()->SetServingStatus(false);
  std::thread second_signal([&signals] {
    int sig = 0;
    sigwait(&signals, &sig);
    spdlog::warn("second signal {}: exiting now", sig);
    std::_Exit(kExitFailure);
  });
  second_signal.detach();
  manager->Drain(
      std::chrono::milliseconds(static_cast<int64_t>(config.limits.drain_timeout_s * 1000)));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  transport->Shutdown();
  executor.Shutdown();
  manager.reset();
  if (!config.listen.unix_socket.empty()) {
    std::error_code ec;
    std::filesystem::remove(config.listen.unix_socket, ec);
  }
  spdlog::info("spectrumkvd stopped");
  return kExitOk;
}

}  // namespace
}  // namespace spectrumkv

int main(int argc, char** argv) { return spectrumkv::Run(argc, argv); }
