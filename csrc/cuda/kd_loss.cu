// Fused logit distillation loss: CUDA kernels, one thread block per row.
//
// Forward: each thread streams its strided share of the row with an online
// softmax for student and teacher at once (running max per side, sums
// rescaled only when the max grows), the per-thread states are merged with
// warp shuffles and then across warps through shared memory. KL and reverse
// KL need one read of the row; JSD needs the normalised probabilities and
// reads the row a second time. Backward reads the row once and writes the
// student gradient in the student's dtype. Loads of float32 / bfloat16 /
// float16 (any mix) are template parameters, 4 columns per access when the
// rows are aligned; math is float32.
// Contract: csrc/cuda/kd_loss.cuh and kdfast/ops/kd_loss.py.
#include "cuda/float_convert.cuh"
#include "cuda/kd_loss.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kdfast {
namespace cuda {
namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr int kMaxWarps = 32;

// Centre of a side whose max is m: 0 for a fully masked side, so exp(x - c) stays 0, never NaN.
__device__ __forceinline__ float safe(float m) { return m == -kInf ? 0.f : m; }

// Online softmax state of a (part of a) row. Sums are relative to the centres
// ca = safe(ms) / T, cb = safe(mt) / T (and safe(ms) for s1):
//   sa = sum exp(a - ca), sb = sum exp(b - cb), s1 = sum exp(s - safe(ms)),
//   dot (kl) = sum eb ((b - cb) - (a - ca)), dot (reverse_kl) = sum ea ((a - ca) - (b - cb)).
struct Online {
  float ms, mt, ca, cb, sa, sb, s1, dot;
  int bad;  // NaN or +inf seen
};

__device__ __forceinline__ Online empty_state() {
  Online o;
  o.ms = o.mt = -kInf;
  o.ca = o.cb = o.sa = o.sb = o.s1 = o.dot = 0.f;
  o.bad = 0;
  return o;
}

// Add one column (s, t) to the state; rescales only when a max grows.
template <int DIV>
__device__ __forceinline__ void push(Online& o, float s, float t, float it, bool lse1) {
  o.bad |= (s != s) | (t != t) | (s == kInf) | (t == kInf);
  if (s > o.ms) {
    const float ca = s * it, d = ca - o.ca;
    const float r = o.ms == -kInf ? 1.f : expf(o.ca - ca);
    if (DIV == 0) o.dot += o.sb * d;
    if (DIV == 1) o.dot = r * (o.dot - o.sa * d);
    if (lse1) o.s1 *= o.ms == -kInf ? 1.f : expf(o.ms - s);
    o.sa *= r;
    o.ms = s;
    o.ca = ca;
  }
  if (t > o.mt) {
    const float cb = t * it, d = cb - o.cb;
    const float r = o.mt == -kInf ? 1.f : expf(o.cb - cb);
    if (DIV == 0) o.dot = r * (o.dot - o.sb * d);
    if (DIV == 1) o.dot += o.sa * d;
    o.sb *= r;
    o.mt = t;
    o.cb = cb;
  }
  const float xa = s * it - o.ca, xb = t * it - o.cb;
  const float ea = expf(xa), eb = expf(xb);
  o.sa += ea;
  o.sb += eb;
  if (lse1) o.s1 += expf(s - safe(o.ms));
  if (DIV == 0 && eb > 0.f) o.dot += eb * (xb - xa);
  if (DIV == 1 && ea > 0.f) o.dot += ea * (xa - xb);
}

// z (already centred on the merged maxima) += p re-centred.
template <int DIV>
__device__ __forceinline__ void absorb(Online& z, const Online& p) {
  const bool live_s = p.ms != -kInf, live_t = p.mt != -kInf;
  const float ra = live_s ? expf(p.ca - z.ca) : 0.f;
  const float rb = live_t ? expf(p.cb - z.cb) : 0.f;
  if (DIV == 0 && live_t) z.dot += rb * (p.dot + p.sb * ((z.ca - p.ca) - (z.cb - p.cb)));
  if (DIV == 1 && live_s) z.dot += ra * (p.dot + p.sa * ((z.cb - p.cb) - (z.ca - p.ca)));
  z.sa += ra * p.sa;
  z.sb += rb * p.sb;
  if (live_s) z.s1 += expf(p.ms - z.ms) * p.s1;
}

template <int DIV>
__device__ __forceinline__ Online merge(const Online& x, const Online& y, float it) {
  Online z = empty_state();
  z.bad = x.bad | y.bad;
  z.ms = fmaxf(x.ms, y.ms);
  z.mt = fmaxf(x.mt, y.mt);
  z.ca = safe(z.ms) * it;
  z.cb = safe(z.mt) * it;
  absorb<DIV>(z, x);
  absorb<DIV>(z, y);
  return z;
}

__device__ __forceinline__ Online shfl_xor(const Online& o, int m) {
  Online r;
  r.ms = __shfl_xor_sync(0xffffffffu, o.ms, m);
  r.mt = __shfl_xor_sync(0xffffffffu, o.mt, m);
  r.ca = __shfl_xor_sync(0xffffffffu, o.ca, m);
  r.cb = __shfl_xor_sync(0xffffffffu, o.cb, m);
  r.sa = __shfl_xor_sync(0xffffffffu, o.sa, m);
  r.sb = __shfl_xor_sync(0xffffffffu, o.sb, m);
  r.s1 = __shfl_xor_sync(0xffffffffu, o.s1, m);
  r.dot = __shfl_xor_sync(0xffffffffu, o.dot, m);
  r.bad = __shfl_xor_sync(0xffffffffu, o.bad, m);
  return r;
}

// Merged state of the whole block, returned to every thread.
template <int DIV>
__device__ Online block_merge(Online o, float it, Online* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int m = 16; m > 0; m >>= 1) o = merge<DIV>(o, shfl_xor(o, m), it);
  if (lane == 0) smem[warp] = o;
  __syncthreads();
  if (warp == 0) {
    o = lane < nwarps ? smem[lane] : empty_state();
    for (int m = 16; m > 0; m >>= 1) o = merge<DIV>(o, shfl_xor(o, m), it);
    if (lane == 0) smem[0] = o;
  }
  __syncthreads();
  return smem[0];
}

