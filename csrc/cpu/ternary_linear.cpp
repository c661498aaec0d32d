// Ternary (2-bit) weight matmuls on the CPU.
//
//   ternary_linear_w2a8(x f32 [M,K], packed u8 [N,16*ceil(K/64)], scale f32 [N], bias?, K) -> f32 [M,N]
//       per-token int8 quantization of x fused in, then int8 x ternary dot
//       products in int32 (W2A8): y = ((acc * sx[m]) * scale[n]) + bias[n].
//   ternary_linear_i8(q i8 [M,K], sx f32 [M], packed, scale, bias?, K) -> f32 [M,N]
//       same with activations already quantized.
//   ternary_matmul_i8_acc(q i8 [M,K], packed, K) -> i32 [M,N]: the exact integer sums.
//   ternary_linear_f32(x f32 [M,K], packed, scale, bias?, K) -> f32 [M,N]
//       float activations, weights unpacked in registers (M <= 4) or per
//       4-row tile (M > 4), fp32 FMA accumulation.
//   quantize_act_i8(x f32 [M,K]) -> (q i8 [M,K], sx f32 [M])
//
// Layout: see ternary_kernels.h and kdfast/ops/ternary_quant.py. Paths:
// AVX-512 VNNI (vpdpbusd), AVX-512BW and AVX2 (vpmaddubsw + vpmaddwd), and
// a scalar baseline, chosen at run time by cpu_isa(). OpenMP over output
// features. Any M, N, K: K is zero-padded to a multiple of 64 in a copy of
// the activations, so no load ever reads past an input row.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace ternary {

struct IntArgs {
  const int8_t* x;        // [M, Kp] zero-padded
  const int32_t* rowsum;  // [M] sum of x over k
  int64_t M, KB, N;
  const uint8_t* w;  // [N, KB * 16]
  int32_t* acc;      // output int32 [M, N] or nullptr
  float* y;          // output float [M, N]
  const float *sx, *sw, *bias;
  int64_t K = 0;  // real in_features (the AMX path needs it)
};

struct FArgs {
  const float* x;  // [M, Kp] zero-padded
  int64_t M, KB, N;
  const uint8_t* w;
  float* y;
  const float *sw, *bias;
};

// ---- scalar baseline (any CPU) ------------------------------------------------
namespace scalar {
constexpr int kTileN = 4;
constexpr int kTileM = 4;
KDFAST_INLINE int code_at(const uint8_t* w, int64_t k) {
  return (w[(k >> 6) * 16 + (k & 15)] >> (2 * ((k >> 4) & 3))) & 3;
}
template <int MR, int NR = 1>
void int_rows_inreg(const uint8_t* w, int64_t rowb, const int8_t* x, int64_t Kp, int64_t, int32_t* out) {
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) s += code_at(w + r * rowb, k) * x[m * Kp + k];
      out[r * MR + m] = s;
    }
}
template <int MR>
void int_tile(const uint8_t* codes, const int8_t* x, int64_t Kp, int32_t* out) {
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) s += codes[n * Kp + k] * x[m * Kp + k];
      out[n * MR + m] = s;
    }
}
inline void unpack_codes_row(const uint8_t* w, int64_t KB, uint8_t* dst) {
  for (int64_t k = 0; k < KB * 64; ++k) dst[k] = static_cast<uint8_t>(code_at(w, k));
}
template <int MR, int NR = 1>
void f_rows_inreg(const uint8_t* w, int64_t rowb, const float* x, int64_t Kp, int64_t, float* out) {
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < Kp; ++k) s += static_cast<float>(code_at(w + r * rowb, k) - 1) * x[m * Kp + k];
      out[r * MR + m] = s;
    }
}
template <int MR>
void f_tile(const float* wbuf, const float* x, int64_t Kp, float* out) {
  for (int n = 0; n < kTileN; ++n)
    for (int m = 0; m < MR; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < Kp; ++k) s += wbuf[n * Kp + k] * x[m * Kp + k];
      out[n * MR + m] = s;
    }
}
inline void unpack_weights_row(const uint8_t* w, int64_t KB, float* dst) {
  for (int64_t k = 0; k < KB * 64; ++k) dst[k] = static_cast<float>(code_at(w, k) - 1);
}
inline int32_t quant_row(const float* x, int64_t K, int64_t Kp, int8_t* q, float* s_out) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float s = amax / 127.f;
  if (s == 0.f) s = 1.f;
  *s_out = s;
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    float r = std::nearbyint(x[k] / s);
    r = std::min(std::max(r, -127.f), 127.f);
    q[k] = static_cast<int8_t>(r);
    sum += q[k];
  }
  std::memset(q + K, 0, Kp - K);
  return sum;
}
#include "cpu/ternary_driver.h"
}  // namespace scalar

