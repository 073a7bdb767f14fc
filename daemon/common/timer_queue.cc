#include "daemon/common/timer_queue.h"

#include <pthread.h>

#include "absl/time/time.h"

namespace spectrumkv {

TimerQueue::TimerQueue() {
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "skv-timers");
    Loop();
  });
}

TimerQueue::~TimerQueue() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  thread_.join();
}

TimerQueue::Id TimerQueue::Schedule(Clock::time_point when, std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  const Id id = next_id_++;
  order_.emplace(when, id);
  changed_ = true;
  timers_.emplace(id, std::make_pair(when, std::move(fn)));
  return id;
}

bool TimerQueue::Cancel(Id id) {
  absl::MutexLock lock(&mu_);
  auto it = timers_.find(id);
  if (it == timers_.end()) return false;
  auto range = order_.equal_range(it->second.first);
  for (auto o = range.first; o != range.second; ++o) {
    if (o->second == id) {
      order_.erase(o);
      break;
    }
  }
  timers_.erase(it);
  return true;
}

void TimerQueue::Flush() {
  absl::Mutex done_mu;
  bool done = false;
  Schedule(Clock::now(), [&] {
    absl::MutexLock lock(&done_mu);
    done = true;
  });
  absl::MutexLock lock(&done_mu);
  done_mu.Await(absl::Condition(&done));
}

void TimerQueue::Loop() {
  const auto wake = +[](TimerQueue* q) ABSL_EXCLUSIVE_LOCKS_REQUIRED(q->mu_) {
    return q->stopping_ || q->changed_;
  };
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    changed_ = false;
    if (order_.empty()) {
      mu_.Await(absl::Condition(wake, this));
      continue;
    }
    const auto first = order_.begin();
    const auto now = Clock::now();
    if (first->first > now) {
      const auto wait = std::chrono::duration_cast<std::chrono::microseconds>(first->first - now);
      mu_.AwaitWithTimeout(absl::Condition(wake, this), absl::Microseconds(wait.count()));
      continue;
    }
    const Id id = first->second;
    order_.erase(first);
    auto it = timers_.find(id);
    std::function<void()> fn = std::move(it->second.second);
    timers_.erase(it);
    mu_.Unlock();
    fn();
    mu_.Lock();
  }
}
}  // namespace spectrumkv
