// Child processes for integration tests: start a binary with arguments, its output appended to a
// log file, and stop it (signal, then wait with a bound). The destructor kills what still runs.
#ifndef SPECTRUMKV_TESTS_TESTING_SUBPROCESS_H_
#define SPECTRUMKV_TESTS_TESTING_SUBPROCESS_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

namespace spectrumkv::testing {

class Subprocess {
 public:
  Subprocess() = default;
  ~Subprocess();
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  // Starts argv[0] with argv; stdout and stderr go to `log_path`. False if fork/exec failed.
  bool Start(const std::vector<std::string>& argv, const std::string& log_path);
  // Sends `sig`, then waits up to `timeout_s`; returns the exit code (128+signal if killed), or
  // nullopt if it did not exit in time (it is then SIGKILLed).
  std::optional<int> Stop(int sig, double timeout_s);
  // Waits up to `timeout_s` for a normal exit.
  std::optional<int> Wait(double timeout_s);
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

 private:
  pid_t pid_ = -1;
};

// Runs a command to completion (bounded), capturing stdout+stderr. Returns the exit code, or -1
// if it timed out.
int RunCommand(const std::vector<std::string>& argv, double timeout_s, std::string* output);

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_TESTING_SUBPROCESS_H_