__device__ float2 block_sum2(float2 v, float2* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  for (int m = 16; m > 0; m >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, m);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, m);
  }
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : make_float2(0.f, 0.f);
    for (int m = 16; m > 0; m >>= 1) {
      v.x += __shfl_xor_sync(0xffffffffu, v.x, m);
      v.y += __shfl_xor_sync(0xffffffffu, v.y, m);
    }
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// log M = log(beta p_t + (1 - beta) p_s) from log p_s, log p_t (both -inf: NaN, guarded by callers).
__device__ __forceinline__ float log_mix(float lps, float lpt, const KdParams& p) {
  const float xs = lps + p.log_1mbeta, xt = lpt + p.log_beta;
  const float hi = fmaxf(xs, xt), lo = fminf(xs, xt);
  return hi + log1pf(expf(lo - hi));
}

// Four consecutive columns, loaded or stored as one 8- or 16-byte access.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool aligned4(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0;
}

// f(j, s_j, t_j) for the block's share of the row's columns. When both rows
// are aligned, each thread reads 4 columns per access (wide loads keep more
// bytes in flight); a scalar loop covers the tail and unaligned rows. The
// alignment test is per row, hence uniform across the block.
template <typename TS, typename TT, typename F>
__device__ __forceinline__ void for_each_col(const TS* sr, const TT* tr, int64_t V, F&& f) {
  int64_t j0 = 0;
  if (aligned4(sr) && aligned4(tr)) {
    const int64_t nv = V >> 2;
    const Pack4<TS>* s4 = reinterpret_cast<const Pack4<TS>*>(sr);
    const Pack4<TT>* t4 = reinterpret_cast<const Pack4<TT>*>(tr);
    for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
      const Pack4<TS> a = s4[k];
      const Pack4<TT> b = t4[k];
#pragma unroll
      for (int q = 0; q < 4; ++q) f(4 * k + q, to_f(a.v[q]), to_f(b.v[q]));
    }
    j0 = nv << 2;
  }
  for (int64_t j = j0 + threadIdx.x; j < V; j += blockDim.x) f(j, to_f(sr[j]), to_f(tr[j]));
}

