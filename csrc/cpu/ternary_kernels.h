// Ternary matmul inner loops for one x86 vector ISA. Included by ternary_linear.cpp
// once per ISA inside a `#pragma GCC target` region and its own namespace,
// with TERNARY_ISA set to 1 (AVX2), 2 (AVX-512BW) or 3 (AVX-512 VNNI).
//
// Packed layout (kdfast/ops/ternary_quant.py is the spec): row n holds
// KB = ceil(K / 64) blocks of 16 bytes; bit pair i (bits 2i..2i+1) of byte j
// of block b is the code of k = 64 b + 16 i + j, code = weight + 1.
// Shifting a block right by 2i and masking with 3 therefore gives 16 codes
// for 16 consecutive k: a whole 64-wide block unpacks in three instructions
// (broadcast, variable shift, and) straight into VNNI's unsigned operand.
//
// Integer path: sum_k code * x - sum_k x = sum_k w * x, exactly, in int32
// (|x| <= 127, K < 2^23 / 2 keeps every partial sum in range).
// Float path: code - 1 in int8, widened to float; fp32 FMA accumulation.

#if TERNARY_ISA >= 2
using ivec = __m512i;
using fvec = __m512;
constexpr int kVecBytes = 64;  // int8 lanes per vector (= one block)
constexpr int kFloats = 16;
KDFAST_INLINE ivec izero() { return _mm512_setzero_si512(); }
KDFAST_INLINE ivec iload(const void* p) { return _mm512_loadu_si512(p); }
KDFAST_INLINE void istore(void* p, ivec v) { _mm512_storeu_si512(p, v); }
// Codes for k offsets [64h, 64h + 64) of the block at p (h is always 0 here).
KDFAST_INLINE ivec unpack_codes(const uint8_t* p, int /*h*/) {
  const ivec shifts = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  ivec v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi8(3));
}
KDFAST_INLINE ivec dot_codes(ivec acc, ivec codes, ivec x) {
#if TERNARY_ISA == 3
  return _mm512_dpbusd_epi32(acc, codes, x);
#else
  // codes <= 2 and |x| <= 127: the int16 pair sums (<= 508) never saturate.
  ivec t = _mm512_maddubs_epi16(codes, x);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(t, _mm512_set1_epi16(1)));
