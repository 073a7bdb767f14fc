// The C++ client of spectrumkvd: one object per daemon connection, thin wrappers over the gRPC
// stub that turn every call into an absl::StatusOr with a deadline. Thread-safe (gRPC channels
// and stubs are).
#ifndef SPECTRUMKV_CLIENT_LIB_CLIENT_H_
#define SPECTRUMKV_CLIENT_LIB_CLIENT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "spectrumkv/v1/kv_transfer.grpc.pb.h"

namespace spectrumkv {

class Client {
 public:
  // `target` is "unix:/path/to.sock" or "host:port". Connection is lazy: errors surface on the
  // first call (UNAVAILABLE).
  static std::unique_ptr<Client> Connect(const std::string& target,
                                         int max_message_bytes = 64 << 20);

  // grpc.health.v1 Check of the whole server: true if SERVING.
  absl::StatusOr<bool> Health(double timeout_s);

  absl::StatusOr<v1::DaemonInfo> GetDaemonInfo(double timeout_s);
  absl::StatusOr<v1::RegisterPoolResponse> RegisterPool(const v1::RegisterPoolRequest& req,
                                                        double timeout_s);
  absl::Status UnregisterPool(const std::string& pool_id, double timeout_s);
  absl::StatusOr<v1::ListPoolsResponse> ListPools(double timeout_s);
  absl::StatusOr<v1::SendResponse> Send(const v1::SendRequest& req, double timeout_s);
  absl::StatusOr<v1::ReceiveResponse> Receive(const v1::ReceiveRequest& req, double timeout_s);
  absl::StatusOr<v1::CancelResponse> Cancel(const v1::CancelRequest& req, double timeout_s);
  absl::StatusOr<v1::TransferInfo> GetTransfer(const v1::GetTransferRequest& req, double timeout_s);
  absl::StatusOr<v1::ListTransfersResponse> ListTransfers(bool include_ended, double timeout_s);
  absl::StatusOr<v1::ModelPolicy> SetModelPolicy(const v1::ModelPolicy& req, double timeout_s);
  absl::StatusOr<v1::ListModelPoliciesResponse> ListModelPolicies(double timeout_s);

  const std::string& target() const { return target_; }

 private:
  Client(std::string target, std::shared_ptr<grpc::Channel> channel);
  std::string target_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvTransfer::Stub> stub_;
};

// absl::Status of a grpc::Status, keeping code and message.
absl::Status FromGrpc(const grpc::Status& s);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_CLIENT_LIB_CLIENT_H_
