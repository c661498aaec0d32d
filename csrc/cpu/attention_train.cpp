// Attention forward + backward for training on the CPU: padding-aware (valid
// keys / queries only), packed variable-length input, head gates, inactive
// heads, and attention dropout drawn inside the kernel from a counter-based
// RNG so that the backward regenerates the forward's mask instead of storing it.
//
// Work unit: one (batch, head). Its valid query rows (m) and valid key rows (n)
// are gathered into per-thread tiles and the products run as GEMMs on those
// contiguous tiles, single-threaded inside our parallel region. Padded keys and
// (zero_padded_queries / packed) padded queries are never read nor computed.
// The only L x L storage is one m x n fp32 tile (three in the backward) per
// thread: 0.6 MiB each at m = n = 384.
//
// Two GEMM paths:
// - fp32 tiles (float32, float16, and bf16 where the next path cannot run): the
//   gather converts to float32 (and any row stride), at::mm_out -> MKL sgemm,
//   fp32 outputs converted to the input dtype at the end.
// - bf16 GEMMs (bf16 q/k/v/grad_out, CPU path AVX-512 or above, oneDNN's brgemm
//   packs bf16, i.e. AMX-BF16): bf16 tiles gathered without conversion, the B
//   operands in the VNNI layout built while gathering; at::native::cpublas::brgemm
//   (bf16 x bf16, fp32 accumulation and fp32 C). Scores, softmax, LSE, dropout and
//   dS stay fp32; P and dS are rounded to bf16 only as GEMM operands (as PyTorch's
//   CPU flash attention does); outputs and gradients are written as bf16 directly.
//   KDFAST_ATTENTION_BF16_GEMM=0 (or _C.set_attention_bf16_gemm(False)) forces the
//   fp32 tiles; _C.attention_last_gemm() says which path the latest call ran.
//   On the 2-core Xeon (AMX-BF16, KVM), one 384 x 64 x 192 product: sgemm 84 us,
//   brgemm AMX 15 us (bf16 at::mm_out with bf16 output: 49 us, and it cannot keep
//   fp32 scores). B=16 H=12 L=384 D=64, 50% valid, dropout 0.1, bf16 fwd+bwd, 2
//   threads: 395-476 ms against 687-698 ms forced off (SDPA bf16 1732-2150 ms),
//   peak 41 MiB against 101-103; the Philox dropout is now most of the time
//   (1 thread: 335-387 ms with dropout 0.1, 137-149 ms without).
// Why GEMMs on tiles and not the broadcast-FMA kernel of attention.cpp: on the
// 2-core EPYC (AVX2) that kernel ran B=64 L=216 inference in 1.64 s against
// SDPA's 0.53 s; sgemm tiles are what MKL blocks well, and the elementwise
// softmax / dropout / dS loops (compiled per ISA) were a small part there (with
// bf16 GEMMs on AMX they are the larger part, see above).
//
// Dropout RNG: Philox-4x32-10 exactly as Triton's tl.rand(seed, offset)
// (counter c0/c1 = the 64-bit offset, c2 = c3 = 0, key = the 64-bit seed),
// uniform u = (int32 bits, negatives folded) * 4.6566127342e-10. The offset of
// element (b, h, i, j) is offset + ((b * H + h) * Lq + i) * Lk + j, with Lq/Lk
// the padded lengths (max_seqlen for packed input, so packed == padded).
// An element is kept when u >= p and then scaled by 1 / (1 - p).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/attention_train.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace kdfast {

namespace {
std::atomic<int> g_bf16_gemm{-1};  // -1: not read yet from KDFAST_ATTENTION_BF16_GEMM
std::atomic<int> g_last_gemm{0};   // 0: no call yet, 1: fp32, 2: bf16
}  // namespace

bool attention_bf16_gemm_available() {
  return hardware_isa() >= Isa::AVX512 && at::native::cpublas::could_pack(at::kBFloat16);
}

bool attention_bf16_gemm_enabled() {
  int v = g_bf16_gemm.load();
  if (v < 0) {
    const char* e = std::getenv("KDFAST_ATTENTION_BF16_GEMM");
    v = (e && (!std::strcmp(e, "0") || !std::strcmp(e, "off") || !std::strcmp(e, "false"))) ? 0 : 1;
    g_bf16_gemm.store(v);
  }
  return v == 1;
}

void set_attention_bf16_gemm(bool enabled) { g_bf16_gemm.store(enabled ? 1 : 0); }

const char* attention_last_gemm() {
  switch (g_last_gemm.load()) {
    case 1: return "fp32";
    case 2: return "bf16";
    default: return "";
  }
}

namespace {

// bf16 GEMMs for these inputs now: bf16 everywhere, allowed, available, CPU path AVX-512 or above.
bool use_bf16_gemm(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (t->scalar_type() != at::kBFloat16) return false;
  return static_cast<int>(cpu_isa()) >= static_cast<int>(Isa::AVX512) && attention_bf16_gemm_enabled() &&
         attention_bf16_gemm_available();
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

KDFAST_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

KDFAST_INLINE float philox_uniform(uint64_t seed, uint64_t ctr) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;  // -x - 1 without overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Rows of a [B, H, L, D] tensor (padded) or a [T, H, D] tensor (packed):
// row (b, h, pos) at ptr + boff[b] + h * sh + pos * sp (elements).
struct Rows {
  void* ptr = nullptr;
  at::ScalarType dt = at::kFloat;
  std::vector<int64_t> boff;
  int64_t sh = 0, sp = 0;
};

Rows rows_of(const at::Tensor& t, const std::vector<int64_t>& cu, int64_t B) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "attention kernel: rows need a unit last stride");
  Rows r;
  r.ptr = t.data_ptr();
  r.dt = t.scalar_type();
  r.boff.resize(B);
  if (t.dim() == 4) {
    for (int64_t b = 0; b < B; ++b) r.boff[b] = b * t.stride(0);
    r.sh = t.stride(1);
    r.sp = t.stride(2);
  } else {
    for (int64_t b = 0; b < B; ++b) r.boff[b] = cu[b] * t.stride(0);
    r.sh = t.stride(1);
    r.sp = t.stride(0);
  }
  return r;
}

