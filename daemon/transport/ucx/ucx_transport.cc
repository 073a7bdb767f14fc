#include "daemon/transport/ucx/ucx_transport.h"

#include <netdb.h>
#include <netinet/in.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "common/status.h"
#include "kernels/api/wire_format.h"

namespace spectrumkv {
namespace {

constexpr char kScheme[] = "ucx://";
constexpr unsigned kAmControl = 1;
constexpr unsigned kAmData = 2;
constexpr uint16_t kHeaderMagic = 0x4B53;  // "SK"
constexpr size_t kDataHeaderBytes = 40;

// What a data chunk held for a connection that closed is told.
absl::Status ConnectionClosed(const std::string& peer) {
  return absl::UnavailableError("the connection to " + peer + " was closed");
}

absl::Status FromUcs(ucs_status_t s, const std::string& what) {
  if (s == UCS_OK) return absl::OkStatus();
  return absl::UnavailableError(absl::StrFormat("%s: %s", what, ucs_status_string(s)));
}

// "host:port" -> (host, port). False if malformed.
bool SplitHostPort(const std::string& s, std::string* host, uint16_t* port) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 >= s.size()) return false;
  *host = s.substr(0, colon);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  char* end = nullptr;
  const unsigned long p = std::strtoul(s.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || p > 65535) return false;
  *port = static_cast<uint16_t>(p);
  return true;
}

absl::Status Resolve(const std::string& host, uint16_t port, bool passive, sockaddr_storage* out,
                     socklen_t* len) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    return absl::UnavailableError(absl::StrFormat("cannot resolve %s: %s", host, gai_strerror(rc)));
  }
  std::memcpy(out, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return absl::OkStatus();
}

// Header of every active message: magic, version, kind, the sender's address, the sender's
// stream (an epoch per outbound endpoint and a sequence number in it, so the receiver can
// restore the sending order, which UCX does not keep between eager and rendezvous messages), the
// sender's origin (random per transport life) with an order number (control: its number among
// the control messages to this peer; data: its fence, the number of the last control message
// sent to this peer before it), and for data the chunk framing. Little-endian.
constexpr uint8_t kHeaderVersion = 2;
constexpr size_t kFixedHeaderBytes = 38;

struct ParsedHeader {
  uint8_t kind = 0;
  std::string sender;
  uint64_t epoch = 0;
  uint64_t seq = 0;
  uint64_t origin = 0;
  uint64_t order = 0;
  DataChunkHeader data;
};

std::string EncodeHeader(const ParsedHeader& m) {
  const bool data = m.kind == kAmData;
  std::string h(kFixedHeaderBytes + m.sender.size() + (data ? kDataHeaderBytes : 0), '\0');
  auto* p = reinterpret_cast<uint8_t*>(h.data());
  StoreLe16(p, kHeaderMagic);
  p[2] = kHeaderVersion;
  p[3] = m.kind;
  StoreLe16(p + 4, static_cast<uint16_t>(m.sender.size()));
  StoreLe64(p + 6, m.epoch);
  StoreLe64(p + 14, m.seq);
  StoreLe64(p + 22, m.origin);
  StoreLe64(p + 30, m.order);
  std::memcpy(p + kFixedHeaderBytes, m.sender.data(), m.sender.size());
  if (data) {
    uint8_t* d = p + kFixedHeaderBytes + m.sender.size();
    StoreLe64(d, m.data.transfer_id);
    StoreLe32(d + 8, m.data.index);
    StoreLe32(d + 12, m.data.first_layer);
    StoreLe32(d + 16, m.data.last_layer);
    StoreLe32(d + 20, 0);
    StoreLe64(d + 24, m.data.offset);
    StoreLe64(d + 32, m.data.size);
  }
  return h;
}

// Never trusts a length it has not checked.
bool DecodeHeader(const void* header, size_t length, ParsedHeader* out) {
  const auto* p = static_cast<const uint8_t*>(header);
  if (length < kFixedHeaderBytes || LoadLe16(p) != kHeaderMagic || p[2] != kHeaderVersion) {
    return false;
  }
  out->kind = p[3];
  const size_t sender_len = LoadLe16(p + 4);
  out->epoch = LoadLe64(p + 6);
  out->seq = LoadLe64(p + 14);
  out->origin = LoadLe64(p + 22);
  out->order = LoadLe64(p + 30);
  if (sender_len == 0 || kFixedHeaderBytes + sender_len > length) return false;
  out->sender.assign(reinterpret_cast<const char*>(p + kFixedHeaderBytes), sender_len);
  if (out->kind == kAmData) {
    if (length != kFixedHeaderBytes + sender_len + kDataHeaderBytes) return false;
    const uint8_t* d = p + kFixedHeaderBytes + sender_len;
    out->data.transfer_id = LoadLe64(d);
    out->data.index = LoadLe32(d + 8);
    out->data.first_layer = LoadLe32(d + 12);
    out->data.last_layer = LoadLe32(d + 16);
    out->data.offset = LoadLe64(d + 24);
    out->data.size = LoadLe64(d + 32);
    return true;
  }
  return out->kind == kAmControl && length == kFixedHeaderBytes + sender_len;
}

