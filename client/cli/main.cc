// `spectrumkv`: the SpectrumKV command-line client.
#include <cstdio>

#include "CLI/CLI.hpp"
#include "client/cli/codec_command.h"
#include "client/cli/daemon_commands.h"
#include "client/cli/fake_frontend.h"
#include "common/exit_codes.h"

int main(int argc, char** argv) {
  CLI::App app{"spectrumkv: the SpectrumKV command-line client"};
  app.set_version_flag("--version", "spectrumkv 0.1.0");
  app.require_subcommand(1);
  int exit_code = spectrumkv::kExitOk;
  spectrumkv::AddCodecCommand(app, &exit_code);
  spectrumkv::AddDaemonCommands(app, &exit_code);
  spectrumkv::AddFakeFrontendCommand(app, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? spectrumkv::kExitOk : spectrumkv::kExitUsage;
  }
  return exit_code;
}
