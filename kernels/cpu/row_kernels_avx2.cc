// AVX2/F16C/FMA row kernels. This file alone is compiled with -mavx2 -mf16c -mfma; nothing in it
// runs unless Avx2RowKernels() found those instructions. Codes, scales and reconstructions equal
// the scalar kernels' bit for bit: the same float operations in the same order (no FMA in the
// codec arithmetic; FMA only in the scoring sums, which are allowed to differ in the last bits).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/quant_math.h"
#include "kernels/cpu/row_kernels.h"

namespace spectrumkv {
namespace {

inline __m256 Load8(DType dtype, const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (dtype == DType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 16 bytes to `p`: a streaming store (p 16-byte aligned) or an ordinary one.
template <bool kStream>
inline void Store16(uint16_t* p, __m128i v) {
  if constexpr (kStream) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
  }
}

// Rounds 8 floats to nearest even in the dtype and stores them.
template <bool kStream = false>
inline void Store8(DType dtype, uint16_t* p, __m256 v) {
  if (dtype == DType::kFloat16) {
    Store16<kStream>(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
  // bfloat16 round-to-nearest-even on the bits (inputs are never NaN here).
  __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  u = _mm256_srli_epi32(u, 16);
  Store16<kStream>(p, _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
}

// Rows written with streaming stores: those that start on a 64-byte line and fill whole lines
// (head_dim a multiple of 32), so no line is left partly written in a write-combining buffer.
inline bool Streamable(const uint16_t* dst, uint32_t dim) {
  return reinterpret_cast<uintptr_t>(dst) % 64 == 0 && dim % 32 == 0;
}

inline uint16_t AbsMaxBits(const uint16_t* src, uint32_t dim) {
  const __m256i mask256 = _mm256_set1_epi16(0x7FFF);
  __m256i m = _mm256_setzero_si256();
  uint32_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    m = _mm256_max_epu16(m, _mm256_and_si256(v, mask256));
  }
  __m128i m128 = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  if (i < dim) {  // dim % 16 == 8
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    m128 = _mm_max_epu16(m128, _mm_and_si128(v, _mm_set1_epi16(0x7FFF)));
  }
  // max(x) = ~min(~x); _mm_minpos_epu16 finds the minimum of 8 lanes.
  const __m128i inv = _mm_xor_si128(m128, _mm_set1_epi16(-1));
  return static_cast<uint16_t>(~_mm_extract_epi16(_mm_minpos_epu16(inv), 0));
}

// 8 integer codes (as int32) of 8 floats: round half to even (the MXCSR default, as
// nearbyint), no clamp. The scale is rounded up (quant::MakeScale), so |x * inv| is at most
// qmax * (1 + 2^-23) and never rounds past qmax: the scalar definition's clamp never binds, and
// skipping it here changes no bit (the self-test and tests compare against the scalar kernels).
inline __m256i Codes8(__m256 x, __m256 inv) { return _mm256_cvtps_epi32(_mm256_mul_ps(x, inv)); }

// 32 int8 codes in element order from four vectors of 8 int32 codes.
inline __m256i Pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i abcd = _mm256_packs_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 16 bytes of nibbles from 32 int8 codes in element order.
inline __m128i Nibbles32(__m256i codes) {
  const __m256i lo = _mm256_and_si256(codes, _mm256_set1_epi16(0x000F));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(codes, 4), _mm256_set1_epi16(0x00F0));
  const __m256i bytes = _mm256_packus_epi16(_mm256_or_si256(lo, hi), _mm256_setzero_si256());
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(bytes, 0x08));
}

// Quantizes a row given by a loader of 8 floats at a time. Writes int8 codes (kInt4=false) or
// nibbles (kInt4=true). The scale must be non-zero and its reciprocal finite.
template <bool kInt4, typename Loader>
void QuantizeRow(Loader load, uint32_t dim, const quant::RowScale& s, float qmax_f, void* out) {
  (void)qmax_f;
  const __m256 inv = _mm256_set1_ps(s.inv);
  uint8_t* dst = static_cast<uint8_t*>(out);
  uint32_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    const __m256i codes = Pack32(Codes8(load(i), inv), Codes8(load(i + 8), inv),
                                 Codes8(load(i + 16), inv), Codes8(load(i + 24), inv));
    if constexpr (kInt4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i / 2), Nibbles32(codes));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), codes);
    }
  }
  for (; i < dim; i += 8) {  // dim is a multiple of 8
    alignas(32) int32_t c[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), Codes8(load(i), inv));
    for (int k = 0; k < 8; k += 2) {
      if constexpr (kInt4) {
        dst[(i + k) / 2] = quant::PackNibbles(c[k], c[k + 1]);
      } else {
        dst[i + k] = static_cast<uint8_t>(static_cast<int8_t>(c[k]));
        dst[i + k + 1] = static_cast<uint8_t>(static_cast<int8_t>(c[k + 1]));
      }
    }
  }
}