// lse: [B, H, Lq] (padded) or [H, Tq] (packed).
Rows lse_rows(const at::Tensor& t, const std::vector<int64_t>& cu, int64_t B, bool packed) {
  Rows r;
  r.ptr = t.data_ptr();
  r.boff.resize(B);
  if (!packed) {
    for (int64_t b = 0; b < B; ++b) r.boff[b] = b * t.stride(0);
    r.sh = t.stride(1);
    r.sp = t.stride(2);
  } else {
    for (int64_t b = 0; b < B; ++b) r.boff[b] = cu[b];
    r.sh = t.stride(0);
    r.sp = 1;
  }
  return r;
}

template <typename T>
void gather_t(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t D, float mul, float* dst) {
  const T* base = static_cast<const T*>(r.ptr) + r.boff[b] + h * r.sh;
  for (int64_t i = 0; i < n; ++i) {
    const T* s = base + pos[i] * r.sp;
    float* o = dst + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(s[d]) * mul;
  }
}

void gather(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t D, float mul, float* dst) {
  switch (r.dt) {
    case at::kFloat: gather_t<float>(r, b, h, pos, n, D, mul, dst); break;
    case at::kBFloat16: gather_t<at::BFloat16>(r, b, h, pos, n, D, mul, dst); break;
    case at::kHalf: gather_t<at::Half>(r, b, h, pos, n, D, mul, dst); break;
    default: TORCH_CHECK(false, "attention kernel: unsupported dtype ", r.dt);
  }
}

void scatter(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t D, float mul,
             const float* src) {
  float* base = static_cast<float*>(r.ptr) + r.boff[b] + h * r.sh;
  for (int64_t i = 0; i < n; ++i) {
    float* o = base + pos[i] * r.sp;
    const float* s = src + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] = s[d] * mul;
  }
}

struct Ctx {
  int64_t B = 0, H = 0, D = 0, Lq = 0, Lk = 0;  // Lq, Lk: padded lengths (dropout counters)
  float scale = 1.f, p = 0.f;
  uint64_t seed = 0, offset = 0;
  Rows q, k, v, out, ung, lse, go, dq, dk, dv;
  bool has_ung = false;
  std::vector<std::vector<int32_t>> qpos, kpos;
  const float* gates = nullptr;
  int64_t g_sb = 0;
  const bool* active = nullptr;
  float* dg = nullptr;  // [B, H] gate gradients
  int64_t mmax = 0, nmax = 0;
  bool bf16 = false;  // bf16 GEMM path (q, k, v, grad_out bf16; outputs written as bf16)
};

struct Buf {
  at::Tensor q, k, v, o, g, s, s2, s3, dk, dv;
  explicit Buf(const Ctx& c, bool bwd) {
    auto f = at::TensorOptions().dtype(at::kFloat);
    const int64_t m = std::max<int64_t>(c.mmax, 1), n = std::max<int64_t>(c.nmax, 1), D = c.D;
    q = at::empty({m, D}, f);
    k = at::empty({n, D}, f);
    v = at::empty({n, D}, f);
    o = at::empty({std::max(m, n), D}, f);
    s = at::empty({m * n}, f);
    if (bwd) {
      g = at::empty({m, D}, f);
      dk = at::empty({n, D}, f);
      dv = at::empty({n, D}, f);
      s2 = at::empty({m * n}, f);
      s3 = at::empty({m * n}, f);
    }
  }
};

at::Tensor view2(const at::Tensor& buf, int64_t r, int64_t c) { return buf.narrow(0, 0, r * c).view({r, c}); }
at::Tensor view2d(const at::Tensor& buf, int64_t r, int64_t c) {
  return buf.view(-1).narrow(0, 0, r * c).view({r, c});
}

// ---- elementwise parts (compiled per ISA) ----
KDFAST_INLINE float softmax_row(float* s, int64_t n) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  float l = 0.f;
#pragma omp simd reduction(+ : l)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(s[j] - mx);
    s[j] = e;
    l += e;
  }
  const float inv = 1.f / l;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  return mx + std::log(l);
}

// dst[j] = src[j] * (u >= p ? 1/(1-p) : 0) for keys kpos[j] of query position qi.
KDFAST_INLINE void dropout_row(float* dst, const float* src, int64_t n, const int32_t* kp, uint64_t row_ctr,
                               uint64_t seed, float p, float zs) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float u = philox_uniform(seed, row_ctr + static_cast<uint64_t>(kp[j]));
    dst[j] = u >= p ? src[j] * zs : 0.f;
  }
}

KDFAST_INLINE bool skip_task(const Ctx& c, int64_t b, int64_t h) {
  return (c.active && !c.active[h]) || c.qpos[b].empty() || c.kpos[b].empty();
}

KDFAST_INLINE uint64_t row_counter(const Ctx& c, int64_t b, int64_t h, int64_t qi) {
  return c.offset + (static_cast<uint64_t>((b * c.H + h) * c.Lq + qi)) * static_cast<uint64_t>(c.Lk);
}

KDFAST_INLINE void fwd_task(const Ctx& c, int64_t b, int64_t h, Buf& w) {
  if (skip_task(c, b, h)) return;
  const auto& qp = c.qpos[b];
  const auto& kp = c.kpos[b];
  const int64_t m = qp.size(), n = kp.size(), D = c.D;
  float* Q = w.q.data_ptr<float>();
  gather(c.q, b, h, qp.data(), m, D, c.scale, Q);
  gather(c.k, b, h, kp.data(), n, D, 1.f, w.k.data_ptr<float>());
  gather(c.v, b, h, kp.data(), n, D, 1.f, w.v.data_ptr<float>());
  at::Tensor S = view2(w.s, m, n);
  at::mm_out(S, view2d(w.q, m, D), view2d(w.k, n, D).t());
  float* s = S.data_ptr<float>();
  float* lse = static_cast<float*>(c.lse.ptr) + c.lse.boff[b] + h * c.lse.sh;
  const float zs = 1.f / (1.f - c.p);
  for (int64_t i = 0; i < m; ++i) {
    float* row = s + i * n;
    lse[qp[i] * c.lse.sp] = softmax_row(row, n);
    if (c.p > 0.f) dropout_row(row, row, n, kp.data(), row_counter(c, b, h, qp[i]), c.seed, c.p, zs);
  }
  at::Tensor O = view2d(w.o, m, D);
  at::mm_out(O, S, view2d(w.v, n, D));
  const float g = c.gates ? c.gates[b * c.g_sb + h] : 1.f;
  scatter(c.out, b, h, qp.data(), m, D, g, O.data_ptr<float>());
  if (c.has_ung) scatter(c.ung, b, h, qp.data(), m, D, 1.f, O.data_ptr<float>());
}