// UCX 1.13's new protocol stack (`PROTO_ENABLE`, experimental there and off by default) aborts
// the process in connection set-up under this transport's traffic (an assertion in
// proto_reconfig.c while wire-up replays the pending sends, seen with transport_bench; a transfer
// between two daemons with it never finished): refuse it, from the configuration or the
// environment, before anything is set.
absl::Status CheckProtocolStack(const UcxTransportOptions& options) {
  unsigned major = 0, minor = 0, release = 0;
  ucp_get_version(&major, &minor, &release);
  if (major != 1 || minor > 13) return absl::OkStatus();
  std::string value;
  if (auto it = options.ucx_options.find("PROTO_ENABLE"); it != options.ucx_options.end()) {
    value = it->second;
  } else if (const char* env = std::getenv("UCX_PROTO_ENABLE"); env != nullptr) {
    value = env;
  } else {
    return absl::OkStatus();
  }
  const std::string v = absl::AsciiStrToLower(value);
  if (v != "y" && v != "yes" && v != "on" && v != "1") return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "UCX PROTO_ENABLE=%s: UCX %u.%u's new protocols abort in connection set-up with this "
      "transport; leave PROTO_ENABLE unset (transport.ucx_options, UCX_PROTO_ENABLE)",
      value, major, minor));
}

