#include "common/crc32c.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace spectrumkv::crc32c {
namespace {

TEST(Crc32cTest, StandardVectors) {
  // RFC 3720 B.4 test vectors and the CRC catalogue check value.
  EXPECT_EQ(Value("123456789", 9), 0xE3069283u);
  std::vector<uint8_t> buf(32, 0);
  EXPECT_EQ(Value(buf.data(), buf.size()), 0x8A9136AAu);
  std::fill(buf.begin(), buf.end(), 0xFF);
  EXPECT_EQ(Value(buf.data(), buf.size()), 0x62A8AB43u);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(Value(buf.data(), buf.size()), 0x46DD794Eu);
  for (int i = 0; i < 32; ++i) buf[i] = static_cast<uint8_t>(31 - i);
  EXPECT_EQ(Value(buf.data(), buf.size()), 0x113FDB5Cu);
  EXPECT_EQ(Value(nullptr, 0), 0u);
}

TEST(Crc32cTest, ExtendConcatenates) {
  const std::string a = "hello, ", b = "world";
  EXPECT_EQ(Extend(Value(a.data(), a.size()), b.data(), b.size()),
            Value((a + b).data(), a.size() + b.size()));
}

TEST(Crc32cTest, CombineEqualsTheCrcOfTheWhole) {
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> buf(100000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (int i = 0; i < 200; ++i) {
    const size_t n = rng() % buf.size(), cut = n == 0 ? 0 : rng() % (n + 1);
    EXPECT_EQ(Combine(Value(buf.data(), cut), Value(buf.data() + cut, n - cut), n - cut),
              Value(buf.data(), n))
        << n << " cut at " << cut;
  }
  EXPECT_EQ(Combine(0x12345678u, 0, 0), 0x12345678u);  // b empty
  EXPECT_EQ(Combine(0, 0xE3069283u, 9), 0xE3069283u);  // a empty: "123456789"
  // Eight parts, combined in order.
  uint32_t crc = 0;
  for (size_t p = 0; p < 8; ++p) {
    const size_t b = buf.size() * p / 8, e = buf.size() * (p + 1) / 8;
    crc = Combine(crc, Value(buf.data() + b, e - b), e - b);
  }
  EXPECT_EQ(crc, Value(buf.data(), buf.size()));
}

TEST(Crc32cTest, AcceleratedMatchesPortable) {
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint8_t> buf(70000);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t len : {0u, 1u, 3u, 16u, 31u, 1024u, 4099u, 70000u}) {
    for (size_t off : {0u, 1u, 7u}) {
      if (off + len > buf.size()) continue;
      EXPECT_EQ(Extend(0x1234u, buf.data() + off, len),
                ExtendPortable(0x1234u, buf.data() + off, len))
          << len << " " << off;
    }
  }
  EXPECT_TRUE(IsAccelerated()) << "ISA-L CRC32C failed its self-test on this machine";
}

}  // namespace
}  // namespace spectrumkv::crc32c
