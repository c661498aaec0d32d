// Ternary GEMV on NVIDIA GPUs (see ternary_linear.cuh for the layout and contracts).
//
// One warp per output feature n: lane l streams 16-byte weight blocks
// l, l + 32, ... of row n (one 128-bit load = 64 weights), unpacks them in
// registers and applies them to up to 8 input rows; a warp shuffle reduces.
// Float path: fp32 FMA. W2A8 path: a 32-bit word of a block shifted right by
// 2i and masked with 0x03030303 is 4 codes of 4 consecutive k, exactly the
// operand of __dp4a against 4 int8 activations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/float_convert.cuh"
#include "cuda/ternary_linear.cuh"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kWarps = 4;  // output features per 128-thread block
constexpr int kRows = 8;   // input rows per program

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void gemv_float_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                  const float* __restrict__ scale, const float* __restrict__ bias,
                                  T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;
  const int64_t KB = (K + 63) / 64;
  const int rows = static_cast<int>(M - m0 < kRows ? M - m0 : kRows);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  const uint4* wrow = reinterpret_cast<const uint4*>(packed + n * KB * 16);
  for (int64_t b = lane; b < KB; b += 32) {
    const uint4 blk = __ldg(wrow + b);
    const uint32_t words[4] = {blk.x, blk.y, blk.z, blk.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int64_t k = b * 64 + 16 * i + j;
        const float w = static_cast<float>(static_cast<int>((words[j >> 2] >> (8 * (j & 3) + 2 * i)) & 3u) - 1);
        if (k < K) {
#pragma unroll
          for (int r = 0; r < kRows; ++r)
            if (r < rows) acc[r] = fmaf(w, to_f<T>(x[(m0 + r) * K + k]), acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0 && r < rows) {
      float v = s * scale[n];
      if (bias) v += bias[n];
      y[(m0 + r) * N + n] = from_f<T>(v);
    }
  }
}

template <typename T>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, int64_t ldq,
                                     float* __restrict__ sx, int32_t* __restrict__ rowsum, int64_t K) {
  __shared__ float smax[32];
  __shared__ int ssum[32];
  const int64_t m = blockIdx.x;
  const T* xr = x + m * K;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(to_f<T>(xr[k])));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) smax[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? smax[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) smax[0] = v;
  }
  __syncthreads();
  float s = __fdiv_rn(smax[0], 127.f);  // exact IEEE division even under --use_fast_math
  if (s == 0.f) s = 1.f;
  int sum = 0;
  for (int64_t k = threadIdx.x; k < ldq; k += blockDim.x) {
    int qi = 0;  // zero padding for k >= K
    if (k < K) {
      float r = rintf(__fdiv_rn(to_f<T>(xr[k]), s));
      qi = static_cast<int>(fminf(fmaxf(r, -127.f), 127.f));
    }
    q[m * ldq + k] = static_cast<int8_t>(qi);
    sum += qi;
  }
  sum = warp_sum(sum);
  if ((threadIdx.x & 31) == 0) ssum[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int t = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) t += ssum[w];
    rowsum[m] = t;
    sx[m] = s;
  }
}

template <typename T>
__global__ void gemv_int8_kernel(const int8_t* __restrict__ q, int64_t ldq, const float* __restrict__ sx,
                                 const int32_t* __restrict__ rowsum, const uint8_t* __restrict__ packed,
                                 const float* __restrict__ scale, const float* __restrict__ bias,
                                 T* __restrict__ y, int64_t M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= N) return;
  const int64_t KB = (K + 63) / 64;
  const int rows = static_cast<int>(M - m0 < kRows ? M - m0 : kRows);
  int acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0;
  const uint4* wrow = reinterpret_cast<const uint4*>(packed + n * KB * 16);
  for (int64_t b = lane; b < KB; b += 32) {
    const uint4 blk = __ldg(wrow + b);
    const uint32_t words[4] = {blk.x, blk.y, blk.z, blk.w};
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r < rows) {
        // ldq is a multiple of 64 with zero padding: 64 activations of block b, 16 words.
        const int* xw = reinterpret_cast<const int*>(q + (m0 + r) * ldq + b * 64);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            acc[r] = __dp4a(static_cast<int>((words[j] >> (2 * i)) & 0x03030303u), xw[4 * i + j], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int s = warp_sum(acc[r]);
    if (lane == 0 && r < rows) {
      const int v = s - rowsum[m0 + r];  // sum (code - 1) * q
      float out = __fmul_rn(__fmul_rn(static_cast<float>(v), sx[m0 + r]), scale[n]);
      if (bias) out = __fadd_rn(out, bias[n]);
      y[(m0 + r) * N + n] = from_f<T>(out);
    }
  }
}

dim3 gemv_grid(int64_t M, int64_t N) {
  return dim3(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>((M + kRows - 1) / kRows));
}

}  // namespace

cudaError_t ternary_gemv_float(const void* x, int dtype, const uint8_t* packed, const float* scale,
                               const float* bias, void* y, int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid = gemv_grid(M, N), block(32 * kWarps);
  switch (dtype) {
    case kFloat32:
      gemv_float_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(x), packed, scale, bias,
                                                           static_cast<float*>(y), M, N, K);
      break;
    case kFloat16:
      gemv_float_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(x), packed, scale, bias,
                                                            static_cast<__half*>(y), M, N, K);
      break;
    case kBFloat16:
      gemv_float_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), packed, scale, bias, static_cast<__nv_bfloat16*>(y), M, N, K);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t ternary_quantize_rows(const void* x, int dtype, int8_t* q, int64_t ldq, float* sx, int32_t* rowsum,
                                  int64_t M, int64_t K, cudaStream_t stream) {
  if (ldq < K) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(M)), block(256);
  switch (dtype) {
    case kFloat32:
      quantize_rows_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(x), q, ldq, sx, rowsum, K);
      break;
    case kFloat16:
      quantize_rows_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(x), q, ldq, sx, rowsum, K);
      break;
    case kBFloat16:
      quantize_rows_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), q,
                                                                       ldq, sx, rowsum, K);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t ternary_gemv_int8(const int8_t* q, int64_t ldq, const float* sx, const int32_t* rowsum,
                              const uint8_t* packed, const float* scale, const float* bias, void* y, int out_dtype,
                              int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (ldq % 64 != 0 || ldq < K) return cudaErrorInvalidValue;
  const dim3 grid = gemv_grid(M, N), block(32 * kWarps);
  switch (out_dtype) {
    case kFloat32:
      gemv_int8_kernel<float><<<grid, block, 0, stream>>>(q, ldq, sx, rowsum, packed, scale, bias,
                                                          static_cast<float*>(y), M, N, K);
      break;
    case kFloat16:
      gemv_int8_kernel<__half><<<grid, block, 0, stream>>>(q, ldq, sx, rowsum, packed, scale, bias,
                                                           static_cast<__half*>(y), M, N, K);
      break;
    case kBFloat16:
      gemv_int8_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(q, ldq, sx, rowsum, packed, scale, bias,
                                                                  static_cast<__nv_bfloat16*>(y), M, N, K);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kdfast
