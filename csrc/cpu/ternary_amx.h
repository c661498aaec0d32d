// AMX-INT8 GEMM for the W2A8 ternary matmul (Sapphire Rapids and later).
// Included by ternary_linear.cpp inside a `#pragma GCC target(... amx-tile,amx-int8)`
// region, after the avx512_vnni namespace whose helpers it reuses.
//
// Why: at M = 384 the VNNI register tile is bound by vpdpbusd throughput,
// the same bound fbgemm's int8 GEMM hits; one AMX TDPBUSD does
// 16 x 16 x 64 multiply-adds.
//
// TDPBUSD needs an unsigned operand: the activations become u = q + 128
// (A tiles, rows m, straight from a [Mp][Kp] buffer) and
// sum_k u w = sum_k q w + 128 sum_k w, so 128 * (row sum of W) is subtracted.
// The weights (signed, -1/0/+1) are the B operand in the VNNI layout
// [k / 4][n][k % 4], built per block of 32 output features and reused for all M.
// Tiles: C0..C3 (tmm0-3) = 32 rows x 32 features, int32, rows m / columns n,
// so the epilogue writes 16 contiguous outputs per vector.
#include <cpuid.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sys/syscall.h>
#include <unistd.h>

namespace amx {

constexpr int kTileN = 32;
constexpr int kTileM = 32;
constexpr int64_t kStreamBytes = int64_t{2} << 20;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline bool hardware_ready() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, int8 = (d >> 25) & 1;
    if (!tile || !int8) return false;
    // Linux: ask the kernel for the AMX tile state (XTILEDATA = 18).
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
  }();
  return ok;
}

// xu: [Mp][Kp] uint8 activations q + 128 (0 for k >= K and rows >= M).
struct AmxArgs {
  const uint8_t* xu;
  int64_t Mp, K;
};

// Output rows m of a 16 x 16 int32 tile (rows m, columns n), vectorised over n.
KDFAST_INLINE void store_rows(const IntArgs& a, const int32_t* tile, const int32_t* corr, int64_t mbase,
                              int64_t nbase, int64_t ncount, bool stream) {
  const __mmask16 mask = static_cast<__mmask16>((1u << ncount) - 1);
  const __m512i cv = _mm512_maskz_loadu_epi32(mask, corr);
  const __m512 sw = a.acc ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask, a.sw + nbase);
  const __m512 bv = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + nbase) : _mm512_setzero_ps();
  for (int r = 0; r < 16 && mbase + r < a.M; ++r) {
    const int64_t m = mbase + r;
    const __m512i v = _mm512_sub_epi32(_mm512_loadu_si512(tile + r * 16), cv);
    if (a.acc) {
      _mm512_mask_storeu_epi32(a.acc + m * a.N + nbase, mask, v);
      continue;
    }
    __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(a.sx[m])), sw);
    asm("" : "+v"(f));  // no FMA contraction: bitwise ((acc * sx) * sw) + bias like the reference
    if (a.bias) f = _mm512_add_ps(f, bv);
    float* dst = a.y + m * a.N + nbase;
    if (stream && ncount == 16 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) _mm512_stream_ps(dst, f);
    else _mm512_mask_storeu_ps(dst, mask, f);
  }
}

// u = q + 128 (q ^ 0x80) for k < K, 0 past K, for rows [m0, m1) of the zero-padded [M][Kp] int8 input.
void make_xu(const int8_t* xp, int64_t m0, int64_t m1, int64_t Kp, int64_t K, uint8_t* xu) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t k = 0; k < Kp; k += 64) {
      __m512i v = _mm512_xor_si512(_mm512_loadu_si512(xp + m * Kp + k), flip);
      if (k + 64 > K) v = _mm512_maskz_mov_epi8(_cvtu64_mask64(~0ull >> (k + 64 - K)), v);
      _mm512_storeu_si512(xu + m * Kp + k, v);
    }
}