// gr[j] = f(j, s_j, t_j) with the same wide accesses (gr aligned too).
template <typename TS, typename TT, typename F>
__device__ __forceinline__ void map_cols(const TS* sr, const TT* tr, TS* gr, int64_t V, F&& f) {
  int64_t j0 = 0;
  if (aligned4(sr) && aligned4(tr) && aligned4(gr)) {
    const int64_t nv = V >> 2;
    const Pack4<TS>* s4 = reinterpret_cast<const Pack4<TS>*>(sr);
    const Pack4<TT>* t4 = reinterpret_cast<const Pack4<TT>*>(tr);
    Pack4<TS>* g4 = reinterpret_cast<Pack4<TS>*>(gr);
    for (int64_t k = threadIdx.x; k < nv; k += blockDim.x) {
      const Pack4<TS> a = s4[k];
      const Pack4<TT> b = t4[k];
      Pack4<TS> out;
#pragma unroll
      for (int q = 0; q < 4; ++q) out.v[q] = from_f<TS>(f(4 * k + q, to_f(a.v[q]), to_f(b.v[q])));
      g4[k] = out;
    }
    j0 = nv << 2;
  }
  for (int64_t j = j0 + threadIdx.x; j < V; j += blockDim.x) gr[j] = from_f<TS>(f(j, to_f(sr[j]), to_f(tr[j])));
}

template <typename TS, typename TT, int DIV>
__global__ void __launch_bounds__(1024)
    kd_fwd_kernel(const TS* __restrict__ s, int64_t s_stride, const TT* __restrict__ t,
                              int64_t t_stride, const int64_t* __restrict__ labels, int64_t V, KdParams p,
                              float* __restrict__ rows, float* __restrict__ stats) {
  __shared__ Online smem[kMaxWarps];
  __shared__ float2 smem2[kMaxWarps];
  const int64_t row = blockIdx.x;
  int64_t label = 0;
  if (labels != nullptr) {
    label = labels[row];
    if (label == p.ignore_index) {  // uniform across the block
      if (threadIdx.x == 0) {
        rows[row * 2] = rows[row * 2 + 1] = 0.f;
        for (int k = 0; k < 4; ++k) stats[row * 4 + k] = -kInf;
      }
      return;
    }
  }
  const TS* sr = s + row * s_stride;
  const TT* tr = t + row * t_stride;
  const float it = p.inv_t;
  const bool hard = p.hard && labels != nullptr;
  const bool lse1 = hard && it != 1.f;
  Online o = empty_state();
  for_each_col(sr, tr, V, [&](int64_t, float sv, float tv) { push<DIV>(o, sv, tv, it, lse1); });
  o = block_merge<DIV>(o, it, smem);

  const bool dead_s = o.ms == -kInf, dead_t = o.mt == -kInf;
  const float lse_a = dead_s ? -kInf : o.ca + logf(o.sa);
  const float lse_b = dead_t ? -kInf : o.cb + logf(o.sb);
  const float lse_1 = !lse1 ? lse_a : dead_s ? -kInf : o.ms + logf(o.s1);
  float soft = 0.f, aux = 0.f;
  if (DIV == 0) {
    // KL(t || s) = E_pt[(b - cb) - (a - ca)] + log(sa / sb); 0 for a dead teacher, inf for a dead student.
    if (!dead_t) soft = dead_s ? kInf : o.dot / o.sb + logf(o.sa / o.sb);
  } else if (DIV == 1) {
    if (!dead_s) {
      const float e = o.dot / o.sa;
      soft = dead_t ? kInf : e + logf(o.sb / o.sa);
      aux = e + o.ca - o.cb;
    }
  } else if (!(dead_s && dead_t)) {  // uniform: o is the block's merged state
    const float la = dead_s ? kInf : lse_a, lb = dead_t ? kInf : lse_b;
    float2 kl = make_float2(0.f, 0.f);  // (KL(p_t || M), KL(p_s || M)) partial sums
    for_each_col(sr, tr, V, [&](int64_t, float sv, float tv) {
      const float lps = sv * it - la, lpt = tv * it - lb;
      const float ps = expf(lps), pt = expf(lpt);
      if (ps > 0.f || pt > 0.f) {
        const float lm = log_mix(lps, lpt, p);
        if (pt > 0.f) kl.x += pt * (lpt - lm);
        if (ps > 0.f) kl.y += ps * (lps - lm);
      }
    });
    kl = block_sum2(kl, smem2);
    soft = p.beta * kl.x + (1.f - p.beta) * kl.y;
    aux = kl.y;
  }
  if (threadIdx.x != 0) return;
  float hard_term = 0.f;
  if (hard) {
    const bool ok = label >= 0 && label < V;
    // A fully masked student puts probability 0 on the label: -log 0 = inf.
    hard_term = !ok ? __builtin_nanf("") : dead_s ? kInf : lse_1 - to_f(sr[label]);
  }
  const float nan = __builtin_nanf("");
  const bool bad = o.bad != 0;
  rows[row * 2] = bad ? nan : soft;
  rows[row * 2 + 1] = bad ? nan : hard_term;
  stats[row * 4] = bad ? nan : lse_a;
  stats[row * 4 + 1] = bad ? nan : lse_b;
  stats[row * 4 + 2] = bad ? nan : lse_1;
  stats[row * 4 + 3] = bad ? nan : aux;
}

