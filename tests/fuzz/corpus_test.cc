// Replays the wire fuzz corpus (and every truncation of each file) as an ordinary test.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <vector>

#include "gtest/gtest.h"
#include "tests/fuzz/wire_fuzz_target.h"

namespace spectrumkv::fuzz {
namespace {

TEST(WireFuzzCorpusTest, EveryFileAndTruncationIsHandled) {
  const char* dir = std::getenv("SPECTRUMKV_FUZZ_CORPUS");
  ASSERT_NE(dir, nullptr);
  int files = 0, unpacked = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path(), std::ios::binary);
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
    unpacked += FuzzWirePayload(bytes.data(), bytes.size());
    for (size_t len = 0; len < bytes.size(); len += 1 + len / 64) {
      EXPECT_EQ(FuzzWirePayload(bytes.data(), len), 0) << entry.path() << " truncated to " << len;
    }
    ++files;
  }
  EXPECT_GE(files, 2);
  EXPECT_GE(unpacked, 2) << "the corpus should hold valid payloads to mutate from";
}

}  // namespace
}  // namespace spectrumkv::fuzz
