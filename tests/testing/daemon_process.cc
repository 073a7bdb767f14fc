#include "tests/testing/daemon_process.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <thread>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace spectrumkv::testing {

int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  const bool ok = fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  if (fd >= 0) close(fd);
  EXPECT_TRUE(ok) << "no free loopback port";
  return ok ? ntohs(a.sin_port) : 0;
}

std::string DaemonProcess::Log() const {
  std::ifstream f(log_path());
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void DaemonProcess::Start() {
  const std::string config = dir + "/" + name + ".yaml";
  std::ofstream(config) << absl::StrFormat(R"(node_name: %s
listen: {unix_socket: %s}
metrics: {address: "127.0.0.1:0"}
transport: {kind: ucx, address: "127.0.0.1:%d", ucx_tls: tcp%s}
%s)",
                                           name, socket, port,
                                           transport.empty() ? "" : ", " + transport, settings);
  ASSERT_TRUE(process.Start({binary, "--config", config}, log_path()));
  client = Client::Connect("unix:" + socket);
  for (int i = 0; i < 600; ++i) {
    auto h = client->Health(1);
    if (h.ok() && *h) return;
    if (process.Wait(0).has_value()) break;  // exited
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL() << name << " did not become healthy:\n" << Log();
}

void DaemonPair::Start(const std::string& binary, const std::string& dir,
                       const std::string& settings, const std::string& transport) {
  for (auto* d : {&prefill, &decode}) {
    *d = std::make_unique<DaemonProcess>();
    DaemonProcess& p = **d;
    p.binary = binary;
    p.name = d == &prefill ? "prefill" : "decode";
    p.dir = dir;
    p.settings = settings;
    p.transport = transport;
    p.socket = dir + "/" + p.name + ".sock";
    p.port = FreeLoopbackPort();
    p.ucx_address = absl::StrFormat("ucx://127.0.0.1:%d", p.port);
    p.Start();
  }
}

void DaemonPair::Stop() {
  for (auto* d : {&prefill, &decode}) {
    if (*d != nullptr && (*d)->process.running()) {
      EXPECT_EQ((*d)->process.Stop(SIGTERM, 20), 0) << (*d)->name << " must exit 0 on SIGTERM";
    }
    d->reset();
  }
}

}  // namespace spectrumkv::testing
