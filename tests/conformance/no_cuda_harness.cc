// Builds without the CUDA backend have no CUDA harness.
#include "tests/conformance/backend_harness.h"

namespace spectrumkv::testing {

std::vector<std::pair<std::string, HarnessFactory>> CudaHarnesses() { return {}; }

}  // namespace spectrumkv::testing
