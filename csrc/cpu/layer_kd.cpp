// Layer distillation losses on the CPU without L x L maps in memory:
//
//   attention_score_mse  sum over valid (i, j) of (S_s - S_t)^2 with
//                        S = q k^T * scale, computed exactly from D x D Gram
//                        matrices: with A_xy = q_x^T q_y and C_xy = k_x^T k_y
//                        over the valid rows,
//                        ||S_s - S_t||_F^2 = s_s^2 <A_ss, C_ss>
//                          - 2 s_s s_t <A_st, C_st> + s_t^2 <A_tt, C_tt>.
//                        Cost O(L (Ds^2 + Ds Dt + Dt^2)) per head instead of
//                        O(L^2 D).
//   attention_kl         sum over valid query rows of
//                        KL(softmax(S_t) || softmax(S_s)) over valid keys,
//                        in query-row tiles of up to kRowTileMax x n (memory
//                        per thread grows with L, never L^2): one pass over a
//                        tile gives both log-sum-exps, the KL and the score
//                        gradient.
//   hidden_loss          sum over valid rows of ||h_s W^T + b - h_t||^2
//                        (kind 0) or 1 - cos(h_s W^T + b, h_t) (kind 1), in
//                        row blocks, projection fused.
//
// Every op returns the loss *sum* and, when asked, the gradient of that sum
// (the "unit" gradient, float32). The Python op divides by the count and the
// autograd backward only scales the unit gradient by grad_output: the
// losses are sums, so d(loss)/d(input) is known in the forward pass and
// nothing is recomputed (4 matmuls for attention_kl instead of 6).
// The attention ops also take an optional grad_weight [B, H] (float32): the
// gradient is then grad_weight[b, h] * d loss[b, h] / d input, written in each
// input's own dtype (fp32 accumulation, one rounding). That is the backward
// of 16-bit inputs: a bf16 gradient, not a float32 unit gradient and a copy
// (B=32, L=384, H=12, D=64: 36 MiB at the peak instead of 144 MiB).
//
// Heads run in parallel: one task per (b, h), handed out longest first from
// a shared counter (examples have different lengths). Matrix products inside
// a task go to BLAS (at::addmm_ on views, single-threaded inside the
// parallel region). Padded tokens are skipped exactly: when the valid tokens
// of an example form one run [first, first + n) (right or left padding) and
// an input is float32 with unit stride in D, the kernel reads the input rows
// in place and writes gradient rows straight into the output; other masks
// and dtypes gather the valid rows into float32 thread-local buffers. Scores
// are never scaled in memory: the scales enter the softmax pass.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kRowTileMin = 64;      // query rows per attention_kl tile: at least
constexpr int64_t kRowTileMax = 512;     // ... and at most
constexpr int64_t kTileFloats = 160000;  // target floats per score tile (2 tiles: <= 1.3 MB, in L2)
constexpr int64_t kHiddenRows = 128;    // rows per hidden_loss block

at::Tensor mat(float* p, int64_t r, int64_t c) { return at::from_blob(p, {r, c}, at::kFloat); }
at::Tensor mat(const float* p, int64_t r, int64_t c, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {r, c}, {ld, 1}, at::kFloat);
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C, op(X) = X^T when the flag is set
// (A is [M, K] or, transposed, [K, M]; B is [K, N] or [N, K]). beta = 0 ignores C's contents.
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  at::Tensor a = ta ? mat(A, K, M, lda).t() : mat(A, M, K, lda);
  at::Tensor b = tb ? mat(B, N, K, ldb).t() : mat(B, K, N, ldb);
  at::Tensor c = mat(C, M, N, ldc);
  c.addmm_(a, b, beta, alpha);
}