// Weights of features [nb, nb + nn) (nn <= 32) straight from the packed rows
// into the VNNI layout wv[k / 4][32][4] (int8 -1/0/+1; 0 past K and past nn),
// and corr[n] = 128 * sum_k w[n, k]. A 32-bit word jw of block b shifted right
// by 2i and masked with 0x03030303 holds the codes of k = 64b + 16i + 4jw + 0..3,
// i.e. one VNNI dword: a gather of that word over 16 rows is one B-tile row.
KDFAST_INLINE void build_weights(const IntArgs& a, int64_t K, int64_t nb, int64_t nn, int32_t* wv, int32_t* corr) {
  const int64_t rowb = a.KB * 16;
  const __m512i m3 = _mm512_set1_epi32(0x03030303), one8 = _mm512_set1_epi8(1), one16 = _mm512_set1_epi16(1);
  const __m512i lane = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int>(rowb / 4)));
  for (int h = 0; h < 2; ++h) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, nn - 16 * h));
    const __mmask16 lm = static_cast<__mmask16>((1u << valid) - 1);
    const int* base = reinterpret_cast<const int*>(a.w + (nb + 16 * h) * rowb);
    __m512i s = _mm512_setzero_si512();
    for (int64_t b = 0; b < a.KB; ++b) {
      for (int jw = 0; jw < 4; ++jw) {
        const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(b * 4 + jw)));
        // Missing rows read as code 1 (0x55 bytes) = weight 0.
        const __m512i v = valid ? _mm512_mask_i32gather_epi32(_mm512_set1_epi32(0x55555555), lm, idx, base, 4)
                                : _mm512_set1_epi32(0x55555555);
        for (int i = 0; i < 4; ++i) {
          __m512i w = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi32(v, 2 * i), m3), one8);
          const int64_t k0 = 64 * b + 16 * i + 4 * jw;
          if (k0 + 4 > K) {
            const int64_t cnt = std::max<int64_t>(0, K - k0);
            w = _mm512_maskz_mov_epi8(_cvtu64_mask64(((1ull << cnt) - 1) * 0x1111111111111111ull), w);
          }
          _mm512_storeu_si512(wv + (b * 16 + 4 * i + jw) * kTileN + 16 * h, w);
          s = _mm512_add_epi32(s, _mm512_madd_epi16(_mm512_maddubs_epi16(one8, w), one16));
        }
      }
    }
    _mm512_storeu_si512(corr + 16 * h, _mm512_slli_epi32(s, 7));
  }
}

void int_range(const IntArgs& a, const AmxArgs& t, int64_t n0, int64_t n1) {
  const int64_t Kp = a.KB * 64, G = Kp / 4;
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
  // Each (32 features x 32 rows) step writes 32 rows of 128 bytes, a stride
  // the prefetchers do not follow: when the float output is larger than L2,
  // full aligned lines are written with streaming stores (no read for
  // ownership of lines that are entirely overwritten).
  const bool stream = !a.acc && a.M * a.N * 4 >= kStreamBytes;
  // weights in VNNI layout [k / 4][n][k % 4], 64-byte aligned so that each B tile row is one cache line
  std::unique_ptr<int32_t, decltype(&std::free)> wv_buf(
      static_cast<int32_t*>(std::aligned_alloc(64, G * kTileN * sizeof(int32_t))), &std::free);
  int32_t* const wv = wv_buf.get();
  if (!wv) {  // inside an OpenMP region: no exception can leave it
    std::fprintf(stderr, "kdfast ternary AMX: out of memory for the weight tile buffer\n");
    std::abort();
  }
  alignas(64) int32_t cbuf[4][16 * 16];
  alignas(64) int32_t corr[kTileN];
  for (int64_t nb = n0; nb < n1; nb += kTileN) {
    const int64_t nn = std::min<int64_t>(kTileN, n1 - nb);
    build_weights(a, t.K, nb, nn, wv, corr);
    const int8_t* B = reinterpret_cast<const int8_t*>(wv);
    for (int64_t m0 = 0; m0 < a.M; m0 += kTileM) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint8_t* A0 = t.xu + m0 * Kp;
      const uint8_t* A1 = A0 + 16 * Kp;
      for (int64_t k = 0; k < Kp; k += 64) {
        _tile_loadd(4, A0 + k, Kp);
        _tile_loadd(5, A1 + k, Kp);
        _tile_loadd(6, B + k * kTileN, kTileN * 4);
        _tile_loadd(7, B + k * kTileN + 64, kTileN * 4);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
      }
      _tile_stored(0, cbuf[0], 64);
      _tile_stored(1, cbuf[1], 64);
      _tile_stored(2, cbuf[2], 64);
      _tile_stored(3, cbuf[3], 64);
      for (int c = 0; c < 4; ++c) {
        const int64_t nofs = (c & 1) * 16, ncount = std::min<int64_t>(16, nn - nofs);
        if (ncount > 0) store_rows(a, cbuf[c], corr + nofs, m0 + (c >> 1) * 16, nb + nofs, ncount, stream);
      }
    }
  }
  _tile_release();
  if (stream) _mm_sfence();
}

}  // namespace amx
