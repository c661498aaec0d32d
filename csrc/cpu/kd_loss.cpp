// Fused logit distillation loss on the CPU: per-row forward (soft and hard
// terms plus statistics) and a one-pass backward that writes the student
// gradient. OpenMP over rows; each row is processed in cache with
// vectorised exp/log (vec_math.h) compiled for AVX-512, AVX2 and the
// baseline ISA, chosen at run time (isa.h).
//
// Conventions (see kdfast/ops/kd_loss.py): a = s / T, b = t / T,
// div 0 = KL(p_t || p_s), 1 = KL(p_s || p_t), 2 = JSD with weight beta on p_t.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>


#include "cpu/buffer_cache.h"
#include "cpu/isa.h"
#include "cpu/vec_math.h"

// The hot loops select with `c ? x : 0` after computing x; under GCC's default
// -ftrapping-math the vectoriser refuses to if-convert them for AVX2 (and the
// JSD loops for AVX-512 too). Without it: KL loop 25 -> 3.5 ns/element (AVX2),
// JSD loop 78 -> 5.7 ns/element (AVX-512), standalone on this loaded 2-core
// machine. The kernels never read floating-point exception flags. (setup.py
// also passes -fno-trapping-math; the pragma keeps this file fast without it.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace kdfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Elements summed in float per SIMD lane before adding to a double total:
// keeps the row sums accurate at V = 256000 without slowing the inner loop.
constexpr int64_t kBlock = 2048;

struct KdArgs {
  float inv_t;
  int div;
  float beta, log_beta, log_1mbeta;
  bool hard;
};

KDFAST_INLINE void row_max(const float* s, const float* t, int64_t V, float& ms, float& mt, bool& bad) {
  float a = -kInf, b = -kInf;
  int nan = 0;
#pragma omp simd reduction(max : a, b) reduction(| : nan)
  for (int64_t j = 0; j < V; ++j) {
    a = s[j] > a ? s[j] : a;
    b = t[j] > b ? t[j] : b;
    nan |= (s[j] != s[j]) | (t[j] != t[j]);
  }
  ms = a;
  mt = b;
  bad = nan != 0 || a == kInf || b == kInf;
}

// log p = x - lse; a fully masked side (lse = -inf) gets probabilities 0.
KDFAST_INLINE float safe_lse(float lse) { return lse == -kInf ? kInf : lse; }