// Output of size `sizes` for gradients. Every element is written by the kernel (no
// zero fill). Large buffers get a transparent-huge-page hint: the first touch of a fresh
// 38 MB buffer otherwise costs ~9500 page faults, as much time as a kernel pass.
at::Tensor empty_grad(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(sizes, opt);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  const uintptr_t a = (p + huge - 1) & ~(huge - 1), e = (p + bytes) & ~(huge - 1);
  if (bytes >= 4 * huge && e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // a hint only
#endif
  return t;
}

// Valid positions of one example (mask[b, l] != 0), and whether they form one run.
struct Example {
  std::vector<int64_t> pos;
  int64_t first = 0;
  bool run = false;
  int64_t n() const { return static_cast<int64_t>(pos.size()); }
};

std::vector<Example> examples(const at::Tensor& mask) {
  const int64_t B = mask.size(0), L = mask.size(1);
  std::vector<Example> ex(B);
  for (int64_t b = 0; b < B; ++b) {
    const float* m = mask.data_ptr<float>() + b * L;
    auto& e = ex[b];
    e.pos.reserve(L);
    for (int64_t l = 0; l < L; ++l)
      if (m[l] != 0.f) e.pos.push_back(l);
    if (!e.pos.empty()) {
      e.first = e.pos.front();
      e.run = e.pos.back() - e.first + 1 == e.n();
    }
  }
  return ex;
}

// (b, h) tasks, longest example first (the shared counter then balances threads).
std::vector<int64_t> task_order(const std::vector<Example>& ex, int64_t H) {
  const int64_t B = static_cast<int64_t>(ex.size());
  std::vector<int64_t> order(B * H);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t c) { return ex[a / H].n() > ex[c / H].n(); });
  return order;
}

// MKL's C API for the calling thread's BLAS thread count (mkl_service.h: mkl_set_num_threads_local
// is a macro for this name; the lowercase symbol is the Fortran, by-reference entry). Weak: null
// when torch's BLAS is not MKL. Inside the parallel region every product is single-threaded
// anyway, but MKL picks its kernels from the thread count it believes it has: told 1, it runs
// its small-matrix kernels without packing copies.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct BlasSingleThread {
  int previous = 0;
  BlasSingleThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~BlasSingleThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// Worker threads for ntasks tasks.
int64_t task_threads(int64_t ntasks) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
}

// Runs body(bh, slot) for every task in order, each of `nthreads` workers (slot in
// [0, nthreads): the index of its thread-local buffers) pulling the next task from a counter.
template <typename Body>
void for_each_task(const std::vector<int64_t>& order, int64_t nthreads, Body body) {
  const int64_t ntasks = static_cast<int64_t>(order.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
    BlasSingleThread blas1;
    for (int64_t slot = t0; slot < t1; ++slot)
      for (int64_t i = next.fetch_add(1); i < ntasks; i = next.fetch_add(1)) body(order[i], slot);
  });
}

template <typename T>
void gather_t(const at::Tensor& x, int64_t b, int64_t h, const std::vector<int64_t>& pos, float* out, int64_t ld) {
  const int64_t D = x.size(3);
  const T* base = x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1);
  const int64_t sl = x.stride(2), sd = x.stride(3);
  for (size_t r = 0; r < pos.size(); ++r) {
    const T* src = base + pos[r] * sl;
    float* dst = out + r * ld;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * sd]);
  }
}

// Rows of one head, float32, row stride ld.
struct Rows {
  const float* p;
  int64_t ld;
};

// The valid rows of x[b, h]: in place for float32 inputs with unit stride in D when the
// example's valid tokens form one run, else gathered into buf.
Rows rows_of(const at::Tensor& x, int64_t b, int64_t h, const Example& e, std::vector<float>& buf) {
  const int64_t D = x.size(3);
  if (e.run && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.stride(2) >= D)
    return {x.data_ptr<float>() + b * x.stride(0) + h * x.stride(1) + e.first * x.stride(2), x.stride(2)};
  buf.resize(e.n() * D);
  switch (x.scalar_type()) {
    case at::kFloat: gather_t<float>(x, b, h, e.pos, buf.data(), D); break;
    case at::kBFloat16: gather_t<at::BFloat16>(x, b, h, e.pos, buf.data(), D); break;
    case at::kHalf: gather_t<at::Half>(x, b, h, e.pos, buf.data(), D); break;
    default: TORCH_CHECK(false, "layer_kd kernel: unsupported dtype ", x.scalar_type());
  }
  return {buf.data(), D};
}

// Gradient rows of head (b, h) of a contiguous [B, H, L, D] output: where the kernel writes
// them (in place for a run of valid tokens of a float32 output, else buf, float32), then
// finish() zeroes the padded rows and scatters buf, rounding to the output's dtype.
template <typename T>
void store_head(const at::Tensor& g, int64_t bh, const Example& e, const float* rows) {
  const int64_t L = g.size(2), D = g.size(3);
  T* head = g.data_ptr<T>() + bh * L * D;
  std::fill(head, head + L * D, T(0.f));
  for (int64_t r = 0; r < e.n(); ++r) {
    const float* src = rows + r * D;
    T* dst = head + e.pos[r] * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
  }
}