#if KDFAST_HAVE_X86_PATHS
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")
namespace avx2 {
#define TERNARY_ISA 1
#include "cpu/ternary_kernels.h"
#undef TERNARY_ISA
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")
namespace avx512 {
#define TERNARY_ISA 2
#include "cpu/ternary_kernels.h"
#undef TERNARY_ISA
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,bmi2")
namespace avx512_vnni {
#define TERNARY_ISA 3
#include "cpu/ternary_kernels.h"
#undef TERNARY_ISA
}  // namespace avx512_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,bmi2,amx-tile,amx-int8")
#include "cpu/ternary_amx.h"
#pragma GCC pop_options
#endif

// AMX is used for the W2A8 GEMM when the CPU has it, the avx512_vnni path is
// selected, M >= kAmxMinRows and KDFAST_TERNARY_AMX is not "0".
// Below 64 rows the per-call weight re-layout costs more than AMX saves
// (measured: M=16, 4096x11008: AMX 21 ms vs VNNI 4.2 ms before the re-layout was vectorised).
constexpr int64_t kAmxMinRows = 64;

bool amx_enabled() {
#if KDFAST_HAVE_X86_PATHS
  const char* e = std::getenv("KDFAST_TERNARY_AMX");
  if (e && e[0] == '0') return false;
  return cpu_isa() == Isa::AVX512_VNNI && amx::hardware_ready();
#else
  return false;
#endif
}

bool ternary_amx_available() {
#if KDFAST_HAVE_X86_PATHS
  return amx::hardware_ready();
#else
  return false;
#endif
}

struct Paths {
  void (*int_range)(const IntArgs&, int64_t, int64_t);
  void (*f_range)(const FArgs&, int64_t, int64_t);
  int32_t (*quant_row)(const float*, int64_t, int64_t, int8_t*, float*);
  int tile_n;
};

Paths pick() {
#if KDFAST_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::AVX512_VNNI:
      return {avx512_vnni::int_range, avx512_vnni::f_range, avx512_vnni::quant_row, avx512_vnni::kTileN};
    case Isa::AVX512: return {avx512::int_range, avx512::f_range, avx512::quant_row, avx512::kTileN};
    case Isa::AVX2: return {avx2::int_range, avx2::f_range, avx2::quant_row, avx2::kTileN};
    default: break;
  }
#endif
  return {scalar::int_range, scalar::f_range, scalar::quant_row, scalar::kTileN};
}

// ---- argument checks (the Python layer validates first; these guard direct calls)
void check_packed(const at::Tensor& packed, int64_t K, const char* op) {
  TORCH_CHECK(packed.device().is_cpu(), op, ": packed_weight must be a CPU tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, op,
              ": packed_weight must be a 2-D uint8 tensor, got ", packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(K >= 1, op, ": in_features must be >= 1, got ", K);
  TORCH_CHECK(packed.size(1) == 16 * ((K + 63) / 64), op, ": packed_weight must have 16 * ceil(K / 64) = ",
              16 * ((K + 63) / 64), " columns for in_features=", K, ", got ", packed.size(1));
}

void check_act(const at::Tensor& x, int64_t K, at::ScalarType t, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": input must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == t && x.dim() == 2, op, ": input must be 2-D ", t, ", got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(x.size(1) == K, op, ": input has ", x.size(1), " features, expected in_features=", K);
}

void check_vec(const at::Tensor& v, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == n, op, ": ",
              name, " must be a float32 CPU vector of length ", n, ", got ", v.scalar_type(), " ", v.sizes());
}

// Output-feature blocks over OpenMP threads with a dynamic schedule: on a
// loaded machine a thread that is descheduled holds up only its current
// chunk, where a static split (at::parallel_for) waits for its whole share.
// Chunks carry at least ~2^20 multiply-adds; small problems run inline.
template <typename F>
void parallel_blocks(int64_t nblocks, int64_t macs_per_block, const F& f) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, macs_per_block));
  const int64_t nchunks = (nblocks + chunk - 1) / chunk;
  const int threads = at::get_num_threads();
  if (nchunks <= 1 || threads <= 1 || at::in_parallel_region()) {
    f(0, nblocks);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t c = 0; c < nchunks; ++c) f(c * chunk, std::min(nblocks, (c + 1) * chunk));
}

// Row passes over the activations (quantization, AMX operand) run on one
// thread up to this many elements (every BERT-base layer at M=384): each
// parallel region is a barrier, and on a loaded machine a barrier waits for a
// descheduled thread for a whole scheduler tick (2 threads with a compiler on
// the other core, 768x768 M=384: ~20 ms instead of 0.35 ms), while the pass
// itself costs ~0.1 ms per million elements on one core.
constexpr int64_t kSerialPrepElems = int64_t{1} << 21;

