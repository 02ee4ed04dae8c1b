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

template <typename T, int BITS, int M, int KS>
void launch_m(const T* xp, const uint8_t* q, const __half* s, const __half* mn, T* yp, int N, int K, int G,
              int64_t ldx, cudaStream_t stream) {
  using namespace int4cuda;
  constexpr int rows_per_block = kWarpsPerBlock / KS * kRowsPerWarp;
  const dim3 block(32, kWarpsPerBlock);
  const dim3 grid((N + rows_per_block - 1) / rows_per_block);
  int gshift = 0;                            // log2(G / columns per 16-byte vector)
  while ((Cols<BITS>::value << gshift) < G) ++gshift;
  int4_gemv_kernel<T, BITS, M, KS><<<grid, block, 0, stream>>>(xp, q, s, mn, yp, N, K, gshift, ldx);
}

template <typename T, int BITS, int KS>
void launch(const void* x, const uint8_t* q, const void* scale, const void* mins, void* y, int M, int N, int K,
            int G, int64_t ldx, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  const __half* s = static_cast<const __half*>(scale);
  const __half* mn = static_cast<const __half*>(mins);
  T* yp = static_cast<T*>(y);
  // M is a template argument: every loop over rows of x unrolls, acc stays in registers
  switch (M) {
    case 1: launch_m<T, BITS, 1, KS>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    case 2: launch_m<T, BITS, 2, KS>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    case 3: launch_m<T, BITS, 3, KS>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    default: launch_m<T, BITS, 4, KS>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
  }
}

template <typename T, int KS>
void launch_bits(int bits, const void* x, const uint8_t* q, const void* s, const void* mn, void* y, int M, int N,
                 int K, int G, int64_t ldx, cudaStream_t stream) {
  if (bits == 4) launch<T, 4, KS>(x, q, s, mn, y, M, N, K, G, ldx, stream);
  else launch<T, 8, KS>(x, q, s, mn, y, M, N, K, G, ldx, stream);
}

template <typename T>
void launch_split(int ksplit, int bits, const void* x, const uint8_t* q, const void* s, const void* mn, void* y,
                  int M, int N, int K, int G, int64_t ldx, cudaStream_t stream) {
  switch (ksplit) {
    case 1: launch_bits<T, 1>(bits, x, q, s, mn, y, M, N, K, G, ldx, stream); break;
    case 2: launch_bits<T, 2>(bits, x, q, s, mn, y, M, N, K, G, ldx, stream); break;
    default: launch_bits<T, 4>(bits, x, q, s, mn, y, M, N, K, G, ldx, stream); break;
  }
}

}  // namespace

cudaError_t int4_gemv(DType dt, int bits, const void* x, const uint8_t* qweight, const void* scale,
                      const void* mins, void* y, int M, int N, int K, int group_size, int64_t ldx,
                      cudaStream_t stream, int ksplit) {
  if (M < 1 || M > kGemvMaxM || (bits != 4 && bits != 8) || (ksplit != 1 && ksplit != 2 && ksplit != 4))
    return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32:
      launch_split<float>(ksplit, bits, x, qweight, scale, mins, y, M, N, K, group_size, ldx, stream);
      break;
    case DType::kFloat16:
      launch_split<__half>(ksplit, bits, x, qweight, scale, mins, y, M, N, K, group_size, ldx, stream);
      break;
    case DType::kBFloat16:
      launch_split<__nv_bfloat16>(ksplit, bits, x, qweight, scale, mins, y, M, N, K, group_size, ldx, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_launch
}  // namespace mops