// Unique per connection and per process life.
uint64_t SplitMix(uint64_t* seed) {
  *seed += 0x9E3779B97F4A7C15ull;
  uint64_t z = *seed;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

struct UcxTransport::Impl {
  struct Lane;
  using StreamKey = std::pair<std::string, uint64_t>;  // (sender, epoch): one connection
  struct Endpoint {
    Lane* lane = nullptr;
    ucp_ep_h ep = nullptr;
    std::string peer;  // known for outbound; learned from messages for inbound
    bool outbound = false;
    bool closed = false;
    uint64_t epoch = 0;     // outbound: this connection's stream id
    uint64_t next_seq = 0;  // outbound: sequence number of the next message
    // Inbound: the sender streams and origins that arrived on it, forgotten when it fails (and
    // only those: a restarted sender's new connection may already be talking).
    std::set<StreamKey> streams;
    std::set<uint64_t> origins;
  };
  // An operation handed to a lane's progress thread.
  struct Op {
    enum class Kind { kControl, kData, kAccept, kResume, kComplete } kind = Kind::kControl;
    std::string peer;
    uint64_t order = 0;                // control: its number; data: its fence
    DataChunkHeader chunk;             // data
    std::string header;                // encoded when the endpoint is known
    std::string control;               // serialized PeerMessage (control)
    std::span<const uint8_t> payload;  // data: the caller keeps it valid until done
    SendCallback done;
    ucp_conn_request_h conn = nullptr;  // accept: a connection the listener handed over
    StreamKey stream;                   // resume: a stream whose fence opened
    absl::Status result;                // complete: what `done` is told
  };
  // A message that arrived ahead of its turn (or whose fence is closed): its rendezvous
  // descriptor or a copy of its bytes.
  struct Early {
    ParsedHeader header;
    bool rndv = false;
    void* desc = nullptr;
    size_t length = 0;
    std::string bytes;
  };
  // One sender connection's messages, restored to their sending order.
  struct InboundStream {
    uint64_t expected = 0;
    std::map<uint64_t, Early> early;
  };
  struct SendRequest {
    Lane* lane;
    Op op;
  };
  struct RecvRequest {
    Lane* lane;
    std::string peer;
    ParsedHeader header;
    std::string buffer;  // control messages received by rendezvous
  };
  // What one sender (one process life: sender address and origin) has had delivered of its
  // control messages, and the streams waiting for more.
  struct Parked {
    Lane* lane;
    StreamKey stream;
    uint64_t fence;
  };
  struct SenderOrder {
    uint64_t delivered = 0;  // the highest control number delivered
    std::vector<Parked> parked;
  };
  // What this side has sent to one peer.
  struct PeerOut {
    uint64_t controls = 0;  // control messages numbered so far
    size_t next_lane = 0;   // where the next data chunk goes
  };

  struct Lane {
    Impl* impl = nullptr;
    int index = 0;
    ucp_worker_h worker = nullptr;
    int worker_fd = -1, event_fd = -1, epoll_fd = -1;
    std::thread thread;

    // Held by whoever drives the UCX worker (and the state below): the lane's thread, except
    // while it sleeps in epoll_wait, or a thread that sends on the lane directly (TrySend).
    absl::Mutex worker_mu;  // before mu
    absl::Mutex mu;
    std::deque<Op> queue ABSL_GUARDED_BY(mu);
    bool stopping ABSL_GUARDED_BY(mu) = false;

    // Progress state: used under worker_mu only.
    struct DataFlow {
      uint32_t in_flight = 0;  // data sends posted to UCX and not completed
      std::deque<Op> held;     // data sends waiting for one of those to complete
    };
    std::map<std::string, DataFlow> flows;  // by peer
    std::map<std::string, Endpoint*> outbound;
    std::set<Endpoint*> endpoints;  // every live endpoint, inbound and outbound
    uint64_t closing = 0;           // endpoint closes in flight
    std::map<StreamKey, InboundStream> streams;

    ~Lane() {
      if (worker) ucp_worker_destroy(worker);
      if (event_fd >= 0) close(event_fd);
      if (epoll_fd >= 0) close(epoll_fd);
    }

    absl::Status Init();
    void Wake() {
      const uint64_t one = 1;
      (void)!write(event_fd, &one, sizeof(one));
    }
    // Queues `op` for this lane's thread; false (and `op` untouched) once the lane stops.
    bool Push(Op& op) {
      absl::MutexLock lock(&mu);
      if (stopping) return false;
      queue.push_back(std::move(op));
      Wake();
      return true;
    }
    void Stop() {
      absl::MutexLock lock(&mu);
      stopping = true;
      Wake();
    }
    // Sends `op` (a message to a peer already connected on this lane) from the calling thread
    // when nobody drives the worker and nothing is queued before it, i.e. the lane's thread is
    // asleep: the message leaves without waiting for that thread to wake. False (and `op`
    // untouched) otherwise; the caller queues it.
    bool TrySend(Op& op);

    void Loop();
    Endpoint* Connect(const std::string& peer, absl::Status* error);
    void Execute(Op op);
    // Sends `op` on `e` (this lane's connection to op.peer). A data chunk joins the peer's held
    // chunks and goes when its turn comes (PumpData): a peer's chunks are held only while
    // chunks_in_flight are in flight, and whatever ends one of those (OnSendDone, PostNow's
    // immediate completion inside PumpData's loop) pumps. A completion known at once goes to
    // Complete.
    void Post(Endpoint* e, Op op, bool on_lane_thread);
    // Sends `op` on `e` now (a data chunk: counted in flight by the caller).
    void PostNow(Endpoint* e, Op op, bool on_lane_thread);
    // Calls `done`: here on the lane's thread; on a caller's thread it is handed to the lane's
    // thread (kComplete), never run inside the caller's Send*.
    void Complete(SendCallback done, absl::Status status, bool on_lane_thread);
    // Posts `peer`'s waiting data chunks while fewer than chunks_in_flight are in flight.
    void PumpData(const std::string& peer, bool on_lane_thread);
    void Accept(ucp_conn_request_h conn);
    static void OnSendDone(void* request, ucs_status_t status, void* user_data);
    static void OnEndpointError(void* arg, ucp_ep_h, ucs_status_t status);
    void CloseEndpoint(Endpoint* e, bool force);
    static void OnClosed(void* request, ucs_status_t, void* user_data);
    static void OnConnRequest(ucp_conn_request_h conn, void* arg);
    void NoteSender(const ucp_am_recv_param_t* param, const ParsedHeader& h);
    static ucs_status_t OnAm(void* arg, const void* header, size_t header_length, void* data,
                             size_t length, const ucp_am_recv_param_t* param);
    void Drain(const StreamKey& key);
    void Process(Early& m, bool in_callback);
    void DropStreams(const Endpoint& e);
    static void OnRecvDone(void* request, ucs_status_t status, size_t, void* user_data);
    void Deliver(RecvRequest* req, absl::Status status);
    void ShutdownOnThread();
  };

  ucp_context_h context = nullptr;
  ucp_listener_h listener = nullptr;  // on lane 0
  std::string address;
  uint64_t origin = 0;
  TransportHandler* handler = nullptr;
  std::vector<std::unique_ptr<Lane>> lanes;
  // Data chunks posted to UCX at once per peer and lane (UcxTransportOptions::chunks_in_flight);
  // the rest wait in order.
  uint32_t chunks_in_flight = 2;
  size_t next_accept = 0;  // lane 0's thread: where the next accepted connection goes

  absl::Mutex mu;  // before any lane's mu
  bool stopping ABSL_GUARDED_BY(mu) = false;
  bool started ABSL_GUARDED_BY(mu) = false;
  std::map<std::string, PeerOut> peers ABSL_GUARDED_BY(mu);
  uint64_t epoch_seed ABSL_GUARDED_BY(mu) = 0;

  absl::Mutex order_mu;
  std::map<std::pair<std::string, uint64_t>, SenderOrder> orders ABSL_GUARDED_BY(order_mu);
  // The origin (process life) each sender was last heard from under.
  std::map<std::string, uint64_t> current_origin ABSL_GUARDED_BY(order_mu);

  ~Impl() {
    // Lane 0's thread destroys the listener when it stops; a transport never started still has
    // it. Workers go before the context.
    if (listener) ucp_listener_destroy(listener);
    lanes.clear();
    if (context) ucp_cleanup(context);
  }

  uint64_t NextEpoch() {
    absl::MutexLock lock(&mu);
    return SplitMix(&epoch_seed);
  }

  // Numbers a control message or fences a chunk, and queues it: control messages on lane 0 in
  // their numbering order, chunks on the lanes in turn.
  void Submit(Op op) {
    {
      absl::MutexLock lock(&mu);
      if (!stopping && started) {
        PeerOut& out = peers[op.peer];
        Lane* lane = lanes[0].get();
        if (op.kind == Op::Kind::kControl) {
          op.order = ++out.controls;
        } else {
          op.order = out.controls;
          lane = lanes[out.next_lane++ % lanes.size()].get();
        }
        // Sent from here while holding `mu`, so messages still leave in their numbering order.
        if (lane->TrySend(op) || lane->Push(op)) return;
      }
    }
    // Not running: fail on a thread of our own, never inside the caller's Send*.
    std::thread([done = std::move(op.done)] {
      done(absl::UnavailableError("the UCX transport is not running"));
    }).detach();
  }

  // Whether every control message a data chunk is fenced behind has been delivered; if not,
  // `lane` is told (kResume) when it has.
  bool FenceOpen(Lane* lane, const StreamKey& key, const ParsedHeader& h) {
    if (h.kind != kAmData || h.order == 0) return true;
    absl::MutexLock lock(&order_mu);
    SenderOrder& o = orders[{h.sender, h.origin}];
    if (h.order <= o.delivered) return true;
    if (o.parked.size() < 4096) o.parked.push_back({lane, key, h.order});
    return false;
  }

  // Control message `number` of (sender, origin) was delivered: resumes what waited for it.
  void ControlDelivered(const ParsedHeader& h) {
    std::vector<Parked> ready;
    {
      absl::MutexLock lock(&order_mu);
      SenderOrder& o = orders[{h.sender, h.origin}];
      o.delivered = std::max(o.delivered, h.order);
      auto keep = std::partition(o.parked.begin(), o.parked.end(),
                                 [&](const Parked& p) { return p.fence > o.delivered; });
      ready.assign(keep, o.parked.end());
      o.parked.erase(keep, o.parked.end());
    }
    for (Parked& p : ready) {
      Op op;
      op.kind = Op::Kind::kResume;
      op.stream = std::move(p.stream);
      p.lane->Push(op);  // a stopping lane releases what it holds itself
    }
  }

  void ForgetOrigins(const std::string& sender, const std::set<uint64_t>& origins) {
    absl::MutexLock lock(&order_mu);
    for (uint64_t o : origins) orders.erase({sender, o});
    auto it = current_origin.find(sender);
    if (it != current_origin.end() && origins.count(it->second)) current_origin.erase(it);
  }

  void NoteOrigin(const std::string& sender, uint64_t o) {
    absl::MutexLock lock(&order_mu);
    current_origin[sender] = o;
  }

  // Whether an inbound connection carried only earlier lives of its sender than the one last
  // heard from (its failure is then old news, not the sender going down).
  bool Stale(const std::string& sender, const std::set<uint64_t>& origins) {
    absl::MutexLock lock(&order_mu);
    auto it = current_origin.find(sender);
    return !origins.empty() && it != current_origin.end() && !origins.count(it->second);
  }
};

using Impl = UcxTransport::Impl;

absl::Status Impl::Lane::Init() {
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  if (ucs_status_t s = ucp_worker_create(impl->context, &wp, &worker); s != UCS_OK) {
    return FromUcs(s, "ucp_worker_create");
  }
  if (ucs_status_t s = ucp_worker_get_efd(worker, &worker_fd); s != UCS_OK) {
    return FromUcs(s, "ucp_worker_get_efd");
  }
  for (unsigned id : {kAmControl, kAmData}) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = id;
    hp.cb = &Lane::OnAm;
    hp.arg = this;
    if (ucs_status_t s = ucp_worker_set_am_recv_handler(worker, &hp); s != UCS_OK) {
      return FromUcs(s, "ucp_worker_set_am_recv_handler");
    }
  }
  event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  if (event_fd < 0 || epoll_fd < 0) {
    return absl::UnavailableError("cannot create the transport's event descriptors");
  }
  for (int fd : {worker_fd, event_fd}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
      return absl::UnavailableError("epoll_ctl failed");
    }
  }
  return absl::OkStatus();
}

