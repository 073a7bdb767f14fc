// The wire-format fuzz target: parse, verify and unpack arbitrary bytes into a pool of the
// payload's shape. Must never crash, hang or touch memory out of bounds, whatever the input.
#ifndef SPECTRUMKV_TESTS_FUZZ_WIRE_FUZZ_TARGET_H_
#define SPECTRUMKV_TESTS_FUZZ_WIRE_FUZZ_TARGET_H_

#include <cstddef>
#include <cstdint>

namespace spectrumkv::fuzz {

// Returns 1 if the input parsed and unpacked, 0 otherwise.
int FuzzWirePayload(const uint8_t* data, size_t size);

}  // namespace spectrumkv::fuzz

#endif  // SPECTRUMKV_TESTS_FUZZ_WIRE_FUZZ_TARGET_H_
