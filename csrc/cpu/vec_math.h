// exp and log written as plain arithmetic so that `#pragma omp simd` loops
// vectorise them for whatever ISA the enclosing function targets (no libm
// calls in hot loops). Relative error about 2e-7 over the float range used.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace kdfast {

#define KDFAST_INLINE inline __attribute__((always_inline))

KDFAST_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
KDFAST_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(x); 0 for x < -87.3 (including -inf), +inf above 88.7.
KDFAST_INLINE float fast_exp(float x) {
  const float lo = -87.33654f, hi = 88.72283f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  // n = round(x / ln2) with the 1.5 * 2^23 trick (no rounding instruction needed).
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693145751953125f;  // ln2 split in two for accuracy
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  // Split the power of two so that n = 128 (x near the top) does not overflow the exponent.
  int32_t n1 = ni >> 1, n2 = ni - n1;
  float s1 = bits_to_float(static_cast<uint32_t>(n1 + 127) << 23);
  float s2 = bits_to_float(static_cast<uint32_t>(n2 + 127) << 23);
  float y = p * s1 * s2;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return x < lo ? 0.0f : y;
}

// log(x) for x >= 0: -inf at 0 (and subnormals), NaN below 0, +inf at +inf.
KDFAST_INLINE float fast_log(float x) {
  uint32_t u = float_to_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 127;
  float m = bits_to_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  bool big = m > 1.41421356f;
  const float half_m = m * 0.5f;  // unconditional: keeps the loop branch-free (vectorises without AVX-512 masks)
  m = big ? half_m : m;
  e = big ? e + 1 : e;
  float f = m - 1.0f;           // [-0.293, 0.414]
  float s = f / (2.0f + f);     // log(1+f) = 2 atanh(s)
  float s2 = s * s;
  float q = 2.0f / 9.0f;
  q = q * s2 + 2.0f / 7.0f;
  q = q * s2 + 2.0f / 5.0f;
  q = q * s2 + 2.0f / 3.0f;
  q = q * s2 + 2.0f;
  float y = static_cast<float>(e) * 0.693147180559945309f + s * q;
  y = x < 1.17549435e-38f ? -std::numeric_limits<float>::infinity() : y;
  y = x == std::numeric_limits<float>::infinity() ? x : y;
  return x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : y;
}

}  // namespace kdfast