KDFAST_INLINE void bwd_task(const Ctx& c, int64_t b, int64_t h, Buf& w) {
  if (skip_task(c, b, h)) return;
  const auto& qp = c.qpos[b];
  const auto& kp = c.kpos[b];
  const int64_t m = qp.size(), n = kp.size(), D = c.D;
  gather(c.q, b, h, qp.data(), m, D, c.scale, w.q.data_ptr<float>());
  gather(c.k, b, h, kp.data(), n, D, 1.f, w.k.data_ptr<float>());
  gather(c.v, b, h, kp.data(), n, D, 1.f, w.v.data_ptr<float>());
  float* G = w.g.data_ptr<float>();
  gather(c.go, b, h, qp.data(), m, D, 1.f, G);
  const float g = c.gates ? c.gates[b * c.g_sb + h] : 1.f;
  if (c.dg && c.has_ung) {
    float* U = w.o.data_ptr<float>();
    gather(c.ung, b, h, qp.data(), m, D, 1.f, U);
    double acc = 0.0;
    for (int64_t i = 0; i < m * D; ++i) acc += static_cast<double>(G[i]) * U[i];
    c.dg[b * c.H + h] = static_cast<float>(acc);
  }
  if (g != 1.f)
    for (int64_t i = 0; i < m * D; ++i) G[i] *= g;
  at::Tensor Qt = view2d(w.q, m, D), Kt = view2d(w.k, n, D), Vt = view2d(w.v, n, D), Gt = view2d(w.g, m, D);
  at::Tensor P = view2(w.s, m, n);
  at::mm_out(P, Qt, Kt.t());
  float* pp = P.data_ptr<float>();
  const float* lse = static_cast<const float*>(c.lse.ptr) + c.lse.boff[b] + h * c.lse.sh;
  const bool drop = c.p > 0.f;
  const float zs = 1.f / (1.f - c.p);
  float* pd = drop ? w.s2.data_ptr<float>() : pp;
  for (int64_t i = 0; i < m; ++i) {
    const float li = lse[qp[i] * c.lse.sp];
    float* row = pp + i * n;
    if (li == kNegInf) {
      for (int64_t j = 0; j < n; ++j) row[j] = 0.f;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = fast_exp(row[j] - li);
    }
    if (drop) dropout_row(pd + i * n, row, n, kp.data(), row_counter(c, b, h, qp[i]), c.seed, c.p, zs);
  }
  at::Tensor Pd = drop ? view2(w.s2, m, n) : P;
  at::Tensor dV = view2d(w.dv, n, D);
  at::Tensor dPd = view2(w.s3, m, n);
  at::mm_out(dPd, Gt, Vt.t());
  at::mm_out(dV, Pd.t(), Gt);
  float* dp = dPd.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    const float* pr = pp + i * n;
    const float* pdr = pd + i * n;
    float* dr = dp + i * n;
    float delta = 0.f;
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < n; ++j) delta += pdr[j] * dr[j];
    if (drop) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * ((pdr[j] != 0.f ? zs : 0.f) * dr[j] - delta);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - delta);
    }
  }
  at::Tensor dQ = view2d(w.o, m, D);
  at::mm_out(dQ, dPd, Kt);
  scatter(c.dq, b, h, qp.data(), m, D, c.scale, dQ.data_ptr<float>());
  at::Tensor dK = view2d(w.dk, n, D);
  at::mm_out(dK, dPd.t(), Qt);  // Q tile is pre-scaled: dK = scale * dS^T Q
  scatter(c.dk, b, h, kp.data(), n, D, 1.f, dK.data_ptr<float>());
  scatter(c.dv, b, h, kp.data(), n, D, 1.f, dV.data_ptr<float>());
}

// ---- bf16 GEMM path (bf16 q/k/v on CPUs where oneDNN's brgemm runs bf16 on AMX) ----
// Operands are bf16 tiles for at::native::cpublas::brgemm (bf16 x bf16 -> fp32 C, nothing
// accumulated). B operands are in the VNNI layout: element (r, c) of a [K, N] matrix at
// ((r / 2) * ldb + c) * 2 + r % 2, i.e. rows 2t and 2t + 1 interleaved as one 32-bit word per
// column; they are built while gathering or while rounding P / dS (no separate pack pass).
// Row and key counts are rounded up to kTile with zero rows / columns, so that few distinct
// shapes are compiled (oneDNN JITs one kernel per shape, about 1 ms each, cached per thread)
// and the AMX reductions have no K tail (K = 176 ran 1.4x slower than K = 192).
// The helpers are inline so that their loops compile for the AVX-512 target of the task.
constexpr int64_t kTile = 32;
constexpr int64_t kBlock = 16;  // rows per block of the blocked transposes

KDFAST_INLINE int64_t round_up(int64_t x, int64_t r) { return (x + r - 1) / r * r; }

// float -> bf16 bits, round to nearest even (NaN stays NaN).
KDFAST_INLINE uint32_t bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : r;
}
KDFAST_INLINE float bf16_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

KDFAST_INLINE const uint16_t* bf16_row(const Rows& r, int64_t b, int64_t h, int64_t pos) {
  return static_cast<const uint16_t*>(r.ptr) + r.boff[b] + h * r.sh + pos * r.sp;
}

// A operand [rows, Dp] row-major: dst[i * Dp + d] = x[pos[i]][d]; zero past D and for rows >= n.
KDFAST_INLINE void gather_a(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t rows,
                            int64_t D, int64_t Dp, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t* o = dst + i * Dp;
    std::memcpy(o, bf16_row(r, b, h, pos[i]), D * sizeof(uint16_t));
    for (int64_t d = D; d < Dp; ++d) o[d] = 0;
  }
  std::memset(dst + n * Dp, 0, (rows - n) * Dp * sizeof(uint16_t));
}

