#include "daemon/transfer/model_policies.h"

#include "absl/strings/str_format.h"

namespace spectrumkv {

absl::Status ModelPolicies::Set(const ModelTierPolicy& policy) {
  if (policy.model.empty() || policy.model.size() > 256) {
    return absl::InvalidArgumentError("model: must be 1-256 characters");
  }
  if (policy.allow_int4 && !policy.allow_int8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "model %s: allowing INT4 without INT8 is not a supported policy", policy.model));
  }
  absl::MutexLock lock(&mu_);
  policies_[policy.model] = policy;
  return absl::OkStatus();
}

std::optional<ModelTierPolicy> ModelPolicies::Get(const std::string& model) const {
  absl::MutexLock lock(&mu_);
  auto it = policies_.find(model);
  if (it == policies_.end()) return std::nullopt;
  return it->second;
}

std::vector<ModelTierPolicy> ModelPolicies::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<ModelTierPolicy> out;
  for (const auto& [m, p] : policies_) out.push_back(p);
  return out;
}

absl::StatusOr<Policy> ModelPolicies::Resolve(const std::string& model, Policy requested) const {
  const std::optional<ModelTierPolicy> p = model.empty() ? std::nullopt : Get(model);
  if (!p) return requested;
  if (!p->allow_int8) {
    if (requested == Policy::kPdTrim) return requested;
    return absl::FailedPreconditionError(
        absl::StrFormat("model %s allows neither INT8 nor INT4; only pdtrim can be used", model));
  }
  if (!p->allow_int4) {
    switch (requested) {
      case Policy::k3Tier:
      case Policy::kSinkProtect:
      case Policy::kRandomTier:
        return Policy::k2Tier;
      case Policy::kUniformInt4:
        return absl::FailedPreconditionError(absl::StrFormat(
            "model %s does not allow INT4 (%s); uniform_int4 cannot be used", model, p->source));
      default:
        return requested;
    }
  }
  return requested;
}

}  // namespace spectrumkv
