// Status helpers shared by every SpectrumKV component.
//
// absl::Status / absl::StatusOr<T> cross every component boundary; Debian's Abseil 20220623
// lacks the RETURN_IF_ERROR family, so we define our own. SPECTRUMKV_CHECK is for invariants no
// client, peer or environment can break: it aborts with a message.
#ifndef SPECTRUMKV_COMMON_STATUS_H_
#define SPECTRUMKV_COMMON_STATUS_H_

#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SPECTRUMKV_STATUS_CONCAT_INNER_(a, b) a##b
#define SPECTRUMKV_STATUS_CONCAT_(a, b) SPECTRUMKV_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the current function if not OK.
#define SPECTRUMKV_RETURN_IF_ERROR(expr)                     \
  do {                                                       \
    ::absl::Status spectrumkv_status_ = (expr);              \
    if (!spectrumkv_status_.ok()) return spectrumkv_status_; \
  } while (0)

// `lhs` = value of `rexpr` (an absl::StatusOr<T>), or returns its status from the function.
#define SPECTRUMKV_ASSIGN_OR_RETURN(lhs, rexpr) \
  SPECTRUMKV_ASSIGN_OR_RETURN_IMPL_(SPECTRUMKV_STATUS_CONCAT_(spectrumkv_or_, __LINE__), lhs, rexpr)
#define SPECTRUMKV_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                                      \
  if (!tmp.ok()) return std::move(tmp).status();           \
  lhs = std::move(tmp).value()

namespace spectrumkv {

// Aborts the process with `message` and the source location. Never returns.
[[noreturn]] void CheckFailed(const char* file, int line, const char* condition,
                              std::string_view message);

}  // namespace spectrumkv

// Crash on the impossible: for invariants that no input can violate.
#define SPECTRUMKV_CHECK(cond)                                             \
  do {                                                                     \
    if (!(cond)) ::spectrumkv::CheckFailed(__FILE__, __LINE__, #cond, ""); \
  } while (0)
#define SPECTRUMKV_CHECK_MSG(cond, msg)                                       \
  do {                                                                        \
    if (!(cond)) ::spectrumkv::CheckFailed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)

#endif  // SPECTRUMKV_COMMON_STATUS_H_
