// Pruned attention forward on the CPU: flash-style online softmax over key
// chunks, never materialising the L x L scores.
//
// What is skipped, not multiplied by zero:
//   - padded keys: each batch row's valid key indices are listed once per
//     call (variable length); key chunks gather only those,
//   - masked blocks of a block-sparse layout (query block x key block),
//   - inactive heads (their output is written as 0),
//   - padded query rows when zero_padded_queries is set.
// The head gate multiplies the output as it is written (fused).
//
// Work is split over (batch, head, query tile) with at::parallel_for
// (OpenMP). The per-tile loop is compiled for AVX-512, AVX2 and the baseline
// ISA and picked with cpu_isa() (isa.h). Inner products are written as
// broadcast-FMA loops over 64 keys (scores) or over the head dim (P V) so
// that `omp simd` vectorises them; exp is vec_math.h's fast_exp.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/vec_math.h"

namespace kdfast {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kQT = 128;  // query rows per tile (amortises the K/V gather)
constexpr int64_t kKT = 64;   // keys per chunk
constexpr int64_t kMaxD = 256;

struct AttnTile {
  // inputs (float32, unit stride along D)
  const float* q;  // row i of (b, h): q + i * sq
  const float* k;
  const float* v;
  int64_t sq, sk, sv;  // row strides
  int64_t D;
  float scale;
  // query rows [i0, i1)
  int64_t i0, i1;
  // valid keys for this tile: chunks of key indices
  const int32_t* keys;      // list of key indices (ascending)
  const int64_t* seg_begin; // segments of `keys` to visit
  const int64_t* seg_end;
  int64_t nseg;
  // outputs: row i at out + i * so (and ung + i * so), lse + i
  float* out;
  float* ung;
  int64_t so;
  float* lse;
  float gate;
  const bool* qvalid;  // nullptr or per-row validity (zero_padded_queries)
  // The next tile's query rows (nullptr: none), prefetched while this tile computes, so
  // that reading Q (and writing the output) does not stall the next tile: these
  // per-tile memory costs do not shrink with block sparsity, the compute does.
  const float* qn;
  int64_t nqn;
};

// Prefetch part `part` of `nparts` of the next tile's query rows into L2 and of this
// tile's output rows for writing.
KDFAST_INLINE void prefetch_part(const AttnTile& t, int64_t part, int64_t nparts) {
  const int64_t row_bytes = t.D * static_cast<int64_t>(sizeof(float));
  if (t.qn) {
    const int64_t r0 = part * t.nqn / nparts, r1 = (part + 1) * t.nqn / nparts;
    for (int64_t r = r0; r < r1; ++r) {
      const char* p = reinterpret_cast<const char*>(t.qn + r * t.sq);
      for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b, 0, 2);
    }
  }
  const int64_t nq = t.i1 - t.i0;
  const int64_t r0 = part * nq / nparts, r1 = (part + 1) * nq / nparts;
  for (int64_t r = r0; r < r1; ++r) {
    const char* p = reinterpret_cast<const char*>(t.out + (t.i0 + r) * t.so);
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(p + b, 1, 2);
  }
}

// 16 floats as one value: GCC keeps these in registers and lowers them to
// zmm (AVX-512), ymm pairs (AVX2) or xmm quads (baseline) per function target.
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf16u __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kRB = 4;  // query rows per register block

KDFAST_INLINE vf16 ld(const float* p) { return *reinterpret_cast<const vf16u*>(p); }
KDFAST_INLINE void st(float* p, vf16 x) { *reinterpret_cast<vf16u*>(p) = x; }

struct Scratch {
  std::vector<float> qt, acc, vb, st, zero, m, l, alpha;
  int64_t Dp = 0;
  void ensure(int64_t D) {
    Dp = (D + 15) / 16 * 16;
    qt.assign(D * kQT, 0.f);
    acc.assign(kQT * Dp, 0.f);
    vb.assign(kKT * Dp, 0.f);
    st.assign(kKT * kQT, 0.f);
    zero.assign(Dp, 0.f);
    m.assign(kQT, 0.f);
    l.assign(kQT, 0.f);
    alpha.assign(kQT, 0.f);
  }
};

