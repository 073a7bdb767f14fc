// A Transport between daemons of one process, addressed "inproc://NAME". Each instance owns a
// delivery thread: messages to it are queued and delivered in order; payload bytes are copied
// into the memory the receiving handler names. Shutting an instance down tells every other
// instance its peer went down, like a crashed process. Thread-safe.
#ifndef SPECTRUMKV_DAEMON_TRANSPORT_INPROC_TRANSPORT_H_
#define SPECTRUMKV_DAEMON_TRANSPORT_INPROC_TRANSPORT_H_

#include <memory>
#include <string>

#include "daemon/transport/transport.h"

namespace spectrumkv {

class Executor;

class InprocTransport final : public Transport {
 public:
  // `name` must be unique in the process among started instances.
  explicit InprocTransport(std::string name);
  ~InprocTransport() override;

  absl::Status Start(TransportHandler* handler) override;
  void Shutdown() override;
  std::string kind() const override { return "inproc"; }
  std::string address() const override { return "inproc://" + name_; }
  void SendControl(const std::string& peer, const v1::PeerMessage& message,
                   SendCallback done) override;
  void SendData(const std::string& peer, const DataChunkHeader& header,
                std::span<const uint8_t> data, SendCallback done) override;

 private:
  // Runs `fn` on `peer`'s delivery thread, then `done` on this instance's: OK once `fn` has run,
  // UNAVAILABLE if there is no such started peer (or this instance shut down meanwhile).
  void DeliverTo(const std::string& peer, std::function<void(TransportHandler*)> fn,
                 SendCallback done);

  const std::string name_;
  TransportHandler* handler_ = nullptr;
  std::shared_ptr<Executor> delivery_;  // this instance's delivery thread
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_TRANSPORT_INPROC_TRANSPORT_H_
