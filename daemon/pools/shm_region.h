// Host memory a frontend shares with the daemon: a POSIX shared-memory object mapped read-write.
#ifndef SPECTRUMKV_DAEMON_POOLS_SHM_REGION_H_
#define SPECTRUMKV_DAEMON_POOLS_SHM_REGION_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace spectrumkv {

// A mapping of [offset, offset + size) of a shared-memory object. Unmapped on destruction.
// Thread-compatible; the memory itself is shared with other processes.
class ShmRegion {
 public:
  // Maps `size_bytes` at `offset_bytes` of the object `name` ("/name", as shm_open takes).
  // INVALID_ARGUMENT for a bad name, a range outside the object or a zero size; NOT_FOUND if
  // the object does not exist; PERMISSION_DENIED if it cannot be opened read-write.
  static absl::StatusOr<std::unique_ptr<ShmRegion>> Map(const std::string& name,
                                                        uint64_t offset_bytes, uint64_t size_bytes);
  ~ShmRegion();
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;

  void* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  ShmRegion(void* mapping, uint64_t mapping_bytes, void* data, uint64_t size)
      : mapping_(mapping), mapping_bytes_(mapping_bytes), data_(data), size_(size) {}
  void* mapping_;
  uint64_t mapping_bytes_;
  void* data_;
  uint64_t size_;
};

// Copies `bytes` bytes at `offset_bytes` of the shared-memory object `name` into `out` with
// pread, not a mapping, so that an object the frontend shrinks meanwhile gives an error, not
// SIGBUS. INVALID_ARGUMENT for a bad name or a range outside the object; NOT_FOUND if the
// object does not exist; PERMISSION_DENIED if it cannot be opened for reading.
absl::Status ReadShm(const std::string& name, uint64_t offset_bytes, void* out, uint64_t bytes);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_POOLS_SHM_REGION_H_
