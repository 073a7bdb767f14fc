#include "daemon/pools/shm_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"

namespace spectrumkv {
namespace {

// shm_open of `name` after checking its form; NOT_FOUND or PERMISSION_DENIED as the errno says.
absl::StatusOr<int> OpenShm(const std::string& name, int flags) {
  if (name.size() < 2 || name.size() > 255 || name[0] != '/' ||
      name.find('/', 1) != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "shared-memory name \"%s\" must be \"/name\" with no other slash (shm_open)", name));
  }
  const int fd = shm_open(name.c_str(), flags, 0);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrFormat("shared-memory object %s does not exist", name));
    }
    return absl::PermissionDeniedError(
        absl::StrFormat("cannot open shared-memory object %s: %s", name, std::strerror(err)));
  }
  return fd;
}

}  // namespace

absl::Status ReadShm(const std::string& name, uint64_t offset_bytes, void* out, uint64_t bytes) {
  absl::StatusOr<int> fd = OpenShm(name, O_RDONLY);
  if (!fd.ok()) return fd.status();
  auto* dst = static_cast<uint8_t*>(out);
  uint64_t done = 0;
  while (done < bytes) {
    const ssize_t n = pread(*fd, dst + done, bytes - done, static_cast<off_t>(offset_bytes + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : 0;
      close(*fd);
      return absl::InvalidArgumentError(absl::StrFormat(
          "region [%u, +%u) of shared-memory object %s cannot be read%s%s", offset_bytes, bytes,
          name, err ? ": " : " (it lies outside the object)", err ? std::strerror(err) : ""));
    }
    done += static_cast<uint64_t>(n);
  }
  close(*fd);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ShmRegion>> ShmRegion::Map(const std::string& name,
                                                          uint64_t offset_bytes,
                                                          uint64_t size_bytes) {
  if (size_bytes == 0) return absl::InvalidArgumentError("shared-memory region of size 0");
  absl::StatusOr<int> opened = OpenShm(name, O_RDWR);
  if (!opened.ok()) return opened.status();
  const int fd = *opened;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return absl::InternalError(absl::StrFormat("fstat %s: %s", name, std::strerror(err)));
  }
  uint64_t end;
  if (__builtin_add_overflow(offset_bytes, size_bytes, &end) ||
      end > static_cast<uint64_t>(st.st_size)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrFormat("region [%u, +%u) lies outside shared-memory object %s of %u bytes",
                        offset_bytes, size_bytes, name, static_cast<uint64_t>(st.st_size)));
  }
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t map_offset = offset_bytes / page * page;
  const uint64_t map_bytes = end - map_offset;
  void* mapping = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                       static_cast<off_t>(map_offset));
  const int err = errno;
  close(fd);
  if (mapping == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("cannot map %u bytes of %s: %s", map_bytes, name, std::strerror(err)));
  }
  void* data = static_cast<uint8_t*>(mapping) + (offset_bytes - map_offset);
  return std::unique_ptr<ShmRegion>(new ShmRegion(mapping, map_bytes, data, size_bytes));
}

ShmRegion::~ShmRegion() { munmap(mapping_, mapping_bytes_); }

}  // namespace spectrumkv