#endif
}
KDFAST_INLINE int32_t ihsum(ivec v) { return _mm512_reduce_add_epi32(v); }
KDFAST_INLINE fvec fzero() { return _mm512_setzero_ps(); }
KDFAST_INLINE fvec fload(const float* p) { return _mm512_loadu_ps(p); }
KDFAST_INLINE void fstore(float* p, fvec v) { _mm512_storeu_ps(p, v); }
KDFAST_INLINE fvec ffma(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
KDFAST_INLINE float fhsum(fvec v) { return _mm512_reduce_add_ps(v); }
// Weights (float) for k offsets [16 j, 16 j + 16) of the block at p.
KDFAST_INLINE fvec unpack_weights(const uint8_t* p, int j) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  b = _mm_and_si128(_mm_srl_epi16(b, _mm_cvtsi32_si128(2 * j)), _mm_set1_epi8(3));
  b = _mm_sub_epi8(b, _mm_set1_epi8(1));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#else  // AVX2
using ivec = __m256i;
using fvec = __m256;
constexpr int kVecBytes = 32;
constexpr int kFloats = 8;
KDFAST_INLINE ivec izero() { return _mm256_setzero_si256(); }
KDFAST_INLINE ivec iload(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
KDFAST_INLINE void istore(void* p, ivec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
KDFAST_INLINE ivec unpack_codes(const uint8_t* p, int h) {
  const ivec shifts = h == 0 ? _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0) : _mm256_set_epi32(6, 6, 6, 6, 4, 4, 4, 4);
  ivec v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi8(3));
}
KDFAST_INLINE ivec dot_codes(ivec acc, ivec codes, ivec x) {
  ivec t = _mm256_maddubs_epi16(codes, x);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(t, _mm256_set1_epi16(1)));
}
KDFAST_INLINE int32_t ihsum(ivec v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
KDFAST_INLINE fvec fzero() { return _mm256_setzero_ps(); }
KDFAST_INLINE fvec fload(const float* p) { return _mm256_loadu_ps(p); }
KDFAST_INLINE void fstore(float* p, fvec v) { _mm256_storeu_ps(p, v); }
KDFAST_INLINE fvec ffma(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
KDFAST_INLINE float fhsum(fvec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
KDFAST_INLINE fvec unpack_weights(const uint8_t* p, int j) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  b = _mm_and_si128(_mm_srl_epi16(b, _mm_cvtsi32_si128(2 * (j >> 1))), _mm_set1_epi8(3));
  b = _mm_sub_epi8(b, _mm_set1_epi8(1));
  if (j & 1) b = _mm_srli_si128(b, 8);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
#endif

constexpr int kVecPerBlock = 64 / kVecBytes;
constexpr int kFvecPerBlock = 64 / kFloats;
constexpr int kTileN = 4;  // output features per register tile
#if TERNARY_ISA == 3
constexpr int kTileM = 6;  // 4 x 6 accumulators + 4 weights + 1 input < 32 zmm
#elif TERNARY_ISA == 2
constexpr int kTileM = 4;  // maddubs needs temporaries: keep 16 accumulators
#else
constexpr int kTileM = 2;  // 16 ymm registers only
#endif

// ---- int8 activations --------------------------------------------------
// GEMV-like: codes unpacked in registers, used for MR (<= 4) input rows and NR
// weight rows at once: NR x MR independent accumulator chains hide the
// vpdpbusd latency (one chain: 5 cycles per block, ~4x slower at M = 1).
template <int MR, int NR = 1>
KDFAST_INLINE void int_rows_inreg(const uint8_t* w, int64_t rowb, const int8_t* x, int64_t Kp, int64_t KB,
                                  int32_t* out /*[NR][MR]*/) {
  ivec acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = izero();
  for (int64_t b = 0; b < KB; ++b) {
    for (int h = 0; h < kVecPerBlock; ++h) {
      ivec xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = iload(x + m * Kp + b * 64 + h * kVecBytes);
      for (int r = 0; r < NR; ++r) {
        // The next group of NR rows, one cache line per 4 blocks: overlaps the
        // weight stream with the dot products (the stream is the M = 1 bound).
        if (NR > 1 && h == 0 && (b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * rowb + b * 16), _MM_HINT_T0);
        ivec c = unpack_codes(w + r * rowb + b * 16, h);
        for (int m = 0; m < MR; ++m) acc[r][m] = dot_codes(acc[r][m], c, xv[m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = ihsum(acc[r][m]);
}

// GEMM tile: kTileN rows of codes already unpacked to `codes` ([kTileN][Kp] bytes).
template <int MR>
KDFAST_INLINE void int_tile(const uint8_t* codes, const int8_t* x, int64_t Kp, int32_t* out /*[kTileN][MR]*/) {
  ivec acc[kTileN][MR];
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = izero();
  for (int64_t k = 0; k < Kp; k += kVecBytes) {
    ivec c[kTileN];
    for (int n = 0; n < kTileN; ++n) c[n] = iload(codes + n * Kp + k);
    for (int m = 0; m < MR; ++m) {
      ivec xv = iload(x + m * Kp + k);
      for (int n = 0; n < kTileN; ++n) acc[n][m] = dot_codes(acc[n][m], c[n], xv);
    }
  }
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) out[n * MR + m] = ihsum(acc[n][m]);
}

KDFAST_INLINE void unpack_codes_row(const uint8_t* w, int64_t KB, uint8_t* dst) {
  for (int64_t b = 0; b < KB; ++b)
    for (int h = 0; h < kVecPerBlock; ++h) istore(dst + b * 64 + h * kVecBytes, unpack_codes(w + b * 16, h));
}

// ---- float activations ---------------------------------------------------
template <int MR, int NR = 1>
KDFAST_INLINE void f_rows_inreg(const uint8_t* w, int64_t rowb, const float* x, int64_t Kp, int64_t KB,
                                float* out /*[NR][MR]*/) {
  fvec acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = fzero();
  for (int64_t b = 0; b < KB; ++b) {
    for (int j = 0; j < kFvecPerBlock; ++j) {
      fvec xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = fload(x + m * Kp + b * 64 + j * kFloats);
      for (int r = 0; r < NR; ++r) {
        if (NR > 1 && j == 0 && (b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * rowb + b * 16), _MM_HINT_T0);
        fvec wv = unpack_weights(w + r * rowb + b * 16, j);
        for (int m = 0; m < MR; ++m) acc[r][m] = ffma(wv, xv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = fhsum(acc[r][m]);
}

template <int MR>
KDFAST_INLINE void f_tile(const float* wbuf, const float* x, int64_t Kp, float* out /*[kTileN][MR]*/) {
  fvec acc[kTileN][MR];
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) acc[n][m] = fzero();
  for (int64_t k = 0; k < Kp; k += kFloats) {
    fvec wv[kTileN];
    for (int n = 0; n < kTileN; ++n) wv[n] = fload(wbuf + n * Kp + k);
    for (int m = 0; m < MR; ++m) {
      fvec xv = fload(x + m * Kp + k);
      for (int n = 0; n < kTileN; ++n) acc[n][m] = ffma(wv[n], xv, acc[n][m]);
    }
  }
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) out[n * MR + m] = fhsum(acc[n][m]);
}

KDFAST_INLINE void unpack_weights_row(const uint8_t* w, int64_t KB, float* dst) {
  for (int64_t b = 0; b < KB; ++b)
    for (int j = 0; j < kFvecPerBlock; ++j) fstore(dst + b * 64 + j * kFloats, unpack_weights(w + b * 16, j));
}

// ---- per-token int8 quantization of one input row --------------------------
// s = max|x| / 127 (1 when the row is all zeros), q = clamp(round_half_even(x / s),
// -127, 127): the same float32 operations as the reference, so q is identical.
// q is written to [0, Kp) with zeros past K; returns sum(q).
KDFAST_INLINE int32_t quant_row(const float* x, int64_t K, int64_t Kp, int8_t* q, float* s_out) {
  float amax = 0.f;
  int64_t k = 0;
#if TERNARY_ISA >= 2
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  amax = _mm512_reduce_max_ps(vmax);
#else
  __m256 vmax = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(absmask, _mm256_loadu_ps(x + k)));
  float tmp[8];
  _mm256_storeu_ps(tmp, vmax);
  for (int i = 0; i < 8; ++i) amax = std::max(amax, tmp[i]);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float s = amax / 127.f;
  if (s == 0.f) s = 1.f;
  *s_out = s;
  int32_t sum = 0;
  k = 0;
#if TERNARY_ISA >= 2
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  __m512i isum = _mm512_setzero_si512();
  for (; k + 16 <= K; k += 16) {
    __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i i = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    isum = _mm512_add_epi32(isum, i);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(i));
  }
  sum = _mm512_reduce_add_epi32(isum);
#else
  const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  __m256i isum = _mm256_setzero_si256();
  for (; k + 8 <= K; k += 8) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    isum = _mm256_add_epi32(isum, i);
    int32_t t[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), i);
    for (int j = 0; j < 8; ++j) q[k + j] = static_cast<int8_t>(t[j]);
  }
  sum = ihsum(isum);
#endif
  for (; k < K; ++k) {
    float r = std::nearbyint(x[k] / s);
    r = std::min(std::max(r, -127.f), 127.f);
    q[k] = static_cast<int8_t>(r);
    sum += q[k];
  }
  std::memset(q + K, 0, Kp - K);
  return sum;
}

#include "cpu/ternary_driver.h"
