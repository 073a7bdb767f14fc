#include "daemon/pools/staging_arena.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/status.h"

namespace spectrumkv {
namespace {

constexpr uint64_t kGranule = 64 << 10;

uint64_t RoundUp(uint64_t x) { return (x + kGranule - 1) / kGranule * kGranule; }

}  // namespace

StagingBuffer::StagingBuffer(StagingArena* arena, uint8_t* data, uint64_t size, uint64_t offset,
                             uint64_t reserved)
    : arena_(arena), data_(data), size_(size), offset_(offset), reserved_(reserved) {}

StagingBuffer::StagingBuffer(StagingBuffer&& other) noexcept { *this = std::move(other); }

StagingBuffer& StagingBuffer::operator=(StagingBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    arena_ = other.arena_;
    data_ = other.data_;
    size_ = other.size_;
    offset_ = other.offset_;
    reserved_ = other.reserved_;
    other.arena_ = nullptr;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

StagingBuffer::~StagingBuffer() { Release(); }

void StagingBuffer::Release() {
  if (arena_ != nullptr) arena_->Free(offset_, reserved_);
  arena_ = nullptr;
  data_ = nullptr;
  size_ = 0;
}

absl::StatusOr<std::unique_ptr<StagingArena>> StagingArena::Create(uint64_t capacity_bytes,
                                                                   bool prefault, bool lock) {
  if (capacity_bytes == 0) return absl::InvalidArgumentError("staging arena of 0 bytes");
  const uint64_t capacity = RoundUp(capacity_bytes);
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | (prefault || lock ? MAP_POPULATE : MAP_NORESERVE);
  void* p = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cannot reserve a %u-byte staging arena: %s", capacity, std::strerror(errno)));
  }
  if (lock && mlock(p, capacity) != 0) {
    const int err = errno;
    munmap(p, capacity);
    return absl::ResourceExhaustedError(
        absl::StrFormat("cannot lock a %u-byte staging arena: %s (raise LimitMEMLOCK)", capacity,
                        std::strerror(err)));
  }
  return std::unique_ptr<StagingArena>(new StagingArena(static_cast<uint8_t*>(p), capacity));
}

StagingArena::~StagingArena() {
  {
    absl::MutexLock lock(&mu_);
    SPECTRUMKV_CHECK_MSG(used_ == 0, "staging arena destroyed with buffers outstanding");
  }
  munmap(base_, capacity_);
}

absl::StatusOr<StagingBuffer> StagingArena::Allocate(uint64_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("staging allocation of 0 bytes");
  const uint64_t need = RoundUp(bytes);
  absl::MutexLock lock(&mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < need) continue;
    const uint64_t offset = it->first, left = it->second - need;
    free_.erase(it);
    if (left > 0) free_[offset + need] = left;
    used_ += need;
    return StagingBuffer(this, base_ + offset, bytes, offset, need);
  }
  return absl::ResourceExhaustedError(
      absl::StrFormat("no room for %u bytes in the staging arena (%u of %u bytes in use)", bytes,
                      used_, capacity_));
}

void StagingArena::Free(uint64_t offset, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  used_ -= bytes;
  auto next = free_.lower_bound(offset);
  uint64_t start = offset, size = bytes;
  if (next != free_.end() && offset + bytes == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      size += prev->second;
      free_.erase(prev);
    }
  }
  free_[start] = size;
}

uint64_t StagingArena::used() const {
  absl::MutexLock lock(&mu_);
  return used_;
}

}  // namespace spectrumkv