template <typename TS, typename TT, int DIV>
__global__ void __launch_bounds__(1024)
    kd_bwd_kernel(const TS* __restrict__ s, int64_t s_stride, const TT* __restrict__ t,
                              int64_t t_stride, const int64_t* __restrict__ labels,
                              const float* __restrict__ stats, const float* __restrict__ grad_rows, int64_t V,
                              KdParams p, TS* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  TS* gr = grad + row * V;
  int64_t label = -1;
  if (labels != nullptr) {
    label = labels[row];
    if (label == p.ignore_index) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) gr[j] = from_f<TS>(0.f);
      return;
    }
  }
  const TS* sr = s + row * s_stride;
  const TT* tr = t + row * t_stride;
  const float it = p.inv_t;
  auto unmask = [](float l) { return l == -kInf ? kInf : l; };  // dead side: probabilities 0
  const float la = unmask(stats[row * 4]), lb = unmask(stats[row * 4 + 1]);
  const float l1 = unmask(stats[row * 4 + 2]), aux = stats[row * 4 + 3];
  const float gs = grad_rows[row * 2], gh = grad_rows[row * 2 + 1];
  const float cs = gs * it, w = cs * (1.f - p.beta);
  const bool hard = p.hard && labels != nullptr && gh != 0.f;
  map_cols(sr, tr, gr, V, [&](int64_t j, float sv, float tv) {
    const float a = sv * it;
    float g = 0.f;
    if (gs != 0.f) {  // exact 0 (not 0 * inf) when the soft term has no gradient
      const float lps = a - la, ps = expf(lps);
      const float b = tv * it;
      if (DIV == 0) {
        g = cs * (ps - expf(b - lb));
      } else if (DIV == 1) {
        g = ps > 0.f ? cs * ps * ((a - b) - aux) : 0.f;
      } else {
        g = ps > 0.f ? w * ps * (lps - log_mix(lps, b - lb, p) - aux) : 0.f;
      }
    }
    if (hard) g += gh * (expf(sv - l1) - (j == label ? 1.f : 0.f));
    return g;
  });
}