// The rare rows whose scale is 0 or whose reciprocal overflows use the scalar definition.
template <bool kInt4>
void QuantizeScalarFloats(const float* x, uint32_t dim, const quant::RowScale& s, float qmax,
                          void* out) {
  uint8_t* dst = static_cast<uint8_t*>(out);
  for (uint32_t i = 0; i < dim; i += 2) {
    const int a = quant::Quantize(x[i], s, qmax), b = quant::Quantize(x[i + 1], s, qmax);
    if constexpr (kInt4) {
      dst[i / 2] = quant::PackNibbles(a, b);
    } else {
      dst[i] = static_cast<uint8_t>(static_cast<int8_t>(a));
      dst[i + 1] = static_cast<uint8_t>(static_cast<int8_t>(b));
    }
  }
}

// quant::MakeScale with single instructions for fp16 (F16C converts with round-up directly);
// the same bits, as the self-test checks.
inline quant::RowScale MakeScaleFast(DType dtype, uint16_t amax_bits, float qmax) {
  if (dtype != DType::kFloat16) return quant::MakeScale(dtype, ToFloat(dtype, amax_bits), qmax);
  quant::RowScale s;
  const float amax = _cvtsh_ss(amax_bits);
  s.bits = _cvtss_sh(amax / qmax, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  s.value = _cvtsh_ss(s.bits);
  if (s.value > 0.0f) {
    s.inv = 1.0f / s.value;
    s.divide = !std::isfinite(s.inv);
  }
  return s;
}

template <bool kInt4>
bool QuantizeAbsmax(DType dtype, const uint16_t* src, uint32_t dim, void* out, uint16_t* scale) {
  const uint16_t amax = AbsMaxBits(src, dim);
  if (amax >= NonFiniteAbsBits(dtype)) return false;
  const float qmax = kInt4 ? quant::kInt4Max : quant::kInt8Max;
  const quant::RowScale s = MakeScaleFast(dtype, amax, qmax);
  *scale = s.bits;
  if (s.value == 0.0f || s.divide) {
    float x[kMaxNormalizedDim];
    for (uint32_t i = 0; i < dim; ++i) x[i] = ToFloat(dtype, src[i]);
    QuantizeScalarFloats<kInt4>(x, dim, s, qmax, out);
    return true;
  }
  QuantizeRow<kInt4>([&](uint32_t i) { return Load8(dtype, src + i); }, dim, s, qmax, out);
  return true;
}

bool QuantizeInt8(DType dtype, const uint16_t* src, uint32_t dim, int8_t* codes, uint16_t* scale) {
  return QuantizeAbsmax<false>(dtype, src, dim, codes, scale);
}

bool QuantizeInt4(DType dtype, const uint16_t* src, uint32_t dim, uint8_t* nibbles,
                  uint16_t* scale) {
  return QuantizeAbsmax<true>(dtype, src, dim, nibbles, scale);
}

bool QuantizeInt4Kcn(DType dtype, const uint16_t* src, uint32_t dim, const float* offset,
                     const float* inv_factor, uint8_t* nibbles, uint16_t* scale) {
  if (AbsMaxBits(src, dim) >= NonFiniteAbsBits(dtype)) return false;
  alignas(32) float x[kMaxNormalizedDim];
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax8 = _mm256_setzero_ps();
  for (uint32_t i = 0; i < dim; i += 8) {
    __m256 v = _mm256_sub_ps(Load8(dtype, src + i), _mm256_loadu_ps(offset + i));
    v = _mm256_mul_ps(v, _mm256_loadu_ps(inv_factor + i));
    _mm256_store_ps(x + i, v);
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, v));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax8);
  float amax = 0.0f;
  for (float l : lanes) amax = std::max(amax, l);
  const quant::RowScale s = quant::MakeScale(dtype, amax, quant::kInt4Max);
  *scale = s.bits;
  if (s.value == 0.0f || s.divide) {
    QuantizeScalarFloats<true>(x, dim, s, quant::kInt4Max, nibbles);
    return true;
  }
  QuantizeRow<true>([&](uint32_t i) { return _mm256_load_ps(x + i); }, dim, s, quant::kInt4Max,
                    nibbles);
  return true;
}