struct GradRows {
  const at::Tensor* g = nullptr;
  float* p = nullptr;
  int64_t ld = 0, bh = 0;
  const Example* e = nullptr;
  bool direct = false;  // rows written in place (float32 output, one run of valid tokens)

  GradRows() = default;  // no gradient wanted
  GradRows(const at::Tensor& out, int64_t b, int64_t h, const Example& ex, std::vector<float>& buf)
      : g(&out), e(&ex) {
    const int64_t L = out.size(2), D = out.size(3);
    bh = b * out.size(1) + h;
    ld = D;
    direct = ex.run && out.scalar_type() == at::kFloat;
    if (direct) {
      p = out.data_ptr<float>() + (bh * L + ex.first) * D;
    } else {
      buf.resize(ex.n() * D);
      p = buf.data();
    }
  }
  void finish() {
    const int64_t L = g->size(2), D = g->size(3);
    if (direct) {
      float* head = g->data_ptr<float>() + bh * L * D;
      std::fill(head, head + e->first * D, 0.f);
      std::fill(head + (e->first + e->n()) * D, head + L * D, 0.f);
      return;
    }
    switch (g->scalar_type()) {
      case at::kFloat: store_head<float>(*g, bh, *e, p); break;
      case at::kBFloat16: store_head<at::BFloat16>(*g, bh, *e, p); break;
      case at::kHalf: store_head<at::Half>(*g, bh, *e, p); break;
      default: TORCH_CHECK(false, "layer_kd kernel: unsupported gradient dtype ", g->scalar_type());
    }
  }
};

void zero_head(at::Tensor& g, int64_t bh) {
  g.view({-1, g.size(2), g.size(3)})[bh].zero_();
}

// Gradient outputs: float32 unit gradients without grad_weight, else the dtype of the input.
at::Tensor grad_output_like(const at::Tensor& x, int64_t B, int64_t H, int64_t L, int64_t D, bool weighted) {
  return empty_grad({B, H, L, D}, x.options().dtype(weighted ? x.scalar_type() : at::kFloat));
}

// grad_weight[b, h] as a float32 pointer (nullptr when absent: weight 1).
const float* grad_weights(const std::optional<at::Tensor>& w, int64_t B, int64_t H, const char* op) {
  if (!w.has_value()) return nullptr;
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->device().is_cpu() && w->dim() == 2 &&
                  w->size(0) == B && w->size(1) == H,
              op, " kernel: grad_weight must be contiguous float32 [B, H] on the CPU");
  return w->data_ptr<float>();
}

void check_qk(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt,
              const at::Tensor& mask, const char* op) {
  for (const auto* x : {&qs, &ks, &qt, &kt}) {
    TORCH_CHECK(x->dim() == 4, op, " kernel: q/k tensors must be 4-D [B, H, L, D]");
    TORCH_CHECK(x->device().is_cpu(), op, " cpu kernel: tensors must be on the CPU");
    auto st = x->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
                " kernel: dtype must be float32, bfloat16 or float16, got ", st);
    TORCH_CHECK(x->size(0) == qs.size(0) && x->size(1) == qs.size(1) && x->size(2) == qs.size(2), op,
                " kernel: q/k tensors must agree in B, H and L");
  }
  TORCH_CHECK(ks.size(3) == qs.size(3) && kt.size(3) == qt.size(3), op, " kernel: q and k head dims differ");
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.dim() == 2 &&
                  mask.size(0) == qs.size(0) && mask.size(1) == qs.size(2),
              op, " kernel: mask must be contiguous float32 [B, L]");
}

// ---------------------------------------------------------------------------
// attention_kl: one tile of m query rows x n keys. s and t hold the unscaled
// scores q k^T on entry; with grad, s holds d(sum_rows KL)/d(q_s k_s^T) =
// scale_s (p_s - p_t) on exit.
// ---------------------------------------------------------------------------
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.44269504088896341f;

// 2^x for x <= 0 (softmax terms centred on the row maximum, in log2 units); 0 below -126.
KDFAST_INLINE float exp2_nonpos(float x) {
  const float xc = x < -126.f ? -126.f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  const float n = (xc + shifter) - shifter;
  const float f = xc - n;  // [-0.5, 0.5]
  // 2^f = e^(f ln2): Taylor coefficients ln2^k / k!, relative error < 2e-7 on [-0.5, 0.5].
  float p = 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const float y = p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -126.f ? 0.0f : y;
}

