// int4_matmul CUDA launcher (nvcc): the decode GEMV of int4_matmul_kernel.cuh for M <= 4 rows of x.
// No torch header and nothing that throws: the checks, the allocation and the error report are in
// int4_matmul_cuda_glue.cpp (g++), see cuda_launch.h for why.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_launch.h"
#include "int4_matmul_kernel.cuh"

namespace mops {
namespace cuda_launch {
namespace {

static_assert(kGemvMaxM == int4cuda::kMaxM, "cuda_launch.h's kGemvMaxM must equal the kernel's kMaxM");

template <typename T, int BITS, int M>
void launch_m(const T* xp, const uint8_t* q, const __half* s, const __half* mn, T* yp, int N, int K, int G,
              int64_t ldx, cudaStream_t stream) {
  using namespace int4cuda;
  constexpr int rows_per_block = kWarpsPerBlock * kRowsPerWarp;
  const dim3 block(32, kWarpsPerBlock);
  const dim3 grid((N + rows_per_block - 1) / rows_per_block);
  int gshift = 0;                            // log2(G / columns per 16-byte vector)
  while ((Cols<BITS>::value << gshift) < G) ++gshift;
  int4_gemv_kernel<T, BITS, M><<<grid, block, 0, stream>>>(xp, q, s, mn, yp, N, K, gshift, ldx);
}

template <typename T, int BITS>
void launch(const void* x, const uint8_t* q, const void* scale, const void* mins, void* y, int M, int N, int K,
            int G, int64_t ldx, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const __half* s = static_cast<const __half*>(scale);
  const __half* mn = static_cast<const __half*>(mins);
  T* yp = static_cast<T*>(y);
  // M is a template argument: every loop over rows of x unrolls, acc stays in registers
  switch (M) {
    case 1: launch_m<T, BITS, 1>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    case 2: launch_m<T, BITS, 2>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    case 3: launch_m<T, BITS, 3>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    default: launch_m<T, BITS, 4>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
  }
}

template <typename T>
void launch_bits(int bits, const void* x, const uint8_t* q, const void* s, const void* mn, void* y, int M, int N,
                 int K, int G, int64_t ldx, cudaStream_t stream) {
  if (bits == 4) launch<T, 4>(x, q, s, mn, y, M, N, K, G, ldx, stream);
  else launch<T, 8>(x, q, s, mn, y, M, N, K, G, ldx, stream);
}

}  // namespace

cudaError_t int4_gemv(DType dt, int bits, const void* x, const uint8_t* qweight, const void* scale,
                      const void* mins, void* y, int M, int N, int K, int group_size, int64_t ldx,
                      cudaStream_t stream) {
  if (M < 1 || M > kGemvMaxM || (bits != 4 && bits != 8)) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32: launch_bits<float>(bits, x, qweight, scale, mins, y, M, N, K, group_size, ldx, stream); break;
    case DType::kFloat16: launch_bits<__half>(bits, x, qweight, scale, mins, y, M, N, K, group_size, ldx, stream); break;
    case DType::kBFloat16:
      launch_bits<__nv_bfloat16>(bits, x, qweight, scale, mins, y, M, N, K, group_size, ldx, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_launch
}  // namespace mops
