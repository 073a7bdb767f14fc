#include "daemon/pools/shm_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

// A shared-memory object of `bytes` bytes 0, 1, 2, ... (mod 256), unlinked on destruction.
class ShmObject {
 public:
  explicit ShmObject(uint64_t bytes) : name_(absl::StrFormat("/skv-shm-test-%d", getpid())) {
    const int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    EXPECT_GE(fd, 0);
    std::vector<uint8_t> data(bytes);
    std::iota(data.begin(), data.end(), uint8_t{0});
    EXPECT_EQ(pwrite(fd, data.data(), bytes, 0), static_cast<ssize_t>(bytes));
    close(fd);
  }
  ~ShmObject() { shm_unlink(name_.c_str()); }
  const std::string& name() const { return name_; }
  void Truncate(uint64_t bytes) const {
    const int fd = shm_open(name_.c_str(), O_RDWR, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0);
    close(fd);
  }

 private:
  std::string name_;
};

TEST(ReadShmTest, ReadsTheRangeAndRefusesWhatIsNotThere) {
  ShmObject obj(10000);
  std::vector<uint8_t> out(300);
  ASSERT_TRUE(ReadShm(obj.name(), 5000, out.data(), out.size()).ok());
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<uint8_t>(5000 + i));

  // Past the end, also after the frontend shrank the object: an error, not SIGBUS.
  EXPECT_EQ(ReadShm(obj.name(), 9800, out.data(), out.size()).code(),
            absl::StatusCode::kInvalidArgument);
  obj.Truncate(5100);
  EXPECT_EQ(ReadShm(obj.name(), 5000, out.data(), out.size()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadShm("/skv-shm-test-none", 0, out.data(), 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ReadShm("no-slash", 0, out.data(), 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadShm("/a/b", 0, out.data(), 1).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ShmRegionTest, MapsARangeAndRefusesOneOutsideTheObject) {
  ShmObject obj(10000);
  auto region = ShmRegion::Map(obj.name(), 4097, 100);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(static_cast<const uint8_t*>((*region)->data())[0], static_cast<uint8_t>(4097));
  EXPECT_EQ(ShmRegion::Map(obj.name(), 9950, 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmRegion::Map(obj.name(), 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ShmRegion::Map("/skv-shm-test-none", 0, 1).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace spectrumkv