KDFAST_INLINE double kl_tile(float* s_tile, float* t_tile, int64_t m, int64_t n, float scale_s, float scale_t,
                             bool grad) {
  const float cs = scale_s * kLog2e, ct = scale_t * kLog2e;
  double total = 0;
  for (int64_t r = 0; r < m; ++r) {
    float* s = s_tile + r * n;
    float* t = t_tile + r * n;
    float ms = -kInf, mt = -kInf;
#pragma omp simd reduction(max : ms, mt)
    for (int64_t j = 0; j < n; ++j) {
      ms = s[j] > ms ? s[j] : ms;
      mt = t[j] > mt ? t[j] : mt;
    }
    float zs = 0, zt = 0, acc = 0;
    // n <= a few thousand keys: float sums stay accurate (relative ~1e-6).
#pragma omp simd reduction(+ : zs, zt, acc)
    for (int64_t j = 0; j < n; ++j) {
      // Scaled scores minus the row maxima, in log2 units (scales > 0: the maxima commute).
      const float xs = (s[j] - ms) * cs, xt = (t[j] - mt) * ct;
      const float es = exp2_nonpos(xs), et = exp2_nonpos(xt);
      zs += es;
      zt += et;
      acc += et * (xt - xs);
      s[j] = es;
      t[j] = et;
    }
    // KL = E_pt[S_t - S_s] - lse_t + lse_s, every term centred on the row maxima (exact 0 for one key).
    total += kLn2 * static_cast<double>(acc) / zt + std::log(static_cast<double>(zs) / zt);
    if (grad) {
      const float is = scale_s / zs, it = scale_s / zt;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = s[j] * is - t[j] * it;
    }
  }
  return total;
}

using KlTileFn = double (*)(float*, float*, int64_t, int64_t, float, float, bool);
double kl_tile_baseline(float* s, float* t, int64_t m, int64_t n, float a, float c, bool g) {
  return kl_tile(s, t, m, n, a, c, g);
}
#if KDFAST_HAVE_X86_PATHS
KDFAST_TARGET_AVX2 double kl_tile_avx2(float* s, float* t, int64_t m, int64_t n, float a, float c, bool g) {
  return kl_tile(s, t, m, n, a, c, g);
}
KDFAST_TARGET_AVX512 double kl_tile_avx512(float* s, float* t, int64_t m, int64_t n, float a, float c, bool g) {
  return kl_tile(s, t, m, n, a, c, g);
}
#endif

KlTileFn pick_kl_tile() {
#if KDFAST_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::AVX512:
    case Isa::AVX512_VNNI: return kl_tile_avx512;
    case Isa::AVX2: return kl_tile_avx2;
    default: break;
  }
#endif
  return kl_tile_baseline;
}

// Query rows per tile for n keys: two m x n tiles stay in L2, and BLAS gets >= 64 rows.
int64_t kl_rows(int64_t n) {
  const int64_t rows = std::clamp<int64_t>(kTileFloats / std::max<int64_t>(n, 1) / 16 * 16, kRowTileMin, kRowTileMax);
  return std::min(rows, n);
}