// --- progress threads ------------------------------------------------------------------------

bool Impl::Lane::TrySend(Op& op) {
  if (!worker_mu.TryLock()) return false;
  bool sent = false;
  {
    absl::MutexLock lock(&mu);
    sent = !stopping && queue.empty();
  }
  auto it = outbound.find(op.peer);
  sent = sent && it != outbound.end();
  if (sent) Post(it->second, std::move(op), /*on_lane_thread=*/false);
  worker_mu.Unlock();
  // The lane's thread armed the worker before this send: it runs a progress round for it.
  if (sent) Wake();
  return sent;
}

void Impl::Lane::Loop() {
  pthread_setname_np(pthread_self(), absl::StrFormat("skv-ucx%d", index).c_str());
  for (;;) {
    std::deque<Op> ops;
    bool stop = false;
    absl::ReleasableMutexLock driving(&worker_mu);
    {
      absl::MutexLock lock(&mu);
      ops.swap(queue);
      stop = stopping;
    }
    for (Op& op : ops) Execute(std::move(op));
    if (stop) break;
    while (ucp_worker_progress(worker) != 0) {
    }
    const ucs_status_t armed = ucp_worker_arm(worker);
    driving.Release();
    if (armed == UCS_ERR_BUSY) continue;
    epoll_event events[2];
    const int n = epoll_wait(epoll_fd, events, 2, 1000);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == event_fd) {
        uint64_t v;
        (void)!read(event_fd, &v, sizeof(v));
      }
    }
  }
  ShutdownOnThread();
}

Impl::Endpoint* Impl::Lane::Connect(const std::string& peer, absl::Status* error) {
  auto it = outbound.find(peer);
  if (it != outbound.end()) return it->second;
  std::string host;
  uint16_t port = 0;
  if (peer.rfind(kScheme, 0) != 0 ||
      !SplitHostPort(peer.substr(sizeof(kScheme) - 1), &host, &port)) {
    *error = absl::InvalidArgumentError(
        absl::StrFormat("peer \"%s\" is not a UCX address (ucx://host:port)", peer));
    return nullptr;
  }
  sockaddr_storage addr;
  socklen_t len;
  *error = Resolve(host, port, false, &addr, &len);
  if (!error->ok()) return nullptr;
  auto* e = new Endpoint;
  e->lane = this;
  e->peer = peer;
  e->outbound = true;
  e->epoch = impl->NextEpoch();
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  p.sockaddr.addrlen = len;
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = &OnEndpointError;
  p.err_handler.arg = e;
  const ucs_status_t s = ucp_ep_create(worker, &p, &e->ep);
  if (s != UCS_OK) {
    delete e;
    *error = FromUcs(s, "connecting to " + peer);
    return nullptr;
  }
  outbound[peer] = e;
  endpoints.insert(e);
  return e;
}

