// A Transport decorator that injects faults into what a daemon sends (the Envoy fault filter /
// LevelDB EnvWrapper idea): flip a byte of a chosen data chunk, drop a chunk, or drop control
// messages of a kind; it also counts the data chunks it sends. Test-only.
#ifndef SPECTRUMKV_TESTS_TESTING_FAULT_TRANSPORT_H_
#define SPECTRUMKV_TESTS_TESTING_FAULT_TRANSPORT_H_

#include <atomic>
#include <cstring>
#include <memory>
#include <vector>

#include "daemon/transport/transport.h"

namespace spectrumkv::testing {

class FaultTransport final : public Transport {
 public:
  explicit FaultTransport(Transport& inner) : inner_(inner) {}

  // Flip one bit at `offset` within data chunk `index` of every transfer (-1: off).
  std::atomic<int> corrupt_chunk{-1};
  std::atomic<uint64_t> corrupt_offset{0};
  // Silently drop data chunk `index` (-1: off): it never arrives.
  std::atomic<int> drop_chunk{-1};
  // Drop every PeerAck this side sends.
  std::atomic<bool> drop_acks{false};
  // Data chunks sent (the prelude included), and the largest of them in bytes.
  std::atomic<uint64_t> data_chunks_sent{0};
  std::atomic<uint64_t> largest_chunk_bytes{0};

  absl::Status Start(TransportHandler* handler) override { return inner_.Start(handler); }
  void Shutdown() override { inner_.Shutdown(); }
  std::string kind() const override { return inner_.kind(); }
  std::string address() const override { return inner_.address(); }

  void SendControl(const std::string& peer, const v1::PeerMessage& message,
                   SendCallback done) override {
    if (drop_acks && message.has_ack()) {
      // Pretend it went out.
      inner_.SendControl("inproc://nobody", message,
                         [done](absl::Status) { done(absl::OkStatus()); });
      return;
    }
    inner_.SendControl(peer, message, std::move(done));
  }

  void SendData(const std::string& peer, const DataChunkHeader& header,
                std::span<const uint8_t> data, SendCallback done) override {
    ++data_chunks_sent;
    uint64_t largest = largest_chunk_bytes;
    while (data.size() > largest &&
           !largest_chunk_bytes.compare_exchange_weak(largest, data.size())) {
    }
    if (static_cast<int>(header.index) == drop_chunk) {
      inner_.SendControl("inproc://nobody", v1::PeerMessage(),
                         [done](absl::Status) { done(absl::OkStatus()); });
      return;
    }
    if (static_cast<int>(header.index) == corrupt_chunk) {
      auto copy = std::make_shared<std::vector<uint8_t>>(data.begin(), data.end());
      (*copy)[corrupt_offset % copy->size()] ^= 0x10;
      inner_.SendData(peer, header, *copy, [copy, done](absl::Status s) { done(s); });
      return;
    }
    inner_.SendData(peer, header, data, std::move(done));
  }

 private:
  Transport& inner_;
};

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_TESTING_FAULT_TRANSPORT_H_
