// attention_score_mse on the CPU without L x L maps in memory: the sum over
// valid (i, j) of (S_s - S_t)^2 with S = q k^T * scale, computed exactly from
// D x D Gram matrices: with A_xy = q_x^T q_y and C_xy = k_x^T k_y over the
// valid rows,
//   ||S_s - S_t||_F^2 = s_s^2 <A_ss, C_ss> - 2 s_s s_t <A_st, C_st> + s_t^2 <A_tt, C_tt>.
// Cost O(L (Ds^2 + Ds Dt + Dt^2)) per head instead of O(L^2 D).
//
// The op returns the loss *sum* and, when asked, the gradient of that sum
// (the "unit" gradient, float32). The Python op divides by the count and the
// autograd backward only scales the unit gradient by grad_output: the loss is
// a sum, so d(loss)/d(input) is known in the forward pass and nothing is
// recomputed.
// An optional grad_weight [B, H] (float32) makes the gradient
// grad_weight[b, h] * d loss[b, h] / d input, written in each input's own
// dtype (fp32 accumulation, one rounding). That is the backward of 16-bit
// inputs: a bf16 gradient, not a float32 unit gradient and a copy (B=32,
// L=384, H=12, D=64: 36 MiB at the peak instead of 144 MiB).
//
// Heads run in parallel, padded tokens are skipped exactly and valid rows are
// read in place where they can be: see masked_heads.h.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu/isa.h"
#include "cpu/masked_heads.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace {

using namespace masked_heads;

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
  LossOutputs outputs = loss_outputs(qs, ks, qt, kt, mask, grad_weight, compute_grad, true, "attention_score_mse");
  at::Tensor &loss = outputs.loss, &dq = outputs.dq, &dk = outputs.dk;
  const float* gw = outputs.gw;
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3), Dt = qt.size(3);
  if (B * H == 0 || L == 0) return {loss.zero_(), dq, dk};
  const std::vector<Example> ex = examples(mask);
  const float ss = static_cast<float>(scale_s), st = static_cast<float>(scale_t);
  float* out = loss.data_ptr<float>();
  struct Buffers {
    std::vector<float> qs, ks, qt, kt, dq, dk;
    std::vector<float> a_ss, a_st, a_tt, c_ss, c_st, c_tt;
  };
  const auto empty = [&](int64_t bh) {
    if (!compute_grad) return;
    zero_head(dq, bh);
    zero_head(dk, bh);
  };
  for_each_head<Buffers>(ex, H, out, empty, [&](int64_t bh, int64_t b, int64_t h, const Example& e, Buffers& w) {
    const int64_t n = e.n();
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("attention_score_mse_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, "
        "float scale_t, bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor, Tensor)",
        &attention_score_mse_fwd);
}

}  // namespace kdfast
