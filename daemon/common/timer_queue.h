// One thread that runs callbacks at deadlines (transfer deadlines, early-payload expiry,
// periodic sweeps). Callbacks must be short: they run on the timer thread. Thread-safe.
#ifndef SPECTRUMKV_DAEMON_COMMON_TIMER_QUEUE_H_
#define SPECTRUMKV_DAEMON_COMMON_TIMER_QUEUE_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <thread>

#include "absl/synchronization/mutex.h"

namespace spectrumkv {

class TimerQueue {
 public:
  using Clock = std::chrono::steady_clock;
  using Id = uint64_t;

  TimerQueue();
  ~TimerQueue();  // cancels everything pending, joins the thread
  TimerQueue(const TimerQueue&) = delete;
  TimerQueue& operator=(const TimerQueue&) = delete;

  // Runs `fn` at or after `when`. Returns an id for Cancel.
  Id Schedule(Clock::time_point when, std::function<void()> fn);
  // True if the timer was removed before it fired.
  bool Cancel(Id id);
  // Blocks until every callback due now has run, including one running at the time of the call.
  // Must not be called from a timer callback.
  void Flush();

 private:
  void Loop();
  absl::Mutex mu_;
  std::multimap<Clock::time_point, Id> order_ ABSL_GUARDED_BY(mu_);
  std::map<Id, std::pair<Clock::time_point, std::function<void()>>> timers_ ABSL_GUARDED_BY(mu_);
  Id next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool changed_ ABSL_GUARDED_BY(mu_) = false;  // a timer was added: re-check the earliest
  std::thread thread_;
};

}  // namespace spectrumkv

#endif  // SPECTRUMKV_DAEMON_COMMON_TIMER_QUEUE_H_