void Impl::Lane::Execute(Op op) {
  if (op.kind == Op::Kind::kAccept) {
    Accept(op.conn);
    return;
  }
  if (op.kind == Op::Kind::kResume) {
    Drain(op.stream);
    return;
  }
  if (op.kind == Op::Kind::kComplete) {
    op.done(op.result);
    return;
  }
  absl::Status error;
  Endpoint* e = Connect(op.peer, &error);
  if (e == nullptr) {
    op.done(error);
    return;
  }
  Post(e, std::move(op), /*on_lane_thread=*/true);
}

void Impl::Lane::Post(Endpoint* e, Op op, bool on_lane_thread) {
  if (op.kind == Op::Kind::kData) {
    const std::string peer = op.peer;
    flows[peer].held.push_back(std::move(op));
    PumpData(peer, on_lane_thread);
    return;
  }
  PostNow(e, std::move(op), on_lane_thread);
}

void Impl::Lane::PostNow(Endpoint* e, Op op, bool on_lane_thread) {
  const bool data = op.kind == Op::Kind::kData;
  ParsedHeader h;
  h.kind = data ? kAmData : kAmControl;
  h.sender = impl->address;
  h.epoch = e->epoch;
  h.seq = e->next_seq++;
  h.origin = impl->origin;
  h.order = op.order;
  if (data) h.data = op.chunk;
  op.header = EncodeHeader(h);
  auto* req = new SendRequest{this, std::move(op)};
  ucp_request_param_t rp{};
  rp.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  rp.cb.send = &OnSendDone;
  rp.user_data = req;
  rp.flags = UCP_AM_SEND_FLAG_REPLY;
  const void* buffer;
  size_t length;
  if (data) {
    buffer = req->op.payload.data();
    length = req->op.payload.size();
    // Large chunks by rendezvous: the receiver pulls them into its own buffer.
    if (length >= (64u << 10)) rp.flags |= UCP_AM_SEND_FLAG_RNDV;
  } else {
    buffer = req->op.control.data();
    length = req->op.control.size();
  }
  const ucs_status_ptr_t r = ucp_am_send_nbx(e->ep, h.kind, req->op.header.data(),
                                             req->op.header.size(), buffer, length, &rp);
  spdlog::debug("ucx{}: send {} bytes to {} ({}): {}", index, length, req->op.peer,
                data ? "data" : "control",
                r == nullptr ? "done" : (UCS_PTR_IS_ERR(r) ? "error" : "pending"));
  if (r != nullptr && !UCS_PTR_IS_ERR(r)) return;  // OnSendDone follows
  if (data) --flows[req->op.peer].in_flight;       // PumpData's loop posts the next
  Complete(std::move(req->op.done),
           r == nullptr ? absl::OkStatus() : FromUcs(UCS_PTR_STATUS(r), "send to " + req->op.peer),
           on_lane_thread);
  delete req;
}

void Impl::Lane::Complete(SendCallback done, absl::Status status, bool on_lane_thread) {
  if (on_lane_thread) {
    done(std::move(status));
    return;
  }
  Op complete;
  complete.kind = Op::Kind::kComplete;
  complete.done = std::move(done);
  complete.result = std::move(status);
  absl::MutexLock lock(&mu);
  queue.push_back(std::move(complete));  // the caller wakes the thread
}

void Impl::Lane::PumpData(const std::string& peer, bool on_lane_thread) {
  for (;;) {
    auto f = flows.find(peer);
    if (f == flows.end() || f->second.held.empty() ||
        f->second.in_flight >= impl->chunks_in_flight) {
      return;
    }
    Op op = std::move(f->second.held.front());
    f->second.held.pop_front();
    auto e = outbound.find(peer);
    if (e == outbound.end()) {
      Complete(std::move(op.done), ConnectionClosed(peer), on_lane_thread);
      continue;
    }
    ++f->second.in_flight;
    PostNow(e->second, std::move(op), on_lane_thread);
  }
}

void Impl::Lane::OnSendDone(void* request, ucs_status_t status, void* user_data) {
  auto* req = static_cast<SendRequest*>(user_data);
  Lane* lane = req->lane;
  spdlog::debug("ucx{}: send to {} completed: {}", lane->index, req->op.peer,
                ucs_status_string(status));
  if (req->op.kind == Op::Kind::kData) {
    --lane->flows[req->op.peer].in_flight;
    lane->PumpData(req->op.peer, /*on_lane_thread=*/true);
  }
  req->op.done(FromUcs(status, "send to " + req->op.peer));
  ucp_request_free(request);
  delete req;
}

void Impl::Lane::OnEndpointError(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* e = static_cast<Endpoint*>(arg);
  Lane* lane = e->lane;
  const std::string peer = e->peer;
  const bool stale = !e->outbound && lane->impl->Stale(peer, e->origins);
  if (!e->outbound) lane->DropStreams(*e);
  lane->CloseEndpoint(e, /*force=*/true);
  if (stale) {
    spdlog::debug("ucx{}: a connection from an earlier life of {} failed: {}", lane->index, peer,
                  ucs_status_string(status));
  } else if (!peer.empty() && lane->impl->handler != nullptr) {
    lane->impl->handler->OnPeerDown(peer, FromUcs(status, "UCX endpoint to " + peer));
  }
}