// A operand x^T [D, rows]: dst[d * rows + i] = x[pos[i]][d]; zero for i >= n. Blocks of kBlock
// rows, so that each d writes kBlock contiguous elements.
KDFAST_INLINE void gather_at(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t rows,
                             int64_t D, uint16_t* dst) {
  const uint16_t* src[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t nb = std::min<int64_t>(kBlock, n - i0);
    for (int64_t i = 0; i < nb; ++i) src[i] = bf16_row(r, b, h, pos[i0 + i]);
    for (int64_t d = 0; d < D; ++d) {
      uint16_t* o = dst + d * rows + i0;
      for (int64_t i = 0; i < nb; ++i) o[i] = src[i][d];
    }
  }
  for (int64_t d = 0; d < D; ++d) std::memset(dst + d * rows + n, 0, (rows - n) * sizeof(uint16_t));
}

// B operand x^T [Dp, cols] in VNNI layout: the pair (x[j][2t], x[j][2t + 1]) is the 32-bit word
// [t][j], so this is a 32-bit transpose of the rows (blocks of kBlock rows); zero for columns
// j >= n and past D (odd D: (x[j][D - 1], 0)).
KDFAST_INLINE void gather_bt(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t cols,
                             int64_t D, uint16_t* dst) {
  const int64_t D2 = D / 2, Dp2 = (D + 1) / 2;
  uint32_t* o = reinterpret_cast<uint32_t*>(dst);
  const uint16_t* src[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min<int64_t>(kBlock, n - j0);
    for (int64_t j = 0; j < nb; ++j) src[j] = bf16_row(r, b, h, pos[j0 + j]);
    for (int64_t t = 0; t < D2; ++t) {
      uint32_t* ot = o + t * cols + j0;
      for (int64_t j = 0; j < nb; ++j) ot[j] = src[j][2 * t] | (static_cast<uint32_t>(src[j][2 * t + 1]) << 16);
    }
    if (D2 < Dp2)
      for (int64_t j = 0; j < nb; ++j) o[D2 * cols + j0 + j] = src[j][D - 1];
  }
  for (int64_t t = 0; t < Dp2; ++t) std::memset(o + t * cols + n, 0, (cols - n) * sizeof(uint32_t));
}

// B operand x [rows, D] (the reduction runs over rows) in VNNI layout: word [t][d] =
// (x[2t][d], x[2t + 1][d]); zero rows from n to `rows` (even).
KDFAST_INLINE void gather_b(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t rows,
                            int64_t D, uint16_t* dst) {
  uint32_t* o = reinterpret_cast<uint32_t*>(dst);
  for (int64_t t = 0; t < rows / 2; ++t) {
    const int64_t i = 2 * t;
    uint32_t* ot = o + t * D;
    if (i + 1 < n) {
      const uint16_t* s0 = bf16_row(r, b, h, pos[i]);
      const uint16_t* s1 = bf16_row(r, b, h, pos[i + 1]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ot[d] = s0[d] | (static_cast<uint32_t>(s1[d]) << 16);
    } else if (i < n) {
      const uint16_t* s0 = bf16_row(r, b, h, pos[i]);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ot[d] = s0[d];
    } else {
      std::memset(ot, 0, D * sizeof(uint32_t));
    }
  }
}

// Rows 2t, 2t + 1 of an fp32 map (row stride ld, n valid columns, `m` valid rows) rounded into
// the VNNI word row t of a B operand with `cols` columns (zero past n and for rows >= m).
KDFAST_INLINE void pack_pair(const float* map, int64_t ld, int64_t t, int64_t m, int64_t n, int64_t cols,
                             uint32_t* dst) {
  const int64_t i = 2 * t;
  uint32_t* o = dst + t * cols;
  if (i >= m) {
    std::memset(o, 0, cols * sizeof(uint32_t));
    return;
  }
  const float* r0 = map + i * ld;
  if (i + 1 < m) {
    const float* r1 = r0 + ld;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = bf16_bits(r0[j]) | (bf16_bits(r1[j]) << 16);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = bf16_bits(r0[j]);
  }
  for (int64_t j = n; j < cols; ++j) o[j] = 0;
}

// C = A [M, K] x B [K, N] (B in VNNI layout), fp32 C.
KDFAST_INLINE void gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, float* C, int64_t ldc) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, false, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, true);
}

// Output rows i from an fp32 tile [n, D] into bf16 rows.
KDFAST_INLINE void scatter_bf16(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t D,
                                float mul, const float* src) {
  uint16_t* base = static_cast<uint16_t*>(r.ptr) + r.boff[b] + h * r.sh;
  for (int64_t i = 0; i < n; ++i) {
    uint16_t* o = base + pos[i] * r.sp;
    const float* s = src + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<uint16_t>(bf16_bits(s[d] * mul));
  }
}

// Output rows j from the columns of a transposed fp32 tile t [D, ld] (dV^T, dK^T) into bf16 rows,
// blocks of kBlock rows (each d reads kBlock contiguous floats).
KDFAST_INLINE void scatter_cols(const Rows& r, int64_t b, int64_t h, const int32_t* pos, int64_t n, int64_t D,
                                float mul, const float* t, int64_t ld) {
  uint16_t* base = static_cast<uint16_t*>(r.ptr) + r.boff[b] + h * r.sh;
  uint16_t* dst[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t nb = std::min<int64_t>(kBlock, n - j0);
    for (int64_t j = 0; j < nb; ++j) dst[j] = base + pos[j0 + j] * r.sp;
    for (int64_t d = 0; d < D; ++d) {
      const float* td = t + d * ld + j0;
      for (int64_t j = 0; j < nb; ++j) dst[j][d] = static_cast<uint16_t>(bf16_bits(td[j] * mul));
    }
  }
}

