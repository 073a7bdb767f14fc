// CRC-32C (Castagnoli), the checksum of the SpectrumKV wire format.
//
// Standard parameters: reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF,
// so Value("123456789") == 0xE3069283. The fast path is ISA-L's crc32_iscsi; it is used only
// after a known-answer self-test against the portable table implementation passes (the LevelDB
// pattern); otherwise the table implementation is used. Thread-safe: all functions are pure.
#ifndef SPECTRUMKV_COMMON_CRC32C_H_
#define SPECTRUMKV_COMMON_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace spectrumkv::crc32c {

// Returns the CRC-32C of data[0, n) continued from the CRC `crc` of some earlier bytes,
// so Extend(Value(a), b) == Value(a ‖ b). Extend(0, ...) starts a new checksum.
uint32_t Extend(uint32_t crc, const void* data, size_t n);

// Returns the CRC-32C of data[0, n).
inline uint32_t Value(const void* data, size_t n) { return Extend(0, data, n); }

// Returns the CRC-32C of a ‖ b from crc_a = Value(a), crc_b = Value(b) and len_b = |b|, without
// the bytes (zlib's crc32_combine for this polynomial): the CRCs of the parts of a message,
// computed on several threads, give the CRC of the whole. About a microsecond.
uint32_t Combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

// Portable byte-at-a-time table implementation; the reference for the self-test and tests.
uint32_t ExtendPortable(uint32_t crc, const void* data, size_t n);

// True if the accelerated path passed its self-test and is in use.
bool IsAccelerated();

}  // namespace spectrumkv::crc32c

#endif  // SPECTRUMKV_COMMON_CRC32C_H_
