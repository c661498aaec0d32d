// Layer distillation losses on the CPU without L x L maps in memory:
//
//   attention_score_mse  sum over valid (i, j) of (S_s - S_t)^2 with
//                        S = q k^T * scale, computed exactly from D x D Gram
//                        matrices: with Q = [q_s*scale_s | q_t*scale_t] and
//                        K = [k_s | -k_t] (rows of padded tokens dropped),
//                        S_s - S_t = Q K^T and ||Q K^T||_F^2 = <Q^T Q, K^T K>.
//                        Cost O(L (Ds+Dt)^2) per head instead of O(L^2 D).
//   attention_kl         sum over valid query rows of
//                        KL(softmax(S_t) || softmax(S_s)) over valid keys,
//                        in query-row tiles of kRowTile x L (memory per
//                        thread grows with L, never L^2): one pass gives both
//                        log-sum-exps, the KL and the score gradient.
//   hidden_loss          sum over valid rows of ||h_s W^T + b - h_t||^2
//                        (kind 0) or 1 - cos(h_s W^T + b, h_t) (kind 1), in
//                        row blocks, projection fused.
//
// Every op returns the loss *sum* and, when asked, the gradient of that sum
// (the "unit" gradient, float32). The Python op divides by the count and the
// autograd backward only scales the unit gradient by grad_output: the
// losses are sums, so d(loss)/d(input) is known in the forward pass and
// nothing is recomputed (4 matmuls for attention_kl instead of 6).
//
// Heads run in parallel (at::parallel_for over B*H); matrix products inside a
// task use at::mm on thread-local buffers (single-threaded inside the
// parallel region). Padded tokens are dropped by gathering the valid rows, so
// any mask pattern works and padding costs nothing.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kRowTile = 64;    // query rows per attention_kl tile
constexpr int64_t kHiddenRows = 128;  // rows per hidden_loss block

at::Tensor mat(float* p, int64_t r, int64_t c) { return at::from_blob(p, {r, c}, at::kFloat); }
at::Tensor mat(float* p, int64_t r, int64_t c, int64_t ld) {
  return at::from_blob(p, {r, c}, {ld, 1}, at::kFloat);
}

// Positions l of example b with mask[b, l] != 0.
std::vector<int64_t> valid_positions(const at::Tensor& mask, int64_t b) {
  const int64_t L = mask.size(1);
  const float* m = mask.data_ptr<float>() + b * L;
  std::vector<int64_t> pos;
  pos.reserve(L);
  for (int64_t l = 0; l < L; ++l)
    if (m[l] != 0.f) pos.push_back(l);
  return pos;
}

template <typename T>
void gather_t(const at::Tensor& x, int64_t b, int64_t h, const std::vector<int64_t>& pos, float scale, float* out,
              int64_t ld) {
  const int64_t D = x.size(3);
  const T* base = x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1);
  const int64_t sl = x.stride(2), sd = x.stride(3);
  for (size_t r = 0; r < pos.size(); ++r) {
    const T* src = base + pos[r] * sl;
    float* dst = out + r * ld;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * sd]) * scale;
  }
}

// out[r, :D] = x[b, h, pos[r], :] * scale (float32, row stride ld).
void gather(const at::Tensor& x, int64_t b, int64_t h, const std::vector<int64_t>& pos, float scale, float* out,
            int64_t ld) {
  switch (x.scalar_type()) {
    case at::kFloat: gather_t<float>(x, b, h, pos, scale, out, ld); break;
    case at::kBFloat16: gather_t<at::BFloat16>(x, b, h, pos, scale, out, ld); break;
    case at::kHalf: gather_t<at::Half>(x, b, h, pos, scale, out, ld); break;
    default: TORCH_CHECK(false, "layer_kd kernel: unsupported dtype ", x.scalar_type());
  }
}

