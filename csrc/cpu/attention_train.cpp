// Attention forward + backward for training on the CPU: padding-aware (valid
// keys / queries only), packed variable-length input, head gates, inactive
// heads, and attention dropout drawn inside the kernel from a counter-based
// RNG so that the backward regenerates the forward's mask instead of storing it.
//
// Work unit: one (batch, head). Its valid query rows (m) and valid key rows (n)
// are gathered into per-thread float32 tiles (this also converts bf16/fp16 and
// any row stride), and the products run as float32 GEMMs on those contiguous
// tiles (at::mm_out -> MKL/oneDNN sgemm, single-threaded inside our
// parallel region). Padded keys and (zero_padded_queries / packed) padded
// queries are never read nor computed. The only L x L storage is one m x n
// tile (three in the backward) per thread: 0.6 MiB each at m = n = 384.
// Why GEMMs on tiles and not the broadcast-FMA kernel of attention.cpp: on the
// 2-core EPYC (AVX2) that kernel ran B=64 L=216 inference in 1.64 s against
// SDPA's 0.53 s; sgemm tiles are what MKL blocks well, and the elementwise
// softmax / dropout / dS loops (compiled per ISA) are a small part.
//
// Dropout RNG: Philox-4x32-10 exactly as Triton's tl.rand(seed, offset)
// (counter c0/c1 = the 64-bit offset, c2 = c3 = 0, key = the 64-bit seed),
// uniform u = (int32 bits, negatives folded) * 4.6566127342e-10. The offset of
// element (b, h, i, j) is offset + ((b * H + h) * Lq + i) * Lk + j, with Lq/Lk
// the padded lengths (max_seqlen for packed input, so packed == padded).
// An element is kept when u >= p and then scaled by 1 / (1 - p).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace {

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

using TaskFn = void (*)(const Ctx&, int64_t, int64_t, Buf&);
void fwd_baseline(const Ctx& c, int64_t b, int64_t h, Buf& w) { fwd_task(c, b, h, w); }
void bwd_baseline(const Ctx& c, int64_t b, int64_t h, Buf& w) { bwd_task(c, b, h, w); }
#if KDFAST_HAVE_X86_PATHS
KDFAST_TARGET_AVX2 void fwd_avx2(const Ctx& c, int64_t b, int64_t h, Buf& w) { fwd_task(c, b, h, w); }
KDFAST_TARGET_AVX2 void bwd_avx2(const Ctx& c, int64_t b, int64_t h, Buf& w) { bwd_task(c, b, h, w); }
KDFAST_TARGET_AVX512 void fwd_avx512(const Ctx& c, int64_t b, int64_t h, Buf& w) { fwd_task(c, b, h, w); }
KDFAST_TARGET_AVX512 void bwd_avx512(const Ctx& c, int64_t b, int64_t h, Buf& w) { bwd_task(c, b, h, w); }
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
  TaskFn fn = pick(bwd);
  const int64_t ntask = c.B * c.H;
  // Dynamic scheduling: rows of different lengths cost different amounts.
  std::atomic<int64_t> next{0};
  const int64_t nth = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntask));
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
  // Padded outputs are [B, Lq, H, D] buffers returned as [B, H, Lq, D] views (HF transposes them back).
  at::Tensor out32 = packed ? at::zeros({q.size(0), H, D}, f) : at::zeros({B, c.Lq, H, D}, f);
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
  at::Tensor out = dt == at::kFloat ? o4 : o4.to(dt);
  at::Tensor ung = keep_ungated ? (packed ? ung32 : ung32.transpose(1, 2)) : at::empty({0}, q.options());
  if (keep_ungated && dt != at::kFloat) ung = ung.to(dt);
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
  at::Tensor dq = at::zeros_like(q_in, f), dk = at::zeros_like(k_in, f), dv = at::zeros_like(v_in, f);
  if (dq.stride(-1) != 1) dq = at::zeros(q.sizes(), f);
  if (dk.stride(-1) != 1) dk = at::zeros(k.sizes(), f);
  if (dv.stride(-1) != 1) dv = at::zeros(v.sizes(), f);
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
    return like.scalar_type() == at::kFloat ? g : g.to(like.scalar_type());
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
