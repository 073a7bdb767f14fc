// A fixed pool of worker threads running posted tasks in FIFO order. Codec work (score, pack,
// unpack) and transfer bookkeeping run here, never on gRPC's callback threads.
// Thread-safe. Shutdown() (or the destructor) runs every task already posted, then joins.
#ifndef SPECTRUMKV_DAEMON_COMMON_EXECUTOR_H_
#define SPECTRUMKV_DAEMON_COMMON_EXECUTOR_H_

#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace spectrumkv {

class Executor {
 public:
  // `nice` > 0 lowers the workers' scheduling priority: each worker's nice value is the creating
  // thread's plus `nice` (19 at most); threads they start inherit it. A failure is logged.
  Executor(int threads, std::string name, int nice = 0);
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
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  size_t running_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_COMMON_EXECUTOR_H_
