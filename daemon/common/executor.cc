#include "daemon/common/executor.h"

#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

namespace spectrumkv {
namespace {

// On Linux a thread's nice value is its own (PRIO_PROCESS with a thread id); it starts at the
// creating thread's and is raised by `by` here, to 19 at most.
void Renice(const std::string& thread_name, int by) {
  const id_t tid = static_cast<id_t>(gettid());
  errno = 0;
  const int now = getpriority(PRIO_PROCESS, tid);
  const int target = std::min(19, (errno == 0 ? now : 0) + by);
  if (setpriority(PRIO_PROCESS, tid, target) != 0) {
    spdlog::warn("{}: cannot set nice {}: {}", thread_name, target, std::strerror(errno));
  }
}

}  // namespace

Executor::Executor(int threads, std::string name, int nice) : name_(std::move(name)) {
  for (int i = 0; i < threads; ++i) {
    threads_.emplace_back([this, i, nice] {
      const std::string thread_name = (name_ + "-" + std::to_string(i)).substr(0, 15);
      pthread_setname_np(pthread_self(), thread_name.c_str());
      if (nice != 0) Renice(thread_name, nice);
      Loop();
    });
  }
}

Executor::~Executor() { Shutdown(); }

bool Executor::Post(std::function<void()> task) {
  absl::MutexLock lock(&mu_);
  if (stopping_) return false;
  queue_.push_back(std::move(task));
  return true;
}

void Executor::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
  }
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

size_t Executor::pending() const {
  absl::MutexLock lock(&mu_);
  return queue_.size() + running_;
}

void Executor::Loop() {
  for (;;) {
    std::function<void()> task;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](Executor* e)
               ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) { return !e->queue_.empty() || e->stopping_; },
          this));
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
    }
    task();
    absl::MutexLock lock(&mu_);
    --running_;
  }
}

}  // namespace spectrumkv