struct BufB {
  int64_t Dp = 0;
  at::Tensor qa, kt, vb, pb, ga, vt, gt, qt, kb, dsa, dsv, s, s2, s3, o, t;
  BufB(const Ctx& c, bool bwd) {
    const int64_t mp = round_up(std::max<int64_t>(c.mmax, 1), kTile);
    const int64_t np = round_up(std::max<int64_t>(c.nmax, 1), kTile);
    const int64_t D = c.D;
    Dp = round_up(D, 2);
    auto h = at::TensorOptions().dtype(at::kBFloat16);
    auto f = at::TensorOptions().dtype(at::kFloat);
    qa = at::empty({mp * Dp}, h);
    kt = at::empty({Dp * np}, h);
    pb = at::empty({mp * np}, h);  // fwd: P row-major (A); bwd: dropped P in VNNI layout (B)
    s = at::empty({mp * np}, f);
    o = at::empty({mp * D}, f);
    if (!bwd) {
      vb = at::empty({np * D}, h);
      return;
    }
    ga = at::empty({mp * Dp}, h);
    vt = at::empty({Dp * np}, h);
    gt = at::empty({D * mp}, h);
    qt = at::empty({D * mp}, h);
    kb = at::empty({np * D}, h);
    dsa = at::empty({mp * np}, h);
    dsv = at::empty({mp * np}, h);
    s2 = at::empty({mp * np}, f);
    s3 = at::empty({mp * np}, f);
    t = at::empty({D * np}, f);
  }
};

KDFAST_INLINE uint16_t* bptr(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

KDFAST_INLINE void fwd_task_bf16(const Ctx& c, int64_t b, int64_t h, BufB& w) {
  if (skip_task(c, b, h)) return;
  const auto& qp = c.qpos[b];
  const auto& kp = c.kpos[b];
  const int64_t m = qp.size(), n = kp.size(), D = c.D, Dp = w.Dp;
  const int64_t mt = round_up(m, kTile), nt = round_up(n, kTile);
  uint16_t* qa = bptr(w.qa);
  uint16_t* kt = bptr(w.kt);
  uint16_t* vb = bptr(w.vb);
  uint16_t* pb = bptr(w.pb);
  gather_a(c.q, b, h, qp.data(), m, mt, D, Dp, qa);
  gather_bt(c.k, b, h, kp.data(), n, nt, D, kt);
  gather_b(c.v, b, h, kp.data(), n, nt, D, vb);
  float* s = w.s.data_ptr<float>();
  gemm_bf16(mt, nt, Dp, qa, Dp, kt, nt, s, nt);  // S = Q K^T (unscaled)
  float* lse = static_cast<float*>(c.lse.ptr) + c.lse.boff[b] + h * c.lse.sh;
  const float zs = 1.f / (1.f - c.p), scale = c.scale;
  for (int64_t i = 0; i < m; ++i) {
    float* row = s + i * nt;
    float mx = kNegInf;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = row[j] * scale > mx ? row[j] * scale : mx;
    float l = 0.f;
#pragma omp simd reduction(+ : l)
    for (int64_t j = 0; j < n; ++j) {
      const float e = fast_exp(row[j] * scale - mx);
      row[j] = e;
      l += e;
    }
    lse[qp[i] * c.lse.sp] = mx + std::log(l);
    const float inv = 1.f / l;
    uint16_t* pr = pb + i * nt;
    if (c.p > 0.f) {
      const uint64_t ctr = row_counter(c, b, h, qp[i]);
      const float ks = inv * zs;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float u = philox_uniform(c.seed, ctr + static_cast<uint64_t>(kp[j]));
        pr[j] = static_cast<uint16_t>(bf16_bits(u >= c.p ? row[j] * ks : 0.f));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) pr[j] = static_cast<uint16_t>(bf16_bits(row[j] * inv));
    }
    for (int64_t j = n; j < nt; ++j) pr[j] = 0;
  }
  std::memset(pb + m * nt, 0, (mt - m) * nt * sizeof(uint16_t));
  float* O = w.o.data_ptr<float>();
  gemm_bf16(mt, D, nt, pb, nt, vb, D, O, D);  // O = P V
  const float g = c.gates ? c.gates[b * c.g_sb + h] : 1.f;
  scatter_bf16(c.out, b, h, qp.data(), m, D, g, O);
  if (c.has_ung) scatter_bf16(c.ung, b, h, qp.data(), m, D, 1.f, O);
}