int64_t prep_grain(int64_t M, int64_t K, int64_t grain) {
  return M * K <= kSerialPrepElems ? std::max<int64_t>(M, 1) : grain;
}

// xu_ready: the AMX operand (q + 128, [Mp][Kp]) when the caller already built it.
void run_int(IntArgs& a, const Paths& p, const uint8_t* xu_ready = nullptr) {
#if KDFAST_HAVE_X86_PATHS
  if (a.M >= kAmxMinRows && amx_enabled()) {
    const int64_t Kp = a.KB * 64, Mp = (a.M + amx::kTileM - 1) / amx::kTileM * amx::kTileM;
    const int64_t K = a.K;
    at::Tensor xu;  // 64-byte aligned: AMX tile rows are whole cache lines
    if (!xu_ready) {
      xu = at::zeros({Mp * Kp}, at::TensorOptions().dtype(at::kByte));
      uint8_t* xd = xu.data_ptr<uint8_t>();
      at::parallel_for(0, a.M, prep_grain(a.M, Kp, 16),
                       [&](int64_t m0, int64_t m1) { amx::make_xu(a.x, m0, m1, Kp, K, xd); });
      xu_ready = xd;
    }
    amx::AmxArgs t{xu_ready, Mp, K};
    const int64_t nblocks = (a.N + amx::kTileN - 1) / amx::kTileN;
    parallel_blocks(nblocks, amx::kTileN * Kp * a.M, [&](int64_t b, int64_t e) {
      amx::int_range(a, t, b * amx::kTileN, std::min(a.N, e * amx::kTileN));
    });
    return;
  }
#endif
  const int64_t nblocks = (a.N + p.tile_n - 1) / p.tile_n;
  parallel_blocks(nblocks, p.tile_n * a.KB * 64 * a.M, [&](int64_t b, int64_t e) {
    p.int_range(a, b * p.tile_n, std::min(a.N, e * p.tile_n));
  });
}

at::Tensor int_common(const at::Tensor& q_in, const at::Tensor* sx, const at::Tensor& packed,
                      const at::Tensor* scale, const std::optional<at::Tensor>& bias, int64_t K, bool want_acc,
                      const char* op) {
  check_act(q_in, K, at::kChar, op);
  check_packed(packed, K, op);
  const int64_t M = q_in.size(0), N = packed.size(0), KB = (K + 63) / 64, Kp = KB * 64;
  at::Tensor q = q_in.contiguous(), w = packed.contiguous();
  at::Tensor out = at::empty({M, N}, q.options().dtype(want_acc ? at::kInt : at::kFloat));
  if (M == 0 || N == 0) return out;
  std::vector<int8_t> xp(M * Kp, 0);
  std::vector<int32_t> rs(M, 0);
  const int8_t* qs = q.data_ptr<int8_t>();
  at::parallel_for(0, M, prep_grain(M, K, 16), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += qs[m * K + k];
      std::memcpy(xp.data() + m * Kp, qs + m * K, K);
      rs[m] = s;
    }
  });
  IntArgs a{xp.data(), rs.data(), M, KB, N, w.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, nullptr, K};
  at::Tensor sxc, swc, bc;
  if (want_acc) {
    a.acc = out.data_ptr<int32_t>();
  } else {
    sxc = sx->contiguous();
    swc = scale->contiguous();
    a.y = out.data_ptr<float>();
    a.sx = sxc.data_ptr<float>();
    a.sw = swc.data_ptr<float>();
    if (bias) {
      bc = bias->contiguous();
      a.bias = bc.data_ptr<float>();
    }
  }
  run_int(a, pick());
  return out;
}

at::Tensor ternary_matmul_i8_acc(const at::Tensor& q, const at::Tensor& packed, int64_t K) {
  return int_common(q, nullptr, packed, nullptr, std::nullopt, K, true, "ternary_matmul_i8_acc");
}

at::Tensor ternary_linear_i8(const at::Tensor& q, const at::Tensor& sx, const at::Tensor& packed,
                             const at::Tensor& scale, const std::optional<at::Tensor>& bias, int64_t K) {
  const char* op = "ternary_linear_i8";
  check_vec(sx, q.size(0), "act_scale", op);
  check_vec(scale, packed.size(0), "scale", op);
  if (bias) check_vec(*bias, packed.size(0), "bias", op);
  return int_common(q, &sx, packed, &scale, bias, K, false, op);
}

