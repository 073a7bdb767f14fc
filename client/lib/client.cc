#include "client/lib/client.h"

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <future>

namespace spectrumkv {
namespace {

void SetDeadline(grpc::ClientContext* ctx, double timeout_s) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::duration_cast<std::chrono::system_clock::duration>(
                        std::chrono::duration<double>(timeout_s)));
}

template <typename Resp, typename Call>
absl::StatusOr<Resp> Unary(double timeout_s, Call call) {
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_s);
  Resp resp;
  const grpc::Status s = call(&ctx, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

}  // namespace

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::unique_ptr<Client> Client::Connect(const std::string& target, int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(max_message_bytes);
  args.SetMaxReceiveMessageSize(max_message_bytes);
  auto channel = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  return std::unique_ptr<Client>(new Client(target, std::move(channel)));
}

Client::Client(std::string target, std::shared_ptr<grpc::Channel> channel)
    : target_(std::move(target)),
      channel_(std::move(channel)),
      stub_(v1::KvTransfer::NewStub(channel_)) {}

absl::StatusOr<bool> Client::Health(double timeout_s) {
  // grpc.health.v1.Health/Check through the generic stub: the request (empty service name) is
  // an empty message; the response's field 1 is the ServingStatus enum (1 = SERVING). This avoids
  // generating a second copy of health.proto next to the one inside libgrpc++.
  grpc::GenericStub generic(channel_);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout_s);
  grpc::ByteBuffer request, response;
  grpc::Slice empty;
  request = grpc::ByteBuffer(&empty, 1);
  std::promise<grpc::Status> done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&done](grpc::Status s) { done.set_value(s); });
  const grpc::Status s = done.get_future().get();
  if (!s.ok()) return FromGrpc(s);
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("unreadable health response");
  std::string bytes;
  for (const auto& slice : slices)
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  // Field 1, varint: tag byte 0x08 then the value (a small enum fits in one byte).
  return bytes.size() >= 2 && bytes[0] == 0x08 && bytes[1] == 0x01;
}

absl::StatusOr<v1::DaemonInfo> Client::GetDaemonInfo(double timeout_s) {
  return Unary<v1::DaemonInfo>(timeout_s, [&](grpc::ClientContext* c, v1::DaemonInfo* r) {
    return stub_->GetDaemonInfo(c, v1::GetDaemonInfoRequest(), r);
  });
}

absl::StatusOr<v1::RegisterPoolResponse> Client::RegisterPool(const v1::RegisterPoolRequest& req,
                                                              double timeout_s) {
  return Unary<v1::RegisterPoolResponse>(timeout_s,
                                         [&](grpc::ClientContext* c, v1::RegisterPoolResponse* r) {
                                           return stub_->RegisterPool(c, req, r);
                                         });
}

absl::Status Client::UnregisterPool(const std::string& pool_id, double timeout_s) {
  v1::UnregisterPoolRequest req;
  req.set_pool_id(pool_id);
  return Unary<v1::UnregisterPoolResponse>(
             timeout_s,
             [&](grpc::ClientContext* c, v1::UnregisterPoolResponse* r) {
               return stub_->UnregisterPool(c, req, r);
             })
      .status();
}

absl::StatusOr<v1::ListPoolsResponse> Client::ListPools(double timeout_s) {
  return Unary<v1::ListPoolsResponse>(timeout_s,
                                      [&](grpc::ClientContext* c, v1::ListPoolsResponse* r) {
                                        return stub_->ListPools(c, v1::ListPoolsRequest(), r);
                                      });
}

absl::StatusOr<v1::SendResponse> Client::Send(const v1::SendRequest& req, double timeout_s) {
  return Unary<v1::SendResponse>(timeout_s, [&](grpc::ClientContext* c, v1::SendResponse* r) {
    return stub_->Send(c, req, r);
  });
}

absl::StatusOr<v1::ReceiveResponse> Client::Receive(const v1::ReceiveRequest& req,
                                                    double timeout_s) {
  return Unary<v1::ReceiveResponse>(timeout_s, [&](grpc::ClientContext* c, v1::ReceiveResponse* r) {
    return stub_->Receive(c, req, r);
  });
}

absl::StatusOr<v1::CancelResponse> Client::Cancel(const v1::CancelRequest& req, double timeout_s) {
  return Unary<v1::CancelResponse>(timeout_s, [&](grpc::ClientContext* c, v1::CancelResponse* r) {
    return stub_->Cancel(c, req, r);
  });
}

absl::StatusOr<v1::TransferInfo> Client::GetTransfer(const v1::GetTransferRequest& req,
                                                     double timeout_s) {
  return Unary<v1::TransferInfo>(timeout_s, [&](grpc::ClientContext* c, v1::TransferInfo* r) {
    return stub_->GetTransfer(c, req, r);
  });
}

absl::StatusOr<v1::ListTransfersResponse> Client::ListTransfers(bool include_ended,
                                                                double timeout_s) {
  v1::ListTransfersRequest req;
  req.set_include_ended(include_ended);
  return Unary<v1::ListTransfersResponse>(
      timeout_s, [&](grpc::ClientContext* c, v1::ListTransfersResponse* r) {
        return stub_->ListTransfers(c, req, r);
      });
}

absl::StatusOr<v1::ModelPolicy> Client::SetModelPolicy(const v1::ModelPolicy& req,
                                                       double timeout_s) {
  return Unary<v1::ModelPolicy>(timeout_s, [&](grpc::ClientContext* c, v1::ModelPolicy* r) {
    return stub_->SetModelPolicy(c, req, r);
  });
}

absl::StatusOr<v1::ListModelPoliciesResponse> Client::ListModelPolicies(double timeout_s) {
  return Unary<v1::ListModelPoliciesResponse>(
      timeout_s, [&](grpc::ClientContext* c, v1::ListModelPoliciesResponse* r) {
        return stub_->ListModelPolicies(c, v1::ListModelPoliciesRequest(), r);
      });
}

}  // namespace spectrumkv
