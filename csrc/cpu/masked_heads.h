// Masked attention heads on the CPU, shared by the attention-map losses
// (attention_kl.cpp, attention_score_mse.cpp): q/k tensors [B, H, L, D] with a
// float32 padding mask [B, L], processed head by head.
//
//   Example / examples()   the valid positions of each example, and whether
//                          they form one run (right or left padding)
//   for_each_head          (b, h) tasks, longest example first, pulled from a
//                          shared counter by worker threads with their own
//                          buffers, BLAS single-threaded inside
//   rows_of                the valid rows of one head as float32: in place for
//                          float32 inputs with unit stride in D when the valid
//                          tokens form one run, else gathered into a buffer
//   GradRows               where a head's gradient rows are written, and the
//                          zeroing / scatter of padded rows afterwards
//   gemm                   row-major C = alpha op(A) op(B) + beta C on BLAS
//   check_qk, grad_weights, grad_output_like, loss_outputs   argument checks and outputs
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <optional>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

// MKL's C API for the calling thread's BLAS thread count (mkl_service.h: mkl_set_num_threads_local
// is a macro for this name; the lowercase symbol is the Fortran, by-reference entry). Weak: null
// when torch's BLAS is not MKL. Inside the parallel region every product is single-threaded
// anyway, but MKL picks its kernels from the thread count it believes it has: told 1, it runs
// its small-matrix kernels without packing copies.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace kdfast {
namespace masked_heads {

inline at::Tensor mat(float* p, int64_t r, int64_t c) { return at::from_blob(p, {r, c}, at::kFloat); }
inline at::Tensor mat(const float* p, int64_t r, int64_t c, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {r, c}, {ld, 1}, at::kFloat);
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C, op(X) = X^T when the flag is set
// (A is [M, K] or, transposed, [K, M]; B is [K, N] or [N, K]). beta = 0 ignores C's contents.
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  at::Tensor a = ta ? mat(A, K, M, lda).t() : mat(A, M, K, lda);
  at::Tensor b = tb ? mat(B, N, K, ldb).t() : mat(B, K, N, ldb);
  at::Tensor c = mat(C, M, N, ldc);
  c.addmm_(a, b, beta, alpha);
}

// Output of size `sizes` for gradients. Every element is written by the kernel (no
// zero fill). Large buffers get a transparent-huge-page hint: the first touch of a fresh
// 38 MB buffer otherwise costs ~9500 page faults, as much time as a kernel pass.
inline at::Tensor empty_grad(at::IntArrayRef sizes, const at::TensorOptions& opt) {
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

inline std::vector<Example> examples(const at::Tensor& mask) {
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
inline std::vector<int64_t> task_order(const std::vector<Example>& ex, int64_t H) {
  const int64_t B = static_cast<int64_t>(ex.size());
  std::vector<int64_t> order(B * H);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t c) { return ex[a / H].n() > ex[c / H].n(); });
  return order;
}

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
inline int64_t task_threads(int64_t ntasks) {
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

// Runs body(bh, b, h, example, buffers) for every head (b, h) whose example has valid tokens, on
// worker threads each with its own Buffers (reused across its heads), longest example first. A
// head without valid tokens gets out[bh] = 0 and empty(bh), which zeroes its gradient rows.
template <typename Buffers, typename Empty, typename Body>
void for_each_head(const std::vector<Example>& ex, int64_t H, float* out, Empty empty, Body body) {
  const std::vector<int64_t> order = task_order(ex, H);
  const int64_t nthreads = task_threads(static_cast<int64_t>(order.size()));
  std::vector<Buffers> bufs(nthreads);
  for_each_task(order, nthreads, [&](int64_t bh, int64_t slot) {
    const int64_t b = bh / H, h = bh % H;
    if (ex[b].n() == 0) {
      out[bh] = 0.f;
      empty(bh);
      return;
    }
    body(bh, b, h, ex[b], bufs[slot]);
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
inline Rows rows_of(const at::Tensor& x, int64_t b, int64_t h, const Example& e, std::vector<float>& buf) {
  const int64_t D = x.size(3);
  if (e.run && x.scalar_type() == at::kFloat && x.stride(3) == 1 && x.stride(2) >= D)
    return {x.data_ptr<float>() + b * x.stride(0) + h * x.stride(1) + e.first * x.stride(2), x.stride(2)};
  buf.resize(e.n() * D);
  switch (x.scalar_type()) {
    case at::kFloat: gather_t<float>(x, b, h, e.pos, buf.data(), D); break;
    case at::kBFloat16: gather_t<at::BFloat16>(x, b, h, e.pos, buf.data(), D); break;
    case at::kHalf: gather_t<at::Half>(x, b, h, e.pos, buf.data(), D); break;
    default: TORCH_CHECK(false, "attention loss kernel: unsupported dtype ", x.scalar_type());
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
      default: TORCH_CHECK(false, "attention loss kernel: unsupported gradient dtype ", g->scalar_type());
    }
  }
};

inline void zero_head(at::Tensor& g, int64_t bh) {
  g.view({-1, g.size(2), g.size(3)})[bh].zero_();
}

// Gradient outputs: float32 unit gradients without grad_weight, else the dtype of the input.
inline at::Tensor grad_output_like(const at::Tensor& x, int64_t B, int64_t H, int64_t L, int64_t D, bool weighted) {
  return empty_grad({B, H, L, D}, x.options().dtype(weighted ? x.scalar_type() : at::kFloat));
}

// grad_weight[b, h] as a float32 pointer (nullptr when absent: weight 1).
inline const float* grad_weights(const std::optional<at::Tensor>& w, int64_t B, int64_t H, const char* op) {
  if (!w.has_value()) return nullptr;
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->device().is_cpu() && w->dim() == 2 &&
                  w->size(0) == B && w->size(1) == H,
              op, " kernel: grad_weight must be contiguous float32 [B, H] on the CPU");
  return w->data_ptr<float>();
}

inline void check_qk(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt,
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

// What an attention-map loss kernel returns: the per-head loss [B, H] and, with compute_grad, the
// q and k gradient buffers (k's only when with_dk; empty tensors otherwise), plus grad_weight's
// pointer. Runs check_qk first.
struct LossOutputs {
  at::Tensor loss, dq, dk;
  const float* gw;
};

inline LossOutputs loss_outputs(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                                const at::Tensor& kt, const at::Tensor& mask,
                                const std::optional<at::Tensor>& grad_weight, bool compute_grad, bool with_dk,
                                const char* op) {
  check_qk(qs, ks, qt, kt, mask, op);
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3);
  const auto f32 = qs.options().dtype(at::kFloat);
  const float* gw = grad_weights(grad_weight, B, H, op);
  const bool weighted = gw != nullptr;
  at::Tensor dq = compute_grad ? grad_output_like(qs, B, H, L, Ds, weighted) : at::empty({0}, f32);
  at::Tensor dk = compute_grad && with_dk ? grad_output_like(ks, B, H, L, Ds, weighted) : at::empty({0}, f32);
  return {at::empty({B, H}, f32), dq, dk, gw};
}

}  // namespace masked_heads
}  // namespace kdfast