// 8 refinement cells (quant::RefineCell, as int32) of 8 floats, for a scale with a finite
// reciprocal: the same float operations in the same order.
inline __m256i Cells8(__m256 x, __m256 inv) {
  const __m256 y = _mm256_mul_ps(x, inv);
  __m256 q = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-quant::kInt4Max)),
                    _mm256_set1_ps(quant::kInt4Max));
  __m256 c = _mm256_sub_ps(y, q);
  c = _mm256_add_ps(c, _mm256_set1_ps(0.5f));
  c = _mm256_floor_ps(_mm256_mul_ps(c, _mm256_set1_ps(16.0f)));
  // max_ps returns its second operand when the first is NaN: NaN -> 0, as the scalar rule.
  c = _mm256_min_ps(_mm256_max_ps(c, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
  return _mm256_cvttps_epi32(c);
}

bool RefineInt4(DType dtype, const uint16_t* src, uint32_t dim, uint8_t* cells) {
  const uint16_t amax = AbsMaxBits(src, dim);
  if (amax >= NonFiniteAbsBits(dtype)) return false;
  const quant::RowScale s = MakeScaleFast(dtype, amax, quant::kInt4Max);
  if (s.value == 0.0f || s.divide) {
    for (uint32_t i = 0; i < dim; i += 2) {
      cells[i / 2] = static_cast<uint8_t>(quant::RefineCell(ToFloat(dtype, src[i]), s) |
                                          (quant::RefineCell(ToFloat(dtype, src[i + 1]), s) << 4));
    }
    return true;
  }
  const __m256 inv = _mm256_set1_ps(s.inv);
  uint32_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    const __m256i c =
        Pack32(Cells8(Load8(dtype, src + i), inv), Cells8(Load8(dtype, src + i + 8), inv),
               Cells8(Load8(dtype, src + i + 16), inv), Cells8(Load8(dtype, src + i + 24), inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(cells + i / 2), Nibbles32(c));
  }
  for (; i < dim; i += 8) {  // dim is a multiple of 8
    alignas(32) int32_t c[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c), Cells8(Load8(dtype, src + i), inv));
    for (int k = 0; k < 8; k += 2)
      cells[(i + k) / 2] = static_cast<uint8_t>(c[k] | (c[k + 1] << 4));
  }
  return true;
}

template <bool kStream>
void DequantizeInt8Rows(DType dtype, const int8_t* codes, uint16_t scale, uint32_t dim,
                        uint16_t* dst) {
  const __m256 s = _mm256_set1_ps(ToFloat(dtype, scale));
  for (uint32_t i = 0; i < dim; i += 8) {
    const __m128i c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i));
    const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8));
    Store8<kStream>(dtype, dst + i, _mm256_mul_ps(c, s));
  }
}

void DequantizeInt8(DType dtype, const int8_t* codes, uint16_t scale, uint32_t dim, uint16_t* dst) {
  if (Streamable(dst, dim)) {
    DequantizeInt8Rows<true>(dtype, codes, scale, dim, dst);
  } else {
    DequantizeInt8Rows<false>(dtype, codes, scale, dim, dst);
  }
}

// 8 sign-extended INT4 codes from 4 bytes of nibbles.
inline __m256 Nibbles8(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  const __m256i v = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 28));
}

