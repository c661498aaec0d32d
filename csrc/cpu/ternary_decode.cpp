// Decode 2-bit packed ternary weights into a dense matrix, once per call.
//
//   ternary_decode(packed u8 [N, 16*ceil(K/64)], scale f32 [N]?, K, dtype) -> dtype [N, K]
//       w[n, k] = (field(n, k) - 1) * scale[n]   (codes -1/0/+1 when scale is None)
//
// Used by the float-activation ternary_linear at large M: one pass over the
// packed weights writes a dense matrix that the BLAS / oneDNN matmul of torch
// consumes (see kdfast/ops/ternary_linear.py, DENSE_MIN_ROWS). Every output
// row takes one of four values {-s, 0, s, 2s} with s = scale[n] rounded once
// to dtype, so a 4-entry lookup table per row indexed by the 2-bit field is
// the whole decode, and the result is exactly torch's
// `unpack_ternary(packed, K).to(dtype) * scale.to(dtype)[:, None]`.
// Layout (kdfast/ops/ternary_quant.py): block b of 64 weights = 16 bytes,
// bits 2i of byte j hold k = 64 b + 16 i + j; positions past K are never written.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

namespace kdfast {
namespace ternary_decode {

template <typename T>
void lut_for_row(const float* scale, int64_t n, T lut[4]) {
  const float s = scale ? static_cast<float>(static_cast<T>(scale[n])) : 1.f;
  for (int f = 0; f < 4; ++f) lut[f] = static_cast<T>(static_cast<float>(f - 1) * s);
}

// Baseline: any CPU. Full blocks then the tail block with a bound on k.
template <typename T>
void rows_scalar(const uint8_t* w, const float* scale, int64_t K, int64_t n0, int64_t n1, T* out) {
  const int64_t KB = (K + 63) / 64, rowb = KB * 16;
  for (int64_t n = n0; n < n1; ++n) {
    T lut[4];
    lut_for_row(scale, n, lut);
    const uint8_t* src = w + n * rowb;
    T* dst = out + n * K;
    for (int64_t b = 0; b < KB; ++b)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 16; ++j) {
          const int64_t k = 64 * b + 16 * i + j;
          if (k < K) dst[k] = lut[(src[16 * b + j] >> (2 * i)) & 3];
        }
  }
}

#if KDFAST_HAVE_X86_PATHS
// AVX-512: 16 fields of one bit pair per vector, a permute does the lookup.
// The last (partial) block goes through a 64-entry stack buffer.
template <typename T>
KDFAST_TARGET_AVX512 void rows_avx512(const uint8_t* w, const float* scale, int64_t K, int64_t n0, int64_t n1,
                                      T* out) {
  const int64_t KB = (K + 63) / 64, rowb = KB * 16, full = K / 64;
  alignas(64) T tail[64];
  for (int64_t n = n0; n < n1; ++n) {
    T lut[4];
    lut_for_row(scale, n, lut);
    const uint8_t* src = w + n * rowb;
    T* dst = out + n * K;
    if constexpr (sizeof(T) == 4) {
      float lf[16] = {};
      std::memcpy(lf, lut, sizeof(lut));
      const __m512 lv = _mm512_loadu_ps(lf);
      const __m512i m3 = _mm512_set1_epi32(3);
      for (int64_t b = 0; b < KB; ++b) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * b)));
        float* d = b < full ? reinterpret_cast<float*>(dst + 64 * b) : reinterpret_cast<float*>(tail);
        for (int i = 0; i < 4; ++i)
          _mm512_storeu_ps(d + 16 * i, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 2 * i), m3), lv));
        if (b >= full) std::memcpy(dst + 64 * b, tail, (K - 64 * b) * sizeof(T));
      }
    } else {
      uint16_t lu[16] = {};
      std::memcpy(lu, lut, sizeof(lut));
      const __m256i lv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lu));
      const __m256i m3 = _mm256_set1_epi16(3);
      for (int64_t b = 0; b < KB; ++b) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * b)));
        T* d = b < full ? dst + 64 * b : tail;
        for (int i = 0; i < 4; ++i)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16 * i),
                              _mm256_permutexvar_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2 * i), m3), lv));
        if (b >= full) std::memcpy(dst + 64 * b, tail, (K - 64 * b) * sizeof(T));
      }
    }
  }
}

