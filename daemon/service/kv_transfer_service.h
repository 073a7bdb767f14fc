// The gRPC KvTransfer service: a thin layer that validates and converts requests, hands them to
// the pool registry, the transfer manager and the model policies, and converts results back.
// Callbacks never block: long work runs on the transfer manager's executor.
#ifndef SPECTRUMKV_DAEMON_SERVICE_KV_TRANSFER_SERVICE_H_
#define SPECTRUMKV_DAEMON_SERVICE_KV_TRANSFER_SERVICE_H_

#include <atomic>
#include <functional>
#include <string>

#include "daemon/config/config.h"
#include "daemon/metrics/metrics.h"
#include "daemon/pools/pool_registry.h"
#include "daemon/transfer/model_policies.h"
#include "daemon/transfer/transfer_manager.h"
#include "spectrumkv/v1/kv_transfer.grpc.pb.h"

namespace spectrumkv {

class KvTransferService final : public v1::KvTransfer::CallbackService {
 public:
  // `info` is returned by GetDaemonInfo (draining is filled in live).
  KvTransferService(const DaemonConfig& config, PoolRegistry& pools, TransferManager& manager,
                    ModelPolicies& models, Metrics& metrics, v1::DaemonInfo info);

  grpc::ServerUnaryReactor* RegisterPool(grpc::CallbackServerContext* ctx,
                                         const v1::RegisterPoolRequest* req,
                                         v1::RegisterPoolResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterPool(grpc::CallbackServerContext* ctx,
                                           const v1::UnregisterPoolRequest* req,
                                           v1::UnregisterPoolResponse* resp) override;
  grpc::ServerUnaryReactor* ListPools(grpc::CallbackServerContext* ctx,
                                      const v1::ListPoolsRequest* req,
                                      v1::ListPoolsResponse* resp) override;
  grpc::ServerUnaryReactor* Send(grpc::CallbackServerContext* ctx, const v1::SendRequest* req,
                                 v1::SendResponse* resp) override;
  grpc::ServerUnaryReactor* Receive(grpc::CallbackServerContext* ctx, const v1::ReceiveRequest* req,
                                    v1::ReceiveResponse* resp) override;
  grpc::ServerUnaryReactor* Cancel(grpc::CallbackServerContext* ctx, const v1::CancelRequest* req,
                                   v1::CancelResponse* resp) override;
  grpc::ServerUnaryReactor* GetTransfer(grpc::CallbackServerContext* ctx,
                                        const v1::GetTransferRequest* req,
                                        v1::TransferInfo* resp) override;
  grpc::ServerUnaryReactor* ListTransfers(grpc::CallbackServerContext* ctx,
                                          const v1::ListTransfersRequest* req,
                                          v1::ListTransfersResponse* resp) override;
  grpc::ServerUnaryReactor* SetModelPolicy(grpc::CallbackServerContext* ctx,
                                           const v1::ModelPolicy* req,
                                           v1::ModelPolicy* resp) override;
  grpc::ServerUnaryReactor* GetModelPolicy(grpc::CallbackServerContext* ctx,
                                           const v1::GetModelPolicyRequest* req,
                                           v1::ModelPolicy* resp) override;
  grpc::ServerUnaryReactor* ListModelPolicies(grpc::CallbackServerContext* ctx,
                                              const v1::ListModelPoliciesRequest* req,
                                              v1::ListModelPoliciesResponse* resp) override;
  grpc::ServerUnaryReactor* GetDaemonInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetDaemonInfoRequest* req,
                                          v1::DaemonInfo* resp) override;

 private:
  std::optional<SteadyClock::time_point> Deadline(grpc::CallbackServerContext* ctx) const;

  const DaemonConfig& config_;
  PoolRegistry& pools_;
  TransferManager& manager_;
  ModelPolicies& models_;
  Metrics& metrics_;
  const v1::DaemonInfo info_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_SERVICE_KV_TRANSFER_SERVICE_H_
