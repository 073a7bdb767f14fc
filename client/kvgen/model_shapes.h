// Named KV-cache shapes of real models (layers, KV heads, head_dim).
#ifndef SPECTRUMKV_CLIENT_KVGEN_MODEL_SHAPES_H_
#define SPECTRUMKV_CLIENT_KVGEN_MODEL_SHAPES_H_

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/api/types.h"

namespace spectrumkv::kvgen {

// llama3-8b (32, 8, 128), qwen2.5-7b (28, 4, 128), mistral-7b (32, 8, 128), gemma2-9b (42, 8, 256)
// and the small "tiny" (2, 2, 64) used by tests.
std::optional<ModelShape> LookupModelShape(std::string_view name);
std::vector<std::string> ModelShapeNames();

}  // namespace spectrumkv::kvgen

#endif  // SPECTRUMKV_CLIENT_KVGEN_MODEL_SHAPES_H_