// Gradients with G = grad_out ungated and g the gate: dP = G V^T, dV = g (Pd^T G),
// dS = P * (Z dP - rowsum(Pd * dP)), dQ = scale g (dS K), dK = scale g (dS^T Q). dV and dK come
// out transposed ([D, keys], A = G^T / Q^T: small transposes) so that the operands made from the
// m x n maps (Pd, dS) are row-pair (VNNI) copies, not transposes.
KDFAST_INLINE void bwd_task_bf16(const Ctx& c, int64_t b, int64_t h, BufB& w) {
  if (skip_task(c, b, h)) return;
  const auto& qp = c.qpos[b];
  const auto& kp = c.kpos[b];
  const int64_t m = qp.size(), n = kp.size(), D = c.D, Dp = w.Dp;
  const int64_t mt = round_up(m, kTile), nt = round_up(n, kTile);
  uint16_t* qa = bptr(w.qa);
  uint16_t* kt = bptr(w.kt);
  uint16_t* ga = bptr(w.ga);
  uint16_t* vt = bptr(w.vt);
  uint16_t* gt = bptr(w.gt);
  uint16_t* qt = bptr(w.qt);
  uint16_t* kb = bptr(w.kb);
  uint16_t* dsa = bptr(w.dsa);
  uint32_t* pv = reinterpret_cast<uint32_t*>(bptr(w.pb));
  uint32_t* dsv = reinterpret_cast<uint32_t*>(bptr(w.dsv));
  gather_a(c.q, b, h, qp.data(), m, mt, D, Dp, qa);
  gather_bt(c.k, b, h, kp.data(), n, nt, D, kt);
  gather_a(c.go, b, h, qp.data(), m, mt, D, Dp, ga);
  gather_bt(c.v, b, h, kp.data(), n, nt, D, vt);
  gather_at(c.go, b, h, qp.data(), m, mt, D, gt);
  gather_at(c.q, b, h, qp.data(), m, mt, D, qt);
  gather_b(c.k, b, h, kp.data(), n, nt, D, kb);
  const float g = c.gates ? c.gates[b * c.g_sb + h] : 1.f;
  if (c.dg && c.has_ung) {
    float* U = w.o.data_ptr<float>();
    gather(c.ung, b, h, qp.data(), m, D, 1.f, U);
    double acc = 0.0;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(bf16_float(ga[i * Dp + d])) * U[i * D + d];
    c.dg[b * c.H + h] = static_cast<float>(acc);
  }
  float* pp = w.s.data_ptr<float>();
  gemm_bf16(mt, nt, Dp, qa, Dp, kt, nt, pp, nt);  // S = Q K^T (unscaled)
  const float* lse = static_cast<const float*>(c.lse.ptr) + c.lse.boff[b] + h * c.lse.sh;
  const bool drop = c.p > 0.f;
  const float zs = 1.f / (1.f - c.p), scale = c.scale;
  float* pd = drop ? w.s2.data_ptr<float>() : pp;
  for (int64_t i = 0; i < m; ++i) {
    const float li = lse[qp[i] * c.lse.sp];
    float* row = pp + i * nt;
    if (li == kNegInf) {
      for (int64_t j = 0; j < n; ++j) row[j] = 0.f;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) row[j] = fast_exp(row[j] * scale - li);
    }
    if (drop) dropout_row(pd + i * nt, row, n, kp.data(), row_counter(c, b, h, qp[i]), c.seed, c.p, zs);
  }
  for (int64_t t = 0; t < mt / 2; ++t) pack_pair(pd, nt, t, m, n, nt, pv);
  float* dp = w.s3.data_ptr<float>();
  float* T = w.t.data_ptr<float>();
  gemm_bf16(mt, nt, Dp, ga, Dp, vt, nt, dp, nt);                               // dP = G V^T
  gemm_bf16(D, nt, mt, gt, mt, reinterpret_cast<uint16_t*>(pv), nt, T, nt);  // dV^T = G^T Pd
  scatter_cols(c.dv, b, h, kp.data(), n, D, g, T, nt);
  for (int64_t i = 0; i < m; ++i) {
    const float* pr = pp + i * nt;
    const float* pdr = pd + i * nt;
    float* dr = dp + i * nt;
    float delta = 0.f;
#pragma omp simd reduction(+ : delta)
    for (int64_t j = 0; j < n; ++j) delta += pdr[j] * dr[j];
    uint16_t* oa = dsa + i * nt;
    if (drop) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        dr[j] = pr[j] * ((pdr[j] != 0.f ? zs : 0.f) * dr[j] - delta);
        oa[j] = static_cast<uint16_t>(bf16_bits(dr[j]));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        dr[j] = pr[j] * (dr[j] - delta);
        oa[j] = static_cast<uint16_t>(bf16_bits(dr[j]));
      }
    }
    for (int64_t j = n; j < nt; ++j) oa[j] = 0;
  }
  for (int64_t t = 0; t < mt / 2; ++t) pack_pair(dp, nt, t, m, n, nt, dsv);
  float* dQ = w.o.data_ptr<float>();
  gemm_bf16(mt, D, nt, dsa, nt, kb, D, dQ, D);  // dQ = dS K (rows >= m of dS: not read back)
  scatter_bf16(c.dq, b, h, qp.data(), m, D, scale * g, dQ);
  gemm_bf16(D, nt, mt, qt, mt, reinterpret_cast<uint16_t*>(dsv), nt, T, nt);  // dK^T = Q^T dS
  scatter_cols(c.dk, b, h, kp.data(), n, D, scale * g, T, nt);
}

using TaskFn = void (*)(const Ctx&, int64_t, int64_t, Buf&);
void fwd_baseline(const Ctx& c, int64_t b, int64_t h, Buf& w) { fwd_task(c, b, h, w); }
void bwd_baseline(const Ctx& c, int64_t b, int64_t h, Buf& w) { bwd_task(c, b, h, w); }
#if KDFAST_HAVE_X86_PATHS
KDFAST_TARGET_AVX2 void fwd_avx2(const Ctx& c, int64_t b, int64_t h, Buf& w) { fwd_task(c, b, h, w); }
KDFAST_TARGET_AVX2 void bwd_avx2(const Ctx& c, int64_t b, int64_t h, Buf& w) { bwd_task(c, b, h, w); }
KDFAST_TARGET_AVX512 void fwd_avx512(const Ctx& c, int64_t b, int64_t h, Buf& w) { fwd_task(c, b, h, w); }
KDFAST_TARGET_AVX512 void bwd_avx512(const Ctx& c, int64_t b, int64_t h, Buf& w) { bwd_task(c, b, h, w); }
// The bf16 GEMM path runs only with AVX-512 (every CPU whose brgemm packs bf16 has it).
using TaskFnB = void (*)(const Ctx&, int64_t, int64_t, BufB&);
KDFAST_TARGET_AVX512 void fwd_bf16_avx512(const Ctx& c, int64_t b, int64_t h, BufB& w) { fwd_task_bf16(c, b, h, w); }
KDFAST_TARGET_AVX512 void bwd_bf16_avx512(const Ctx& c, int64_t b, int64_t h, BufB& w) { bwd_task_bf16(c, b, h, w); }
#endif

TaskFn pick(bool bwd) {
#if KDFAST_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::AVX512:
    case Isa::AVX512_VNNI: return bwd ? bwd_avx512 : fwd_avx512;
    case Isa::AVX2: return bwd ? bwd_avx2 : fwd_avx2;
    default: break;
  }
#endif
  return bwd ? bwd_baseline : fwd_baseline;
}

void run_tasks(const Ctx& c, bool bwd) {
  const int64_t ntask = c.B * c.H;
  // Dynamic scheduling: rows of different lengths cost different amounts.
  std::atomic<int64_t> next{0};
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
  g_last_gemm.store(c.bf16 ? 2 : 1);
  if (c.bf16) {
#if KDFAST_HAVE_X86_PATHS
    TaskFnB fn = bwd ? bwd_bf16_avx512 : fwd_bf16_avx512;
    at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
      // brgemm keeps the AMX tile configuration of its last kernel per thread: start from none and
      // release the tiles when this thread is done.
      at::native::cpublas::brgemm_release(true);
      BufB w(c, bwd);
      for (int64_t t; (t = next.fetch_add(1)) < ntask;) fn(c, t / c.H, t % c.H, w);
      at::native::cpublas::brgemm_release(true);
    });
    return;
#else
    TORCH_CHECK(false, "attention kernel: no bf16 GEMM path in this build");
