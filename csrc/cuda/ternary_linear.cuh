// Ternary (2-bit) weight GEMV kernels for small M: raw-pointer launchers, no
// torch headers (the torch glue is ternary_linear_torch.cpp).
//
// Packed layout (kdfast/ops/ternary_quant.py): row n has KB = ceil(K / 64)
// blocks of 16 bytes; bits 2i..2i+1 of byte j of block b hold code
// (weight + 1) of k = 64 b + 16 i + j. Activations/outputs are row-major.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace kdfast {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// y[m, n] = sum_k x[m, k] * (code[n, k] - 1) * scale[n] + bias[n]; fp32 accumulation.
// x and y have dtype `dtype`; bias may be null. Any M (rows are processed 8 at a time).
cudaError_t ternary_gemv_float(const void* x, int dtype, const uint8_t* packed, const float* scale,
                               const float* bias, void* y, int64_t M, int64_t N, int64_t K,
                               cudaStream_t stream);

// Per-token int8 quantization: sx[m] = max|x[m]| / 127 (1 if 0), q = clamp(rint(x / sx), +-127),
// rowsum[m] = sum_k q[m, k]. q is [M, ldq] int8 (ldq >= K), zero for k >= K.
cudaError_t ternary_quantize_rows(const void* x, int dtype, int8_t* q, int64_t ldq, float* sx, int32_t* rowsum,
                                  int64_t M, int64_t K, cudaStream_t stream);

// W2A8: acc = sum_k q * (code - 1) exactly (dp4a, int32), y = ((acc * sx[m]) * scale[n]) + bias[n],
// written in `out_dtype`. K must be a multiple of 4 for the dp4a loads: callers pass
// q with a row stride `ldq` that is a multiple of 64 and zero padding up to it.
cudaError_t ternary_gemv_int8(const int8_t* q, int64_t ldq, const float* sx, const int32_t* rowsum,
                              const uint8_t* packed, const float* scale, const float* bias, void* y,
                              int out_dtype, int64_t M, int64_t N, int64_t K, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdfast
