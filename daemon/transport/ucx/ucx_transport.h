// UcxTransport: the Transport between daemons on different hosts (or processes), over UCX.
//
// The only code of the project that includes UCX headers. One UCP context and worker, driven by
// one progress thread that sleeps on the worker's event fd (epoll) when idle: no core is burnt
// while nothing moves. Other threads hand operations to that thread through a queue and an
// eventfd. Daemons find each other by "ucx://host:port" (the listen address a daemon
// advertises); endpoints are created on first use, with UCX's peer error handling, and
// re-created after a peer restarts. Control messages and payload chunks are UCX active
// messages; large chunks use rendezvous and land directly in the memory the receiving handler
// names (zero copy on the receive side where the transport allows it).
//
// Thread-safety: all public methods are thread-safe. Handler callbacks run on the progress
// thread.
#ifndef SPECTRUMKV_DAEMON_TRANSPORT_UCX_UCX_TRANSPORT_H_
#define SPECTRUMKV_DAEMON_TRANSPORT_UCX_UCX_TRANSPORT_H_

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "daemon/transport/transport.h"

namespace spectrumkv {

struct UcxTransportOptions {
  // Where to listen: "host:port" (port 0 picks one; host 0.0.0.0 listens everywhere).
  std::string listen_address = "0.0.0.0:13337";
  // The host peers use to reach us; empty: the listen host, or this machine's hostname when
  // listening on 0.0.0.0.
  std::string advertise_host;
  // UCX transports (UCX_TLS), e.g. "tcp", "posix,tcp", "rc,tcp". Empty: UCX's default (all).
  std::string tls = "tcp";
  // Further UCX settings, name without the UCX_ prefix -> value (e.g. RNDV_THRESH -> 64k).
  std::map<std::string, std::string> ucx_options;
};

class UcxTransport final : public Transport {
 public:
  // Initializes UCX and binds the listener. UNAVAILABLE if UCX cannot start or the address
  // cannot be bound; INVALID_ARGUMENT for a malformed address or a setting UCX rejects.
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(const UcxTransportOptions& options);
  ~UcxTransport() override;

  absl::Status Start(TransportHandler* handler) override;
  void Shutdown() override;
  std::string kind() const override { return "ucx"; }
  std::string address() const override;
  void SendControl(const std::string& peer, const v1::PeerMessage& message,
                   SendCallback done) override;
  void SendData(const std::string& peer, const DataChunkHeader& header,
                std::span<const uint8_t> data, SendCallback done) override;

  struct Impl;

 private:
  explicit UcxTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_TRANSPORT_UCX_UCX_TRANSPORT_H_
