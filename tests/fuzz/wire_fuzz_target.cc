#include "tests/fuzz/wire_fuzz_target.h"

#include <span>

#include "client/kvgen/host_pool.h"
#include "kernels/api/codec.h"
#include "kernels/cpu/cpu_codec.h"

namespace spectrumkv::fuzz {

int FuzzWirePayload(const uint8_t* data, size_t size) {
  static const auto codec = CpuCodec::CreateBest();
  const std::span<const uint8_t> bytes(data, size);
  auto prelude = ParsePrelude(bytes, uint64_t{1} << 26);
  if (!prelude.ok()) return 0;
  const PayloadDesc& d = prelude->layout.desc;
  const uint64_t kv_bytes = uint64_t{d.num_tokens} * d.shape.Fp16BytesPerToken();
  if (kv_bytes > (uint64_t{8} << 20)) return 0;  // keep each run small
  kvgen::PoolSpec spec{kvgen::PoolLayoutKind::kVllmNhd, d.shape, d.dtype, 16,
                       kvgen::BlocksFor(d.num_tokens, 16)};
  auto pool = kvgen::HostPool::Create(spec);
  if (!pool.ok()) return 0;
  std::vector<uint32_t> table(spec.num_blocks);
  for (uint32_t i = 0; i < table.size(); ++i) table[i] = i;
  return UnpackPayload(*codec, bytes, (*pool)->View(table, d.num_tokens), uint64_t{1} << 26).ok()
             ? 1
             : 0;
}

}  // namespace spectrumkv::fuzz