void Impl::Lane::CloseEndpoint(Endpoint* e, bool force) {
  if (e->closed) return;
  e->closed = true;
  if (e->outbound) {
    auto it = outbound.find(e->peer);
    if (it != outbound.end() && it->second == e) outbound.erase(it);
    // Data chunks still waiting for this connection fail with it (those in flight fail in UCX).
    if (auto f = flows.find(e->peer); f != flows.end()) {
      std::deque<Op> held;
      held.swap(f->second.held);
      for (Op& op : held) {
        op.done(ConnectionClosed(e->peer));
      }
    }
  }
  endpoints.erase(e);
  ucp_request_param_t p{};
  p.op_attr_mask =
      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  p.cb.send = &OnClosed;
  p.user_data = e;
  const ucs_status_ptr_t r = ucp_ep_close_nbx(e->ep, &p);
  if (r == nullptr || UCS_PTR_IS_ERR(r)) {
    delete e;
  } else {
    ++closing;
  }
}

void Impl::Lane::OnClosed(void* request, ucs_status_t, void* user_data) {
  auto* e = static_cast<Endpoint*>(user_data);
  --e->lane->closing;
  ucp_request_free(request);
  delete e;
}

// On lane 0's thread: hands the connection to the lanes in turn.
void Impl::Lane::OnConnRequest(ucp_conn_request_h conn, void* arg) {
  auto* lane0 = static_cast<Lane*>(arg);
  Impl* impl = lane0->impl;
  Lane* target = impl->lanes[impl->next_accept++ % impl->lanes.size()].get();
  if (target == lane0) {
    lane0->Accept(conn);
    return;
  }
  Op op;
  op.kind = Op::Kind::kAccept;
  op.conn = conn;
  if (!target->Push(op) && impl->listener != nullptr) ucp_listener_reject(impl->listener, conn);
}

void Impl::Lane::Accept(ucp_conn_request_h conn) {
  auto* e = new Endpoint;
  e->lane = this;
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                 UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_USER_DATA;
  p.conn_request = conn;
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = &OnEndpointError;
  p.err_handler.arg = e;
  p.user_data = e;
  if (ucp_ep_create(worker, &p, &e->ep) != UCS_OK) {
    delete e;
    return;
  }
  endpoints.insert(e);
}

// Learns which peer, streams and origins an inbound endpoint carries, so that its failure can
// be reported and its state forgotten.
void Impl::Lane::NoteSender(const ucp_am_recv_param_t* param, const ParsedHeader& h) {
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) || param->reply_ep == nullptr) {
    return;
  }
  for (Endpoint* e : endpoints) {
    if (e->ep == param->reply_ep) {
      if (e->peer.empty()) e->peer = h.sender;
      e->streams.emplace(h.sender, h.epoch);
      if (e->origins.insert(h.origin).second) impl->NoteOrigin(h.sender, h.origin);
      return;
    }
  }
}

ucs_status_t Impl::Lane::OnAm(void* arg, const void* header, size_t header_length, void* data,
                              size_t length, const ucp_am_recv_param_t* param) {
  auto* lane = static_cast<Lane*>(arg);
  Impl* impl = lane->impl;
  Early m;
  m.rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  m.length = length;
  // Returning UCS_OK without receiving drops a rendezvous message (its sender completes);
  // returning UCS_INPROGRESS keeps its descriptor for a later ucp_am_recv_data_nbx or
  // ucp_am_data_release.
  if (!DecodeHeader(header, header_length, &m.header) || impl->handler == nullptr) {
    const auto* p = static_cast<const uint8_t*>(header);
    if (header_length >= 3 && LoadLe16(p) == kHeaderMagic && p[2] != kHeaderVersion) {
      spdlog::warn(
          "ucx: dropped a message of transport header version {}; this daemon speaks "
          "version {} (daemons of both versions cannot talk: upgrade both)",
          p[2], kHeaderVersion);
    } else {
      spdlog::warn("ucx: dropped a malformed active message ({} header bytes)", header_length);
    }
    return UCS_OK;
  }
  lane->NoteSender(param, m.header);
  spdlog::debug("ucx{}: {} message {} from {}: {} bytes{}", lane->index,
                m.header.kind == kAmData ? "data" : "control", m.header.seq, m.header.sender,
                length, m.rndv ? " rndv" : "");
  const StreamKey key{m.header.sender, m.header.epoch};
  InboundStream& stream = lane->streams[key];
  if (m.header.seq < stream.expected || stream.early.count(m.header.seq)) {
    spdlog::warn("ucx: duplicate message {} from {}", m.header.seq, m.header.sender);
    return UCS_OK;
  }
  if (m.header.seq == stream.expected && impl->FenceOpen(lane, key, m.header)) {
    ++stream.expected;
    m.desc = data;
    lane->Process(m, /*in_callback=*/true);
    lane->Drain(key);  // whatever was waiting for this one
    return UCS_OK;
  }
  // Ahead of its turn, or behind a fence: keep it.
  if (stream.early.size() >= 4096) {
    spdlog::warn("ucx: {} is {} messages ahead; dropping", m.header.sender,
                 m.header.seq - stream.expected);
    return UCS_OK;
  }
  if (m.rndv) {
    m.desc = data;  // valid until received or released
  } else {
    m.bytes.assign(static_cast<const char*>(data), length);
  }
  const bool keep = m.rndv;
  stream.early.emplace(m.header.seq, std::move(m));
  return keep ? UCS_INPROGRESS : UCS_OK;
}

// Delivers the stream's kept messages from its expected one on, while they are here and their
// fences are open (a closed fence resumes this later).
void Impl::Lane::Drain(const StreamKey& key) {
  for (;;) {
    auto s = streams.find(key);
    if (s == streams.end()) return;
    auto next = s->second.early.find(s->second.expected);
    if (next == s->second.early.end()) return;
    if (!impl->FenceOpen(this, key, next->second.header)) return;
    Early e = std::move(next->second);
    s->second.early.erase(next);
    ++s->second.expected;
    Process(e, /*in_callback=*/false);
  }
}