// g[b, h, pos[r], :] = src[r, :D] * scale for a contiguous float32 [B, H, L, D] g (other rows stay 0).
void scatter(at::Tensor& g, int64_t b, int64_t h, const std::vector<int64_t>& pos, const float* src, int64_t ld,
             float scale) {
  const int64_t L = g.size(2), D = g.size(3);
  float* base = g.data_ptr<float>() + ((b * g.size(1) + h) * L) * D;
  for (size_t r = 0; r < pos.size(); ++r) {
    float* dst = base + pos[r] * D;
    const float* s = src + r * ld;
    for (int64_t d = 0; d < D; ++d) dst[d] = s[d] * scale;
  }
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
// attention_kl: one tile of m query rows x n keys. s and t hold the scores on
// entry; with grad they hold d(sum_rows KL)/dS_s = p_s - p_t on exit.
// ---------------------------------------------------------------------------
KDFAST_INLINE double kl_tile(float* s_tile, float* t_tile, int64_t m, int64_t n, bool grad) {
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
      float es = fast_exp(s[j] - ms), et = fast_exp(t[j] - mt);
      zs += es;
      zt += et;
      acc += et * ((t[j] - mt) - (s[j] - ms));
      s[j] = es;
      t[j] = et;
    }
    // KL = E_pt[S_t - S_s] - lse_t + lse_s, every term centred on the row maxima (exact 0 for one key).
    total += static_cast<double>(acc) / zt - std::log(static_cast<double>(zt)) + std::log(static_cast<double>(zs));
    if (grad) {
      const float is = 1.f / zs, it = 1.f / zt;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = s[j] * is - t[j] * it;
    }
  }
  return total;
}

using KlTileFn = double (*)(float*, float*, int64_t, int64_t, bool);
double kl_tile_baseline(float* s, float* t, int64_t m, int64_t n, bool g) { return kl_tile(s, t, m, n, g); }
#if KDFAST_HAVE_X86_PATHS
KDFAST_TARGET_AVX2 double kl_tile_avx2(float* s, float* t, int64_t m, int64_t n, bool g) {
  return kl_tile(s, t, m, n, g);
}
KDFAST_TARGET_AVX512 double kl_tile_avx512(float* s, float* t, int64_t m, int64_t n, bool g) {
  return kl_tile(s, t, m, n, g);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_kl_fwd(const at::Tensor& qs, const at::Tensor& ks,
                                                               const at::Tensor& qt, const at::Tensor& kt,
                                                               const at::Tensor& mask, double scale_s,
                                                               double scale_t, bool compute_grad) {
  check_qk(qs, ks, qt, kt, mask, "attention_kl");
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3), Dt = qt.size(3);
  auto f32 = qs.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({B, H}, f32);
  at::Tensor dq = compute_grad ? at::zeros({B, H, L, Ds}, f32) : at::empty({0}, f32);
  at::Tensor dk = compute_grad ? at::zeros({B, H, L, Ds}, f32) : at::empty({0}, f32);
  if (B * H == 0 || L == 0) return {loss, dq, dk};
  std::vector<std::vector<int64_t>> pos(B);
  for (int64_t b = 0; b < B; ++b) pos[b] = valid_positions(mask, b);
  const KlTileFn tile_fn = pick_kl_tile();
  float* out = loss.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Qs, Ks, Qt, Kt, S, T, dQ, dK;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& p = pos[b];
      const int64_t n = static_cast<int64_t>(p.size());
      if (n == 0) continue;
      Qs.resize(n * Ds); Ks.resize(n * Ds); Qt.resize(n * Dt); Kt.resize(n * Dt);
      // Scales folded into q: S_s = (q_s * scale_s) k_s^T.
      gather(qs, b, h, p, static_cast<float>(scale_s), Qs.data(), Ds);
      gather(ks, b, h, p, 1.f, Ks.data(), Ds);
      gather(qt, b, h, p, static_cast<float>(scale_t), Qt.data(), Dt);
      gather(kt, b, h, p, 1.f, Kt.data(), Dt);
      const int64_t tile = std::min(kRowTile, n);
      S.resize(tile * n); T.resize(tile * n);
      if (compute_grad) {
        dQ.assign(n * Ds, 0.f);
        dK.assign(n * Ds, 0.f);
      }
      at::Tensor Ksm = mat(Ks.data(), n, Ds), Ktm = mat(Kt.data(), n, Dt);
      double total = 0;
      for (int64_t i0 = 0; i0 < n; i0 += tile) {
        const int64_t m = std::min(tile, n - i0);
        at::Tensor Sm = mat(S.data(), m, n), Tm = mat(T.data(), m, n);
        at::Tensor Qsm = mat(Qs.data() + i0 * Ds, m, Ds);
        at::mm_out(Sm, Qsm, Ksm.t());
        at::mm_out(Tm, mat(Qt.data() + i0 * Dt, m, Dt), Ktm.t());
        total += tile_fn(S.data(), T.data(), m, n, compute_grad);
        if (compute_grad) {
          at::Tensor dQm = mat(dQ.data() + i0 * Ds, m, Ds);
          at::mm_out(dQm, Sm, Ksm);                  // dS k_s
          at::Tensor dKm = mat(dK.data(), n, Ds);
          dKm.addmm_(Sm.t(), Qsm);                   // dS^T (q_s * scale_s)
        }
      }
      out[bh] = static_cast<float>(total);
      if (compute_grad) {
        scatter(dq, b, h, p, dQ.data(), Ds, static_cast<float>(scale_s));
        scatter(dk, b, h, p, dK.data(), Ds, 1.f);
      }
    }
  });
  return {loss, dq, dk};
}

