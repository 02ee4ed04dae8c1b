// The CUDA launchers: plain functions over raw pointers, compiled by nvcc, with no torch header and
// nothing that throws. Every check, allocation, device guard and error report is in the g++-compiled
// glue (int4_matmul_cuda_glue.cpp, prefix_attention_cuda_glue.cpp), which reads the cudaError_t
// returned here. nvcc never sees torch's headers, and every C++ error comes from one compiler.
// (First GPU run, 2026-11-26: argument checks crashed the process instead of raising. That was the
// image's compiler wrapper, not nvcc: the g++ glue crashed the same way until the build used
// /usr/bin/g++; setup.py now probes the error path after every build.)
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "prefix_attention_cuda_args.h"
#include "prefix_attention_decode_math.h"

namespace mops {
namespace cuda_launch {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The int4 / int8 decode GEMV (int4_matmul_kernel.cuh): y [M, N] = x [M, K] @ W^T, 1 <= M <= kGemvMaxM.
constexpr int kGemvMaxM = 4;  // = int4cuda::kMaxM (static_assert in int4_matmul_cuda.cu)
// ksplit: warps sharing one group of rows, splitting its K (1, 2 or 4; int4_matmul_kernel.cuh's KS).
cudaError_t int4_gemv(DType dt, int bits, const void* x, const uint8_t* qweight, const void* scale,
                      const void* mins, void* y, int M, int N, int K, int group_size, int64_t ldx,
                      cudaStream_t stream, int ksplit = 1);

// The prefix-attention decode kernels (prefix_attention_kernel.cuh): split pass, then merge.
cudaError_t prefix_decode(DType dt, int D, const pacuda::DecodeArgs<void>& a, const pamath::Plan& plan,
                          cudaStream_t stream);

}  // namespace cuda_launch
}  // namespace mops
