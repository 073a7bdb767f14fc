#include "client/kvgen/synthetic.h"

#include <array>
#include <cmath>

#include "common/half.h"

namespace spectrumkv::kvgen {
namespace {

class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t Next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  float Gaussian() {
    const double u1 = Uniform() + 1e-300, u2 = Uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  uint64_t s_;
};

// 65536 standard-normal samples; synthetic rows index it with 16 random bits per element,
// which is fast enough to fill gigabytes.
const std::array<float, 65536>& GaussianTable() {
  static const std::array<float, 65536> table = [] {
    std::array<float, 65536> t{};
    Rng rng(12345);
    for (float& x : t) x = rng.Gaussian();
    return t;
  }();
  return table;
}

}  // namespace

void FillSynthetic(const KvBuffer& kv, const SyntheticOptions& o) {
  const ModelShape& s = kv.layout->shape;
  const DType dtype = kv.layout->dtype;
  const auto& gauss = GaussianTable();
  Rng rng(o.seed);
  std::vector<float> token_mag(kv.num_tokens);
  for (uint32_t t = 0; t < kv.num_tokens; ++t) {
    token_mag[t] =
        std::exp(o.token_spread * rng.Gaussian()) * (t < o.sink_tokens ? o.sink_scale : 1.0f);
  }
  std::vector<float> scale(s.head_dim), offset(s.head_dim);
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    for (bool value : {false, true}) {
      for (uint32_t h = 0; h < s.num_kv_heads; ++h) {
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          scale[c] = 0.5f + static_cast<float>(rng.Uniform());
          offset[c] = 0.0f;
        }
        if (!value) {
          for (uint32_t k = 0; k < o.outlier_channels && k < s.head_dim; ++k) {
            const uint32_t c = static_cast<uint32_t>(rng.Next() % s.head_dim);
            offset[c] = o.outlier_offset * (rng.Next() & 1 ? 1.0f : -1.0f);
            scale[c] *= o.outlier_scale;
          }
        }
        for (uint32_t t = 0; t < kv.num_tokens; ++t) {
          uint16_t* row = HostRowPtr(kv, l, value, t, h);
          const float mag = token_mag[t];
          uint64_t bits = 0;
          for (uint32_t c = 0; c < s.head_dim; ++c) {
            if (c % 4 == 0) bits = rng.Next();
            const float g = gauss[(bits >> (16 * (c % 4))) & 0xFFFF];
            row[c] = FromFloatRne(dtype, g * mag * scale[c] + offset[c]);
          }
        }
      }
    }
  }
}

std::vector<float> SyntheticWindowQueries(const KvBuffer& kv, uint32_t window, uint32_t num_q_heads,
                                          uint64_t seed) {
  const ModelShape& s = kv.layout->shape;
  const DType dtype = kv.layout->dtype;
  const uint32_t group = num_q_heads / s.num_kv_heads;
  const uint32_t n = kv.num_tokens;
  Rng rng(seed);
  std::vector<float> q(uint64_t{s.num_layers} * window * num_q_heads * s.head_dim);
  for (uint32_t l = 0; l < s.num_layers; ++l) {
    for (uint32_t i = 0; i < window; ++i) {
      for (uint32_t hq = 0; hq < num_q_heads; ++hq) {
        const uint32_t h = hq / group;
        const uint16_t* own = HostRowPtr(kv, l, false, n - window + i, h);
        const uint16_t* sink = HostRowPtr(kv, l, false, 0, h);
        float* dst = q.data() + ((uint64_t{l} * window + i) * num_q_heads + hq) * s.head_dim;
        for (uint32_t c = 0; c < s.head_dim; ++c) {
          dst[c] = 0.6f * ToFloat(dtype, own[c]) + 0.2f * ToFloat(dtype, sink[c]) +
                   0.5f * rng.Gaussian();
        }
      }
    }
  }
  return q;
}

}  // namespace spectrumkv::kvgen
