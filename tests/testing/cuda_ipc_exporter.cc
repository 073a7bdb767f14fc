// cuda_ipc_exporter: owns GPU memory for CUDA IPC import tests (protocol in cuda_ipc_exporter.h).
#include "tests/testing/cuda_ipc_exporter.h"

#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "kernels/cuda/cuda_memory.h"
#include "kernels/cuda/device.h"

namespace spectrumkv::testing {
namespace {

int Fail(const std::string& what) {
  std::fprintf(stderr, "cuda_ipc_exporter: %s\n", what.c_str());
  return 1;
}

int Run(int argc, char** argv) {
  if (argc != 5) return Fail("usage: cuda_ipc_exporter BYTES SEED INFO_PATH CHECKSUM_PATH");
  const uint64_t bytes = std::strtoull(argv[1], nullptr, 10);
  const uint64_t seed = std::strtoull(argv[2], nullptr, 10);
  const std::string info_path = argv[3], checksum_path = argv[4];
  if (bytes == 0) return Fail("BYTES must be positive");
  // SIGTERM is taken synchronously below; block it before anything can deliver it.
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  sigprocmask(SIG_BLOCK, &term, nullptr);

  if (absl::Status s = cuda::CheckDevice(0); !s.ok()) return Fail(s.ToString());
  auto buffer = cuda::DeviceBuffer::Allocate(bytes);
  if (!buffer.ok()) return Fail(buffer.status().ToString());
  std::vector<uint8_t> host(bytes);
  for (uint64_t i = 0; i < bytes; ++i) host[i] = IpcPattern(seed, i);
  if (absl::Status s = cuda::CopyToDevice(buffer->data(), host.data(), bytes); !s.ok()) {
    return Fail(s.ToString());
  }
  auto exported = cuda::ExportIpcHandle(buffer->data());
  if (!exported.ok()) return Fail(exported.status().ToString());
  std::string hex;
  for (unsigned char c : exported->handle) hex += absl::StrFormat("%02x", c);
  {
    std::ofstream info(info_path + ".tmp");
    info << hex << " " << exported->offset_bytes << " " << exported->allocation_bytes << "\n";
    if (!info) return Fail("cannot write " + info_path);
  }
  if (std::rename((info_path + ".tmp").c_str(), info_path.c_str()) != 0) {
    return Fail("cannot rename to " + info_path);
  }
  int sig = 0;
  sigwait(&term, &sig);
  if (absl::Status s = cuda::CopyToHost(host.data(), buffer->data(), bytes); !s.ok()) {
    return Fail(s.ToString());
  }
  std::ofstream(checksum_path) << IpcChecksum(host) << "\n";
  return 0;
}

}  // namespace
}  // namespace spectrumkv::testing

int main(int argc, char** argv) { return spectrumkv::testing::Run(argc, argv); }
