#include "daemon/transport/inproc_transport.h"

#include <cstring>
#include <map>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "daemon/common/executor.h"

namespace spectrumkv {
namespace {

constexpr char kScheme[] = "inproc://";

// The started instances of this process, by name. Guarded by Registry().mu.
struct InstanceRegistry {
  absl::Mutex mu;
  std::map<std::string, InprocTransport*> by_name ABSL_GUARDED_BY(mu);
  std::map<std::string, std::shared_ptr<Executor>> delivery ABSL_GUARDED_BY(mu);
  std::map<std::string, TransportHandler*> handlers ABSL_GUARDED_BY(mu);
};

InstanceRegistry& Registry() {
  static auto* r = new InstanceRegistry();
  return *r;
}

std::string NameOf(const std::string& address) {
  if (address.rfind(kScheme, 0) != 0) return "";
  return address.substr(sizeof(kScheme) - 1);
}

}  // namespace

InprocTransport::InprocTransport(std::string name) : name_(std::move(name)) {}

InprocTransport::~InprocTransport() { Shutdown(); }

absl::Status InprocTransport::Start(TransportHandler* handler) {
  if (name_.empty()) return absl::InvalidArgumentError("inproc transport needs a name");
  InstanceRegistry& r = Registry();
  absl::MutexLock lock(&r.mu);
  if (r.by_name.count(name_)) {
    return absl::AlreadyExistsError(
        absl::StrFormat("an inproc transport named \"%s\" is already started", name_));
  }
  handler_ = handler;
  delivery_ = std::make_shared<Executor>(1, "skv-inproc");
  r.by_name[name_] = this;
  r.delivery[name_] = delivery_;
  r.handlers[name_] = handler;
  return absl::OkStatus();
}

void InprocTransport::Shutdown() {
  InstanceRegistry& r = Registry();
  std::map<std::string, std::shared_ptr<Executor>> others;
  {
    absl::MutexLock lock(&r.mu);
    auto it = r.by_name.find(name_);
    if (it == r.by_name.end() || it->second != this) return;
    r.by_name.erase(it);
    r.delivery.erase(name_);
    r.handlers.erase(name_);
    others = r.delivery;
  }
  // Everyone else sees this peer go down, as if the process had died. Those notifications also
  // act as a barrier: once they have run, every delivery this instance queued on the others has
  // run too, so no callback of ours can start after our own queue is drained below.
  const std::string me = address();
  absl::Mutex barrier_mu;
  size_t pending = 0;
  for (const auto& [name, exec] : others) {
    const bool posted = exec->Post([me, name = name, &barrier_mu, &pending] {
      InstanceRegistry& reg = Registry();
      TransportHandler* h = nullptr;
      {
        absl::MutexLock lock(&reg.mu);
        auto it = reg.handlers.find(name);
        if (it != reg.handlers.end()) h = it->second;
      }
      if (h != nullptr) h->OnPeerDown(me, absl::UnavailableError("inproc peer shut down"));
      absl::MutexLock lock(&barrier_mu);
      --pending;
    });
    if (posted) {
      absl::MutexLock lock(&barrier_mu);
      ++pending;
    }
  }
  {
    absl::MutexLock lock(&barrier_mu);
    barrier_mu.Await(absl::Condition(
        +[](size_t* p) { return *p == 0; }, &pending));
  }
  delivery_->Shutdown();
}

void InprocTransport::DeliverTo(const std::string& peer, std::function<void(TransportHandler*)> fn,
                                SendCallback done) {
  SPECTRUMKV_CHECK_MSG(delivery_ != nullptr, "InprocTransport used before Start");
  std::shared_ptr<Executor> own = delivery_;
  auto done_ptr = std::make_shared<SendCallback>(std::move(done));
  bool queued = false;
  {
    InstanceRegistry& r = Registry();
    const std::string name = NameOf(peer);
    absl::MutexLock lock(&r.mu);
    auto exec = r.delivery.find(name);
    if (exec != r.delivery.end()) {
      TransportHandler* target = r.handlers[name];
      queued = exec->second->Post([fn = std::move(fn), target, own, done_ptr] {
        fn(target);
        if (!own->Post([done_ptr] { (*done_ptr)(absl::OkStatus()); })) {
          (*done_ptr)(absl::UnavailableError("sender shut down"));
        }
      });
    }
  }
  if (!queued) {
    const absl::Status s =
        absl::UnavailableError(absl::StrFormat("no inproc peer %s is running", peer));
    if (!own->Post([done_ptr, s] { (*done_ptr)(s); })) (*done_ptr)(s);
  }
}

void InprocTransport::SendControl(const std::string& peer, const v1::PeerMessage& message,
                                  SendCallback done) {
  const std::string from = address();
  DeliverTo(
      peer, [from, message](TransportHandler* h) { h->OnControl(from, message); }, std::move(done));
}

void InprocTransport::SendData(const std::string& peer, const DataChunkHeader& header,
                               std::span<const uint8_t> data, SendCallback done) {
  const std::string from = address();
  // `done` follows whether or not the receiver took the chunk: the bytes have left the sender's
  // buffer either way.
  DeliverTo(
      peer,
      [from, header, data](TransportHandler* h) {
        absl::StatusOr<std::span<uint8_t>> dst = h->OnDataBegin(from, header);
        if (!dst.ok()) return;
        absl::Status s = absl::OkStatus();
        if (dst->size() != header.size) {
          s = absl::InternalError("receiver offered a buffer of the wrong size");
        } else {
          std::memcpy(dst->data(), data.data(), header.size);
        }
        h->OnDataEnd(from, header, s);
      },
      std::move(done));
}

}  // namespace spectrumkv
