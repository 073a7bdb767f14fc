#include "client/kvgen/npy.h"

#include <cstring>
#include <fstream>
#include <regex>

#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace spectrumkv::kvgen {
namespace {

constexpr char kMagic[] = "\x93NUMPY";

uint64_t DenseIndex(const DenseKv& d, uint32_t l, uint32_t kind, uint32_t t, uint32_t h) {
  return ((((uint64_t{l} * 2 + kind) * d.num_tokens + t) * d.shape.num_kv_heads) + h) *
         d.shape.head_dim;
}

}  // namespace

absl::StatusOr<DenseKv> ReadNpy(const std::string& path, bool bf16_bits) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrFormat("cannot open %s", path));
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, kMagic, 6) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s is not a .npy file", path));
  }
  const int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) return absl::DataLossError("truncated .npy");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) return absl::DataLossError("truncated .npy");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t{b[3]} << 24);
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(".npy version %d is not supported", major));
  }
  if (header_len > (1u << 20)) return absl::InvalidArgumentError(".npy header too large");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) return absl::DataLossError("truncated .npy header");

  std::smatch m;
  if (!std::regex_search(header, m, std::regex(R"('descr'\s*:\s*'([^']*)')"))) {
    return absl::InvalidArgumentError(".npy header has no descr");
  }
  const std::string descr = m[1];
  DenseKv kv;
  if (descr == "<f2" && !bf16_bits) {
    kv.dtype = DType::kFloat16;
  } else if ((descr == "<u2" || descr == "<i2") && bf16_bits) {
    kv.dtype = DType::kBFloat16;
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(
        ".npy dtype %s does not match: fp16 needs '<f2', bf16 needs '<u2' bit patterns", descr));
  }
  if (std::regex_search(header, m, std::regex(R"('fortran_order'\s*:\s*True)"))) {
    return absl::InvalidArgumentError(".npy array must be in C order");
  }
  if (!std::regex_search(header, m, std::regex(R"('shape'\s*:\s*\(([^)]*)\))"))) {
    return absl::InvalidArgumentError(".npy header has no shape");
  }
  std::vector<uint64_t> dims;
  for (absl::string_view part : absl::StrSplit(std::string(m[1]), ',', absl::SkipWhitespace())) {
    const std::string p(part);
    const size_t first = p.find_first_not_of(" \t");
    if (first == std::string::npos) continue;
    const std::string digits = p.substr(first);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos ||
        digits.size() > 12) {
      return absl::InvalidArgumentError(absl::StrFormat(".npy shape entry '%s'", p));
    }
    dims.push_back(std::stoull(digits));
  }
  if (dims.size() != 5 || dims[1] != 2) {
    return absl::InvalidArgumentError(
        ".npy KV must have shape [layers, 2, tokens, kv_heads, head_dim]");
  }
  if (dims[0] == 0 || dims[0] > kMaxLayers || dims[2] == 0 || dims[2] > kMaxTokens ||
      dims[3] == 0 || dims[3] > kMaxKvHeads || dims[4] == 0 || dims[4] > kMaxHeadDim ||
      dims[4] % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat(".npy shape [%u, 2, %u, %u, %u] is outside the codec's limits", dims[0],
                        dims[2], dims[3], dims[4]));
  }
  kv.shape = ModelShape{static_cast<uint32_t>(dims[0]), static_cast<uint32_t>(dims[3]),
                        static_cast<uint32_t>(dims[4])};
  kv.num_tokens = static_cast<uint32_t>(dims[2]);
  const uint64_t count = dims[0] * 2 * dims[2] * dims[3] * dims[4];
  kv.data.resize(count);
  if (!in.read(reinterpret_cast<char*>(kv.data.data()), static_cast<std::streamsize>(count * 2))) {
    return absl::DataLossError(absl::StrFormat("%s is shorter than its shape says", path));
  }
  return kv;
}

absl::Status WriteNpy(const std::string& path, const DenseKv& kv) {
  std::string header =
      absl::StrFormat("{'descr': '%s', 'fortran_order': False, 'shape': (%u, 2, %u, %u, %u), }",
                      kv.dtype == DType::kFloat16 ? "<f2" : "<u2", kv.shape.num_layers,
                      kv.num_tokens, kv.shape.num_kv_heads, kv.shape.head_dim);
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrFormat("cannot write %s", path));
  out.write(kMagic, 6);
  const char version[2] = {1, 0};
  out.write(version, 2);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xFF),
                                static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(kv.data.data()),
            static_cast<std::streamsize>(kv.data.size() * 2));
  if (!out) return absl::DataLossError(absl::StrFormat("short write to %s", path));
  return absl::OkStatus();
}

void CopyDenseToBuffer(const DenseKv& dense, const KvBuffer& kv) {
  const ModelShape& s = dense.shape;
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < dense.num_tokens; ++t) {
        for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
          std::memcpy(HostRowPtr(kv, l, kind == 1, t, h),
                      &dense.data[DenseIndex(dense, l, kind, t, h)], uint64_t{s.head_dim} * 2);
        }
      }
    }
  }
}

void CopyBufferToDense(const KvBuffer& kv, DenseKv* dense) {
  dense->shape = kv.layout->shape;
  dense->dtype = kv.layout->dtype;
  dense->num_tokens = kv.num_tokens;
  const ModelShape& s = dense->shape;
  dense->data.assign(uint64_t{s.num_layers} * 2 * kv.num_tokens * s.num_kv_heads * s.head_dim, 0);
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    for (uint32_t kind = 0; kind < 2; ++kind) {
      for (uint32_t t = 0; t < kv.num_tokens; ++t) {
        for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
          std::memcpy(&dense->data[DenseIndex(*dense, l, kind, t, h)],
                      HostRowPtr(kv, l, kind == 1, t, h), uint64_t{s.head_dim} * 2);
        }
      }
    }
  }
}

}  // namespace spectrumkv::kvgen