// kStore (fused forward+gradient): also keeps what the gradient pass needs, so
// that it needs no exp or log of its own: KL: exp(a - ma) in ea_out and
// exp(b - mb) in eb_out; reverse KL: exp(a - ma); JSD: p_s in ea_out and
// log p_s - log M in eb_out (written only when a side is live).
template <bool kStore>
KDFAST_INLINE void fwd_row_impl(const float* s, const float* t, int64_t V, int64_t label, const KdArgs& p,
                                float* rows, float* stats, float* ea_out, float* eb_out, float* scales) {
  float ms, mt;
  bool bad;
  row_max(s, t, V, ms, mt, bad);
  if (bad) {  // NaN or +inf in, NaN out: never hide bad logits.
    rows[0] = rows[1] = kNaN;
    for (int k = 0; k < 4; ++k) stats[k] = kNaN;
    return;
  }
  const float it = p.inv_t;
  // Centre on the row maxima; a fully masked side is centred on 0.
  const float ma = ms == -kInf ? 0.f : ms * it;
  const float mb = mt == -kInf ? 0.f : mt * it;
  const float m1 = ms == -kInf ? 0.f : ms;
  const bool want_1 = p.hard && it != 1.0f;
  double sum_a = 0, sum_b = 0, dot = 0, sum_1 = 0;
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
    float fa = 0, fb = 0, fd = 0, f1 = 0;
    if (p.div == 0) {
#pragma omp simd reduction(+ : fa, fb, fd)
      for (int64_t j = j0; j < j1; ++j) {
        float a = s[j] * it - ma, b = t[j] * it - mb;
        float ea = fast_exp(a), eb = fast_exp(b);
        if constexpr (kStore) {
          ea_out[j] = ea;
          eb_out[j] = eb;
        }
        fa += ea;
        fb += eb;
        const float v = eb * (b - a);  // computed unconditionally: a select, not a branch, so it vectorises
        fd += eb > 0.f ? v : 0.f;
      }
    } else if (p.div == 1) {
#pragma omp simd reduction(+ : fa, fb, fd)
      for (int64_t j = j0; j < j1; ++j) {
        float a = s[j] * it - ma, b = t[j] * it - mb;
        float ea = fast_exp(a), eb = fast_exp(b);
        if constexpr (kStore) ea_out[j] = ea;
        fa += ea;
        fb += eb;
        const float v = ea * (a - b);
        fd += ea > 0.f ? v : 0.f;
      }
    } else {
#pragma omp simd reduction(+ : fa, fb)
      for (int64_t j = j0; j < j1; ++j) {
        fa += fast_exp(s[j] * it - ma);
        fb += fast_exp(t[j] * it - mb);
      }
    }
    if (want_1) {
#pragma omp simd reduction(+ : f1)
      for (int64_t j = j0; j < j1; ++j) f1 += fast_exp(s[j] - m1);
    }
    sum_a += fa;
    sum_b += fb;
    dot += fd;
    sum_1 += f1;
  }
  const float lse_a = ms == -kInf ? -kInf : ma + static_cast<float>(std::log(sum_a));
  const float lse_b = mt == -kInf ? -kInf : mb + static_cast<float>(std::log(sum_b));
  float lse_1 = lse_a;
  if (want_1) lse_1 = ms == -kInf ? -kInf : m1 + static_cast<float>(std::log(sum_1));
  else if (p.hard) lse_1 = lse_a;  // T == 1
  float soft = 0.f, aux = 0.f;
  if (p.div == 0) {
    // KL(t||s) = E_pt[(b - mb) - (a - ma)] + log(sum_a / sum_b); 0 if the teacher is fully masked.
    if (mt != -kInf) soft = static_cast<float>(dot / sum_b + std::log(sum_a / sum_b));
    if (mt != -kInf && ms == -kInf) soft = kInf;
  } else if (p.div == 1) {
    if (ms != -kInf) {
      double e = dot / sum_a;  // E_ps[(a - ma) - (b - mb)]
      soft = static_cast<float>(e + std::log(sum_b / sum_a));
      aux = static_cast<float>(e) + ma - mb;  // E_ps[a - b]
      if (mt == -kInf) soft = kInf;
    }
  } else if (ms != -kInf || mt != -kInf) {
    // JSD needs the normalised probabilities: a second pass over the cached row.
    const float la = safe_lse(lse_a), lb = safe_lse(lse_b);
    const float lw_s = p.log_1mbeta, lw_t = p.log_beta;
    double kl_t = 0, kl_s = 0;
    for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
      const int64_t j1 = j0 + kBlock < V ? j0 + kBlock : V;
      float ft = 0, fs = 0;
#pragma omp simd reduction(+ : ft, fs)
      for (int64_t j = j0; j < j1; ++j) {
        float lps = s[j] * it - la, lpt = t[j] * it - lb;
        float ps = fast_exp(lps), pt = fast_exp(lpt);
        float xs = lps + lw_s, xt = lpt + lw_t;
        float hi = xs > xt ? xs : xt, lo = xs > xt ? xt : xs;
        float lm = hi + fast_log(1.0f + fast_exp(lo - hi));
        const float vt = pt * (lpt - lm), vs = ps * (lps - lm);
        if constexpr (kStore) {  // p_s and log p_s - log M for the gradient pass
          ea_out[j] = ps;
          eb_out[j] = lps - lm;
        }
        ft += pt > 0.f ? vt : 0.f;
        fs += ps > 0.f ? vs : 0.f;
      }
      kl_t += ft;
      kl_s += fs;
    }
    soft = static_cast<float>(p.beta * kl_t + (1.0 - p.beta) * kl_s);
    aux = static_cast<float>(kl_s);
  }
  float hard = 0.f;
  if (p.hard) {
    // A fully masked student puts probability 0 on the label: -log 0 = inf (as the reference).
    hard = (label >= 0 && label < V) ? (ms == -kInf ? kInf : lse_1 - s[label]) : kNaN;
  }
  if constexpr (kStore) {  // 1 / sum of the stored exponentials; 0 for a fully masked side
    scales[0] = ms == -kInf ? 0.f : static_cast<float>(1.0 / sum_a);
    scales[1] = mt == -kInf ? 0.f : static_cast<float>(1.0 / sum_b);
  }
  rows[0] = soft;
  rows[1] = hard;
  stats[0] = lse_a;
  stats[1] = lse_b;
  stats[2] = lse_1;
  stats[3] = aux;
}

