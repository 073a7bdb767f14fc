#include <cstddef>
#include <cstdint>

#include "tests/fuzz/wire_fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  spectrumkv::fuzz::FuzzWirePayload(data, size);
  return 0;
}