// Delivers one message in order: its rendezvous descriptor (`m.desc`) or its bytes (`m.bytes`,
// or `m.desc` inside the callback that brought them). A dropped rendezvous descriptor is
// released explicitly unless we are inside its own callback.
void Impl::Lane::Process(Early& m, bool in_callback) {
  void* data = in_callback || m.rndv ? m.desc : m.bytes.data();
  auto drop = [&] {
    if (m.rndv && !in_callback) ucp_am_data_release(worker, data);
  };
  const ParsedHeader& h = m.header;
  auto* req = new RecvRequest{this, h.sender, h, {}};
  void* dst = nullptr;
  if (h.kind == kAmControl) {
    if (m.length > (1u << 20)) {  // control messages are small; refuse anything else
      delete req;
      drop();
      impl->ControlDelivered(h);
      return;
    }
    req->buffer.resize(m.length);
    dst = req->buffer.data();
  } else {
    if (m.length != h.data.size) {
      spdlog::warn("ucx: chunk {} from {} has {} bytes, its header says {}", h.data.index, h.sender,
                   m.length, h.data.size);
      delete req;
      drop();
      return;
    }
    absl::StatusOr<std::span<uint8_t>> span = impl->handler->OnDataBegin(h.sender, h.data);
    if (!span.ok()) {
      spdlog::debug("ucx: chunk {} of transfer {} from {} refused: {}", h.data.index,
                    h.data.transfer_id, h.sender, span.status().ToString());
      delete req;
      drop();
      return;
    }
    dst = span->data();
  }
  if (!m.rndv) {
    std::memcpy(dst, data, m.length);
    Deliver(req, absl::OkStatus());
    return;
  }
  ucp_request_param_t rp{};
  rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  rp.cb.recv_am = &OnRecvDone;
  rp.user_data = req;
  const ucs_status_ptr_t r = ucp_am_recv_data_nbx(worker, data, dst, m.length, &rp);
  if (r == nullptr) {
    Deliver(req, absl::OkStatus());
  } else if (UCS_PTR_IS_ERR(r)) {
    Deliver(req, FromUcs(UCS_PTR_STATUS(r), "receive from " + h.sender));
  }
}

// Forgets what arrived over a failed inbound endpoint: its streams (releasing the messages kept
// for later) and what its sender processes had delivered of their control messages.
void Impl::Lane::DropStreams(const Endpoint& e) {
  for (const StreamKey& key : e.streams) {
    auto it = streams.find(key);
    if (it == streams.end()) continue;
    for (auto& [seq, early] : it->second.early) {
      if (early.rndv) ucp_am_data_release(worker, early.desc);
    }
    streams.erase(it);
  }
  impl->ForgetOrigins(e.peer, e.origins);
}

void Impl::Lane::OnRecvDone(void* request, ucs_status_t status, size_t, void* user_data) {
  auto* req = static_cast<RecvRequest*>(user_data);
  req->lane->Deliver(req, FromUcs(status, "receive from " + req->peer));
  ucp_request_free(request);
}

void Impl::Lane::Deliver(RecvRequest* req, absl::Status status) {
  if (req->header.kind == kAmData) {
    impl->handler->OnDataEnd(req->peer, req->header.data, status);
  } else {
    if (status.ok()) {
      v1::PeerMessage m;
      if (m.ParseFromString(req->buffer)) {
        impl->handler->OnControl(req->peer, m);
      } else {
        spdlog::warn("ucx: unparsable control message from {}", req->peer);
      }
    }
    impl->ControlDelivered(req->header);
  }
  delete req;
}

void Impl::Lane::ShutdownOnThread() {
  absl::MutexLock driving(&worker_mu);
  for (auto& [key, stream] : streams) {
    for (auto& [seq, e] : stream.early) {
      if (e.rndv) ucp_am_data_release(worker, e.desc);
    }
  }
  streams.clear();
  if (index == 0 && impl->listener != nullptr) {
    ucp_listener_destroy(impl->listener);
    impl->listener = nullptr;
  }
  std::vector<Endpoint*> all(endpoints.begin(), endpoints.end());
  for (Endpoint* e : all) CloseEndpoint(e, /*force=*/true);
  for (int i = 0; i < 10000 && closing > 0; ++i) ucp_worker_progress(worker);
  std::deque<Op> left;
  {
    absl::MutexLock lock(&mu);
    left.swap(queue);
  }
  for (Op& op : left) {
    if (op.done) op.done(absl::UnavailableError("the UCX transport shut down"));
  }
}

UcxTransport::UcxTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

