// The daemons' UCX transport alone, without codec, gRPC or checksums: how fast UcxTransport
// moves a payload cut into chunks, the way the transfer manager sends it (every chunk posted at
// once, each landing where the receiving handler names), between two transports of this
// process over loopback.
//
// Two buffer modes tell whether memory out of cache costs anything (ucx_perftest reuses one
// message buffer per side): "cold" walks each payload through a --region-mib region on both
// sides, so consecutive transfers touch different memory, as the daemons' staging arena does;
// "hot" sends every transfer from and into the same bytes. Medians of --rounds transfers per size,
// as GB/s of payload (first SendData call to the last chunk in place and every send completed).
// "stream" posts --rounds cold transfers back to back and counts all their bytes over the time
// until the last is in place (median of 3), as ucx_perftest streams its messages.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "daemon/transport/ucx/ucx_transport.h"

namespace spectrumkv {
namespace {

using Clock = std::chrono::steady_clock;

// Counts the chunks of the transfers in flight; a chunk of transfer t lands in the base given for
// t, at its offset.
class Sink final : public TransportHandler {
 public:
  void Expect(uint64_t transfer_id, uint8_t* base, uint32_t chunks) {
    std::lock_guard<std::mutex> lock(mu_);
    bases_[transfer_id] = base;
    left_ += chunks;
  }
  // True if every expected chunk was received without error within a minute.
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const bool all = cv_.wait_for(lock, std::chrono::seconds(60), [&] { return left_ == 0; });
    bases_.clear();
    left_ = 0;
    const bool ok = all && !failed_;
    failed_ = false;
    return ok;
  }
  void OnControl(const std::string&, const v1::PeerMessage&) override {}
  absl::StatusOr<std::span<uint8_t>> OnDataBegin(const std::string&,
                                                 const DataChunkHeader& h) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = bases_.find(h.transfer_id);
    if (it == bases_.end()) return absl::InvalidArgumentError("unexpected transfer");
    return std::span<uint8_t>(it->second + h.offset, h.size);
  }
  void OnDataEnd(const std::string&, const DataChunkHeader&, absl::Status status) override {
    std::lock_guard<std::mutex> lock(mu_);
    failed_ |= !status.ok();
    if (--left_ == 0) cv_.notify_all();
  }
  void OnPeerDown(const std::string& peer, const absl::Status& reason) override {
    std::fprintf(stderr, "transport_bench: peer %s down: %s\n", peer.c_str(),
                 reason.ToString().c_str());
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, uint8_t*> bases_;
  uint64_t left_ = 0;
  bool failed_ = false;
};

int Run(int argc, char** argv) {
  std::vector<uint64_t> sizes_mib = {16, 64, 256};
  uint64_t chunk_bytes = 4ull << 20, region_mib = 2048;
  std::string tls = "tcp";
  int rounds = 9, lanes = UcxTransportOptions{}.lanes, idle_ms = 0;
  bool json = false;
  CLI::App app{
      "The UCX transport alone: chunked payloads between two transports on loopback, "
      "from cold and from hot buffers (docs/BENCHMARKS.md)"};
  app.add_option("--sizes", sizes_mib, "Payload sizes, MiB")->capture_default_str();
  app.add_option("--chunk-bytes", chunk_bytes, "Chunk size, bytes")->capture_default_str();
  app.add_option("--region-mib", region_mib, "Cold mode: region each side walks through, MiB")
      ->capture_default_str();
  app.add_option("--tls", tls, "UCX transports (UCX_TLS)")->capture_default_str();
  app.add_option("--lanes", lanes, "UCX lanes (workers and connections) of each transport")
      ->capture_default_str()
      ->check(CLI::Range(1, UcxTransportOptions::kMaxLanes));
  app.add_option("--rounds", rounds, "Transfers per size and mode (median)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  app.add_option("--idle-ms", idle_ms,
                 "Idle time before each cold and hot transfer, ms (as between deliveries)")
      ->capture_default_str()
      ->check(CLI::Range(0, 10000));
  app.add_flag("--json", json, "Print JSON");
  CLI11_PARSE(app, argc, argv);
  const uint64_t largest =
      sizes_mib.empty() ? 0 : *std::max_element(sizes_mib.begin(), sizes_mib.end()) << 20;
  if (sizes_mib.empty() || chunk_bytes == 0 || (region_mib << 20) < largest) {
    std::fprintf(stderr,
                 "transport_bench: need sizes, a chunk size, and a region >= the largest "
                 "size\n");
    return 2;
  }

  UcxTransportOptions options;
  options.listen_address = "127.0.0.1:0";
  options.tls = tls;
  options.lanes = lanes;
  Sink sender_sink, sink;
  auto tx = UcxTransport::Create(options);
  auto rx = UcxTransport::Create(options);
  if (!tx.ok() || !rx.ok()) {
    std::fprintf(stderr, "transport_bench: %s\n",
                 (tx.ok() ? rx.status() : tx.status()).ToString().c_str());
    return 1;
  }
  if (absl::Status s = (*tx)->Start(&sender_sink); !s.ok()) return 1;
  if (absl::Status s = (*rx)->Start(&sink); !s.ok()) return 1;
  const std::string peer = (*rx)->address();

  // Both regions written once, so no transfer takes a page fault.
  const uint64_t region = region_mib << 20;
  std::vector<uint8_t> src(region), dst(region);
  for (uint64_t i = 0; i < region; i += 4096) src[i] = static_cast<uint8_t>(i >> 12);
  std::memset(dst.data(), 0, region);

  // Posts every chunk of one transfer of `size` bytes per offset in `ats` (the transfers follow
  // each other on the connection, with no gap), waits for all; the seconds it took, or -1.
  uint64_t transfer_id = 0;
  auto transfers = [&](uint64_t size, const std::vector<uint64_t>& ats) -> double {
    std::vector<std::pair<DataChunkHeader, uint64_t>> chunks;  // header, offset of its transfer
    for (uint64_t at : ats) {
      uint32_t index = 0;
      for (uint64_t off = 0; off < size; off += chunk_bytes) {
        DataChunkHeader h;
        h.transfer_id = transfer_id;
        h.index = index++;
        h.offset = off;
        h.size = std::min(chunk_bytes, size - off);
        chunks.emplace_back(h, at);
      }
      sink.Expect(transfer_id, dst.data() + at, index);
      ++transfer_id;
    }
    std::mutex mu;
    std::condition_variable cv;
    size_t sends_left = chunks.size();
    bool send_failed = false;
    const auto t0 = Clock::now();
    for (const auto& [h, at] : chunks) {
      (*tx)->SendData(peer, h, std::span<const uint8_t>(src.data() + at + h.offset, h.size),
                      [&](absl::Status s) {
                        std::lock_guard<std::mutex> lock(mu);
                        send_failed |= !s.ok();
                        if (--sends_left == 0) cv.notify_all();
                      });
    }
    const bool received = sink.Wait();
    {
      std::unique_lock<std::mutex> lock(mu);
      // The send callbacks use this frame: never leave it while one may still run.
      if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return sends_left == 0; })) {
        std::fprintf(stderr, "transport_bench: sends did not complete within a minute\n");
        std::_Exit(1);
      }
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!received || send_failed) return -1;
    return seconds;
  };
  auto transfer = [&](uint64_t size, uint64_t at) { return transfers(size, {at}); };
  auto idle = [&] { std::this_thread::sleep_for(std::chrono::milliseconds(idle_ms)); };

  // Warm-up: connection set-up, UCX's first-use costs, and the sockets' buffer autotuning
  // (measured: a first 16 MiB size ran at about half the speed after a single warm-up transfer).
  for (int i = 0; i < 16; ++i) {
    if (transfer(std::min<uint64_t>(largest, 64ull << 20), 0) < 0) {
      std::fprintf(stderr, "transport_bench: a warm-up transfer failed\n");
      return 1;
    }
  }
  struct Row {
    uint64_t mib;
    double cold_gbps, hot_gbps, stream_gbps;
  };
  std::vector<Row> rows;
  for (uint64_t mib : sizes_mib) {
    const uint64_t size = mib << 20;
    std::vector<double> cold, hot, stream;
    uint64_t at = 0;
    auto next_at = [&] {
      at = at + size <= region ? at : 0;
      const uint64_t here = at;
      at += size;
      return here;
    };
    for (int r = 0; r < rounds; ++r) {
      // Alternate the modes so that drifts of a shared machine hit all alike. The stream is
      // `rounds` cold transfers posted back to back.
      idle();
      const double c = transfer(size, next_at());
      idle();
      const double h = transfer(size, 0);
      double st = 0;
      if (r < 3) {
        std::vector<uint64_t> ats;
        for (int k = 0; k < rounds; ++k) ats.push_back(next_at());
        st = transfers(size, ats);
      }
      if (c < 0 || h < 0 || st < 0) {
        std::fprintf(stderr, "transport_bench: a %lu MiB transfer failed\n",
                     static_cast<unsigned long>(mib));
        return 1;
      }
      cold.push_back(double(size) / c / 1e9);
      hot.push_back(double(size) / h / 1e9);
      if (r < 3) stream.push_back(double(size) * rounds / st / 1e9);
    }
    auto median = [](std::vector<double>& v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    rows.push_back({mib, median(cold), median(hot), median(stream)});
  }
  (*tx)->Shutdown();
  (*rx)->Shutdown();

  if (json) {
    std::printf(
        "{\"tls\": \"%s\", \"lanes\": %d, \"chunk_bytes\": %lu, \"rounds\": %d, \"idle_ms\": %d, "
        "\"rows\": [",
        tls.c_str(), lanes, static_cast<unsigned long>(chunk_bytes), rounds, idle_ms);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::printf(
          "%s{\"size_mib\": %lu, \"cold_Bps\": %.0f, \"hot_Bps\": %.0f, \"stream_Bps\": %.0f}",
          i ? ", " : "", static_cast<unsigned long>(rows[i].mib), rows[i].cold_gbps * 1e9,
          rows[i].hot_gbps * 1e9, rows[i].stream_gbps * 1e9);
    }
    std::printf("]}\n");
  } else {
    std::printf(
        "UcxTransport alone, UCX_TLS=%s, %d lane(s), %lu-byte chunks, medians of %d, %d ms idle "
        "before each cold and hot transfer\n",
        tls.c_str(), lanes, static_cast<unsigned long>(chunk_bytes), rounds, idle_ms);
    std::printf("%9s %14s %14s %14s\n", "size", "cold GB/s", "hot GB/s", "stream GB/s");
    for (const Row& r : rows) {
      std::printf("%5lu MiB %14.2f %14.2f %14.2f\n", static_cast<unsigned long>(r.mib), r.cold_gbps,
                  r.hot_gbps, r.stream_gbps);
    }
  }
  return 0;
}

}  // namespace
}  // namespace spectrumkv

int main(int argc, char** argv) { return spectrumkv::Run(argc, argv); }
