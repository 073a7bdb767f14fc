// Which precision tiers each model may use (the INT4 probe's verdict), and how a requested policy
// is adapted to them. Thread-safe.
#ifndef SPECTRUMKV_DAEMON_TRANSFER_MODEL_POLICIES_H_
#define SPECTRUMKV_DAEMON_TRANSFER_MODEL_POLICIES_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/api/types.h"

namespace spectrumkv {

struct ModelTierPolicy {
  std::string model;
  bool allow_int4 = true;
  bool allow_int8 = true;
  std::string source;
};

class ModelPolicies {
 public:
  // INVALID_ARGUMENT for an empty name or INT4 allowed without INT8.
  absl::Status Set(const ModelTierPolicy& policy);
  std::optional<ModelTierPolicy> Get(const std::string& model) const;
  std::vector<ModelTierPolicy> List() const;

  // The policy a transfer of `model` actually uses when `requested` is asked for: without INT4,
  // 3tier, sinkprotect and random_tier become 2tier; without INT8, only pdtrim remains.
  // FAILED_PRECONDITION when the request cannot be honoured (uniform_int4 on a model without
  // INT4, any quantized policy without INT8). Models without a policy allow everything.
  absl::StatusOr<Policy> Resolve(const std::string& model, Policy requested) const;

 private:
  mutable absl::Mutex mu_;
  std::map<std::string, ModelTierPolicy> policies_ ABSL_GUARDED_BY(mu_);
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_TRANSFER_MODEL_POLICIES_H_
