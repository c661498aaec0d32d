// Torch glue of the CUDA kd_loss kernels (csrc/cuda/kd_loss.cu): checks,
// allocation, stream, and the ops torch.ops.kdfast_C.kd_loss_{fwd,bwd}_cuda
// with the same schemas as the CPU kernels (csrc/cpu/kd_loss.cpp).
// Compiled only in CUDA builds.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>

#include "cuda/kd_loss.cuh"

namespace kdfast {
namespace {

cuda::KdDtype kd_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::KdDtype::F32;
    case at::kBFloat16: return cuda::KdDtype::BF16;
    case at::kHalf: return cuda::KdDtype::F16;
    default: TORCH_CHECK(false, "kd_loss cuda kernel: ", name, " dtype must be float32, bfloat16 or float16, got ",
                         x.scalar_type());
  }
}

void check_inputs(const at::Tensor& s, const at::Tensor& t, const std::optional<at::Tensor>& labels) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "kd_loss cuda kernel: student and teacher must be 2-D [N, V]");
  TORCH_CHECK(s.sizes() == t.sizes(), "kd_loss cuda kernel: student ", s.sizes(), " and teacher ", t.sizes(),
              " shapes differ");
  TORCH_CHECK(s.is_cuda() && t.is_cuda(), "kd_loss cuda kernel: student and teacher must be CUDA tensors");
  TORCH_CHECK(s.device() == t.device(), "kd_loss cuda kernel: student and teacher are on different devices");
  for (const auto* x : {&s, &t}) {
    TORCH_CHECK(x->size(1) <= 1 || x->stride(1) == 1, "kd_loss cuda kernel: last dim must have stride 1");
  }
  TORCH_CHECK(s.size(0) <= std::numeric_limits<int32_t>::max(), "kd_loss cuda kernel: too many rows");
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == s.size(0),
                "kd_loss cuda kernel: labels must be int64 [N]");
    TORCH_CHECK(labels->device() == s.device(), "kd_loss cuda kernel: labels must be on the logits' device");
  }
}

cuda::KdParams make_params(double temperature, int64_t div, double beta, int64_t ignore_index, bool hard) {
  TORCH_CHECK(temperature > 0, "kd_loss cuda kernel: temperature must be > 0");
  TORCH_CHECK(div >= 0 && div <= 2, "kd_loss cuda kernel: div must be 0 (kl), 1 (reverse_kl) or 2 (jsd)");
  constexpr float inf = std::numeric_limits<float>::infinity();
  cuda::KdParams p;
  p.inv_t = static_cast<float>(1.0 / temperature);
  p.beta = static_cast<float>(beta);
  p.log_beta = beta > 0 ? static_cast<float>(std::log(beta)) : -inf;
  p.log_1mbeta = beta < 1 ? static_cast<float>(std::log1p(-beta)) : -inf;
  p.div = static_cast<int>(div);
  p.ignore_index = ignore_index;
  p.hard = hard;
  return p;
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels_opt,
                                                    double temperature, int64_t div, double beta,
                                                    int64_t ignore_index, bool compute_hard) {
  check_inputs(student, teacher, labels_opt);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  auto opts = student.options().dtype(at::kFloat);
  at::Tensor rows = at::empty({N, 2}, opts);
  at::Tensor stats = at::empty({N, 4}, opts);
  if (N == 0) return {rows, stats};
  TORCH_CHECK(V > 0, "kd_loss cuda kernel: V must be >= 1");
  at::Tensor labels = labels_opt ? labels_opt->contiguous() : at::Tensor();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const cuda::KdParams p = make_params(temperature, div, beta, ignore_index, compute_hard && lab != nullptr);
  cudaError_t err = cuda::kd_loss_fwd_launch(student.data_ptr(), kd_dtype(student, "student"), student.stride(0),
                                             teacher.data_ptr(), kd_dtype(teacher, "teacher"), teacher.stride(0),
                                             lab, N, V, p, rows.data_ptr<float>(), stats.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "kd_loss_fwd_cuda launch failed: ", cudaGetErrorString(err));
  return {rows, stats};
}

at::Tensor kd_loss_bwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels_opt, const at::Tensor& stats,
                            const at::Tensor& grad_rows, double temperature, int64_t div, double beta,
                            int64_t ignore_index, bool compute_hard) {
  check_inputs(student, teacher, labels_opt);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(stats.device() == student.device() && grad_rows.device() == student.device(),
              "kd_loss_bwd_cuda: stats and grad_rows must be on the logits' device");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == N * 4,
              "kd_loss_bwd_cuda: stats must be float32 [N, 4]");
  TORCH_CHECK(grad_rows.numel() == N * 2, "kd_loss_bwd_cuda: grad_rows must be [N, 2]");
  at::Tensor st = stats.contiguous();
  at::Tensor gr = grad_rows.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty({N, V}, student.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || V == 0) return grad;
  at::Tensor labels = labels_opt ? labels_opt->contiguous() : at::Tensor();
  const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
  const cuda::KdParams p = make_params(temperature, div, beta, ignore_index, compute_hard && lab != nullptr);
  cudaError_t err = cuda::kd_loss_bwd_launch(student.data_ptr(), kd_dtype(student, "student"), student.stride(0),
                                             teacher.data_ptr(), kd_dtype(teacher, "teacher"), teacher.stride(0),
                                             lab, st.data_ptr<float>(), gr.data_ptr<float>(), N, V, p,
                                             grad.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "kd_loss_bwd_cuda launch failed: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("kd_loss_fwd_cuda(Tensor student, Tensor teacher, Tensor? labels, float temperature, int div, "
        "float beta, int ignore_index, bool compute_hard) -> (Tensor, Tensor)",
        &kd_loss_fwd_cuda);
  m.def("kd_loss_bwd_cuda(Tensor student, Tensor teacher, Tensor? labels, Tensor stats, Tensor grad_rows, "
        "float temperature, int div, float beta, int ignore_index, bool compute_hard) -> Tensor",
        &kd_loss_bwd_cuda);
}

}  // namespace kdfast
