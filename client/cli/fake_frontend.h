// `spectrumkv fake-frontend`: plays a prefill frontend and a decode frontend against one or two
// daemons. It creates a KV pool per side (shared host memory, or GPU memory exported through CUDA
// IPC handles) in a chosen engine layout, fills the
// source with synthetic (or file) KV, registers both pools, drives Receive and Send for each
// budget, verifies what arrived against the source within each tier's error bound, optionally
// checks the daemons' metrics against the transfers, and prints a table of bytes and per-stage
// latency.
#ifndef SPECTRUMKV_CLIENT_CLI_FAKE_FRONTEND_H_
#define SPECTRUMKV_CLIENT_CLI_FAKE_FRONTEND_H_

#include "CLI/CLI.hpp"

namespace spectrumkv {

void AddFakeFrontendCommand(CLI::App& app, int* exit_code);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_CLIENT_CLI_FAKE_FRONTEND_H_