template <bool kStream>
void DequantizeInt4Rows(DType dtype, const uint8_t* nibbles, uint16_t scale, uint32_t dim,
                        uint16_t* dst) {
  const __m256 s = _mm256_set1_ps(ToFloat(dtype, scale));
  for (uint32_t i = 0; i < dim; i += 8) {
    Store8<kStream>(dtype, dst + i, _mm256_mul_ps(Nibbles8(nibbles + i / 2), s));
  }
}

void DequantizeInt4(DType dtype, const uint8_t* nibbles, uint16_t scale, uint32_t dim,
                    uint16_t* dst) {
  if (Streamable(dst, dim)) {
    DequantizeInt4Rows<true>(dtype, nibbles, scale, dim, dst);
  } else {
    DequantizeInt4Rows<false>(dtype, nibbles, scale, dim, dst);
  }
}

// 8 refinement cells (unsigned) from 4 bytes.
inline __m256 UnsignedNibbles8(const uint8_t* p) {
  uint32_t word;
  std::memcpy(&word, p, 4);
  const __m256i shifts = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  const __m256i v = _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
}

template <bool kStream>
void DequantizeRefinedRows(DType dtype, const uint8_t* nibbles, const uint8_t* cells,
                           uint16_t scale, uint32_t dim, uint16_t* dst) {
  const __m256 s = _mm256_set1_ps(ToFloat(dtype, scale));
  for (uint32_t i = 0; i < dim; i += 8) {
    // 32q + 2c - 15: small integers, exact in float.
    const __m256 q32 = _mm256_mul_ps(Nibbles8(nibbles + i / 2), _mm256_set1_ps(32.0f));
    const __m256 c2 =
        _mm256_sub_ps(_mm256_mul_ps(UnsignedNibbles8(cells + i / 2), _mm256_set1_ps(2.0f)),
                      _mm256_set1_ps(15.0f));
    const __m256 y =
        _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(q32, c2), s), _mm256_set1_ps(0.03125f));
    Store8<kStream>(dtype, dst + i, y);
  }
}

void DequantizeRefined(DType dtype, const uint8_t* nibbles, const uint8_t* cells, uint16_t scale,
                       uint32_t dim, uint16_t* dst) {
  if (Streamable(dst, dim)) {
    DequantizeRefinedRows<true>(dtype, nibbles, cells, scale, dim, dst);
  } else {
    DequantizeRefinedRows<false>(dtype, nibbles, cells, scale, dim, dst);
  }
}

template <bool kStream>
void DequantizeInt4KcnRows(DType dtype, const uint8_t* nibbles, uint16_t scale, const float* offset,
                           const float* factor, uint32_t dim, uint16_t* dst) {
  const __m256 s = _mm256_set1_ps(ToFloat(dtype, scale));
  for (uint32_t i = 0; i < dim; i += 8) {
    __m256 y = _mm256_mul_ps(Nibbles8(nibbles + i / 2), s);
    y = _mm256_mul_ps(y, _mm256_loadu_ps(factor + i));
    y = _mm256_add_ps(y, _mm256_loadu_ps(offset + i));
    Store8<kStream>(dtype, dst + i, y);
  }
}

void DequantizeInt4Kcn(DType dtype, const uint8_t* nibbles, uint16_t scale, const float* offset,
                       const float* factor, uint32_t dim, uint16_t* dst) {
  if (Streamable(dst, dim)) {
    DequantizeInt4KcnRows<true>(dtype, nibbles, scale, offset, factor, dim, dst);
  } else {
    DequantizeInt4KcnRows<false>(dtype, nibbles, scale, offset, factor, dim, dst);
  }
}

void CopyRow(const uint16_t* src, uint32_t dim, uint16_t* dst) {
  if (!Streamable(dst, dim)) {
    std::memcpy(dst, src, uint64_t{dim} * 2);
    return;
  }
  for (uint32_t i = 0; i < dim; i += 16) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
}

void StoreFence() { _mm_sfence(); }

