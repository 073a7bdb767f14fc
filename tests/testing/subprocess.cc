#include "tests/testing/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

namespace spectrumkv::testing {

Subprocess::~Subprocess() {
  if (pid_ > 0) Stop(SIGKILL, 5);
}

bool Subprocess::Start(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    const int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    execv(args[0], args.data());
    _exit(127);
  }
  pid_ = pid;
  return true;
}

std::optional<int> Subprocess::Wait(double timeout_s) {
  if (pid_ <= 0) return std::nullopt;
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(timeout_s));
  while (true) {  // checks at least once, also with a timeout of 0
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      pid_ = -1;
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return -1;
    }
    if (std::chrono::steady_clock::now() >= end) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return std::nullopt;
}

std::optional<int> Subprocess::Stop(int sig, double timeout_s) {
  if (pid_ <= 0) return std::nullopt;
  kill(pid_, sig);
  std::optional<int> code = Wait(timeout_s);
  if (!code && pid_ > 0) {
    kill(pid_, SIGKILL);
    Wait(5);
  }
  return code;
}

int RunCommand(const std::vector<std::string>& argv, double timeout_s, std::string* output) {
  char path[] = "/tmp/skv-cmd-XXXXXX";
  const int fd = mkstemp(path);
  if (fd >= 0) close(fd);
  Subprocess p;
  if (!p.Start(argv, path)) return -1;
  std::optional<int> code = p.Wait(timeout_s);
  if (!code) p.Stop(SIGKILL, 5);
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  if (output) *output = ss.str();
  std::remove(path);
  return code ? *code : -1;
}

}  // namespace spectrumkv::testing
