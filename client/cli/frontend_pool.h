// The KV pools `spectrumkv fake-frontend` plays an engine's cache with: shared host memory
// (registered as host_shm regions), or GPU memory of this process exported through CUDA IPC
// handles (registered as cuda_ipc regions), as a GPU engine's KV cache would be.
//
// Either kind has a host view that the frontend fills and verifies: the shared memory itself,
// or a host mirror of the GPU pool that Publish() uploads and Fetch() downloads.
#ifndef SPECTRUMKV_CLIENT_CLI_FRONTEND_POOL_H_
#define SPECTRUMKV_CLIENT_CLI_FRONTEND_POOL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/kvgen/pool_layouts.h"
#include "kernels/api/layout.h"
#include "spectrumkv/v1/kv_transfer.pb.h"

namespace spectrumkv {

enum class PoolMemory { kHostShm, kCuda };

class FrontendPool {
 public:
  // A pool of `spec`'s layout, zero-filled. `name` makes shared-memory names unique. For kCuda:
  // UNAVAILABLE where this build has no CUDA or no device can be used.
  static absl::StatusOr<std::unique_ptr<FrontendPool>> Create(PoolMemory memory,
                                                              const std::string& name,
                                                              const kvgen::PoolSpec& spec);
  virtual ~FrontendPool() = default;

  virtual const KvLayout& layout() const = 0;
  // Host view of `num_tokens` tokens through `block_table` (spans must outlive the view).
  virtual KvBuffer View(std::span<const uint32_t> block_table, uint32_t num_tokens) const = 0;
  // Zeroes the pool and its host view.
  virtual absl::Status Zero() = 0;
  // Makes the pool hold what was written into the host view (a no-op for shared memory).
  virtual absl::Status Publish() = 0;
  // Makes the host view hold what the pool holds (a no-op for shared memory).
  virtual absl::Status Fetch() = 0;
  // Adds the pool's memory regions to a RegisterPool request.
  virtual absl::Status AddRegions(v1::RegisterPoolRequest* request) const = 0;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_CLIENT_CLI_FRONTEND_POOL_H_
