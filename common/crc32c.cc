#include "common/crc32c.h"

#include <isa-l/crc.h>

#include <array>
#include <climits>
#include <cstring>

namespace spectrumkv::crc32c {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // reflected Castagnoli

constexpr std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kTable = MakeTable();

// a * b modulo the polynomial, in the reflected representation (bit 31 holds x^0).
constexpr uint32_t MultModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kPolynomial : b >> 1;
  }
  return product;
}

// kPowers[k] = x^(2^k) modulo the polynomial.
constexpr std::array<uint32_t, 64> MakePowers() {
  std::array<uint32_t, 64> powers{};
  powers[0] = 1u << 30;  // x^1
  for (size_t k = 1; k < powers.size(); ++k) powers[k] = MultModP(powers[k - 1], powers[k - 1]);
  return powers;
}
constexpr std::array<uint32_t, 64> kPowers = MakePowers();

uint32_t ExtendIsal(uint32_t crc, const void* data, size_t n) {
  // crc32_iscsi works on the un-inverted register and takes an int length.
  uint32_t reg = ~crc;
  const auto* p = static_cast<const unsigned char*>(data);
  while (n > 0) {
    const size_t chunk = n > (size_t{1} << 30) ? (size_t{1} << 30) : n;
    reg = crc32_iscsi(const_cast<unsigned char*>(p), static_cast<int>(chunk), reg);
    p += chunk;
    n -= chunk;
  }
  return ~reg;
}

bool SelfTest() {
  // Known answers plus agreement with the table on awkward lengths and alignments.
  static const char kCheck[] = "123456789";
  if (ExtendIsal(0, kCheck, 9) != 0xE3069283u) return false;
  unsigned char buf[1024 + 16];
  uint32_t x = 0x12345678u;
  for (auto& b : buf) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<unsigned char>(x >> 24);
  }
  for (size_t offset = 0; offset < 16; offset += 3) {
    for (size_t len : {0, 1, 7, 8, 15, 63, 64, 65, 255, 256, 1000}) {
      if (ExtendIsal(0x9u, buf + offset, len) != ExtendPortable(0x9u, buf + offset, len)) {
        return false;
      }
    }
  }
  return true;
}

using ExtendFn = uint32_t (*)(uint32_t, const void*, size_t);

ExtendFn Choose() { return SelfTest() ? &ExtendIsal : &ExtendPortable; }

ExtendFn Impl() {
  static const ExtendFn fn = Choose();
  return fn;
}

}  // namespace

uint32_t ExtendPortable(uint32_t crc, const void* data, size_t n) {
  uint32_t reg = ~crc;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) reg = kTable[(reg ^ p[i]) & 0xFF] ^ (reg >> 8);
  return ~reg;
}

uint32_t Extend(uint32_t crc, const void* data, size_t n) { return Impl()(crc, data, n); }

uint32_t Combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // crc(a ‖ b) = crc_a * x^(8 len_b) ^ crc_b: the pre- and post-inversions cancel out.
  uint32_t shift = 1u << 31;  // x^0
  for (size_t k = 3; len_b != 0 && k < kPowers.size(); ++k, len_b >>= 1) {
    if (len_b & 1) shift = MultModP(kPowers[k], shift);
  }
  return MultModP(shift, crc_a) ^ crc_b;
}

bool IsAccelerated() { return Impl() == &ExtendIsal; }

}  // namespace spectrumkv::crc32c
