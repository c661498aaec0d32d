// hidden_mse on the CPU (TinyBERT hidden / embedding loss, and the cosine
// variant of hidden_cosine): rows [N, Ds] projected to [N, Dt] and compared
// with [N, Dt], summed over valid rows as ||h_s W^T + b - h_t||^2 (kind 0) or
// 1 - cos(h_s W^T + b, h_t) (kind 1). Row blocks of kHiddenRows: project,
// compare and write the gradient rows for h_s, W and b while the block is in
// cache, so the projected [N, Dt] activations never exist as a whole tensor.
//
// Returns the loss *sum* and, when asked, the gradients of that sum (float32
// "unit" gradients; the autograd backward only scales them by grad_output).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kdfast {
namespace {

constexpr int64_t kHiddenRows = 128;  // rows per block

at::Tensor mat(float* p, int64_t r, int64_t c) { return at::from_blob(p, {r, c}, at::kFloat); }

// grad_weight (optional 0-d float32): the gradients are then grad_weight * d(sum)/d input, each in
// its input's dtype (h_s, weight, bias), instead of float32 unit gradients. 16-bit inputs are
// converted block by block (kHiddenRows rows), never as whole float32 copies.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_mse_fwd(
    const at::Tensor& hs_in, const at::Tensor& ht_in, const std::optional<at::Tensor>& w_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& mask, int64_t kind, double eps,
    bool compute_grad, const std::optional<at::Tensor>& grad_weight) {
  TORCH_CHECK(hs_in.dim() == 2 && ht_in.dim() == 2 && hs_in.size(0) == ht_in.size(0),
              "hidden_mse kernel: hidden states must be [N, D] with one row each");
  TORCH_CHECK(kind == 0 || kind == 1, "hidden_mse kernel: kind must be 0 (mse) or 1 (cosine)");
  const int64_t N = hs_in.size(0), Ds = hs_in.size(1), Dt = ht_in.size(1);
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.numel() == N,
              "hidden_mse kernel: mask must be contiguous float32 [N]");
  const bool has_w = w_in.has_value();
  TORCH_CHECK(has_w || Ds == Dt, "hidden_mse kernel: without a projection the hidden sizes must match");
  const bool weighted = grad_weight.has_value();
  if (weighted)
    TORCH_CHECK(grad_weight->scalar_type() == at::kFloat && grad_weight->numel() == 1 && grad_weight->device().is_cpu(),
                "hidden_mse kernel: grad_weight must be a float32 scalar on the CPU");
  const float gw = weighted ? grad_weight->item<float>() : 1.f;
  // detach(): worker threads of at::parallel_for run with autograd enabled, and mm_out refuses
  // out= calls on tensors that require grad.
  at::Tensor hs = hs_in.detach(), ht = ht_in.detach();
  at::Tensor w = has_w ? w_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  if (has_w) TORCH_CHECK(w.dim() == 2 && w.size(0) == Dt && w.size(1) == Ds, "hidden_mse kernel: weight must be [Dt, Ds]");
  at::Tensor bias = bias_in ? bias_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  if (bias.defined()) TORCH_CHECK(bias.numel() == Dt, "hidden_mse kernel: bias must be [Dt]");
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
  m.def("hidden_mse_fwd(Tensor h_s, Tensor h_t, Tensor? weight, Tensor? bias, Tensor mask, int kind, float eps, "
        "bool compute_grad, Tensor? grad_weight=None) -> (Tensor, Tensor, Tensor, Tensor)",
        &hidden_mse_fwd);
}

}  // namespace kdfast
