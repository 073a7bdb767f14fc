// Conversions between the protobuf API and the daemon's domain types, with validation: every
// field that comes from a frontend is checked here or by the domain code it reaches, and errors
// name the field.
#ifndef SPECTRUMKV_DAEMON_SERVICE_PROTO_CONVERT_H_
#define SPECTRUMKV_DAEMON_SERVICE_PROTO_CONVERT_H_

#include <grpcpp/support/status.h>

#include <functional>

#include "absl/status/statusor.h"
#include "daemon/config/config.h"
#include "daemon/pools/pool_registry.h"
#include "daemon/transfer/transfer_manager.h"
#include "proto/layout_convert.h"
#include "spectrumkv/v1/kv_transfer.pb.h"

namespace spectrumkv {

grpc::Status ToGrpc(const absl::Status& s);

absl::StatusOr<PoolSpec> PoolSpecFromProto(const v1::RegisterPoolRequest& p);

// True if `id` is 1-256 characters of [A-Za-z0-9._:/-].
bool IsValidRequestId(const std::string& id);

// Copies `bytes` bytes of the shared-memory region `shm` names into `out`; errors name what
// failed (no such object, a range outside it).
using ShmReader =
    std::function<absl::Status(const v1::HostSharedMemory& shm, void* out, uint64_t bytes)>;

// Builds SendArgs from a request, filling unset options from the daemon's codec defaults.
// `layout` is the source pool's layout (window queries and scores are checked against it).
// `read_shm` reads window queries that the request placed in shared memory, up to
// `max_shm_bytes` (the bound a request's own size has); without a reader such requests are
// INVALID_ARGUMENT.
absl::StatusOr<SendArgs> SendArgsFromProto(const v1::SendRequest& p, const CodecConfig& defaults,
                                           const KvLayout& layout,
                                           const ShmReader& read_shm = nullptr,
                                           uint64_t max_shm_bytes = 0);
absl::StatusOr<ReceiveArgs> ReceiveArgsFromProto(const v1::ReceiveRequest& p);

void StatsToProto(const TransferStatsData& s, v1::TransferStats* out);
void InfoToProto(const TransferInfoData& i, v1::TransferInfo* out);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_SERVICE_PROTO_CONVERT_H_