// shared: q_s and k_s are one tensor (MiniLM value relation). Both gradient contributions
// then go into dq (dq_s + dk_s, the gradient of that tensor) and dk stays empty: one
// gradient-sized buffer instead of two.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_kl_impl(const at::Tensor& qs, const at::Tensor& ks,
                                                                const at::Tensor& qt, const at::Tensor& kt,
                                                                const at::Tensor& mask, double scale_s,
                                                                double scale_t, bool compute_grad,
                                                                const std::optional<at::Tensor>& grad_weight,
                                                                bool shared) {
  check_qk(qs, ks, qt, kt, mask, "attention_kl");
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3), Dt = qt.size(3);
  auto f32 = qs.options().dtype(at::kFloat);
  const float* gw = grad_weights(grad_weight, B, H, "attention_kl");
  const bool weighted = gw != nullptr;
  at::Tensor loss = at::empty({B, H}, f32);
  at::Tensor dq = compute_grad ? grad_output_like(qs, B, H, L, Ds, weighted) : at::empty({0}, f32);
  at::Tensor dk = compute_grad && !shared ? grad_output_like(ks, B, H, L, Ds, weighted) : at::empty({0}, f32);
  if (B * H == 0 || L == 0) return {loss.zero_(), dq, dk};
  const std::vector<Example> ex = examples(mask);
  const KlTileFn tile_fn = pick_kl_tile();
  const float ss = static_cast<float>(scale_s), st = static_cast<float>(scale_t);
  float* out = loss.data_ptr<float>();
  const std::vector<int64_t> order = task_order(ex, H);
  // Thread-local buffers, reused across tasks (one set per worker thread).
  struct Buffers {
    std::vector<float> qs, ks, qt, kt, s, t, dq, dk;
  };
  const int64_t nthreads = task_threads(static_cast<int64_t>(order.size()));
  std::vector<Buffers> bufs(nthreads);
  for_each_task(order, nthreads, [&](int64_t bh, int64_t slot) {
    const int64_t b = bh / H, h = bh % H;
    const Example& e = ex[b];
    const int64_t n = e.n();
    if (n == 0) {
      out[bh] = 0.f;
      if (compute_grad) {
        zero_head(dq, bh);
        if (!shared) zero_head(dk, bh);
      }
      return;
    }
    Buffers& w = bufs[slot];
    const Rows Qs = rows_of(qs, b, h, e, w.qs), Ks = shared ? Qs : rows_of(ks, b, h, e, w.ks);
    const Rows Qt = rows_of(qt, b, h, e, w.qt), Kt = rows_of(kt, b, h, e, w.kt);
    const int64_t tile = kl_rows(n);
    w.s.resize(tile * n);
    w.t.resize(tile * n);
    float* S = w.s.data();
    float* T = w.t.data();
    GradRows gq, gk;
    if (compute_grad) {
      gq = GradRows(dq, b, h, e, w.dq);
      if (!shared) gk = GradRows(dk, b, h, e, w.dk);
    }
    const float wgt = gw != nullptr ? gw[bh] : 1.f;  // gradient weight of this head
    double total = 0;
    for (int64_t i0 = 0; i0 < n; i0 += tile) {
      const int64_t m = std::min(tile, n - i0);
      const float* qs_i = Qs.p + i0 * Qs.ld;
      gemm(false, true, m, n, Ds, 1.f, qs_i, Qs.ld, Ks.p, Ks.ld, 0.f, S, n);              // q_s k_s^T
      gemm(false, true, m, n, Dt, 1.f, Qt.p + i0 * Qt.ld, Qt.ld, Kt.p, Kt.ld, 0.f, T, n);  // q_t k_t^T
      total += tile_fn(S, T, m, n, ss, st, compute_grad);
      if (compute_grad && shared) {  // one buffer: dx = S x + S^T x (all n rows set by the first tile)
        gemm(true, false, n, Ds, m, wgt, S, n, qs_i, Qs.ld, i0 == 0 ? 0.f : 1.f, gq.p, gq.ld);
        gemm(false, false, m, Ds, n, wgt, S, n, Ks.p, Ks.ld, 1.f, gq.p + i0 * gq.ld, gq.ld);
      } else if (compute_grad) {  // S = d/d(q_s k_s^T): dq_s = S k_s, dk_s = S^T q_s
        gemm(false, false, m, Ds, n, wgt, S, n, Ks.p, Ks.ld, 0.f, gq.p + i0 * gq.ld, gq.ld);
        gemm(true, false, n, Ds, m, wgt, S, n, qs_i, Qs.ld, i0 == 0 ? 0.f : 1.f, gk.p, gk.ld);
      }
    }
    out[bh] = static_cast<float>(total);
    if (compute_grad) {
      gq.finish();
      if (!shared) gk.finish();
    }
  });
  return {loss, dq, dk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_kl_fwd(const at::Tensor& qs, const at::Tensor& ks,
                                                               const at::Tensor& qt, const at::Tensor& kt,
                                                               const at::Tensor& mask, double scale_s,
                                                               double scale_t, bool compute_grad,
                                                               const std::optional<at::Tensor>& grad_weight) {
  return attention_kl_impl(qs, ks, qt, kt, mask, scale_s, scale_t, compute_grad, grad_weight, false);
}

// Value relation: x_s serves as both q_s and k_s. Returns (loss [B, H], d(sum loss)/dx_s).
std::tuple<at::Tensor, at::Tensor> attention_kl_shared_fwd(const at::Tensor& xs, const at::Tensor& qt,
                                                           const at::Tensor& kt, const at::Tensor& mask,
                                                           double scale_s, double scale_t, bool compute_grad,
                                                           const std::optional<at::Tensor>& grad_weight) {
  auto r = attention_kl_impl(xs, xs, qt, kt, mask, scale_s, scale_t, compute_grad, grad_weight, true);
  return {std::get<0>(r), std::get<1>(r)};
}

// ---------------------------------------------------------------------------
// attention_score_mse via Gram matrices.
// ---------------------------------------------------------------------------
KDFAST_INLINE double frob_dot(const float* a, const float* c, int64_t rows, int64_t cols) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < cols; ++j) acc += a[r * cols + j] * c[r * cols + j];
    total += acc;
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_score_mse_fwd(const at::Tensor& qs, const at::Tensor& ks,
                                                                      const at::Tensor& qt, const at::Tensor& kt,
                                                                      const at::Tensor& mask, double scale_s,
                                                                      double scale_t, bool compute_grad,
                                                                      const std::optional<at::Tensor>& grad_weight) {
  check_qk(qs, ks, qt, kt, mask, "attention_score_mse");
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3), Dt = qt.size(3);
  auto f32 = qs.options().dtype(at::kFloat);
  const float* gw = grad_weights(grad_weight, B, H, "attention_score_mse");
  const bool weighted = gw != nullptr;
  at::Tensor loss = at::empty({B, H}, f32);
  at::Tensor dq = compute_grad ? grad_output_like(qs, B, H, L, Ds, weighted) : at::empty({0}, f32);
  at::Tensor dk = compute_grad ? grad_output_like(ks, B, H, L, Ds, weighted) : at::empty({0}, f32);
  if (B * H == 0 || L == 0) return {loss.zero_(), dq, dk};
  const std::vector<Example> ex = examples(mask);
  const float ss = static_cast<float>(scale_s), st = static_cast<float>(scale_t);
  float* out = loss.data_ptr<float>();
  const std::vector<int64_t> order = task_order(ex, H);
  struct Buffers {
    std::vector<float> qs, ks, qt, kt, dq, dk;
    std::vector<float> a_ss, a_st, a_tt, c_ss, c_st, c_tt;
  };
  const int64_t nthreads = task_threads(static_cast<int64_t>(order.size()));
  std::vector<Buffers> bufs(nthreads);
  for_each_task(order, nthreads, [&](int64_t bh, int64_t slot) {
    const int64_t b = bh / H, h = bh % H;
    const Example& e = ex[b];
    const int64_t n = e.n();
    if (n == 0) {
      out[bh] = 0.f;
      if (compute_grad) {
        zero_head(dq, bh);
        zero_head(dk, bh);
      }
      return;
    }
    Buffers& w = bufs[slot];
    const Rows Qs = rows_of(qs, b, h, e, w.qs), Ks = rows_of(ks, b, h, e, w.ks);
    const Rows Qt = rows_of(qt, b, h, e, w.qt), Kt = rows_of(kt, b, h, e, w.kt);
    w.a_ss.resize(Ds * Ds); w.a_st.resize(Ds * Dt); w.a_tt.resize(Dt * Dt);
    w.c_ss.resize(Ds * Ds); w.c_st.resize(Ds * Dt); w.c_tt.resize(Dt * Dt);
    // A_xy = q_x^T q_y, C_xy = k_x^T k_y over the n valid rows.
    gemm(true, false, Ds, Ds, n, 1.f, Qs.p, Qs.ld, Qs.p, Qs.ld, 0.f, w.a_ss.data(), Ds);
    gemm(true, false, Ds, Dt, n, 1.f, Qs.p, Qs.ld, Qt.p, Qt.ld, 0.f, w.a_st.data(), Dt);
    gemm(true, false, Dt, Dt, n, 1.f, Qt.p, Qt.ld, Qt.p, Qt.ld, 0.f, w.a_tt.data(), Dt);
    gemm(true, false, Ds, Ds, n, 1.f, Ks.p, Ks.ld, Ks.p, Ks.ld, 0.f, w.c_ss.data(), Ds);
    gemm(true, false, Ds, Dt, n, 1.f, Ks.p, Ks.ld, Kt.p, Kt.ld, 0.f, w.c_st.data(), Dt);
    gemm(true, false, Dt, Dt, n, 1.f, Kt.p, Kt.ld, Kt.p, Kt.ld, 0.f, w.c_tt.data(), Dt);
    const double s2 = double(ss) * ss, t2 = double(st) * st, x2 = 2.0 * ss * st;
    out[bh] = static_cast<float>(s2 * frob_dot(w.a_ss.data(), w.c_ss.data(), Ds, Ds) -
                                 x2 * frob_dot(w.a_st.data(), w.c_st.data(), Ds, Dt) +
                                 t2 * frob_dot(w.a_tt.data(), w.c_tt.data(), Dt, Dt));
    if (compute_grad) {
      // d/dq_s = 2 s_s^2 q_s C_ss - 2 s_s s_t q_t C_st^T; d/dk_s = 2 s_s^2 k_s A_ss - 2 s_s s_t k_t A_st^T.
      GradRows gq(dq, b, h, e, w.dq), gk(dk, b, h, e, w.dk);
      const double wt = gw != nullptr ? gw[bh] : 1.0;  // gradient weight of this head
      const float a = static_cast<float>(2.0 * s2 * wt), c = static_cast<float>(-x2 * wt);
      gemm(false, false, n, Ds, Ds, a, Qs.p, Qs.ld, w.c_ss.data(), Ds, 0.f, gq.p, gq.ld);
      gemm(false, true, n, Ds, Dt, c, Qt.p, Qt.ld, w.c_st.data(), Dt, 1.f, gq.p, gq.ld);
      gemm(false, false, n, Ds, Ds, a, Ks.p, Ks.ld, w.a_ss.data(), Ds, 0.f, gk.p, gk.ld);
      gemm(false, true, n, Ds, Dt, c, Kt.p, Kt.ld, w.a_st.data(), Dt, 1.f, gk.p, gk.ld);
      gq.finish();
      gk.finish();
    }
  });
  return {loss, dq, dk};
}

