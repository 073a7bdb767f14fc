// `spectrumkv codec`: pack and unpack a synthetic or file KV cache through the real codec and
// report budgets, bytes, tier counts, reconstruction error and throughput.
#ifndef SPECTRUMKV_CLIENT_CLI_CODEC_COMMAND_H_
#define SPECTRUMKV_CLIENT_CLI_CODEC_COMMAND_H_

#include <array>
#include <cstdint>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "kernels/api/plan.h"
#include "kernels/api/types.h"

namespace spectrumkv {

struct CodecCommandOptions {
  std::string model = "llama3-8b";
  std::string kv_file;  // .npy [L, 2, n, H, D]; overrides model and tokens
  bool kv_file_bf16 = false;
  uint32_t tokens = 4096;
  std::string dtype = "fp16";
  double budget = 0.5;
  std::string budget_kind = "element";
  std::string policy = "3tier";
  std::string scoring = "key_norm";
  std::string quantizer = "absmax";
  std::string on_unreachable = "drop";
  uint32_t sinks = 4;
  double first_ratio = 0.0;
  double layer_slope = 0.0;
  bool per_layer = false;
  uint32_t window = 32;
  uint32_t q_heads = 0;  // 0: 4 x KV heads
  uint32_t pool_kernel = 5;
  double recency_decay = 0.0;
  std::string src_layout = "vllm-nhd";
  uint32_t src_block_size = 16;
  std::string dst_layout = "vllm-hnd";
  uint32_t dst_block_size = 32;
  std::string backend = "auto";
  uint32_t outlier_channels = 2;
  uint64_t seed = 1;
  uint32_t repeat = 1;
  bool json = false;
  std::string save_payload;
};

// Errors of one tier of one kind (K or V).
struct TierError {
  uint64_t rows = 0;
  double rel_l2 = 0.0;
  double max_abs = 0.0;
};

struct CodecReport {
  std::string backend;
  std::string backend_reason;
  ModelShape shape;
  std::string model;
  DType dtype = DType::kFloat16;
  uint32_t tokens = 0;
  TierCounts counts;  // summed over tier maps
  uint32_t num_maps = 1;
  // The payload's encoding: the quantizer's name, or "absmax" where the progressive quantizer
  // made an absmax payload (a plan with FP16 or dropped tokens, or one tier).
  std::string payload_quantizer;
  double element_budget = 0.0;
  double wire_budget = 0.0;
  uint64_t fp16_bytes = 0;
  uint64_t wire_bytes = 0;
  std::array<std::array<TierError, 2>, kNumTiers> errors{};  // [tier][K=0, V=1]
  uint64_t dropped_positions = 0;
  double score_s = 0.0, plan_s = 0.0, pack_s = 0.0, unpack_s = 0.0;  // medians over repeats
};

// Runs the round trip. INVALID_ARGUMENT for bad options, other codes from the codec.
absl::StatusOr<CodecReport> RunCodecRoundTrip(const CodecCommandOptions& options);

// Adds the `codec` subcommand to `app`; `exit_code` receives the command's exit status.
void AddCodecCommand(CLI::App& app, int* exit_code);

}  // namespace spectrumkv

#endif  // SPECTRUMKV_CLIENT_CLI_CODEC_COMMAND_H_
