// Logging set-up for the daemon: spdlog to stderr (journald captures it), as text with a
// syslog-style <N> priority prefix, or as one JSON object per line.
#ifndef SPECTRUMKV_DAEMON_COMMON_LOGGING_H_
#define SPECTRUMKV_DAEMON_COMMON_LOGGING_H_

#include <string>

#include "absl/status/status.h"

namespace spectrumkv {

// level: trace, debug, info, warn, error; format: text or json. INVALID_ARGUMENT otherwise.
absl::Status SetUpLogging(const std::string& level, const std::string& format);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_COMMON_LOGGING_H_