// ---------------------------------------------------------------------------
// attention_score_mse via Gram matrices.
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_score_mse_fwd(const at::Tensor& qs, const at::Tensor& ks,
                                                                      const at::Tensor& qt, const at::Tensor& kt,
                                                                      const at::Tensor& mask, double scale_s,
                                                                      double scale_t, bool compute_grad) {
  check_qk(qs, ks, qt, kt, mask, "attention_score_mse");
  const int64_t B = qs.size(0), H = qs.size(1), L = qs.size(2), Ds = qs.size(3), Dt = qt.size(3);
  const int64_t E = Ds + Dt;
  auto f32 = qs.options().dtype(at::kFloat);
  at::Tensor loss = at::zeros({B, H}, f32);
  at::Tensor dq = compute_grad ? at::zeros({B, H, L, Ds}, f32) : at::empty({0}, f32);
  at::Tensor dk = compute_grad ? at::zeros({B, H, L, Ds}, f32) : at::empty({0}, f32);
  if (B * H == 0 || L == 0) return {loss, dq, dk};
  std::vector<std::vector<int64_t>> pos(B);
  for (int64_t b = 0; b < B; ++b) pos[b] = valid_positions(mask, b);
  float* out = loss.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Q, K, GQ(E * E), GK(E * E), dQ, dK;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const auto& p = pos[b];
      const int64_t n = static_cast<int64_t>(p.size());
      if (n == 0) continue;
      Q.resize(n * E); K.resize(n * E);
      gather(qs, b, h, p, static_cast<float>(scale_s), Q.data(), E);
      gather(qt, b, h, p, static_cast<float>(scale_t), Q.data() + Ds, E);
      gather(ks, b, h, p, 1.f, K.data(), E);
      gather(kt, b, h, p, -1.f, K.data() + Ds, E);
      at::Tensor Qm = mat(Q.data(), n, E), Km = mat(K.data(), n, E);
      at::Tensor GQm = mat(GQ.data(), E, E), GKm = mat(GK.data(), E, E);
      at::mm_out(GQm, Qm.t(), Qm);
      at::mm_out(GKm, Km.t(), Km);
      double total = 0;
      for (int64_t e0 = 0; e0 < E; ++e0) {
        float acc = 0;
        const float* a = GQ.data() + e0 * E;
        const float* c = GK.data() + e0 * E;
#pragma omp simd reduction(+ : acc)
        for (int64_t e1 = 0; e1 < E; ++e1) acc += a[e1] * c[e1];
        total += acc;
      }
      out[bh] = static_cast<float>(total);
      if (compute_grad) {
        // d/dQ <Q^T Q, G_K> = 2 Q G_K; the q_s block of Q is q_s * scale_s.
        dQ.resize(n * Ds); dK.resize(n * Ds);
        at::Tensor dQm = mat(dQ.data(), n, Ds), dKm = mat(dK.data(), n, Ds);
        at::mm_out(dQm, Qm, GKm.narrow(1, 0, Ds));
        at::mm_out(dKm, Km, GQm.narrow(1, 0, Ds));
        scatter(dq, b, h, p, dQ.data(), Ds, static_cast<float>(2.0 * scale_s));
        scatter(dk, b, h, p, dK.data(), Ds, 2.f);
      }
    }
  });
  return {loss, dq, dk};
}