at::Tensor ternary_linear_w2a8(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias, int64_t K) {
  const char* op = "ternary_linear_w2a8";
  check_act(x_in, K, at::kFloat, op);
  check_packed(packed, K, op);
  const int64_t M = x_in.size(0), N = packed.size(0), KB = (K + 63) / 64, Kp = KB * 64;
  check_vec(scale, N, "scale", op);
  if (bias) check_vec(*bias, N, "bias", op);
  at::Tensor x = x_in.contiguous(), w = packed.contiguous(), sw = scale.contiguous();
  at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const Paths p = pick();
  std::vector<int32_t> rs(M);
  std::vector<float> sx(M);
  const float* xs = x.data_ptr<float>();
  // On the AMX path the rows are quantized straight into the tile operand
  // buffer and turned into u = q + 128 in place, in the same pass: no second
  // activation buffer and one parallel region instead of two.
  bool use_amx = false;
  int64_t Mp = M;
#if KDFAST_HAVE_X86_PATHS
  use_amx = M >= kAmxMinRows && amx_enabled();
  if (use_amx) Mp = (M + amx::kTileM - 1) / amx::kTileM * amx::kTileM;
#endif
  // 64-byte aligned (torch's CPU allocator): AMX tile rows are whole cache lines.
  at::Tensor xq = at::empty({Mp * Kp}, x.options().dtype(at::kChar));
  int8_t* q = xq.data_ptr<int8_t>();
  if (Mp > M) std::memset(q + M * Kp, 0, (Mp - M) * Kp);
  at::parallel_for(0, M, prep_grain(M, K, 8), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) rs[m] = p.quant_row(xs + m * K, K, Kp, q + m * Kp, &sx[m]);
#if KDFAST_HAVE_X86_PATHS
    if (use_amx) amx::make_xu(q, b, e, Kp, K, reinterpret_cast<uint8_t*>(q));
#endif
  });
  IntArgs a{q, rs.data(), M, KB, N, w.data_ptr<uint8_t>(), nullptr, out.data_ptr<float>(), sx.data(),
            sw.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr, K};
  run_int(a, p, use_amx ? reinterpret_cast<const uint8_t*>(q) : nullptr);
  return out;
}

at::Tensor ternary_linear_f32(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias, int64_t K) {
  const char* op = "ternary_linear_f32";
  check_act(x_in, K, at::kFloat, op);
  check_packed(packed, K, op);
  const int64_t M = x_in.size(0), N = packed.size(0), KB = (K + 63) / 64, Kp = KB * 64;
  check_vec(scale, N, "scale", op);
  if (bias) check_vec(*bias, N, "bias", op);
  at::Tensor x = x_in.contiguous(), w = packed.contiguous(), sw = scale.contiguous();
  at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  std::vector<float> xp(M * Kp, 0.f);
  const float* xs = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) std::memcpy(xp.data() + m * Kp, xs + m * K, K * sizeof(float));
  const Paths p = pick();
  FArgs a{xp.data(), M, KB, N, w.data_ptr<uint8_t>(), out.data_ptr<float>(), sw.data_ptr<float>(),
          bc.defined() ? bc.data_ptr<float>() : nullptr};
  const int64_t nblocks = (N + p.tile_n - 1) / p.tile_n;
  parallel_blocks(nblocks, p.tile_n * Kp * M, [&](int64_t b, int64_t e) {
    p.f_range(a, b * p.tile_n, std::min(N, e * p.tile_n));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_act_i8(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "quantize_act_i8: input must be a 2-D float32 CPU tensor, got ", x_in.scalar_type(), " ",
              x_in.sizes());
  at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options());
  if (M == 0) return {q, s};
  const Paths p = pick();
  const float* xs = x.data_ptr<float>();
  int8_t* qs = q.data_ptr<int8_t>();
  float* ss = s.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) p.quant_row(xs + m * K, K, K, qs + m * K, ss + m);
  });
  return {q, s};
}

}  // namespace ternary
}  // namespace kdfast

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("ternary_linear_w2a8(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features) -> Tensor",
        &kdfast::ternary::ternary_linear_w2a8);
  m.def("ternary_linear_i8(Tensor q, Tensor act_scale, Tensor packed, Tensor scale, Tensor? bias, "
        "int in_features) -> Tensor",
        &kdfast::ternary::ternary_linear_i8);
  m.def("ternary_matmul_i8_acc(Tensor q, Tensor packed, int in_features) -> Tensor",
        &kdfast::ternary::ternary_matmul_i8_acc);
  m.def("ternary_linear_f32(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features) -> Tensor",
        &kdfast::ternary::ternary_linear_f32);
  m.def("quantize_act_i8(Tensor x) -> (Tensor, Tensor)", &kdfast::ternary::quantize_act_i8);
  m.def("ternary_amx_available() -> bool", &kdfast::ternary::ternary_amx_available);
}