// g += gh * (softmax(s) - onehot(label)): the hard cross-entropy term at T = 1.
KDFAST_INLINE void add_hard_grad(const float* s, int64_t V, int64_t label, const KdArgs& p, float l1, float gh,
                                 float* g) {
  if (!p.hard || gh == 0.f) return;
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) g[j] += gh * fast_exp(s[j] - l1);
  if (label >= 0 && label < V) g[label] -= gh;
}

KDFAST_INLINE void bwd_row(const float* s, const float* t, int64_t V, int64_t label, const KdArgs& p,
                           const float* stats, float gs, float gh, float* g) {
  const float it = p.inv_t;
  const float la = safe_lse(stats[0]), lb = safe_lse(stats[1]), l1 = safe_lse(stats[2]), aux = stats[3];
  const float cs = gs * it;
  if (gs == 0.f) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] = 0.f;
  } else if (p.div == 0) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] = cs * (fast_exp(s[j] * it - la) - fast_exp(t[j] * it - lb));
  } else if (p.div == 1) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      float a = s[j] * it, b = t[j] * it;
      float ps = fast_exp(a - la);
      const float v = cs * ps * ((a - b) - aux);
      g[j] = ps > 0.f ? v : 0.f;
    }
  } else {
    const float lw_s = p.log_1mbeta, lw_t = p.log_beta, w = cs * (1.0f - p.beta);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      float lps = s[j] * it - la, lpt = t[j] * it - lb;
      float ps = fast_exp(lps);
      float xs = lps + lw_s, xt = lpt + lw_t;
      float hi = xs > xt ? xs : xt, lo = xs > xt ? xt : xs;
      float lm = hi + fast_log(1.0f + fast_exp(lo - hi));
      const float v = w * ps * (lps - lm - aux);
      g[j] = ps > 0.f ? v : 0.f;
    }
  }
  add_hard_grad(s, V, label, p, l1, gh, g);
}

KDFAST_INLINE void fwd_row(const float* s, const float* t, int64_t V, int64_t label, const KdArgs& p,
                           float* rows, float* stats) {
  fwd_row_impl<false>(s, t, V, label, p, rows, stats, nullptr, nullptr, nullptr);
}

// Forward and the gradient of gs * soft + gh * hard in one visit of the row
// (the row stays in cache between the passes): the gradient pass reuses what
// the forward computed (KL: 2 exps per element in all instead of 4 for
// forward + backward). Non-finite and fully masked rows take the plain
// backward on the cached row. `scratch` holds V floats.
KDFAST_INLINE void fwd_grad_row(const float* s, const float* t, int64_t V, int64_t label, const KdArgs& p,
                                float* rows, float* stats, float gs, float gh, float* g, float* scratch) {
  if (gs == 0.f) {
    fwd_row_impl<false>(s, t, V, label, p, rows, stats, nullptr, nullptr, nullptr);
    bwd_row(s, t, V, label, p, stats, gs, gh, g);
    return;
  }
  float scales[2];
  fwd_row_impl<true>(s, t, V, label, p, rows, stats, g, scratch, scales);
  // NaN / +inf rows: the backward's NaN rules; JSD with a fully masked student: no stores, zero soft gradient.
  if (stats[0] != stats[0] || stats[1] != stats[1] || (p.div == 2 && stats[0] == -kInf)) {
    bwd_row(s, t, V, label, p, stats, gs, gh, g);
    return;
  }
  const float it = p.inv_t, cs = gs * it, ra = scales[0], rb = scales[1];
  if (p.div == 0) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) g[j] = cs * (g[j] * ra - scratch[j] * rb);
  } else if (p.div == 1) {
    const float aux = stats[3];
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float ps = g[j] * ra;
      const float v = cs * ps * ((s[j] * it - t[j] * it) - aux);
      g[j] = ps > 0.f ? v : 0.f;
    }
  } else {  // JSD: (1 - beta) p_s (log p_s - log M - KL(p_s || M)) / T
    const float aux = stats[3], w = cs * (1.0f - p.beta);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float ps = g[j];
      const float v = w * ps * (scratch[j] - aux);
      g[j] = ps > 0.f ? v : 0.f;
    }
  }
  add_hard_grad(s, V, label, p, safe_lse(stats[2]), gh, g);
}