#endif
  }
  TaskFn fn = pick(bwd);
  at::parallel_for(0, nth, 1, [&](int64_t, int64_t) {
    Buf w(c, bwd);
    for (int64_t t; (t = next.fetch_add(1)) < ntask;) fn(c, t / c.H, t % c.H, w);
  });
}

std::vector<int64_t> read_cu(const std::optional<at::Tensor>& cu, int64_t& B) {
  at::Tensor t = cu->to(at::kLong).contiguous();
  TORCH_CHECK(t.dim() == 1 && t.numel() >= 1, "attention varlen: cu_seqlens must be 1-D int [B + 1]");
  B = t.numel() - 1;
  const int64_t* p = t.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + t.numel());
}

// Shared setup of the forward and backward: shapes, positions, options.
Ctx make_ctx(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
             const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
             int64_t max_k, const std::optional<at::Tensor>& head_gates, const std::optional<at::Tensor>& active,
             double scale, bool zpq, double dropout_p, const std::optional<at::Tensor>& rng,
             std::vector<int64_t>& cq, std::vector<int64_t>& ck, at::Tensor& gates_c, at::Tensor& act_c) {
  Ctx c;
  const bool packed = q.dim() == 3;
  TORCH_CHECK(q.device().is_cpu(), "attention cpu kernel: tensors must be on the CPU");
  if (packed) {
    TORCH_CHECK(k.dim() == 3 && cu_q && cu_k, "attention varlen: q, k, v [T, H, D] need cu_seqlens_q/k");
    int64_t Bk = 0;
    cq = read_cu(cu_q, c.B);
    ck = read_cu(cu_k, Bk);
    TORCH_CHECK(Bk == c.B, "attention varlen: cu_seqlens_q and cu_seqlens_k differ in length");
    TORCH_CHECK(cq.back() <= q.size(0) && ck.back() <= k.size(0), "attention varlen: cu_seqlens past the tokens");
    c.H = q.size(1);
    c.D = q.size(2);
    c.Lq = max_q;
    c.Lk = max_k;
    c.qpos.resize(c.B);
    c.kpos.resize(c.B);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t nq = cq[b + 1] - cq[b], nk = ck[b + 1] - ck[b];
      TORCH_CHECK(nq >= 0 && nk >= 0 && nq <= max_q && nk <= max_k,
                  "attention varlen: sequence lengths must be in [0, max_seqlen]");
      for (int32_t i = 0; i < nq; ++i) c.qpos[b].push_back(i);
      for (int32_t j = 0; j < nk; ++j) c.kpos[b].push_back(j);
    }
  } else {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "attention kernel: q, k, v must be 4-D (or 3-D packed)");
    c.B = q.size(0);
    c.H = q.size(1);
    c.D = q.size(3);
    c.Lq = q.size(2);
    c.Lk = k.size(2);
    const bool* mk = nullptr;
    at::Tensor mc;
    if (mask) {
      TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == c.B &&
                      mask->size(1) == c.Lk, "attention kernel: mask must be bool [B, Lk]");
      mc = mask->contiguous();
      mk = mc.data_ptr<bool>();
    }
    TORCH_CHECK(!(zpq && mk) || c.Lq == c.Lk, "attention kernel: zero_padded_queries needs Lq == Lk");
    c.qpos.resize(c.B);
    c.kpos.resize(c.B);
    for (int64_t b = 0; b < c.B; ++b) {
      for (int32_t j = 0; j < c.Lk; ++j)
        if (!mk || mk[b * c.Lk + j]) c.kpos[b].push_back(j);
      for (int32_t i = 0; i < c.Lq; ++i)
        if (!(zpq && mk) || mk[b * c.Lk + i]) c.qpos[b].push_back(i);
    }
  }
  TORCH_CHECK(c.D <= 256, "attention kernel: head dim ", c.D, " > 256");
  for (int64_t b = 0; b < c.B; ++b) {
    c.mmax = std::max<int64_t>(c.mmax, c.qpos[b].size());
    c.nmax = std::max<int64_t>(c.nmax, c.kpos[b].size());
  }
  c.scale = static_cast<float>(scale);
  c.p = static_cast<float>(dropout_p);
  TORCH_CHECK(c.p >= 0.f && c.p < 1.f, "attention kernel: dropout_p must be in [0, 1)");
  if (c.p > 0.f) {
    TORCH_CHECK(rng && rng->numel() == 2 && rng->scalar_type() == at::kLong,
                "attention kernel: dropout needs rng = int64 [seed, offset]");
    at::Tensor r = rng->contiguous();
    c.seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
    c.offset = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  }
  if (head_gates) {
    gates_c = head_gates->to(at::kFloat).contiguous();
    TORCH_CHECK(gates_c.numel() == c.H || gates_c.numel() == c.B * c.H,
                "attention kernel: head_gates must be [H] or [B, H]");
    c.gates = gates_c.data_ptr<float>();
    c.g_sb = gates_c.numel() == c.H ? 0 : c.H;
  }
  if (active) {
    act_c = active->to(at::kBool).contiguous();
    TORCH_CHECK(act_c.numel() == c.H, "attention kernel: active heads must be a bool [H] mask");
    c.active = act_c.data_ptr<bool>();
  }
  return c;
}

