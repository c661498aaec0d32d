// attention_kl on the CPU without L x L maps in memory: the sum over valid
// query rows of KL(softmax(S_t) || softmax(S_s)) over valid keys, S = q k^T *
// scale, in query-row tiles of up to kRowTileMax x n (memory per thread grows
// with L, never L^2): one pass over a tile gives both log-sum-exps, the KL and
// the score gradient. attention_kl_shared_fwd is the value relation (q_s and
// k_s one tensor): one gradient buffer.
//
// The op returns the loss *sum* and, when asked, the gradient of that sum
// (the "unit" gradient, float32). The Python op divides by the count and the
// autograd backward only scales the unit gradient by grad_output: the loss is
// a sum, so d(loss)/d(input) is known in the forward pass and nothing is
// recomputed (4 matmuls instead of 6).
// An optional grad_weight [B, H] (float32) makes the gradient
// grad_weight[b, h] * d loss[b, h] / d input, written in each input's own
// dtype (fp32 accumulation, one rounding). That is the backward of 16-bit
// inputs: a bf16 gradient, not a float32 unit gradient and a copy (B=32,
// L=384, H=12, D=64: 36 MiB at the peak instead of 144 MiB).
//
// Heads run in parallel, padded tokens are skipped exactly and valid rows are
// read in place where they can be: see masked_heads.h.
// Scores are never scaled in memory: the scales enter the softmax pass.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/masked_heads.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace {

using namespace masked_heads;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kRowTileMin = 64;      // query rows per tile: at least
constexpr int64_t kRowTileMax = 512;     // ... and at most
constexpr int64_t kTileFloats = 160000;  // target floats per score tile (2 tiles: <= 1.3 MB, in L2)

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
  LossOutputs outputs = loss_outputs(qs, ks, qt, kt, mask, grad_weight, compute_grad, !shared, "attention_kl");
  at::Tensor &loss = outputs.loss, &dq = outputs.dq, &dk = outputs.dk;
  const float* gw = outputs.gw;
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3), Dt = qt.size(3);
  if (B * H == 0 || L == 0) return {loss.zero_(), dq, dk};
  const std::vector<Example> ex = examples(mask);
  const KlTileFn tile_fn = pick_kl_tile();
  const float ss = static_cast<float>(scale_s), st = static_cast<float>(scale_t);
  float* out = loss.data_ptr<float>();
  struct Buffers {
    std::vector<float> qs, ks, qt, kt, s, t, dq, dk;
  };
  const auto empty = [&](int64_t bh) {
    if (!compute_grad) return;
    zero_head(dq, bh);
    if (!shared) zero_head(dk, bh);
  };
  for_each_head<Buffers>(ex, H, out, empty, [&](int64_t bh, int64_t b, int64_t h, const Example& e, Buffers& w) {
    const int64_t n = e.n();
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("attention_kl_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, "
        "float scale_t, bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor, Tensor)",
        &attention_kl_fwd);
  m.def("attention_kl_shared_fwd(Tensor x_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, float scale_t, "
        "bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor)",
        &attention_kl_shared_fwd);
}

}  // namespace kdfast
