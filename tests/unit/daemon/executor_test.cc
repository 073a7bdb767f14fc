#include "daemon/common/executor.h"

#include <sys/resource.h>
#include <unistd.h>

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

// Workers run at the nice they were given, relative to the process's own, and threads they
// start inherit it; the thread that made the executor keeps its own.
TEST(ExecutorTest, WorkersRunAtTheirNice) {
  errno = 0;
  const int base = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid()));
  ASSERT_EQ(errno, 0);
  if (base > 19 - 5) GTEST_SKIP() << "this process already runs at nice " << base;
  std::mutex mu;
  std::vector<int> seen;
  {
    Executor e(2, "t", 5);
    for (int i = 0; i < 2; ++i) {
      e.Post([&] {
        int inherited = 0;
        std::thread child(
            [&] { inherited = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid())); });
        child.join();
        std::lock_guard<std::mutex> lock(mu);
        seen.push_back(getpriority(PRIO_PROCESS, static_cast<id_t>(gettid())));
        seen.push_back(inherited);
      });
    }
  }
  ASSERT_EQ(seen.size(), 4u);
  for (int nice : seen) EXPECT_EQ(nice, base + 5);
  EXPECT_EQ(getpriority(PRIO_PROCESS, static_cast<id_t>(gettid())), base);
  Executor plain(1, "t");
  int plain_nice = -100;
  plain.Post([&] { plain_nice = getpriority(PRIO_PROCESS, static_cast<id_t>(gettid())); });
  plain.Shutdown();
  EXPECT_EQ(plain_nice, base);
}

}  // namespace
}  // namespace spectrumkv
