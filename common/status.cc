#include "common/status.h"

#include <cstdio>
#include <cstdlib>

namespace spectrumkv {

void CheckFailed(const char* file, int line, const char* condition, std::string_view message) {
  std::fprintf(stderr, "SPECTRUMKV_CHECK failed at %s:%d: %s %.*s\n", file, line, condition,
               static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
  std::abort();
}

}  // namespace spectrumkv