using FwdFn = void (*)(const float*, const float*, int64_t, int64_t, const KdArgs&, float*, float*);
using BwdFn = void (*)(const float*, const float*, int64_t, int64_t, const KdArgs&, const float*, float, float,
                       float*);
using FwdGradFn = void (*)(const float*, const float*, int64_t, int64_t, const KdArgs&, float*, float*, float,
                           float, float*, float*);

struct RowKernels {
  FwdFn fwd;
  BwdFn bwd;
  FwdGradFn fwd_grad;
};

// The row functions compiled for one ISA (ATTR: a target attribute from isa.h, or nothing).
#define KDFAST_KD_ROW_KERNELS(NAME, ATTR)                                                                   \
  ATTR void fwd_##NAME(const float* s, const float* t, int64_t V, int64_t l, const KdArgs& p, float* r,      \
                       float* st) {                                                                         \
    fwd_row(s, t, V, l, p, r, st);                                                                          \
  }                                                                                                         \
  ATTR void bwd_##NAME(const float* s, const float* t, int64_t V, int64_t l, const KdArgs& p, const float* st, \
                       float gs, float gh, float* g) {                                                      \
    bwd_row(s, t, V, l, p, st, gs, gh, g);                                                                  \
  }                                                                                                         \
  ATTR void fwd_grad_##NAME(const float* s, const float* t, int64_t V, int64_t l, const KdArgs& p, float* r,  \
                            float* st, float gs, float gh, float* g, float* scratch) {                      \
    fwd_grad_row(s, t, V, l, p, r, st, gs, gh, g, scratch);                                                 \
  }                                                                                                         \
  constexpr RowKernels kRow_##NAME{fwd_##NAME, bwd_##NAME, fwd_grad_##NAME};

KDFAST_KD_ROW_KERNELS(baseline, )
#if KDFAST_HAVE_X86_PATHS
KDFAST_KD_ROW_KERNELS(avx2, KDFAST_TARGET_AVX2)
KDFAST_KD_ROW_KERNELS(avx512, KDFAST_TARGET_AVX512)
#endif
#undef KDFAST_KD_ROW_KERNELS

RowKernels pick_kernels() {
#if KDFAST_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::AVX512:
    case Isa::AVX512_VNNI: return kRow_avx512;
    case Isa::AVX2: return kRow_avx2;
    default: break;
  }
#endif
  return kRow_baseline;
}

// Row i of x as float: the row itself for float32, else converted into buf.
const float* row_as_float(const at::Tensor& x, int64_t i, std::vector<float>& buf) {
  const int64_t V = x.size(1);
  if (x.scalar_type() == at::kFloat) return x.data_ptr<float>() + i * x.stride(0);
  buf.resize(V);
  if (x.scalar_type() == at::kBFloat16) {
    const auto* src = x.data_ptr<at::BFloat16>() + i * x.stride(0);
    for (int64_t j = 0; j < V; ++j) buf[j] = static_cast<float>(src[j]);
  } else {
    const auto* src = x.data_ptr<at::Half>() + i * x.stride(0);
    for (int64_t j = 0; j < V; ++j) buf[j] = static_cast<float>(src[j]);
  }
  return buf.data();
}

// Rows per parallel task: at least ~64K elements, so a small problem (QA logits,
// 64 x 384) runs on one thread instead of paying a thread wake-up and join
// that cost more than the work (and much more when another process holds a core).
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// Row i of a bfloat16 / float16 [N, V] tensor from float values.
void store_row(at::Tensor& x, int64_t i, const float* g) {
  const int64_t V = x.size(1);
  if (x.scalar_type() == at::kBFloat16) {
    auto* dst = x.data_ptr<at::BFloat16>() + i * V;
    for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<at::BFloat16>(g[j]);
  } else {
    auto* dst = x.data_ptr<at::Half>() + i * V;
    for (int64_t j = 0; j < V; ++j) dst[j] = static_cast<at::Half>(g[j]);
  }
}