// ---------------------------------------------------------------------------
// hidden_loss: rows [N, Ds] projected to [N, Dt], compared with [N, Dt].
// ---------------------------------------------------------------------------
// grad_weight (optional 0-d float32): the gradients are then grad_weight * d(sum)/d input, each in
// its input's dtype (h_s, weight, bias), instead of float32 unit gradients. 16-bit inputs are
// converted block by block (kHiddenRows rows), never as whole float32 copies.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_loss_fwd(
    const at::Tensor& hs_in, const at::Tensor& ht_in, const std::optional<at::Tensor>& w_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& mask, int64_t kind, double eps,
    bool compute_grad, const std::optional<at::Tensor>& grad_weight) {
  TORCH_CHECK(hs_in.dim() == 2 && ht_in.dim() == 2 && hs_in.size(0) == ht_in.size(0),
              "hidden_loss kernel: hidden states must be [N, D] with one row each");
  TORCH_CHECK(kind == 0 || kind == 1, "hidden_loss kernel: kind must be 0 (mse) or 1 (cosine)");
  const int64_t N = hs_in.size(0), Ds = hs_in.size(1), Dt = ht_in.size(1);
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.numel() == N,
              "hidden_loss kernel: mask must be contiguous float32 [N]");
  const bool has_w = w_in.has_value();
  TORCH_CHECK(has_w || Ds == Dt, "hidden_loss kernel: without a projection the hidden sizes must match");
  const bool weighted = grad_weight.has_value();
  if (weighted)
    TORCH_CHECK(grad_weight->scalar_type() == at::kFloat && grad_weight->numel() == 1 && grad_weight->device().is_cpu(),
                "hidden_loss kernel: grad_weight must be a float32 scalar on the CPU");
  const float gw = weighted ? grad_weight->item<float>() : 1.f;
  // detach(): worker threads of at::parallel_for run with autograd enabled, and mm_out refuses
  // out= calls on tensors that require grad.
  at::Tensor hs = hs_in.detach(), ht = ht_in.detach();
  at::Tensor w = has_w ? w_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  if (has_w) TORCH_CHECK(w.dim() == 2 && w.size(0) == Dt && w.size(1) == Ds, "hidden_loss kernel: weight must be [Dt, Ds]");
  at::Tensor bias = bias_in ? bias_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  if (bias.defined()) TORCH_CHECK(bias.numel() == Dt, "hidden_loss kernel: bias must be [Dt]");
  auto f32 = hs.options().dtype(at::kFloat);
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + kHiddenRows - 1) / kHiddenRows));
  at::Tensor partial = at::zeros({nthreads}, at::TensorOptions().dtype(at::kDouble));
  // Every row of dhs is written by its block (masked rows get zeros from their zero row gradient).
  at::Tensor dhs = compute_grad ? at::empty({N, Ds}, weighted ? hs.options() : f32) : at::empty({0}, f32);
  const bool dh_direct = dhs.scalar_type() == at::kFloat;  // else a float32 block, then rounded once
  at::Tensor dw_part = compute_grad && has_w ? at::zeros({nthreads, Dt, Ds}, f32) : at::Tensor();
  at::Tensor db_part = compute_grad && bias.defined() ? at::zeros({nthreads, Dt}, f32) : at::Tensor();
  const float* m = mask.data_ptr<float>();
  const float fe = static_cast<float>(eps);
  if (N > 0) {
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> Y(kHiddenRows * Dt), G(dh_direct ? 0 : kHiddenRows * Ds);
      for (int64_t th = t0; th < t1; ++th) {
        const int64_t r0 = N * th / nthreads, r1 = N * (th + 1) / nthreads;
        double total = 0;
        for (int64_t i0 = r0; i0 < r1; i0 += kHiddenRows) {
          const int64_t rows = std::min(kHiddenRows, r1 - i0);
          at::Tensor Ym = mat(Y.data(), rows, Dt);
          // float32 rows of this block: views for float32 row-major inputs, small copies otherwise.
          at::Tensor Hb = hs.narrow(0, i0, rows).to(at::kFloat).contiguous();
          at::Tensor Tb = ht.narrow(0, i0, rows).to(at::kFloat).contiguous();
          const float* tp = Tb.data_ptr<float>();
          if (has_w) {
            at::mm_out(Ym, Hb, w.t());
            if (bias.defined()) Ym.add_(bias);
          } else {
            Ym.copy_(Hb);
            if (bias.defined()) Ym.add_(bias);
          }
          for (int64_t r = 0; r < rows; ++r) {
            float* y = Y.data() + r * Dt;
            const float* tt = tp + r * Dt;
            if (m[i0 + r] == 0.f) {
              for (int64_t d = 0; d < Dt; ++d) y[d] = 0.f;
              continue;
            }
            if (kind == 0) {
              float acc = 0;
              const float two = 2.f * gw;
#pragma omp simd reduction(+ : acc)
              for (int64_t d = 0; d < Dt; ++d) {
                float diff = y[d] - tt[d];
                acc += diff * diff;
                y[d] = two * diff;
              }
              total += acc;
            } else {
              float yy = 0, tt2 = 0, yt = 0;
#pragma omp simd reduction(+ : yy, tt2, yt)
              for (int64_t d = 0; d < Dt; ++d) {
                yy += y[d] * y[d];
                tt2 += tt[d] * tt[d];
                yt += y[d] * tt[d];
              }
              // cos = y.t / max(|y||t|, eps), as torch.nn.functional.cosine_similarity.
              const float ny = std::sqrt(yy), nt = std::sqrt(tt2);
              const float den = std::max(ny * nt, fe);
              const float cs = yt / den;
              total += 1.0 - cs;
              // d(1 - cos)/dy = -(t / den - cos * y / |y|^2) (the clamp branch: -t / eps).
              const float a = -gw / den;
              const float c = (ny * nt > fe && yy > 0.f) ? gw * cs / yy : 0.f;
#pragma omp simd
              for (int64_t d = 0; d < Dt; ++d) y[d] = a * tt[d] + c * y[d];
            }
          }
          if (compute_grad) {
            at::Tensor dH = dh_direct ? dhs.narrow(0, i0, rows) : mat(G.data(), rows, Ds);
            if (has_w) {
              at::mm_out(dH, Ym, w);
              at::Tensor dW = dw_part[th];
              dW.addmm_(Ym.t(), Hb);
            } else {
              dH.copy_(Ym);
            }
            if (!dh_direct) dhs.narrow(0, i0, rows).copy_(dH);
            if (bias.defined()) db_part[th].add_(Ym.sum(0));
          }
        }
        partial.data_ptr<double>()[th] = total;
      }
    });
  } else if (compute_grad) {
    dhs.zero_();
  }
  at::Tensor loss = partial.sum().to(at::kFloat);
  at::Tensor dw = compute_grad && has_w ? dw_part.sum(0) : at::empty({0}, f32);
  at::Tensor db = compute_grad && bias.defined() ? db_part.sum(0) : at::empty({0}, f32);
  if (weighted && has_w && compute_grad) dw = dw.to(w_in->scalar_type());
  if (weighted && bias.defined() && compute_grad) db = db.to(bias_in->scalar_type());
  return {loss, dhs, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("attention_kl_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, "
        "float scale_t, bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor, Tensor)",
        &attention_kl_fwd);
  m.def("attention_kl_shared_fwd(Tensor x_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, float scale_t, "
        "bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor)",
        &attention_kl_shared_fwd);
  m.def("attention_score_mse_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, "
        "float scale_t, bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor, Tensor)",
        &attention_score_mse_fwd);
  m.def("hidden_loss_fwd(Tensor h_s, Tensor h_t, Tensor? weight, Tensor? bias, Tensor mask, int kind, float eps, "
        "bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor, Tensor, Tensor)",
        &hidden_loss_fwd);
}

}  // namespace kdfast
