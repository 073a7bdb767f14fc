// Builders of the KV-pool layouts real engines use, expressed as SpectrumKV layout descriptors.
//
//   vllm-nhd   per layer one region [2, num_blocks, block_size, H, D] (vLLM FlashAttention)
//   vllm-hnd   per layer one region [2, num_blocks, H, block_size, D]
//   sglang     per layer a K region and a V region, each [num_blocks * block_size, H, D]
//              (SGLang's MHATokenToKVPool; block_size 1 is its token-granular pool)
//   trtllm     one region [num_blocks, L, 2, H, block_size, D] (TensorRT-LLM block-major pool)
#ifndef SPECTRUMKV_CLIENT_KVGEN_POOL_LAYOUTS_H_
#define SPECTRUMKV_CLIENT_KVGEN_POOL_LAYOUTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/api/layout.h"

namespace spectrumkv::kvgen {

enum class PoolLayoutKind { kVllmNhd, kVllmHnd, kSglang, kTrtllm };

std::optional<PoolLayoutKind> ParsePoolLayoutKind(std::string_view name);
std::string_view PoolLayoutKindName(PoolLayoutKind kind);
std::vector<std::string> PoolLayoutKindNames();

struct PoolSpec {
  PoolLayoutKind kind = PoolLayoutKind::kVllmNhd;
  ModelShape shape;
  DType dtype = DType::kFloat16;
  uint32_t block_size = 16;
  uint64_t num_blocks = 0;
};

// A layout and the byte sizes of the regions it refers to.
struct PoolLayout {
  KvLayout layout;
  std::vector<uint64_t> region_sizes;
};

PoolLayout BuildPoolLayout(const PoolSpec& spec);

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_POOL_LAYOUTS_H_
