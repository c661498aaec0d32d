// ISA-independent loops of the ternary matmul, included into each ISA
// namespace of ternary_linear.cpp after that ISA's primitives (int_rows_inreg,
// int_tile, unpack_codes_row, f_rows_inreg, f_tile, unpack_weights_row,
// kTileN, kTileM). One call handles the output features [n0, n1).
//
// M <= 4: weights are unpacked in registers and used for every input row
// (GEMV). M > 4: each group of kTileN weight rows is unpacked once into a
// small L1-resident buffer and reused for a chunk of kChunkM input rows by a
// kTileN x kTileM register tile (GEMM).

constexpr int64_t kChunkM = 96;  // input rows per pass: 96 x 3072 int8 stays in L2

KDFAST_INLINE void int_store(const IntArgs& a, int64_t m, int64_t n, int32_t dot) {
  const int32_t v = dot - a.rowsum[m];  // sum (code - 1) * x
  if (a.acc) {
    a.acc[m * a.N + n] = v;
  } else {
    // volatile: no FMA contraction, so the result is bitwise the reference's
    // ((acc * sx) * sw) + bias in float32.
    volatile float t = static_cast<float>(v) * a.sx[m] * a.sw[n];
    a.y[m * a.N + n] = a.bias ? t + a.bias[n] : t;
  }
}

KDFAST_INLINE void f_store(const FArgs& a, int64_t m, int64_t n, float dot) {
  const float t = dot * a.sw[n];
  a.y[m * a.N + n] = a.bias ? t + a.bias[n] : t;
}

template <typename Fn>
KDFAST_INLINE void by_rows(int64_t mr, Fn&& fn) {
  switch (mr) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    default: fn(std::integral_constant<int, 6>{}); break;
  }
}

void int_range(const IntArgs& a, int64_t n0, int64_t n1) {
  const int64_t Kp = a.KB * 64, rowb = a.KB * 16;
  if (a.M <= 4) {
    int32_t out[4 * 6];  // sized for every by_rows instantiation
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      by_rows(a.M, [&](auto mr) {
        int_rows_inreg<decltype(mr)::value, 4>(a.w + n * rowb, rowb, a.x, Kp, a.KB, out);
      });
      for (int r = 0; r < 4; ++r)
        for (int64_t m = 0; m < a.M; ++m) int_store(a, m, n + r, out[r * a.M + m]);
    }
    for (; n < n1; ++n) {
      by_rows(a.M, [&](auto mr) { int_rows_inreg<decltype(mr)::value>(a.w + n * rowb, rowb, a.x, Kp, a.KB, out); });
      for (int64_t m = 0; m < a.M; ++m) int_store(a, m, n, out[m]);
    }
    return;
  }
  std::vector<uint8_t> codes(kTileN * Kp);
  int32_t out[kTileN * 6];
  for (int64_t mc = 0; mc < a.M; mc += kChunkM) {
    const int64_t mend = std::min(a.M, mc + kChunkM);
    for (int64_t nb = n0; nb < n1; nb += kTileN) {
      const int64_t nn = std::min<int64_t>(kTileN, n1 - nb);
      for (int r = 0; r < kTileN; ++r) {
        if (r < nn) unpack_codes_row(a.w + (nb + r) * rowb, a.KB, codes.data() + r * Kp);
        else std::memset(codes.data() + r * Kp, 0, Kp);
      }
      for (int64_t m0 = mc; m0 < mend; m0 += kTileM) {
        const int64_t mr = std::min<int64_t>(kTileM, mend - m0);
        by_rows(mr, [&](auto c) { int_tile<decltype(c)::value>(codes.data(), a.x + m0 * Kp, Kp, out); });
        for (int r = 0; r < nn; ++r)
          for (int64_t m = 0; m < mr; ++m) int_store(a, m0 + m, nb + r, out[r * mr + m]);
      }
    }
  }
}

void f_range(const FArgs& a, int64_t n0, int64_t n1) {
  const int64_t Kp = a.KB * 64, rowb = a.KB * 16;
  if (a.M <= 4) {
    float out[4 * 6];
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
      by_rows(a.M, [&](auto mr) {
        f_rows_inreg<decltype(mr)::value, 4>(a.w + n * rowb, rowb, a.x, Kp, a.KB, out);
      });
      for (int r = 0; r < 4; ++r)
        for (int64_t m = 0; m < a.M; ++m) f_store(a, m, n + r, out[r * a.M + m]);
    }
    for (; n < n1; ++n) {
      by_rows(a.M, [&](auto mr) { f_rows_inreg<decltype(mr)::value>(a.w + n * rowb, rowb, a.x, Kp, a.KB, out); });
      for (int64_t m = 0; m < a.M; ++m) f_store(a, m, n, out[m]);
    }
    return;
  }
  std::vector<float> wbuf(kTileN * Kp);
  float out[kTileN * 6];
  for (int64_t mc = 0; mc < a.M; mc += kChunkM) {
    const int64_t mend = std::min(a.M, mc + kChunkM);
    for (int64_t nb = n0; nb < n1; nb += kTileN) {
      const int64_t nn = std::min<int64_t>(kTileN, n1 - nb);
      for (int r = 0; r < kTileN; ++r) {
        if (r < nn) unpack_weights_row(a.w + (nb + r) * rowb, a.KB, wbuf.data() + r * Kp);
        else std::fill(wbuf.data() + r * Kp, wbuf.data() + (r + 1) * Kp, 0.f);
      }
      for (int64_t m0 = mc; m0 < mend; m0 += kTileM) {
        const int64_t mr = std::min<int64_t>(kTileM, mend - m0);
        by_rows(mr, [&](auto c) { f_tile<decltype(c)::value>(wbuf.data(), a.x + m0 * Kp, Kp, out); });
        for (int r = 0; r < nn; ++r)
          for (int64_t m = 0; m < mr; ++m) f_store(a, m0 + m, nb + r, out[r * mr + m]);
      }
    }
  }
}
