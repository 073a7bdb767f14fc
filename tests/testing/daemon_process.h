// spectrumkvd processes for integration tests: each writes its own YAML config into a test
// directory, listens for gRPC on a Unix socket there and for peers on a fresh UCX TCP port on
// loopback, and is started and waited for until healthy.
#ifndef SPECTRUMKV_TESTS_TESTING_DAEMON_PROCESS_H_
#define SPECTRUMKV_TESTS_TESTING_DAEMON_PROCESS_H_

#include <memory>
#include <string>

#include "client/lib/client.h"
#include "tests/testing/subprocess.h"

namespace spectrumkv::testing {

// A TCP port on 127.0.0.1 that was free a moment ago.
int FreeLoopbackPort();

struct DaemonProcess {
  std::string binary;     // the spectrumkvd to run
  std::string name;       // node name; also names the config, socket and log files
  std::string dir;        // where they go
  std::string settings;   // YAML appended to the config: limits, codec
  std::string transport;  // further entries of the transport map, e.g. "ucx_lanes: 4"
  std::string socket, ucx_address;
  int port = 0;
  Subprocess process;
  std::unique_ptr<Client> client;

  std::string log_path() const { return dir + "/" + name + ".log"; }
  std::string Log() const;
  // Writes the config and (re)starts the daemon on the same socket and port; a test failure if
  // it is not healthy within 30 s.
  void Start();
};

// A prefill and a decode daemon in `dir`, each on its own fresh port, started.
struct DaemonPair {
  std::unique_ptr<DaemonProcess> prefill, decode;

  void Start(const std::string& binary, const std::string& dir, const std::string& settings,
             const std::string& transport = "");
  // SIGTERM to both; each must exit 0.
  void Stop();
};

}  // namespace spectrumkv::testing

#endif  // SPECTRUMKV_TESTS_TESTING_DAEMON_PROCESS_H_
