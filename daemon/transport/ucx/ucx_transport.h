// UcxTransport: the Transport between daemons on different hosts (or processes), over UCX.
//
// The only code of the project that includes UCX headers. One UCP context and `lanes` workers,
// each driven by a progress thread of its own that sleeps on the worker's event fd (epoll) when
// idle: no core is burnt while nothing moves. Other threads hand operations to a lane's thread
// through a queue and an eventfd, or, when that thread sleeps and nothing is queued before
// them, post them on the lane's worker themselves (the worker is driven under a lock). Daemons
// find each other by "ucx://host:port" (the listen
// address a daemon advertises); every lane connects to a peer on first use, with UCX's peer
// error handling, and reconnects after the peer restarts; the listener (on lane 0) hands the
// connections it accepts to the lanes in turn. Control messages and payload chunks are UCX
// active messages; large chunks use rendezvous and land directly in the memory the receiving
// handler names (zero copy on the receive side where the transport allows it).
//
// Lanes: control messages to a peer all travel on lane 0, in order; payload chunks go to the
// lanes in turn, so that one peer's chunks move over several connections, each copied by its
// own thread (one TCP connection is bound by one core's copies). Each chunk carries a fence,
// the number of control messages sent to that peer before it, and the receiver delivers it only
// once those have been delivered: a transfer's offer always reaches the handler before its
// chunks. Flow control: at most two chunks per peer and lane are posted to UCX at once (UCX
// interleaves a connection's rendezvous sends, so chunks posted together would arrive
// together), the others wait their turn in order.
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
  // UCX workers, each with its own progress thread and its own connection to every peer
  // (1..kMaxLanes). One TCP connection moves about what one core copies (docs/BENCHMARKS.md).
  int lanes = 4;
  static constexpr int kMaxLanes = 64;
  // Data chunks posted to UCX at once per peer and lane (1..kMaxChunksInFlight); the rest wait in
  // order and go as sends complete. UCX moves the rendezvous sends of one connection interleaved,
  // so chunks posted together arrive together (measured: a payload's chunks arriving in bursts,
  // the last third of them within 0.1 ms of each other, all unpacked after the last byte). Two:
  // one travels while the next is announced, and chunks arrive at the link's pace, each unpacked
  // while the next travels.
  int chunks_in_flight = 2;
  static constexpr int kMaxChunksInFlight = 64;
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
