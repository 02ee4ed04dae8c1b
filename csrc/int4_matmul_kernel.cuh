// int4_matmul CUDA kernel: decode GEMV y[m, n] = sum_c x[m, c] * W[n, c], M <= 16 rows of x.
// Raw pointers only (no torch headers); the glue is int4_matmul_cuda.cu.
//
//   4-bit (Q4_1): W[n, c] = q * s[n, c / G] + mn[n, c / G], q in 0..15, byte i of a row holds
//                 column 2i (low nibble) and 2i + 1 (high nibble);  G in {32, 64, 128}
//   8-bit (Q8_0): W[n, c] = q * s[n, c / 32], q int8
//
// One warp per output row n. Each lane reads 16-byte vectors of the packed row (32 columns for
// 4-bit, 16 for 8-bit; consecutive lanes read consecutive vectors, so a warp reads 512 contiguous
// bytes per step), decodes them to fp32 in registers once, and reuses them for all M rows of x:
//   acc[m] += s * sum(q * x) + mn * sum(x)        (the Q4_1 sum trick; a vector never straddles a group)
// then the warp reduces acc[m] with shuffles and lane 0 writes y[m, n] in x's dtype.
// Requires: 16-byte aligned qweight and x base pointers (rows are, since K % 32 == 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace mops {
namespace int4cuda {

constexpr int kWarpsPerBlock = 4;  // 4 output rows per 128-thread block

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// 8 consecutive activations starting at p (16- or 32-byte aligned) as fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float out[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);  // 8 x 16-bit
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(e[i]);
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float out[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

// y [M, N] (T), x [M, K] (T, row stride ldx), qw rows of K/2 (4-bit) or K (8-bit) bytes,
// scale/mins [N, K/G] fp16 (mins unused for 8-bit). M <= MAXM.
template <typename T, int BITS, int MAXM>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
int4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const __half* __restrict__ scale,
                 const __half* __restrict__ mins, T* __restrict__ y, int M, int N, int K, int G,
                 int64_t ldx) {
  constexpr int kCols = BITS == 4 ? 32 : 16;  // columns per 16-byte vector
  const int lane = threadIdx.x;
  const int64_t n = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.y;
  if (n >= N) return;
  const int ng = K / G;
  const int64_t row_bytes = BITS == 4 ? K / 2 : K;
  const uint8_t* row = qw + n * row_bytes;
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;

  for (int c = lane; c < K / kCols; c += 32) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    float q[kCols];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t b = (words[i / 4] >> (8 * (i % 4))) & 0xffu;
      if (BITS == 4) {
        q[2 * i] = (float)(b & 0x0fu);
        q[2 * i + 1] = (float)(b >> 4);
      } else {
        q[i] = (float)(int8_t)b;
      }
    }
    const int col0 = c * kCols;
    const int g = col0 / G;
    const float s = __half2float(scale[n * ng + g]);
    const float mn = BITS == 4 ? __half2float(mins[n * ng + g]) : 0.f;
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
        const T* xr = x + m * ldx + col0;
        float dot = 0.f, xs = 0.f;
#pragma unroll
        for (int j = 0; j < kCols; j += 8) {
          float xv[8];
          load8<T>(xr + j, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            dot = fmaf(q[j + i], xv[i], dot);
            xs += xv[i];
          }
        }
        acc[m] = fmaf(s, dot, acc[m]);
        if (BITS == 4) acc[m] = fmaf(mn, xs, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && m < M) y[(int64_t)m * N + n] = from_f<T>(v);
  }
}

}  // namespace int4cuda
}  // namespace mops
