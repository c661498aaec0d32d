// Torch glue of the ternary CUDA GEMV (csrc/cuda/ternary_linear.cu): argument
// checks, allocation, stream, dtype codes. Registers kdfast_C::ternary_linear_cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "cuda/ternary_linear.cuh"

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kdfast::cuda::kFloat32;
    case at::kHalf: return kdfast::cuda::kFloat16;
    case at::kBFloat16: return kdfast::cuda::kBFloat16;
    default: TORCH_CHECK(false, "ternary_linear_cuda: x must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

// x [M, K] fp32/fp16/bf16 CUDA; packed uint8 [N, 16 * ceil(K / 64)]; scale float32 [N];
// bias float32 [N] or None; act_bits 0 (float) or 8 (W2A8). Returns [M, N] in x's dtype.
at::Tensor ternary_linear_cuda(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scale_in,
                               const std::optional<at::Tensor>& bias_in, int64_t K, int64_t act_bits) {
  TORCH_CHECK(x_in.is_cuda() && packed_in.is_cuda() && scale_in.is_cuda(),
              "ternary_linear_cuda: x, packed and scale must be CUDA tensors");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "ternary_linear_cuda: x must be [M, ", K, "], got ",
              x_in.sizes());
  const int64_t KB = (K + 63) / 64;
  TORCH_CHECK(packed_in.scalar_type() == at::kByte && packed_in.dim() == 2 && packed_in.size(1) == KB * 16,
              "ternary_linear_cuda: packed must be uint8 [N, ", KB * 16, "], got ", packed_in.scalar_type(), " ",
              packed_in.sizes());
  const int64_t M = x_in.size(0), N = packed_in.size(0);
  TORCH_CHECK(scale_in.scalar_type() == at::kFloat && scale_in.numel() == N,
              "ternary_linear_cuda: scale must be float32 [", N, "]");
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "ternary_linear_cuda: act_bits must be 0 or 8, got ", act_bits);
  c10::cuda::CUDAGuard guard(x_in.device());
  const int dt = dtype_code(x_in.scalar_type());
  at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous(), scale = scale_in.contiguous();
  at::Tensor bias;
  if (bias_in) {
    TORCH_CHECK(bias_in->is_cuda() && bias_in->scalar_type() == at::kFloat && bias_in->numel() == N,
                "ternary_linear_cuda: bias must be a float32 CUDA tensor [", N, "]");
    bias = bias_in->contiguous();
  }
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (act_bits == 0) {
    err = kdfast::cuda::ternary_gemv_float(x.data_ptr(), dt, packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), bp,
                                           y.data_ptr(), M, N, K, stream);
  } else {
    const int64_t ldq = KB * 64;
    at::Tensor q = at::empty({M, ldq}, x.options().dtype(at::kChar));
    at::Tensor sx = at::empty({M}, x.options().dtype(at::kFloat));
    at::Tensor rs = at::empty({M}, x.options().dtype(at::kInt));
    err = kdfast::cuda::ternary_quantize_rows(x.data_ptr(), dt, q.data_ptr<int8_t>(), ldq, sx.data_ptr<float>(),
                                              rs.data_ptr<int32_t>(), M, K, stream);
    if (err == cudaSuccess)
      err = kdfast::cuda::ternary_gemv_int8(q.data_ptr<int8_t>(), ldq, sx.data_ptr<float>(), rs.data_ptr<int32_t>(),
                                            packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), bp, y.data_ptr(),
                                            dt, M, N, K, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "ternary_linear_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast_C, m) {
  m.def("ternary_linear_cuda(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features, int act_bits) "
        "-> Tensor",
        &ternary_linear_cuda);
}
