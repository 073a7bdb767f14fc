#include "daemon/service/kv_transfer_service.h"

#include <spdlog/spdlog.h>

#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "daemon/pools/shm_region.h"
#include "daemon/service/proto_convert.h"

namespace spectrumkv {
namespace {

// Window queries a frontend placed in shared memory (read, not mapped: see ReadShm).
absl::Status ReadSharedMemory(const v1::HostSharedMemory& shm, void* out, uint64_t bytes) {
  if (shm.size_bytes() < bytes) return absl::InvalidArgumentError("region too small");
  return ReadShm(shm.name(), shm.offset_bytes(), out, bytes);
}

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const absl::Status& s) {
  grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
  r->Finish(ToGrpc(s));
  return r;
}

// A Send or Receive call: finishes when the transfer manager calls back; a client that cancels
// the call detaches from the transfer (which is cancelled if nobody else waits for it).
class TransferReactor final : public grpc::ServerUnaryReactor {
 public:
  TransferReactor(TransferManager& manager, TransferKey key, TransferRole role)
      : manager_(manager), key_(std::move(key)), role_(role) {}

  // Called once the manager knows the call. The manager's callback (which calls Finish) may have
  // run already, so the reactor lives until both this and OnDone have happened.
  void Started(uint64_t waiter) {
    bool cancel = false;
    {
      absl::MutexLock lock(&mu_);
      waiter_ = waiter;
      started_ = true;
      cancel = cancelled_;
    }
    if (cancel) manager_.Detach(key_, role_, waiter);
    Release();
  }

  void OnCancel() override {
    uint64_t waiter = 0;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      if (!started_) return;
      waiter = waiter_;
    }
    manager_.Detach(key_, role_, waiter);
  }

  void OnDone() override { Release(); }

 private:
  void Release() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }
  std::atomic<int> refs_{2};
  TransferManager& manager_;
  const TransferKey key_;
  const TransferRole role_;
  absl::Mutex mu_;
  uint64_t waiter_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

void PolicyToProto(const ModelTierPolicy& p, v1::ModelPolicy* out) {
  out->set_model(p.model);
  out->set_allow_int4(p.allow_int4);
  out->set_allow_int8(p.allow_int8);
  out->set_source(p.source);
}

}  // namespace

KvTransferService::KvTransferService(const DaemonConfig& config, PoolRegistry& pools,
                                     TransferManager& manager, ModelPolicies& models,
                                     Metrics& metrics, v1::DaemonInfo info)
    : config_(config),
      pools_(pools),
      manager_(manager),
      models_(models),
      metrics_(metrics),
      info_(std::move(info)) {}

std::optional<SteadyClock::time_point> KvTransferService::Deadline(
    grpc::CallbackServerContext* ctx) const {
  const auto deadline = ctx->deadline();
  const auto now = std::chrono::system_clock::now();
  if (deadline > now + std::chrono::hours(24 * 365)) return std::nullopt;  // none set
  return SteadyClock::now() + std::chrono::duration_cast<SteadyClock::duration>(deadline - now);
}