// ---------------------------------------------------------------------------
// hidden_loss: rows [N, Ds] projected to [N, Dt], compared with [N, Dt].
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hidden_loss_fwd(
    const at::Tensor& hs_in, const at::Tensor& ht_in, const std::optional<at::Tensor>& w_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& mask, int64_t kind, double eps,
    bool compute_grad) {
  TORCH_CHECK(hs_in.dim() == 2 && ht_in.dim() == 2 && hs_in.size(0) == ht_in.size(0),
              "hidden_loss kernel: hidden states must be [N, D] with one row each");
  TORCH_CHECK(kind == 0 || kind == 1, "hidden_loss kernel: kind must be 0 (mse) or 1 (cosine)");
  const int64_t N = hs_in.size(0), Ds = hs_in.size(1), Dt = ht_in.size(1);
  TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.is_contiguous() && mask.numel() == N,
              "hidden_loss kernel: mask must be contiguous float32 [N]");
  const bool has_w = w_in.has_value();
  TORCH_CHECK(has_w || Ds == Dt, "hidden_loss kernel: without a projection the hidden sizes must match");
  // detach(): worker threads of at::parallel_for run with autograd enabled, and mm_out refuses
  // out= calls on tensors that require grad.
  at::Tensor hs = hs_in.detach().to(at::kFloat).contiguous(), ht = ht_in.detach().to(at::kFloat).contiguous();
  at::Tensor w = has_w ? w_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  if (has_w) TORCH_CHECK(w.dim() == 2 && w.size(0) == Dt && w.size(1) == Ds, "hidden_loss kernel: weight must be [Dt, Ds]");
  at::Tensor bias = bias_in ? bias_in->detach().to(at::kFloat).contiguous() : at::Tensor();
  if (bias.defined()) TORCH_CHECK(bias.numel() == Dt, "hidden_loss kernel: bias must be [Dt]");
  auto f32 = hs.options();
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + kHiddenRows - 1) / kHiddenRows));
  at::Tensor partial = at::zeros({nthreads}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor dhs = compute_grad ? at::zeros({N, Ds}, f32) : at::empty({0}, f32);
  at::Tensor dw_part = compute_grad && has_w ? at::zeros({nthreads, Dt, Ds}, f32) : at::Tensor();
  at::Tensor db_part = compute_grad && bias.defined() ? at::zeros({nthreads, Dt}, f32) : at::Tensor();
  const float* m = mask.data_ptr<float>();
  const float* tp = ht.data_ptr<float>();
  const float fe = static_cast<float>(eps);
  if (N > 0) {
    at::parallel_for(0, nthreads, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> Y(kHiddenRows * Dt);
      for (int64_t th = t0; th < t1; ++th) {
        const int64_t r0 = N * th / nthreads, r1 = N * (th + 1) / nthreads;
        double total = 0;
        for (int64_t i0 = r0; i0 < r1; i0 += kHiddenRows) {
          const int64_t rows = std::min(kHiddenRows, r1 - i0);
          at::Tensor Ym = mat(Y.data(), rows, Dt);
          at::Tensor Hb = hs.narrow(0, i0, rows);
          if (has_w) {
            at::mm_out(Ym, Hb, w.t());
            if (bias.defined()) Ym.add_(bias);
          } else {
            Ym.copy_(Hb);
            if (bias.defined()) Ym.add_(bias);
          }
          for (int64_t r = 0; r < rows; ++r) {
            float* y = Y.data() + r * Dt;
            const float* tt = tp + (i0 + r) * Dt;
            if (m[i0 + r] == 0.f) {
              for (int64_t d = 0; d < Dt; ++d) y[d] = 0.f;
              continue;
            }
            if (kind == 0) {
              float acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t d = 0; d < Dt; ++d) {
                float diff = y[d] - tt[d];
                acc += diff * diff;
                y[d] = 2.f * diff;
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
              const float a = -1.f / den;
              const float c = (ny * nt > fe && yy > 0.f) ? cs / yy : 0.f;
#pragma omp simd
              for (int64_t d = 0; d < Dt; ++d) y[d] = a * tt[d] + c * y[d];
            }
          }
          if (compute_grad) {
            at::Tensor dH = dhs.narrow(0, i0, rows);
            if (has_w) {
              at::mm_out(dH, Ym, w);
              at::Tensor dW = dw_part[th];
              dW.addmm_(Ym.t(), Hb);
            } else {
              dH.copy_(Ym);
            }
            if (bias.defined()) db_part[th].add_(Ym.sum(0));
          }
        }
        partial.data_ptr<double>()[th] = total;
      }
    });
  }
  at::Tensor loss = partial.sum().to(at::kFloat);
  at::Tensor dw = compute_grad && has_w ? dw_part.sum(0) : at::empty({0}, f32);
  at::Tensor db = compute_grad && bias.defined() ? db_part.sum(0) : at::empty({0}, f32);
  return {loss, dhs, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("attention_kl_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, "
        "float scale_t, bool compute_grad) -> (Tensor, Tensor, Tensor)",
        &attention_kl_fwd);
  m.def("attention_score_mse_fwd(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor mask, float scale_s, "
        "float scale_t, bool compute_grad) -> (Tensor, Tensor, Tensor)",
        &attention_score_mse_fwd);
  m.def("hidden_loss_fwd(Tensor h_s, Tensor h_t, Tensor? weight, Tensor? bias, Tensor mask, int kind, float eps, "
        "bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor)",
        &hidden_loss_fwd);
}

}  // namespace kdfast
