// Transport: how daemons exchange transfer control messages and payload chunks.
//
// Implementations: InprocTransport (daemons in one process; tests and single-node use) and
// UcxTransport (TCP, shared memory or RDMA between processes and nodes). The transfer manager
// only sees this interface.
//
// Contract:
//  - Control messages to one peer are delivered in the order they were sent, and a data chunk
//    after every control message sent to that peer before it; data chunks may overtake each
//    other (a transport may move them over several connections).
//  - A send's `done` callback runs exactly once, on a transport thread, never inside the Send*
//    call itself; OK means the bytes left this process (for data: the buffer may be reused).
//    Whether the peer accepted the transfer is said by control messages, not by `done`.
//  - Handler callbacks run on transport threads and must not block; they may call Send*.
//  - A data chunk is delivered in two steps: OnDataBegin asks the handler where to put it
//    (the handler keeps that memory valid until OnDataEnd), OnDataEnd says it is there.
#ifndef SPECTRUMKV_DAEMON_TRANSPORT_TRANSPORT_H_
#define SPECTRUMKV_DAEMON_TRANSPORT_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "spectrumkv/v1/peer.pb.h"

namespace spectrumkv {

// Framing of one payload chunk. Chunks cover whole layer sections, or the prelude
// (first_layer == last_layer == 0 at offset 0).
struct DataChunkHeader {
  uint64_t transfer_id = 0;  // the sender's transfer id
  uint32_t index = 0;        // chunk number, 0 = prelude
  uint32_t first_layer = 0;  // layers [first_layer, last_layer) of the payload
  uint32_t last_layer = 0;
  uint64_t offset = 0;  // byte offset in the payload
  uint64_t size = 0;
};

using SendCallback = std::function<void(absl::Status)>;

class TransportHandler {
 public:
  virtual ~TransportHandler() = default;
  virtual void OnControl(const std::string& peer, const v1::PeerMessage& message) = 0;
  // Where the chunk's `header.size` bytes go, or an error (the chunk is then discarded).
  virtual absl::StatusOr<std::span<uint8_t>> OnDataBegin(const std::string& peer,
                                                         const DataChunkHeader& header) = 0;
  // The chunk is in place (OK) or could not be received.
  virtual void OnDataEnd(const std::string& peer, const DataChunkHeader& header,
                         absl::Status status) = 0;
  // The peer is unreachable (crashed, shut down, network failure).
  virtual void OnPeerDown(const std::string& peer, const absl::Status& reason) = 0;
};

class Transport {
 public:
  virtual ~Transport() = default;

  // Starts delivering to `handler` (which must outlive the transport).
  virtual absl::Status Start(TransportHandler* handler) = 0;
  // Stops: pending sends complete with UNAVAILABLE, peers see this side go down.
  virtual void Shutdown() = 0;

  virtual std::string kind() const = 0;     // "inproc" or "ucx"
  virtual std::string address() const = 0;  // what a peer passes as `peer` to reach us

  virtual void SendControl(const std::string& peer, const v1::PeerMessage& message,
                           SendCallback done) = 0;
  // `data` must stay valid until `done` runs.
  virtual void SendData(const std::string& peer, const DataChunkHeader& header,
                        std::span<const uint8_t> data, SendCallback done) = 0;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_TRANSPORT_TRANSPORT_H_
