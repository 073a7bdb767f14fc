// A fixed arena of host memory for payloads in flight (packed on the sender, received on the
// receiver). Reserved once at start-up, so in-flight payload memory is bounded by construction:
// an allocation that does not fit fails with RESOURCE_EXHAUSTED instead of growing the process.
// Thread-safe.
#ifndef SPECTRUMKV_DAEMON_POOLS_STAGING_ARENA_H_
#define SPECTRUMKV_DAEMON_POOLS_STAGING_ARENA_H_

#include <cstdint>
#include <map>
#include <memory>
#include <span>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace spectrumkv {

class StagingArena;

// An allocation from the arena, returned when destroyed. Move-only.
class StagingBuffer {
 public:
  StagingBuffer() = default;
  StagingBuffer(StagingBuffer&& other) noexcept;
  StagingBuffer& operator=(StagingBuffer&& other) noexcept;
  ~StagingBuffer();

  std::span<uint8_t> span() const { return {data_, size_}; }
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  friend class StagingArena;
  StagingBuffer(StagingArena* arena, uint8_t* data, uint64_t size, uint64_t offset,
                uint64_t reserved);
  void Release();
  StagingArena* arena_ = nullptr;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  uint64_t offset_ = 0;
  uint64_t reserved_ = 0;
};

class StagingArena {
 public:
  // Reserves `capacity_bytes` (rounded up to 64 KiB). With `prefault` every page is touched now
  // (so the first transfers do not pay page faults); with `lock` the pages are also locked in
  // memory (mlock: resident and never swapped, as pinned memory must be).
  static absl::StatusOr<std::unique_ptr<StagingArena>> Create(uint64_t capacity_bytes,
                                                              bool prefault, bool lock);
  ~StagingArena();

  // First-fit allocation of `bytes` (> 0). RESOURCE_EXHAUSTED if no free range is large enough.
  absl::StatusOr<StagingBuffer> Allocate(uint64_t bytes);

  uint64_t capacity() const { return capacity_; }
  uint64_t used() const;
  // The arena's memory is [base(), base() + capacity()), mapped for the arena's lifetime: what a
  // DMA engine registers to copy to and from staging buffers directly (pinned memory).
  uint8_t* base() const { return base_; }

 private:
  friend class StagingBuffer;
  StagingArena(uint8_t* base, uint64_t capacity) : base_(base), capacity_(capacity) {
    free_[0] = capacity;
  }
  void Free(uint64_t offset, uint64_t bytes);

  uint8_t* const base_;
  const uint64_t capacity_;
  mutable absl::Mutex mu_;
  std::map<uint64_t, uint64_t> free_ ABSL_GUARDED_BY(mu_);  // offset -> bytes
  uint64_t used_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_POOLS_STAGING_ARENA_H_