// Scores of 4 keys (rows k0..k3, unit stride) against NRV*16 query rows of
// qt ([D][kQT], query-major lanes): 4*NRV vector accumulators, written to
// st[j][r] (key-major), so the softmax below runs down columns with vector ops.
template <int NRV>
KDFAST_INLINE void scores_block(const float* qt, const float* const* kr, int64_t D, float* out) {
  vf16 a[4][NRV];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
    for (int x = 0; x < NRV; ++x) a[j][x] = vf16{};
  const float *k0 = kr[0], *k1 = kr[1], *k2 = kr[2], *k3 = kr[3];
  for (int64_t d = 0; d < D; ++d) {
    const float* qd = qt + d * kQT;
    vf16 qv[NRV];
#pragma GCC unroll 4
    for (int x = 0; x < NRV; ++x) qv[x] = ld(qd + 16 * x);
    const float c0 = k0[d], c1 = k1[d], c2 = k2[d], c3 = k3[d];
#pragma GCC unroll 4
    for (int x = 0; x < NRV; ++x) {
      a[0][x] += c0 * qv[x];
      a[1][x] += c1 * qv[x];
      a[2][x] += c2 * qv[x];
      a[3][x] += c3 * qv[x];
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
#pragma GCC unroll 4
    for (int x = 0; x < NRV; ++x) st(out + j * kQT + 16 * x, a[j][x]);
}

// acc[kRB rows][NV*16 cols at c] = alpha * acc + P V, with P read from st[j][r]: 4*NV accumulators.
template <int NV>
KDFAST_INLINE void pv_block(float* acc, int64_t Dp, int64_t c, const float* alpha, const float* pt,
                            const float* const* vr, int64_t n) {
  vf16 a[kRB][NV];
#pragma GCC unroll 4
  for (int r = 0; r < kRB; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) a[r][x] = ld(acc + r * Dp + c + 16 * x) * alpha[r];
  for (int64_t j = 0; j < n; ++j) {
    vf16 vv[NV];
    const float* v = vr[j] + c;
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) vv[x] = ld(v + 16 * x);
    const float* p = pt + j * kQT;
#pragma GCC unroll 4
    for (int r = 0; r < kRB; ++r) {
      const float pr = p[r];
#pragma GCC unroll 4
      for (int x = 0; x < NV; ++x) a[r][x] += pr * vv[x];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kRB; ++r)
#pragma GCC unroll 4
    for (int x = 0; x < NV; ++x) st(acc + r * Dp + c + 16 * x, a[r][x]);
}

KDFAST_INLINE void tile_kernel(const AttnTile& t, Scratch& w) {
  const int64_t D = t.D, Dp = w.Dp, nq = t.i1 - t.i0;
  const int64_t nqp = (nq + 15) / 16 * 16;  // rows rounded to whole vectors
  float* qt = w.qt.data();
  float* acc = w.acc.data();
  float* vb = w.vb.data();
  float* stt = w.st.data();
  float* m = w.m.data();
  float* l = w.l.data();
  float* alpha = w.alpha.data();
  // Q tile transposed to [D][kQT] and pre-scaled; rows past nq are zero.
  for (int64_t r = 0; r < nqp; ++r) {
    if (r < nq) {
      const float* src = t.q + (t.i0 + r) * t.sq;
      for (int64_t d = 0; d < D; ++d) qt[d * kQT + r] = src[d] * t.scale;
    } else {
      for (int64_t d = 0; d < D; ++d) qt[d * kQT + r] = 0.f;
    }
    float* a = acc + r * Dp;
    for (int64_t d = 0; d < Dp; ++d) a[d] = 0.f;
    m[r] = kNegInf;
    l[r] = 0.f;
  }
  const bool direct_v = D % 16 == 0;  // V rows can be read in place (no padding needed)
  const float* kr[kKT + 4];
  const float* vr[kKT];
  int64_t nchunks = 0, chunk = 0;
  for (int64_t sg = 0; sg < t.nseg; ++sg) nchunks += (t.seg_end[sg] - t.seg_begin[sg] + kKT - 1) / kKT;
  for (int64_t sg = 0; sg < t.nseg; ++sg) {
    for (int64_t c0 = t.seg_begin[sg]; c0 < t.seg_end[sg]; c0 += kKT) {
      prefetch_part(t, chunk++, nchunks);
      const int64_t n = std::min<int64_t>(kKT, t.seg_end[sg] - c0);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t key = t.keys[c0 + j];
        kr[j] = t.k + key * t.sk;
        if (direct_v) {
          vr[j] = t.v + key * t.sv;
        } else {
          std::memcpy(vb + j * Dp, t.v + key * t.sv, D * sizeof(float));
          vr[j] = vb + j * Dp;
        }
      }
      const int64_t n4 = (n + 3) / 4 * 4;
      for (int64_t j = n; j < n4; ++j) kr[j] = w.zero.data();
      for (int64_t j0 = 0; j0 < n4; j0 += 4) {
        int64_t r0 = 0;
        for (; r0 + 64 <= nqp; r0 += 64) scores_block<4>(qt + r0, kr + j0, D, stt + j0 * kQT + r0);
        switch ((nqp - r0) / 16) {
          case 3: scores_block<3>(qt + r0, kr + j0, D, stt + j0 * kQT + r0); break;
          case 2: scores_block<2>(qt + r0, kr + j0, D, stt + j0 * kQT + r0); break;
          case 1: scores_block<1>(qt + r0, kr + j0, D, stt + j0 * kQT + r0); break;
          default: break;
        }
      }
      // Online softmax, vectorised across query rows (key-major scores).
      float mx[kQT];
#pragma omp simd
      for (int64_t r = 0; r < nqp; ++r) mx[r] = m[r];
      for (int64_t j = 0; j < n; ++j) {
        const float* sj = stt + j * kQT;
#pragma omp simd
        for (int64_t r = 0; r < nqp; ++r) mx[r] = sj[r] > mx[r] ? sj[r] : mx[r];
      }
#pragma omp simd
      for (int64_t r = 0; r < nqp; ++r) {
        alpha[r] = m[r] == kNegInf ? 0.f : fast_exp(m[r] - mx[r]);
        l[r] *= alpha[r];
        m[r] = mx[r];
      }
      for (int64_t j = 0; j < n; ++j) {
        float* sj = stt + j * kQT;
#pragma omp simd
        for (int64_t r = 0; r < nqp; ++r) {
          const float p = fast_exp(sj[r] - mx[r]);
          sj[r] = p;
          l[r] += p;
        }
      }
      for (int64_t r0 = 0; r0 < nqp; r0 += kRB) {
        int64_t c = 0;
        for (; c + 64 <= Dp; c += 64) pv_block<4>(acc + r0 * Dp, Dp, c, alpha + r0, stt + r0, vr, n);
        switch ((Dp - c) / 16) {
          case 3: pv_block<3>(acc + r0 * Dp, Dp, c, alpha + r0, stt + r0, vr, n); break;
          case 2: pv_block<2>(acc + r0 * Dp, Dp, c, alpha + r0, stt + r0, vr, n); break;
          case 1: pv_block<1>(acc + r0 * Dp, Dp, c, alpha + r0, stt + r0, vr, n); break;
          default: break;
        }
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t i = t.i0 + r;
    float* o = t.out + i * t.so;
    const bool dead = l[r] == 0.f || (t.qvalid && !t.qvalid[i]);
    const float inv = dead ? 0.f : 1.f / l[r];
    const float* a = acc + r * Dp;
    const float g = inv * t.gate;
    for (int64_t d = 0; d < D; ++d) o[d] = a[d] * g;
    if (t.ung) {
      float* u = t.ung + i * t.so;
      for (int64_t d = 0; d < D; ++d) u[d] = a[d] * inv;
    }
    t.lse[i] = dead ? kNegInf : m[r] + std::log(l[r]);
  }
}

using TileFn = void (*)(const AttnTile&, Scratch&);
void tile_baseline(const AttnTile& t, Scratch& w) { tile_kernel(t, w); }
#if KDFAST_HAVE_X86_PATHS
KDFAST_TARGET_AVX2 void tile_avx2(const AttnTile& t, Scratch& w) { tile_kernel(t, w); }
KDFAST_TARGET_AVX512 void tile_avx512(const AttnTile& t, Scratch& w) { tile_kernel(t, w); }
#endif

TileFn pick_tile() {
#if KDFAST_HAVE_X86_PATHS
  switch (cpu_isa()) {
    case Isa::AVX512:
    case Isa::AVX512_VNNI: return tile_avx512;
    case Isa::AVX2: return tile_avx2;
    default: break;
  }
#endif
  return tile_baseline;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& head_gates, const std::optional<at::Tensor>& active,
    const std::optional<at::Tensor>& block_mask, int64_t block_size, double scale, bool zero_padded_queries,
    bool keep_ungated) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "attention kernel: q, k, v must be 4-D");
  TORCH_CHECK(q_in.device().is_cpu(), "attention cpu kernel: tensors must be on the CPU");
  const int64_t B = q_in.size(0), H = q_in.size(1), Lq = q_in.size(2), D = q_in.size(3), Lk = k_in.size(2);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == H && k_in.size(3) == D && v_in.sizes() == k_in.sizes(),
              "attention kernel: k and v must be [B, H, Lk, D] like q");
  TORCH_CHECK(D <= kMaxD, "attention kernel: head dim ", D, " > ", kMaxD);
  TORCH_CHECK(block_size >= 1, "attention kernel: block_size must be >= 1");
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "attention kernel: dtype must be float32, bfloat16 or float16, got ", dtype);
  auto as_f32 = [](const at::Tensor& x) {
    at::Tensor y = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    return y.stride(3) == 1 ? y : y.contiguous();
  };
  at::Tensor q = as_f32(q_in), k = as_f32(k_in), v = as_f32(v_in);
  auto fopts = q_in.options().dtype(at::kFloat);
  // Outputs are [B, Lq, H, D] buffers returned as [B, H, Lq, D] views (HF transposes them back for free).
  at::Tensor out32 = at::empty({B, Lq, H, D}, fopts);
  at::Tensor ung32 = keep_ungated ? at::empty({B, Lq, H, D}, fopts) : at::Tensor();
  at::Tensor lse = at::empty({B, H, Lq}, fopts);

  // Valid keys per batch row, and where each key block starts in that list.
  at::Tensor mask_c;
  const bool* mk = nullptr;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == Lk,
                "attention kernel: mask must be bool [B, Lk]");
    mask_c = mask->contiguous();
    mk = mask_c.data_ptr<bool>();
  }
  const bool sparse = block_mask.has_value();
  const int64_t bs = sparse ? block_size : std::max<int64_t>(Lk, 1);
  const int64_t nkb = (Lk + bs - 1) / bs;
  std::vector<int32_t> keys(B * Lk);
  std::vector<int64_t> kb_ptr(B * (nkb + 1));
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      kb_ptr[b * (nkb + 1) + kb] = b * Lk + n;
      for (int64_t j = kb * bs; j < std::min(Lk, (kb + 1) * bs); ++j)
        if (!mk || mk[b * Lk + j]) keys[b * Lk + n++] = static_cast<int32_t>(j);
    }
    kb_ptr[b * (nkb + 1) + nkb] = b * Lk + n;
  }

  at::Tensor bm_c;
  const bool* bmp = nullptr;
  int64_t bm_sb = 0, bm_sh = 0, nqb_bm = 0;
  if (sparse) {
    const auto& bm = *block_mask;
    TORCH_CHECK(bm.scalar_type() == at::kBool && bm.dim() == 4, "attention kernel: block_mask must be 4-D bool");
    TORCH_CHECK((bm.size(0) == 1 || bm.size(0) == B) && (bm.size(1) == 1 || bm.size(1) == H) &&
                    bm.size(2) == (Lq + block_size - 1) / block_size && bm.size(3) == nkb,
                "attention kernel: block_mask must be [1|B, 1|H, ceil(Lq/bs), ceil(Lk/bs)]");
    bm_c = bm.contiguous();
    bmp = bm_c.data_ptr<bool>();
    nqb_bm = bm.size(2);
    bm_sh = bm.size(1) == 1 ? 0 : nqb_bm * nkb;
    bm_sb = bm.size(0) == 1 ? 0 : bm.size(1) * nqb_bm * nkb;
  }
  at::Tensor gates_c;
  const float* gp = nullptr;
  int64_t g_sb = 0;
  if (head_gates) {
    gates_c = head_gates->to(at::kFloat).contiguous();
    TORCH_CHECK(gates_c.numel() == H || gates_c.numel() == B * H, "attention kernel: head_gates must be [H] or [B, H]");
    gp = gates_c.data_ptr<float>();
    g_sb = gates_c.numel() == H ? 0 : H;
  }
  at::Tensor act_c;
  const bool* ap = nullptr;
  if (active) {
    act_c = active->to(at::kBool).contiguous();
    TORCH_CHECK(act_c.numel() == H, "attention kernel: active heads must be a bool [H] mask");
    ap = act_c.data_ptr<bool>();
  }
  const bool* qvalid_all = (zero_padded_queries && mk) ? mk : nullptr;
  TORCH_CHECK(!qvalid_all || Lq == Lk, "attention kernel: zero_padded_queries needs Lq == Lk");

  // Query tiles never cross a block boundary.
  const int64_t qbs = sparse ? block_size : std::max<int64_t>(Lq, 1);
  const int64_t nqb = (Lq + qbs - 1) / qbs;
  const int64_t tiles_per_block = (std::min(qbs, Lq) + kQT - 1) / kQT;
  const int64_t ntiles = nqb * tiles_per_block;
  TileFn fn = pick_tile();
  float* o32 = out32.data_ptr<float>();
  float* u32 = keep_ungated ? ung32.data_ptr<float>() : nullptr;
  float* lp = lse.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t so = H * D;

  at::parallel_for(0, B * H * ntiles, 1, [&](int64_t t0, int64_t t1) {
    Scratch w;
    w.ensure(D);
    std::vector<int64_t> sb(nkb), se(nkb);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t tile = task % ntiles, bh = task / ntiles, h = bh % H, b = bh / H;
      const int64_t qb = tile / tiles_per_block;
      const int64_t i0 = qb * qbs + (tile % tiles_per_block) * kQT;
      const int64_t i1 = std::min({i0 + kQT, (qb + 1) * qbs, Lq});
      if (i0 >= i1) continue;
      float* orow = o32 + b * Lq * so + h * D;
      float* urow = u32 ? u32 + b * Lq * so + h * D : nullptr;
      float* lrow = lp + (b * H + h) * Lq;
      const bool* qv = qvalid_all ? qvalid_all + b * Lk : nullptr;
      bool any_q = !qv;
      for (int64_t i = i0; i < i1 && !any_q; ++i) any_q = qv[i];
      int64_t nseg = 0;
      const int64_t* ptr = kb_ptr.data() + b * (nkb + 1);
      if (!(ap && !ap[h]) && any_q) {
        for (int64_t kb = 0; kb < nkb; ++kb) {
          if (bmp && !bmp[b * bm_sb + h * bm_sh + qb * nkb + kb]) continue;
          if (ptr[kb + 1] == ptr[kb]) continue;
          if (nseg > 0 && se[nseg - 1] == ptr[kb]) {  // merge adjacent kept blocks into one segment
            se[nseg - 1] = ptr[kb + 1];
          } else {
            sb[nseg] = ptr[kb];
            se[nseg] = ptr[kb + 1];
            ++nseg;
          }
        }
      }
      if (nseg == 0) {  // inactive head, all-padded rows or no key block kept: zeros, nothing computed
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t d = 0; d < D; ++d) orow[i * so + d] = 0.f;
          if (urow) for (int64_t d = 0; d < D; ++d) urow[i * so + d] = 0.f;
          lrow[i] = kNegInf;
        }
        continue;
      }
      AttnTile t;
      t.q = qp + b * q.stride(0) + h * q.stride(1);
      t.k = kp + b * k.stride(0) + h * k.stride(1);
      t.v = vp + b * v.stride(0) + h * v.stride(1);
      t.sq = q.stride(2);
      t.sk = k.stride(2);
      t.sv = v.stride(2);
      t.D = D;
      t.scale = static_cast<float>(scale);
      t.i0 = i0;
      t.i1 = i1;
      t.keys = keys.data();
      t.seg_begin = sb.data();
      t.seg_end = se.data();
      t.nseg = nseg;
      t.out = orow;
      t.ung = urow;
      t.so = so;
      t.lse = lrow;
      t.gate = gp ? gp[b * g_sb + h] : 1.f;
      t.qvalid = qv;
      t.qn = nullptr;
      t.nqn = 0;
      if (task + 1 < t1) {  // the next task's query rows (same tiling arithmetic)
        const int64_t tile2 = (task + 1) % ntiles, bh2 = (task + 1) / ntiles;
        const int64_t qb2 = tile2 / tiles_per_block;
        const int64_t j0 = qb2 * qbs + (tile2 % tiles_per_block) * kQT;
        const int64_t j1 = std::min({j0 + kQT, (qb2 + 1) * qbs, Lq});
        if (j0 < j1) {
          t.qn = qp + (bh2 / H) * q.stride(0) + (bh2 % H) * q.stride(1) + j0 * q.stride(2);
          t.nqn = j1 - j0;
        }
      }
      fn(t, w);
    }
  });
  at::Tensor out = dtype == at::kFloat ? out32 : out32.to(dtype);
  at::Tensor ung = keep_ungated ? (dtype == at::kFloat ? ung32 : ung32.to(dtype)) : at::empty({0}, q_in.options());
  return {out.transpose(1, 2), lse, keep_ungated ? ung.transpose(1, 2) : ung};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? head_gates, Tensor? active, "
        "Tensor? block_mask, int block_size, float scale, bool zero_padded_queries, bool keep_ungated) "
        "-> (Tensor, Tensor, Tensor)",
        &attention_fwd);
}

}  // namespace kdfast