void check_inputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "kd_loss kernel: student and teacher must be 2-D [N, V]");
  TORCH_CHECK(s.sizes() == t.sizes(), "kd_loss kernel: student ", s.sizes(), " and teacher ", t.sizes(),
              " shapes differ");
  TORCH_CHECK(s.device().is_cpu() && t.device().is_cpu(), "kd_loss cpu kernel: tensors must be on the CPU");
  for (const auto* x : {&s, &t}) {
    auto st = x->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                "kd_loss kernel: dtype must be float32, bfloat16 or float16, got ", st);
    TORCH_CHECK(x->size(1) <= 1 || x->stride(1) == 1, "kd_loss kernel: last dim must have stride 1");
  }
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == s.size(0),
                "kd_loss kernel: labels must be int64 [N]");
  }
}

KdArgs make_args(double temperature, int64_t div, double beta, bool hard) {
  TORCH_CHECK(temperature > 0, "kd_loss kernel: temperature must be > 0");
  TORCH_CHECK(div >= 0 && div <= 2, "kd_loss kernel: div must be 0 (kl), 1 (reverse_kl) or 2 (jsd)");
  KdArgs p;
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.div = static_cast<int>(div);
  p.beta = static_cast<float>(beta);
  p.log_beta = beta > 0 ? static_cast<float>(std::log(beta)) : -kInf;
  p.log_1mbeta = beta < 1 ? static_cast<float>(std::log1p(-beta)) : -kInf;
  p.hard = hard;
  return p;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& labels_opt, double temperature,
                                               int64_t div, double beta, int64_t ignore_index,
                                               bool compute_hard) {
  check_inputs(student, teacher, labels_opt);
  const int64_t N = student.size(0), V = student.size(1);
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor rows = at::zeros({N, 2}, opts);
  at::Tensor stats = at::empty({N, 4}, opts);
  if (N == 0) return {rows, stats};
  at::Tensor labels = labels_opt ? labels_opt->contiguous() : at::Tensor();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const KdArgs p = make_args(temperature, div, beta, compute_hard && lab != nullptr);
  FwdFn fn = pick_kernels().fwd;
  float* r = rows.data_ptr<float>();
  float* st = stats.data_ptr<float>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
    std::vector<float> bs, bt;
    for (int64_t i = b; i < e; ++i) {
      const int64_t l = lab ? lab[i] : 0;
      if (lab && l == ignore_index) {  // ignored row: no terms, zero gradient
        for (int k = 0; k < 4; ++k) st[i * 4 + k] = -kInf;
        continue;
      }
      fn(row_as_float(student, i, bs), row_as_float(teacher, i, bt), V, l, p, r + i * 2, st + i * 4);
    }
  });
  return {rows, stats};
}

at::Tensor kd_loss_bwd(const at::Tensor& student, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& labels_opt, const at::Tensor& stats,
                       const at::Tensor& grad_rows, double temperature, int64_t div, double beta,
                       int64_t ignore_index, bool compute_hard) {
  check_inputs(student, teacher, labels_opt);
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == N * 4,
              "kd_loss_bwd: stats must be contiguous float32 [N, 4]");
  at::Tensor gr = grad_rows.to(at::kFloat).contiguous();
  TORCH_CHECK(gr.numel() == N * 2, "kd_loss_bwd: grad_rows must be [N, 2]");
  // Not madvise(MADV_HUGEPAGE)'d: 2 MiB pages halved allocate+fill of a 477 MiB
  // gradient in steady state (330 -> 98..196 ms) but took up to 1 s right after
  // a large free (direct compaction under THP defrag=madvise), as in training.
  // The one-block cache (buffer_cache.h) avoids the page faults instead.
  at::Tensor grad = empty_cached({N, V}, student.options());
  if (N == 0 || V == 0) return grad;
  at::Tensor labels = labels_opt ? labels_opt->contiguous() : at::Tensor();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const KdArgs p = make_args(temperature, div, beta, compute_hard && lab != nullptr);
  BwdFn fn = pick_kernels().bwd;
  const float* st = stats.data_ptr<float>();
  const float* g2 = gr.data_ptr<float>();
  const bool is_float = student.scalar_type() == at::kFloat;
  at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
    std::vector<float> bs, bt, out;
    for (int64_t i = b; i < e; ++i) {
      const int64_t l = lab ? lab[i] : 0;
      const bool ignored = lab && l == ignore_index;
      float* g = is_float ? grad.data_ptr<float>() + i * V : (out.resize(V), out.data());
      if (ignored) {
        for (int64_t j = 0; j < V; ++j) g[j] = 0.f;
      } else {
        fn(row_as_float(student, i, bs), row_as_float(teacher, i, bt), V, l, p, st + i * 4, g2[i * 2],
           g2[i * 2 + 1], g);
      }
      if (!is_float) store_row(grad, i, g);
    }
  });
  return grad;
}