// AVX2, float32 only (16-bit outputs take the baseline): 8 fields per vector.
KDFAST_TARGET_AVX2 void rows_avx2_f32(const uint8_t* w, const float* scale, int64_t K, int64_t n0, int64_t n1,
                                      float* out) {
  const int64_t KB = (K + 63) / 64, rowb = KB * 16, full = K / 64;
  alignas(32) float tail[64];
  for (int64_t n = n0; n < n1; ++n) {
    float lut[8] = {};
    lut_for_row(scale, n, lut);
    const __m256 lv = _mm256_loadu_ps(lut);
    const __m256i m3 = _mm256_set1_epi32(3);
    const uint8_t* src = w + n * rowb;
    float* dst = out + n * K;
    for (int64_t b = 0; b < KB; ++b) {
      float* d = b < full ? dst + 64 * b : tail;
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 16 * b + 8 * h)));
        for (int i = 0; i < 4; ++i)
          _mm256_storeu_ps(d + 16 * i + 8 * h,
                           _mm256_permutevar8x32_ps(lv, _mm256_and_si256(_mm256_srli_epi32(v, 2 * i), m3)));
      }
      if (b >= full) std::memcpy(dst + 64 * b, tail, (K - 64 * b) * sizeof(float));
    }
  }
}
#endif

template <typename T>
void decode_rows(const uint8_t* w, const float* scale, int64_t K, int64_t n0, int64_t n1, T* out) {
#if KDFAST_HAVE_X86_PATHS
  const Isa isa = cpu_isa();
  if (isa >= Isa::AVX512) return rows_avx512<T>(w, scale, K, n0, n1, out);
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::AVX2) return rows_avx2_f32(w, scale, K, n0, n1, out);
  }
#endif
  rows_scalar<T>(w, scale, K, n0, n1, out);
}

at::Tensor ternary_decode(const at::Tensor& packed_in, const std::optional<at::Tensor>& scale_in, int64_t K,
                          at::ScalarType dtype) {
  const char* op = "ternary_decode";
  TORCH_CHECK(packed_in.device().is_cpu(), op, ": packed_weight must be a CPU tensor");
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2, op,
              ": packed_weight must be a 2-D uint8 tensor, got ", packed_in.scalar_type(), " ", packed_in.sizes());
  TORCH_CHECK(K >= 1, op, ": in_features must be >= 1, got ", K);
  const int64_t N = packed_in.size(0), KB = (K + 63) / 64;
  TORCH_CHECK(packed_in.size(1) == 16 * KB, op, ": packed_weight must have 16 * ceil(K / 64) = ", 16 * KB,
              " columns for in_features=", K, ", got ", packed_in.size(1));
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": dtype must be float32, bfloat16 or float16, got ", dtype);
  at::Tensor scale;
  if (scale_in) {
    TORCH_CHECK(scale_in->device().is_cpu() && scale_in->scalar_type() == at::kFloat && scale_in->dim() == 1 &&
                    scale_in->size(0) == N,
                op, ": scale must be a float32 CPU vector of length ", N, ", got ", scale_in->scalar_type(), " ",
                scale_in->sizes());
    scale = scale_in->contiguous();
  }
  at::Tensor packed = packed_in.contiguous();
  at::Tensor out = at::empty({N, K}, packed.options().dtype(dtype));
  if (N == 0) return out;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const float* s = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / K);  // ~64k outputs per task
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (dtype) {
      case at::kFloat: decode_rows<float>(w, s, K, n0, n1, out.data_ptr<float>()); break;
      case at::kBFloat16: decode_rows<at::BFloat16>(w, s, K, n0, n1, out.data_ptr<at::BFloat16>()); break;
      default: decode_rows<at::Half>(w, s, K, n0, n1, out.data_ptr<at::Half>()); break;
    }
  });
  return out;
}

}  // namespace ternary_decode
}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("ternary_decode(Tensor packed, Tensor? scale, int in_features, ScalarType dtype) -> Tensor",
        &kdfast::ternary_decode::ternary_decode);
}
