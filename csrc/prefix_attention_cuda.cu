// prefix_attention CUDA launcher (nvcc): the decode split pass and merge of
// prefix_attention_kernel.cuh. No torch header and nothing that throws: the checks, the plan, the
// allocations and the error report are in prefix_attention_cuda_glue.cpp (g++), see cuda_launch.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

#include "cuda_launch.h"
#include "prefix_attention_kernel.cuh"

namespace mops {
namespace cuda_launch {
namespace {

template <typename T, int D>
void launch(const pacuda::DecodeArgs<T>& a, const pamath::Plan& pl, cudaStream_t stream) {
  const dim3 grid1(static_cast<unsigned>(pl.grid1_x), static_cast<unsigned>(pl.grid1_y));
  switch (pl.gt) {
    case 1: pacuda::decode_split_kernel<T, D, 1><<<grid1, pamath::kThreads, 0, stream>>>(a); break;
    case 2: pacuda::decode_split_kernel<T, D, 2><<<grid1, pamath::kThreads, 0, stream>>>(a); break;
    case 4: pacuda::decode_split_kernel<T, D, 4><<<grid1, pamath::kThreads, 0, stream>>>(a); break;
    default: pacuda::decode_split_kernel<T, D, 8><<<grid1, pamath::kThreads, 0, stream>>>(a); break;
  }
  pacuda::decode_merge_kernel<T, D><<<static_cast<unsigned>(pl.grid2_x), D, 0, stream>>>(a);
}

template <typename T>
void launch_typed(int D, const pacuda::DecodeArgs<void>& raw, const pamath::Plan& pl, cudaStream_t stream) {
  static_assert(sizeof(pacuda::DecodeArgs<T>) == sizeof(pacuda::DecodeArgs<void>) &&
                    std::is_trivially_copyable<pacuda::DecodeArgs<T>>::value,
                "DecodeArgs<T> must have DecodeArgs<void>'s layout");
  pacuda::DecodeArgs<T> a;
  std::memcpy(&a, &raw, sizeof(a));  // the same fields: pointers, int64_t, float
  if (D == 64) launch<T, 64>(a, pl, stream);
  else launch<T, 128>(a, pl, stream);
}

}  // namespace

cudaError_t prefix_decode(DType dt, int D, const pacuda::DecodeArgs<void>& a, const pamath::Plan& plan,
                          cudaStream_t stream) {
  if (D != 64 && D != 128) return cudaErrorInvalidValue;
  switch (dt) {
    case DType::kFloat32: launch_typed<float>(D, a, plan, stream); break;
    case DType::kFloat16: launch_typed<__half>(D, a, plan, stream); break;
    case DType::kBFloat16: launch_typed<__nv_bfloat16>(D, a, plan, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_launch
}  // namespace mops