// Forward and the gradient of sum_i (gs * rows[i, 0] + gh * rows[i, 1]) with
// respect to the student in one visit of each row (kd_loss's eager path
// computes the gradient for grad_output = 1 and scales it in the backward).
// row_weights [N, 2], when given, holds a (gs, gh) pair per row instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_grad(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels_opt,
    double temperature, int64_t div, double beta, int64_t ignore_index, bool compute_hard, double gs, double gh,
    const std::optional<at::Tensor>& row_weights) {
  check_inputs(student, teacher, labels_opt);
  const int64_t N = student.size(0), V = student.size(1);
  at::Tensor rw;  // optional per-row (soft, hard) weights replacing gs, gh
  if (row_weights) {
    rw = row_weights->to(at::kFloat).contiguous();
    TORCH_CHECK(rw.numel() == N * 2, "kd_loss_fwd_grad: row_weights must be [N, 2], got ", row_weights->sizes());
  }
  const float* w = rw.defined() ? rw.data_ptr<float>() : nullptr;
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor rows = at::zeros({N, 2}, opts);
  at::Tensor stats = at::empty({N, 4}, opts);
  at::Tensor grad = empty_cached({N, V}, student.options());
  if (N == 0 || V == 0) return {rows, stats, grad};
  at::Tensor labels = labels_opt ? labels_opt->contiguous() : at::Tensor();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const KdArgs p = make_args(temperature, div, beta, compute_hard && lab != nullptr);
  FwdGradFn fn = pick_kernels().fwd_grad;
  float* r = rows.data_ptr<float>();
  float* st = stats.data_ptr<float>();
  const bool is_float = student.scalar_type() == at::kFloat;
  const float fgs = static_cast<float>(gs), fgh = static_cast<float>(gh);
  at::parallel_for(0, N, row_grain(V), [&](int64_t b, int64_t e) {
    std::vector<float> bs, bt, out, scratch(V);
    for (int64_t i = b; i < e; ++i) {
      const int64_t l = lab ? lab[i] : 0;
      float* g = is_float ? grad.data_ptr<float>() + i * V : (out.resize(V), out.data());
      if (lab && l == ignore_index) {  // ignored row: no terms, zero gradient
        for (int k = 0; k < 4; ++k) st[i * 4 + k] = -kInf;
        for (int64_t j = 0; j < V; ++j) g[j] = 0.f;
      } else {
        fn(row_as_float(student, i, bs), row_as_float(teacher, i, bt), V, l, p, r + i * 2, st + i * 4,
           w ? w[i * 2] : fgs, w ? w[i * 2 + 1] : fgh, g, scratch.data());
      }
      if (!is_float) store_row(grad, i, g);
    }
  });
  return {rows, stats, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("kd_loss_fwd(Tensor student, Tensor teacher, Tensor? labels, float temperature, int div, float beta, "
        "int ignore_index, bool compute_hard) -> (Tensor, Tensor)",
        &kd_loss_fwd);
  m.def("kd_loss_bwd(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, Tensor grad_rows, "
        "float temperature, int div, float beta, int ignore_index, bool compute_hard) -> Tensor",
        &kd_loss_bwd);
  m.def("kd_loss_fwd_grad(Tensor student, Tensor teacher, Tensor? labels, float temperature, int div, float beta, "
        "int ignore_index, bool compute_hard, float soft_grad, float hard_grad, Tensor? row_weights=None) "
        "-> (Tensor, Tensor, Tensor)",
        &kd_loss_fwd_grad);
}

}  // namespace kdfast