// Unit stride along D (expanded grad_outputs, e.g. of .sum(), have stride 0 everywhere).
at::Tensor unit_last(const at::Tensor& t) { return t.numel() == 0 || t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_train_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
    const std::optional<at::Tensor>& head_gates, const std::optional<at::Tensor>& active, double scale, bool zpq,
    bool keep_ungated, double dropout_p, const std::optional<at::Tensor>& rng) {
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  std::vector<int64_t> cq, ck;
  at::Tensor gates_c, act_c;
  Ctx c = make_ctx(q, k, mask, cu_q, cu_k, max_q, max_k, head_gates, active, scale, zpq, dropout_p, rng, cq, ck,
                   gates_c, act_c);
  TORCH_CHECK(v.sizes() == k.sizes(), "attention kernel: v must have k's shape");
  const bool packed = q.dim() == 3;
  const auto dt = q.scalar_type();
  auto f = q.options().dtype(at::kFloat);
  const int64_t B = c.B, H = c.H, D = c.D;
  c.bf16 = use_bf16_gemm({&q, &k, &v});
  // Padded outputs are [B, Lq, H, D] buffers returned as [B, H, Lq, D] views (HF transposes them back).
  // The bf16 path writes bf16 outputs directly, the fp32-tile path fp32 ones (converted at the end).
  auto fo = c.bf16 ? q.options() : f;
  at::Tensor out32 = packed ? at::zeros({q.size(0), H, D}, fo) : at::zeros({B, c.Lq, H, D}, fo);
  at::Tensor ung32 = keep_ungated ? at::zeros_like(out32) : at::Tensor();
  at::Tensor lse = packed ? at::full({H, q.size(0)}, kNegInf, f) : at::full({B, H, c.Lq}, kNegInf, f);
  at::Tensor o4 = packed ? out32 : out32.transpose(1, 2);
  c.q = rows_of(q, cq, B);
  c.k = rows_of(k, ck, B);
  c.v = rows_of(v, ck, B);
  c.out = rows_of(o4, cq, B);
  if (keep_ungated) {
    c.ung = rows_of(packed ? ung32 : ung32.transpose(1, 2), cq, B);
    c.has_ung = true;
  }
  c.lse = lse_rows(lse, cq, B, packed);
  run_tasks(c, false);
  at::Tensor out = o4.scalar_type() == dt ? o4 : o4.to(dt);
  at::Tensor ung = keep_ungated ? (packed ? ung32 : ung32.transpose(1, 2)) : at::empty({0}, q.options());
  if (keep_ungated && ung.scalar_type() != dt) ung = ung.to(dt);
  return {out, lse, ung};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_train_bwd(
    const at::Tensor& go_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& ung_in, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
    const std::optional<at::Tensor>& head_gates, const std::optional<at::Tensor>& active, double scale, bool zpq,
    double dropout_p, const std::optional<at::Tensor>& rng, bool gates_grad) {
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor grad_out = unit_last(go_in), ung = unit_last(ung_in);
  std::vector<int64_t> cq, ck;
  at::Tensor gates_c, act_c;
  Ctx c = make_ctx(q, k, mask, cu_q, cu_k, max_q, max_k, head_gates, active, scale, zpq, dropout_p, rng, cq, ck,
                   gates_c, act_c);
  const bool packed = q.dim() == 3;
  const int64_t B = c.B, H = c.H;
  auto f = q.options().dtype(at::kFloat);
  c.bf16 = use_bf16_gemm({&q, &k, &v, &grad_out});
  auto fg = c.bf16 ? q.options() : f;  // gradients in bf16 directly on the bf16 path
  at::Tensor dq = at::zeros_like(q_in, fg), dk = at::zeros_like(k_in, fg), dv = at::zeros_like(v_in, fg);
  if (dq.stride(-1) != 1) dq = at::zeros(q.sizes(), fg);
  if (dk.stride(-1) != 1) dk = at::zeros(k.sizes(), fg);
  if (dv.stride(-1) != 1) dv = at::zeros(v.sizes(), fg);
  at::Tensor lse_c = lse.to(at::kFloat);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "attention kernel: grad_out must have q's shape");
  c.q = rows_of(q, cq, B);
  c.k = rows_of(k, ck, B);
  c.v = rows_of(v, ck, B);
  c.go = rows_of(grad_out, cq, B);
  c.dq = rows_of(dq, cq, B);
  c.dk = rows_of(dk, ck, B);
  c.dv = rows_of(dv, ck, B);
  c.lse = lse_rows(lse_c, cq, B, packed);
  at::Tensor dg_bh;
  if (gates_grad && head_gates) {
    TORCH_CHECK(ung.sizes() == q.sizes(), "attention kernel: gate gradients need the ungated output");
    c.ung = rows_of(ung, cq, B);
    c.has_ung = true;
    dg_bh = at::zeros({B, H}, f);
    c.dg = dg_bh.data_ptr<float>();
  }
  run_tasks(c, true);
  at::Tensor dg = at::empty({0}, f);
  if (c.dg) dg = head_gates->dim() == 2 ? dg_bh : dg_bh.sum(0);
  auto back = [](const at::Tensor& g, const at::Tensor& like) {
    return like.scalar_type() == g.scalar_type() ? g : g.to(like.scalar_type());
  };
  return {back(dq, q), back(dk, k), back(dv, v), dg};
}

// The kernel's keep mask (bool [B, H, Lq, Lk]), for tests and the reference.
at::Tensor attention_dropout_mask(const at::Tensor& rng, int64_t B, int64_t H, int64_t Lq, int64_t Lk, double p) {
  TORCH_CHECK(rng.numel() == 2 && rng.scalar_type() == at::kLong, "attention_dropout_mask: rng = int64 [seed, offset]");
  at::Tensor r = rng.cpu().contiguous();
  const uint64_t seed = static_cast<uint64_t>(r.data_ptr<int64_t>()[0]);
  const uint64_t off = static_cast<uint64_t>(r.data_ptr<int64_t>()[1]);
  at::Tensor out = at::empty({B, H, Lq, Lk}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  const float pf = static_cast<float>(p);
  at::parallel_for(0, B * H * Lq, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t rr = r0; rr < r1; ++rr)
      for (int64_t j = 0; j < Lk; ++j) {
        const uint64_t ctr = off + static_cast<uint64_t>(rr) * static_cast<uint64_t>(Lk) + static_cast<uint64_t>(j);
        o[rr * Lk + j] = philox_uniform(seed, ctr) >= pf;
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("attention_train_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? cu_q, Tensor? cu_k, "
        "int max_q, int max_k, Tensor? head_gates, Tensor? active, float scale, bool zero_padded_queries, "
        "bool keep_ungated, float dropout_p, Tensor? rng) -> (Tensor, Tensor, Tensor)",
        &attention_train_fwd);
  m.def("attention_train_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor ung, Tensor lse, "
        "Tensor? mask, Tensor? cu_q, Tensor? cu_k, int max_q, int max_k, Tensor? head_gates, Tensor? active, "
        "float scale, bool zero_padded_queries, float dropout_p, Tensor? rng, bool gates_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        &attention_train_bwd);
  m.def("attention_dropout_mask(Tensor rng, int B, int H, int Lq, int Lk, float p) -> Tensor",
        &attention_dropout_mask);
}

}  // namespace kdfast
