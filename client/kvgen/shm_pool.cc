#include "client/kvgen/shm_pool.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv::kvgen {
namespace {

// A new shared-memory object, open read-write. ALREADY_EXISTS if the name is taken.
absl::StatusOr<int> CreateObject(const std::string& name) {
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    const int err = errno;
    return absl::Status(
        err == EEXIST ? absl::StatusCode::kAlreadyExists : absl::StatusCode::kPermissionDenied,
        absl::StrFormat("shm_open %s: %s", name, std::strerror(err)));
  }
  return fd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ShmPool>> ShmPool::Create(const std::string& prefix,
                                                         const PoolSpec& spec) {
  PoolLayout built = BuildPoolLayout(spec);
  SPECTRUMKV_RETURN_IF_ERROR(ValidateLayout(built.layout, built.region_sizes));
  std::unique_ptr<ShmPool> pool(new ShmPool());
  pool->spec_ = spec;
  pool->layout_ = std::move(built.layout);
  for (size_t i = 0; i < built.region_sizes.size(); ++i) {
    const std::string name = absl::StrFormat("/%s-r%u", prefix, i);
    SPECTRUMKV_ASSIGN_OR_RETURN(const int fd, CreateObject(name));
    pool->names_.push_back(name);  // unlinked by the destructor from here on
    const uint64_t size = built.region_sizes[i];
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
      const int err = errno;
      close(fd);
      return absl::ResourceExhaustedError(
          absl::StrFormat("ftruncate %s to %u bytes: %s", name, size, std::strerror(err)));
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int err = errno;
    close(fd);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(absl::StrFormat("mmap %s: %s", name, std::strerror(err)));
    }
    pool->regions_.push_back(MemoryRegion{p, size});
  }
  return pool;
}

ShmPool::~ShmPool() {
  for (const MemoryRegion& r : regions_) munmap(r.base, r.size_bytes);
  for (const std::string& n : names_) shm_unlink(n.c_str());
}

KvBuffer ShmPool::View(std::span<const uint32_t> block_table, uint32_t num_tokens) const {
  return KvBuffer{&layout_, regions_, MemoryKind::kHost, block_table, num_tokens};
}

void ShmPool::Zero() {
  for (const MemoryRegion& r : regions_) std::memset(r.base, 0, r.size_bytes);
}

absl::StatusOr<std::unique_ptr<ShmBytes>> ShmBytes::Create(const std::string& name,
                                                           std::span<const std::byte> data,
                                                           uint64_t offset) {
  SPECTRUMKV_ASSIGN_OR_RETURN(const int fd, CreateObject(name));
  std::unique_ptr<ShmBytes> bytes(new ShmBytes(name));  // unlinks on any error below
  const bool ok = ftruncate(fd, static_cast<off_t>(offset + data.size())) == 0 &&
                  pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset)) ==
                      static_cast<ssize_t>(data.size());
  const int err = errno;
  close(fd);
  if (!ok) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("writing %u bytes to %s: %s", data.size(), name, std::strerror(err)));
  }
  return bytes;
}

ShmBytes::~ShmBytes() { shm_unlink(name_.c_str()); }

}  // namespace spectrumkv::kvgen