UcxTransport::~UcxTransport() { Shutdown(); }

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(
    const UcxTransportOptions& options) {
  if (options.lanes < 1 || options.lanes > UcxTransportOptions::kMaxLanes) {
    return absl::InvalidArgumentError(absl::StrFormat("UCX lanes %d: expected 1..%d", options.lanes,
                                                      UcxTransportOptions::kMaxLanes));
  }
  if (options.chunks_in_flight < 1 ||
      options.chunks_in_flight > UcxTransportOptions::kMaxChunksInFlight) {
    return absl::InvalidArgumentError(absl::StrFormat("UCX chunks in flight %d: expected 1..%d",
                                                      options.chunks_in_flight,
                                                      UcxTransportOptions::kMaxChunksInFlight));
  }
  SPECTRUMKV_RETURN_IF_ERROR(CheckProtocolStack(options));
  auto impl = std::make_unique<Impl>();
  impl->chunks_in_flight = static_cast<uint32_t>(options.chunks_in_flight);
  std::random_device rd;
  {
    absl::MutexLock lock(&impl->mu);
    impl->epoch_seed = (uint64_t{rd()} << 32) ^ rd();
    impl->origin = SplitMix(&impl->epoch_seed);
  }
  std::string host;
  uint16_t port = 0;
  if (!SplitHostPort(options.listen_address, &host, &port)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("transport.address \"%s\" is not host:port", options.listen_address));
  }
  // UCX settings reach UCP and its transports (UCT) alike only through the environment, which
  // UCX reads when the context is created: set them before ucp_init. A restarted daemon must be
  // able to listen on its address again while connections of its previous life sit in
  // TIME_WAIT, hence TCP_CM_REUSEADDR unless the environment says otherwise.
  setenv("UCX_TCP_CM_REUSEADDR", "y", /*overwrite=*/0);
  for (const auto& [name, value] : options.ucx_options) {
    setenv(("UCX_" + name).c_str(), value.c_str(), /*overwrite=*/1);
  }
  ucp_config_t* config = nullptr;
  if (ucs_status_t s = ucp_config_read(nullptr, nullptr, &config); s != UCS_OK) {
    return FromUcs(s, "reading the UCX configuration");
  }
  if (!options.tls.empty()) {
    if (ucs_status_t s = ucp_config_modify(config, "TLS", options.tls.c_str()); s != UCS_OK) {
      ucp_config_release(config);
      return absl::InvalidArgumentError(
          absl::StrFormat("UCX transports \"%s\": %s", options.tls, ucs_status_string(s)));
    }
  }
  ucp_params_t params{};
  params.field_mask =
      UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.name = "spectrumkvd";
  params.mt_workers_shared = options.lanes > 1 ? 1 : 0;  // one worker per lane thread
  const ucs_status_t init = ucp_init(&params, config, &impl->context);
  ucp_config_release(config);
  if (init != UCS_OK) return FromUcs(init, "ucp_init");

  for (int i = 0; i < options.lanes; ++i) {
    auto lane = std::make_unique<Impl::Lane>();
    lane->impl = impl.get();
    lane->index = i;
    impl->lanes.push_back(std::move(lane));
    if (absl::Status s = impl->lanes.back()->Init(); !s.ok()) return s;
  }

  sockaddr_storage addr;
  socklen_t len;
  if (absl::Status s = Resolve(host == "0.0.0.0" ? "0.0.0.0" : host, port, true, &addr, &len);
      !s.ok()) {
    return s;
  }
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = reinterpret_cast<const sockaddr*>(&addr);
  lp.sockaddr.addrlen = len;
  lp.conn_handler.cb = &Impl::Lane::OnConnRequest;
  lp.conn_handler.arg = impl->lanes[0].get();
  if (ucs_status_t s = ucp_listener_create(impl->lanes[0]->worker, &lp, &impl->listener);
      s != UCS_OK) {
    return FromUcs(s, "listening on " + options.listen_address);
  }
  ucp_listener_attr_t la{};
  la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (ucs_status_t s = ucp_listener_query(impl->listener, &la); s != UCS_OK) {
    return FromUcs(s, "ucp_listener_query");
  }
  uint16_t bound = port;
  if (la.sockaddr.ss_family == AF_INET) {
    bound = ntohs(reinterpret_cast<const sockaddr_in*>(&la.sockaddr)->sin_port);
  } else if (la.sockaddr.ss_family == AF_INET6) {
    bound = ntohs(reinterpret_cast<const sockaddr_in6*>(&la.sockaddr)->sin6_port);
  }
  std::string advertise = options.advertise_host;
  if (advertise.empty()) {
    if (host == "0.0.0.0" || host == "::") {
      char name[256] = {0};
      gethostname(name, sizeof(name) - 1);
      advertise = name;
    } else {
      advertise = host;
    }
  }
  impl->address = absl::StrFormat("%s%s:%u", kScheme, advertise, bound);

  return std::unique_ptr<UcxTransport>(new UcxTransport(std::move(impl)));
}

absl::Status UcxTransport::Start(TransportHandler* handler) {
  absl::MutexLock lock(&impl_->mu);
  if (impl_->started) return absl::FailedPreconditionError("already started");
  impl_->handler = handler;
  impl_->started = true;
  for (auto& lane : impl_->lanes) {
    lane->thread = std::thread([l = lane.get()] { l->Loop(); });
  }
  return absl::OkStatus();
}

void UcxTransport::Shutdown() {
  {
    absl::MutexLock lock(&impl_->mu);
    if (!impl_->started || impl_->stopping) return;
    impl_->stopping = true;
  }
  for (auto& lane : impl_->lanes) lane->Stop();
  for (auto& lane : impl_->lanes) lane->thread.join();
}

std::string UcxTransport::address() const { return impl_->address; }

void UcxTransport::SendControl(const std::string& peer, const v1::PeerMessage& message,
                               SendCallback done) {
  Impl::Op op;
  op.kind = Impl::Op::Kind::kControl;
  op.peer = peer;
  op.control = message.SerializeAsString();
  op.done = std::move(done);
  impl_->Submit(std::move(op));
}

void UcxTransport::SendData(const std::string& peer, const DataChunkHeader& header,
                            std::span<const uint8_t> data, SendCallback done) {
  Impl::Op op;
  op.kind = Impl::Op::Kind::kData;
  op.peer = peer;
  op.chunk = header;
  op.payload = data;
  op.done = std::move(done);
  impl_->Submit(std::move(op));
}

}  // namespace spectrumkv
