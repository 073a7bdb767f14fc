#include "daemon/pools/staging_arena.h"

#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

TEST(StagingArenaTest, AllocatesFreesAndCoalesces) {
  auto arena = *StagingArena::Create(1 << 20, false, false);
  EXPECT_EQ(arena->capacity(), 1u << 20);
  auto a = arena->Allocate(300 << 10);
  auto b = arena->Allocate(300 << 10);
  auto c = arena->Allocate(300 << 10);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(arena->Allocate(300 << 10).status().code(), absl::StatusCode::kResourceExhausted);
  std::memset(b->data(), 0xAB, b->size());  // the memory is usable
  *b = StagingBuffer();                     // free the middle
  EXPECT_EQ(arena->Allocate(400 << 10).status().code(), absl::StatusCode::kResourceExhausted);
  *a = StagingBuffer();  // a + b coalesce
  auto d = arena->Allocate(600 << 10);
  ASSERT_TRUE(d.ok());
  *c = StagingBuffer();
  *d = StagingBuffer();
  EXPECT_EQ(arena->used(), 0u);
  EXPECT_TRUE(arena->Allocate(1 << 20).ok());  // all of it again (freed immediately)
  EXPECT_FALSE(arena->Allocate(0).ok());
}

TEST(StagingArenaTest, ConcurrentUseNeverOverlaps) {
  auto arena = *StagingArena::Create(8 << 20, true, false);
  std::vector<std::thread> threads;
  std::atomic<int> overlaps{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 500; ++i) {
        auto b = arena->Allocate(1 + rng() % (512 << 10));
        if (!b.ok()) continue;
        std::memset(b->data(), t + 1, b->size());
        for (uint64_t k = 0; k < b->size(); k += 4096) {
          if (b->data()[k] != t + 1) overlaps++;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(arena->used(), 0u);
}

}  // namespace
}  // namespace spectrumkv
