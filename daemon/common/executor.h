// A fixed pool of worker threads running posted tasks in FIFO order. Codec work (score, pack,
// unpack) and transfer bookkeeping run here, never on gRPC's callback threads.
// Thread-safe. Shutdown() (or the destructor) runs every task already posted, then joins.
//
// Idle workers sleep on a std::condition_variable and each Post wakes one of them at once, so a
// burst of tasks (the slices of one chunk) starts on as many workers in parallel. (absl::Mutex
// conditions wake one waiter at a time, the next only once the woken one has run: measured on a
// 16-core host, the last of eight slices of a chunk began 0.36-0.65 ms after the first.)
#ifndef SPECTRUMKV_DAEMON_COMMON_EXECUTOR_H_
#define SPECTRUMKV_DAEMON_COMMON_EXECUTOR_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace spectrumkv {

class Executor {
 public:
  Executor(int threads, std::string name);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `task`. After Shutdown the task is dropped (returns false).
  bool Post(std::function<void()> task);
  void Shutdown();
  // Tasks queued or running.
  size_t pending() const;

 private:
  void Loop();
  const std::string name_;
  mutable std::mutex mu_;
  std::condition_variable wake_;                // a task was queued, or stopping_ was set
  std::deque<std::function<void()>> queue_;     // guarded by mu_
  size_t running_ = 0;                          // guarded by mu_
  bool stopping_ = false;                       // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_COMMON_EXECUTOR_H_