inline float HorizontalSum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// Σ x² of one row, in four independent sums.
inline __m256 SumSquares8(DType dtype, const uint16_t* src, uint32_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  uint32_t i = 0;
  for (; i + 32 <= dim; i += 32) {
    const __m256 x0 = Load8(dtype, src + i), x1 = Load8(dtype, src + i + 8);
    const __m256 x2 = Load8(dtype, src + i + 16), x3 = Load8(dtype, src + i + 24);
    a0 = _mm256_fmadd_ps(x0, x0, a0);
    a1 = _mm256_fmadd_ps(x1, x1, a1);
    a2 = _mm256_fmadd_ps(x2, x2, a2);
    a3 = _mm256_fmadd_ps(x3, x3, a3);
  }
  for (; i < dim; i += 8) {
    const __m256 x = Load8(dtype, src + i);
    a0 = _mm256_fmadd_ps(x, x, a0);
  }
  return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

float SumRowNorms(DType dtype, const uint16_t* first_row, uint64_t head_stride_bytes,
                  uint32_t heads, uint32_t dim) {
  // Eight heads at a time: their sums of squares reduced into one vector, one square root each.
  float sum = 0.0f;
  alignas(32) float squares[8];
  for (uint32_t h0 = 0; h0 < heads; h0 += 8) {
    const uint32_t count = std::min<uint32_t>(8, heads - h0);
    for (uint32_t k = 0; k < 8; ++k) {
      if (k < count) {
        const auto* row = reinterpret_cast<const uint16_t*>(
            reinterpret_cast<const char*>(first_row) + (h0 + k) * head_stride_bytes);
        squares[k] = HorizontalSum(SumSquares8(dtype, row, dim));
      } else {
        squares[k] = 0.0f;
      }
    }
    sum += HorizontalSum(_mm256_sqrt_ps(_mm256_load_ps(squares)));
  }
  return sum;
}

bool MinMax(DType dtype, const uint16_t* src, uint32_t dim, float* lo, float* hi) {
  if (AbsMaxBits(src, dim) >= NonFiniteAbsBits(dtype)) return false;
  for (uint32_t i = 0; i < dim; i += 8) {
    const __m256 x = Load8(dtype, src + i);
    _mm256_storeu_ps(lo + i, _mm256_min_ps(_mm256_loadu_ps(lo + i), x));
    _mm256_storeu_ps(hi + i, _mm256_max_ps(_mm256_loadu_ps(hi + i), x));
  }
  return true;
}

void DotMany(DType dtype, const uint16_t* row, uint32_t dim, const float* queries,
             uint32_t num_queries, float* out) {
  alignas(32) float k[kMaxNormalizedDim];
  for (uint32_t i = 0; i < dim; i += 8) _mm256_store_ps(k + i, Load8(dtype, row + i));
  uint32_t q = 0;
  for (; q + 4 <= num_queries; q += 4) {
    const float* q0 = queries + uint64_t{q} * dim;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (uint32_t i = 0; i < dim; i += 8) {
      const __m256 kv = _mm256_load_ps(k + i);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + i), kv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + dim + i), kv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * dim + i), kv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * dim + i), kv, a3);
    }
    out[q] = HorizontalSum(a0);
    out[q + 1] = HorizontalSum(a1);
    out[q + 2] = HorizontalSum(a2);
    out[q + 3] = HorizontalSum(a3);
  }
  for (; q < num_queries; ++q) {
    const float* qv = queries + uint64_t{q} * dim;
    __m256 acc = _mm256_setzero_ps();
    for (uint32_t i = 0; i < dim; i += 8) {
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), _mm256_load_ps(k + i), acc);
    }
    out[q] = HorizontalSum(acc);
  }
}

}  // namespace

const RowKernels* Avx2RowKernels() {
  static const RowKernels kKernels = {
      "avx2",          &QuantizeInt8,   &QuantizeInt4,      &QuantizeInt4Kcn,   &RefineInt4,
      &DequantizeInt8, &DequantizeInt4, &DequantizeInt4Kcn, &DequantizeRefined, &SumRowNorms,
      &MinMax,         &DotMany,        &CopyRow,           &StoreFence,
  };
  __builtin_cpu_init();
  const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         __builtin_cpu_supports("fma");
  return supported ? &kKernels : nullptr;
}

}  // namespace spectrumkv
