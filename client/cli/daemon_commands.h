// `spectrumkv` subcommands that talk to a daemon: health, info, pools, send, receive, transfers,
// cancel, policy. Each takes --daemon (the gRPC target) and --timeout-s, and --json where a
// script would read the output.
#ifndef SPECTRUMKV_CLIENT_CLI_DAEMON_COMMANDS_H_
#define SPECTRUMKV_CLIENT_CLI_DAEMON_COMMANDS_H_

#include "CLI/CLI.hpp"
#include "absl/status/status.h"

namespace spectrumkv {

inline constexpr char kDefaultDaemonTarget[] = "unix:/run/spectrumkv/spectrumkvd.sock";

void AddDaemonCommands(CLI::App& app, int* exit_code);

// The exit code for a failed call: 69 when the daemon cannot be reached, 64 for invalid
// arguments, 1 otherwise.
int ExitCodeFor(const absl::Status& s);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_CLIENT_CLI_DAEMON_COMMANDS_H_