grpc::ServerUnaryReactor* KvTransferService::RegisterPool(grpc::CallbackServerContext* ctx,
                                                          const v1::RegisterPoolRequest* req,
                                                          v1::RegisterPoolResponse* resp) {
  absl::StatusOr<PoolSpec> spec = PoolSpecFromProto(*req);
  if (!spec.ok()) return Done(ctx, spec.status());
  absl::StatusOr<std::shared_ptr<Pool>> pool = pools_.Register(std::move(*spec));
  if (!pool.ok()) {
    return Done(ctx, absl::Status(pool.status().code(),
                                  absl::StrFormat("RegisterPool %s: %s", req->pool_id(),
                                                  pool.status().message())));
  }
  resp->set_total_bytes((*pool)->total_bytes());
  metrics_.SetPools(pools_.size());
  spdlog::info("registered pool {} ({} bytes, {} layers)", req->pool_id(), (*pool)->total_bytes(),
               (*pool)->layout().shape.num_layers);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvTransferService::UnregisterPool(grpc::CallbackServerContext* ctx,
                                                            const v1::UnregisterPoolRequest* req,
                                                            v1::UnregisterPoolResponse*) {
  const absl::Status s = pools_.Unregister(req->pool_id());
  metrics_.SetPools(pools_.size());
  return Done(ctx, s);
}

grpc::ServerUnaryReactor* KvTransferService::ListPools(grpc::CallbackServerContext* ctx,
                                                       const v1::ListPoolsRequest*,
                                                       v1::ListPoolsResponse* resp) {
  for (const auto& p : pools_.List()) {
    v1::PoolInfo* info = resp->add_pools();
    info->set_pool_id(p->id());
    *info->mutable_layout() = LayoutToProto(p->layout());
    info->set_memory_kind(p->memory_kind() == MemoryKind::kHost ? "host" : "cuda");
    info->set_total_bytes(p->total_bytes());
    info->set_active_transfers(p->active_transfers.load());
    info->set_model(p->model());
  }
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvTransferService::Send(grpc::CallbackServerContext* ctx,
                                                  const v1::SendRequest* req,
                                                  v1::SendResponse* resp) {
  absl::StatusOr<std::shared_ptr<Pool>> pool = pools_.Get(req->pool_id());
  if (!pool.ok()) {
    return Done(ctx, absl::NotFoundError(absl::StrFormat("Send request %s shard %u peer %s: %s",
                                                         req->request_id(), req->shard(),
                                                         req->peer(), pool.status().message())));
  }
  absl::StatusOr<SendArgs> args = SendArgsFromProto(
      *req, config_.codec, (*pool)->layout(), ReadSharedMemory, config_.limits.max_message_bytes);
  if (!args.ok()) {
    return Done(ctx, absl::InvalidArgumentError(
                         absl::StrFormat("Send request %s shard %u peer %s: %s", req->request_id(),
                                         req->shard(), req->peer(), args.status().message())));
  }
  auto* reactor = new TransferReactor(manager_, args->key, TransferRole::kSend);
  const uint64_t waiter = manager_.Send(std::move(*args), manager_.DeadlineFrom(Deadline(ctx)),
                                        [reactor, resp](absl::StatusOr<SendResult> r) {
                                          if (r.ok()) {
                                            resp->set_transfer_id(r->transfer_id);
                                            StatsToProto(r->stats, resp->mutable_stats());
                                          }
                                          reactor->Finish(ToGrpc(r.status()));
                                        });
  reactor->Started(waiter);
  return reactor;
}

grpc::ServerUnaryReactor* KvTransferService::Receive(grpc::CallbackServerContext* ctx,
                                                     const v1::ReceiveRequest* req,
                                                     v1::ReceiveResponse* resp) {
  absl::StatusOr<ReceiveArgs> args = ReceiveArgsFromProto(*req);
  if (!args.ok()) {
    return Done(ctx, absl::InvalidArgumentError(absl::StrFormat("Receive request %s shard %u: %s",
                                                                req->request_id(), req->shard(),
                                                                args.status().message())));
  }
  auto* reactor = new TransferReactor(manager_, args->key, TransferRole::kReceive);
  const uint64_t waiter = manager_.Receive(
      std::move(*args), manager_.DeadlineFrom(Deadline(ctx)),
      [reactor, resp](absl::StatusOr<ReceiveResult> r) {
        if (r.ok()) {
          resp->set_transfer_id(r->transfer_id);
          resp->set_num_tokens(r->num_tokens);
          resp->set_peer(r->peer);
          if (r->per_layer) {
            for (const auto& layer : r->dropped) {
              resp->add_per_layer_dropped()->mutable_positions()->Add(layer.begin(), layer.end());
            }
          } else if (!r->dropped.empty()) {
            resp->mutable_dropped_positions()->Add(r->dropped[0].begin(), r->dropped[0].end());
          }
          for (const std::string& map : r->tier_maps) resp->add_tier_maps(map);
          StatsToProto(r->stats, resp->mutable_stats());
        }
        reactor->Finish(ToGrpc(r.status()));
      });
  reactor->Started(waiter);
  return reactor;
}

grpc::ServerUnaryReactor* KvTransferService::Cancel(grpc::CallbackServerContext* ctx,
                                                    const v1::CancelRequest* req,
                                                    v1::CancelResponse* resp) {
  absl::StatusOr<bool> r = manager_.Cancel({req->request_id(), req->shard()}, req->reason());
  if (r.ok()) resp->set_cancelled(*r);
  return Done(ctx, r.status());
}

grpc::ServerUnaryReactor* KvTransferService::GetTransfer(grpc::CallbackServerContext* ctx,
                                                         const v1::GetTransferRequest* req,
                                                         v1::TransferInfo* resp) {
  std::optional<TransferRole> role;
  if (req->role() == v1::ROLE_SEND) role = TransferRole::kSend;
  if (req->role() == v1::ROLE_RECEIVE) role = TransferRole::kReceive;
  absl::StatusOr<TransferInfoData> info = manager_.Get({req->request_id(), req->shard()}, role);
  if (info.ok()) InfoToProto(*info, resp);
  return Done(ctx, info.status());
}

grpc::ServerUnaryReactor* KvTransferService::ListTransfers(grpc::CallbackServerContext* ctx,
                                                           const v1::ListTransfersRequest* req,
                                                           v1::ListTransfersResponse* resp) {
  for (const TransferInfoData& i : manager_.List(req->include_ended())) {
    InfoToProto(i, resp->add_transfers());
  }
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvTransferService::SetModelPolicy(grpc::CallbackServerContext* ctx,
                                                            const v1::ModelPolicy* req,
                                                            v1::ModelPolicy* resp) {
  ModelTierPolicy p{req->model(), req->allow_int4(), req->allow_int8(), req->source()};
  const absl::Status s = models_.Set(p);
  if (s.ok()) PolicyToProto(p, resp);
  return Done(ctx, s);
}

grpc::ServerUnaryReactor* KvTransferService::GetModelPolicy(grpc::CallbackServerContext* ctx,
                                                            const v1::GetModelPolicyRequest* req,
                                                            v1::ModelPolicy* resp) {
  const std::optional<ModelTierPolicy> p = models_.Get(req->model());
  if (!p) {
    return Done(
        ctx, absl::NotFoundError(absl::StrFormat("no tier policy for model \"%s\"", req->model())));
  }
  PolicyToProto(*p, resp);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvTransferService::ListModelPolicies(
    grpc::CallbackServerContext* ctx, const v1::ListModelPoliciesRequest*,
    v1::ListModelPoliciesResponse* resp) {
  for (const ModelTierPolicy& p : models_.List()) PolicyToProto(p, resp->add_policies());
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvTransferService::GetDaemonInfo(grpc::CallbackServerContext* ctx,
                                                           const v1::GetDaemonInfoRequest*,
                                                           v1::DaemonInfo* resp) {
  *resp = info_;
  resp->set_draining(manager_.draining());
  return Done(ctx, absl::OkStatus());
}

}  // namespace spectrumkv
