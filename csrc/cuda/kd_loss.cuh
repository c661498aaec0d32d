// Fused logit distillation loss: CUDA kernels (raw pointers, no torch headers).
//
// Per-row contract (kdfast/ops/kd_loss.py): a = s / T, b = t / T;
// div 0 = KL(p_t || p_s), 1 = KL(p_s || p_t), 2 = JSD with weight beta on p_t.
//   forward:  rows [N, 2] float32 = (soft, hard)
//             stats [N, 4] float32 = (lse(a), lse(b), lse(s) (lse(a) without the
//             hard term), aux)   aux: kl 0, reverse_kl E_ps[a - b], jsd KL(p_s || M)
//   backward: grad [N, V] (student dtype) = grad_rows[:, 0] * d soft/ds
//                                          + grad_rows[:, 1] * d hard/ds
// Ignored rows (label == ignore_index): rows 0, stats -inf, gradient 0.
// NaN or +inf anywhere in a row: NaN rows and stats. Fully masked (-inf) sides
// have probability 0 everywhere; both sides masked gives 0, never NaN.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kdfast {
namespace cuda {

enum class KdDtype : int { F32 = 0, BF16 = 1, F16 = 2 };

struct KdParams {
  float inv_t;       // 1 / temperature
  float beta;        // JSD weight on the teacher
  float log_beta;    // log(beta), -inf for beta == 0
  float log_1mbeta;  // log(1 - beta), -inf for beta == 1
  int div;           // 0 kl, 1 reverse_kl, 2 jsd
  int64_t ignore_index;
  bool hard;  // hard (cross-entropy) term wanted; needs labels
};

// student/teacher: [N, V] with unit stride along V and row strides (elements)
// s_stride / t_stride; labels: int64 [N] or nullptr; rows: float32 [N, 2];
// stats: float32 [N, 4]. Returns the launch error (cudaSuccess if none).
cudaError_t kd_loss_fwd_launch(const void* student, KdDtype s_dtype, int64_t s_stride, const void* teacher,
                               KdDtype t_dtype, int64_t t_stride, const int64_t* labels, int64_t N, int64_t V,
                               const KdParams& p, float* rows, float* stats, cudaStream_t stream);

// grad: [N, V] contiguous, in the student's dtype; stats: float32 [N, 4] from
// the forward; grad_rows: float32 [N, 2] contiguous.
cudaError_t kd_loss_bwd_launch(const void* student, KdDtype s_dtype, int64_t s_stride, const void* teacher,
                               KdDtype t_dtype, int64_t t_stride, const int64_t* labels, const float* stats,
                               const float* grad_rows, int64_t N, int64_t V, const KdParams& p, void* grad,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
