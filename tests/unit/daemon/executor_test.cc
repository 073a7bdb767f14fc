#include "daemon/common/executor.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "gtest/gtest.h"

namespace spectrumkv {
namespace {

TEST(ExecutorTest, OneWorkerRunsTasksInOrder) {
  std::vector<int> order;
  {
    Executor e(1, "t");
    for (int i = 0; i < 100; ++i) ASSERT_TRUE(e.Post([&order, i] { order.push_back(i); }));
  }  // the destructor runs what was posted, then joins
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
}

TEST(ExecutorTest, ShutdownRunsWhatWasPostedAndRefusesMore) {
  std::atomic<int> ran{0};
  Executor e(3, "t");
  for (int i = 0; i < 50; ++i) e.Post([&ran] { ran.fetch_add(1); });
  e.Shutdown();
  EXPECT_EQ(ran.load(), 50);
  EXPECT_EQ(e.pending(), 0u);
  EXPECT_FALSE(e.Post([&ran] { ran.fetch_add(1); }));
  e.Shutdown();  // twice is fine
  EXPECT_EQ(ran.load(), 50);
}

// A burst of as many tasks as workers runs on all of them at once: each task waits until every
// one has started (it would wait forever if any two shared a worker; bounded here).
TEST(ExecutorTest, ABurstRunsOnEveryIdleWorkerAtOnce) {
  constexpr int kWorkers = 6;
  Executor e(kWorkers, "t");
  for (int round = 0; round < 20; ++round) {
    std::mutex mu;
    std::condition_variable cv;
    int started = 0, all_met = 0, done = 0;
    for (int i = 0; i < kWorkers; ++i) {
      e.Post([&] {
        std::unique_lock<std::mutex> lock(mu);
        ++started;
        cv.notify_all();
        if (cv.wait_for(lock, std::chrono::seconds(10), [&] { return started == kWorkers; })) {
          ++all_met;
        }
        ++done;
        cv.notify_all();
      });
    }
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(30), [&] { return done == kWorkers; }));
    EXPECT_EQ(all_met, kWorkers) << "round " << round;
  }
}

}  // namespace
}  // namespace spectrumkv
