// The protocol of cuda_ipc_exporter (cuda_ipc_exporter.cc), a test helper process that owns GPU
// memory for tests of CUDA IPC import, which CUDA refuses within the process that allocated the
// memory. Test-only.
//
//   cuda_ipc_exporter BYTES SEED INFO_PATH CHECKSUM_PATH
//
// allocates BYTES of device memory (cudaMalloc) on device 0, fills byte i with
// IpcPattern(SEED, i), and writes INFO_PATH (atomically, by rename) as one line:
// "<128 hex digits of the IPC handle> <offset of the buffer in its allocation> <allocation
// bytes>". On SIGTERM it writes IpcChecksum of the whole buffer, as read back then, in decimal to
// CHECKSUM_PATH and exits 0 (so an importer's writes can be checked); 1 on any error, with the
// reason on stderr.
#ifndef SPECTRUMKV_TESTS_TESTING_CUDA_IPC_EXPORTER_H_
#define SPECTRUMKV_TESTS_TESTING_CUDA_IPC_EXPORTER_H_

#include <cstdint>
#include <span>

namespace spectrumkv::testing {

inline uint8_t IpcPattern(uint64_t seed, uint64_t i) {
  uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  x ^= x >> 29;
  return static_cast<uint8_t>(x * 0xBF58476D1CE4E5B9ull >> 56);
}

// FNV-1a, 64-bit.
inline uint64_t IpcChecksum(std::span<const uint8_t> bytes) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (uint8_t b : bytes) h = (h ^ b) * 0x100000001B3ull;
  return h;
}

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_TESTING_CUDA_IPC_EXPORTER_H_