int threads_for(int64_t V) {
  // Enough columns per thread to hide latency, enough threads to keep loads coalesced.
  return V >= 16384 ? 1024 : V >= 4096 ? 512 : V >= 1024 ? 256 : 128;
}

template <typename TS, typename TT>
cudaError_t fwd_typed(const void* s, int64_t ss, const void* t, int64_t ts, const int64_t* labels, int64_t N,
                      int64_t V, const KdParams& p, float* rows, float* stats, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N)), block(threads_for(V));
  const TS* sp = static_cast<const TS*>(s);
  const TT* tp = static_cast<const TT*>(t);
  switch (p.div) {
    case 0: kd_fwd_kernel<TS, TT, 0><<<grid, block, 0, stream>>>(sp, ss, tp, ts, labels, V, p, rows, stats); break;
    case 1: kd_fwd_kernel<TS, TT, 1><<<grid, block, 0, stream>>>(sp, ss, tp, ts, labels, V, p, rows, stats); break;
    case 2: kd_fwd_kernel<TS, TT, 2><<<grid, block, 0, stream>>>(sp, ss, tp, ts, labels, V, p, rows, stats); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename TS, typename TT>
cudaError_t bwd_typed(const void* s, int64_t ss, const void* t, int64_t ts, const int64_t* labels,
                      const float* stats, const float* grad_rows, int64_t N, int64_t V, const KdParams& p,
                      void* grad, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(N)), block(threads_for(V));
  const TS* sp = static_cast<const TS*>(s);
  const TT* tp = static_cast<const TT*>(t);
  TS* g = static_cast<TS*>(grad);
  switch (p.div) {
    case 0: kd_bwd_kernel<TS, TT, 0><<<grid, block, 0, stream>>>(sp, ss, tp, ts, labels, stats, grad_rows, V, p, g); break;
    case 1: kd_bwd_kernel<TS, TT, 1><<<grid, block, 0, stream>>>(sp, ss, tp, ts, labels, stats, grad_rows, V, p, g); break;
    case 2: kd_bwd_kernel<TS, TT, 2><<<grid, block, 0, stream>>>(sp, ss, tp, ts, labels, stats, grad_rows, V, p, g); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Picks the teacher's load type for a fixed student type.
template <typename TS, typename F>
cudaError_t with_teacher(KdDtype tt, F&& f) {
  switch (tt) {
    case KdDtype::F32: return f(TS{}, float{});
    case KdDtype::BF16: return f(TS{}, __nv_bfloat16{});
    case KdDtype::F16: return f(TS{}, __half{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_types(KdDtype st, KdDtype tt, F&& f) {
  switch (st) {
    case KdDtype::F32: return with_teacher<float>(tt, f);
    case KdDtype::BF16: return with_teacher<__nv_bfloat16>(tt, f);
    case KdDtype::F16: return with_teacher<__half>(tt, f);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t kd_loss_fwd_launch(const void* student, KdDtype s_dtype, int64_t s_stride, const void* teacher,
                               KdDtype t_dtype, int64_t t_stride, const int64_t* labels, int64_t N, int64_t V,
                               const KdParams& p, float* rows, float* stats, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (N > 0x7fffffff || V <= 0) return cudaErrorInvalidValue;
  return with_types(s_dtype, t_dtype, [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    return fwd_typed<TS, TT>(student, s_stride, teacher, t_stride, labels, N, V, p, rows, stats, stream);
  });
}

cudaError_t kd_loss_bwd_launch(const void* student, KdDtype s_dtype, int64_t s_stride, const void* teacher,
                               KdDtype t_dtype, int64_t t_stride, const int64_t* labels, const float* stats,
                               const float* grad_rows, int64_t N, int64_t V, const KdParams& p, void* grad,
                               cudaStream_t stream) {
  if (N == 0 || V == 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  return with_types(s_dtype, t_dtype, [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    return bwd_typed<TS, TT>(student, s_stride, teacher, t_stride, labels, stats, grad_rows, N, V, p, grad,
                             stream);
  });
}

}  // namespace cuda
}  // namespace kdfast
