// What the g++-compiled CUDA glue files (*_cuda_glue.cpp) share: torch's CUDA headers, the launchers'
// declarations, and the element type of a tensor as the launchers name it. Include only under
// WITH_CUDA.
#pragma once
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// CPU-only torch wheels (the compile check) lack this generated header; on Linux it only sets
// C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows. CUDA builds of torch have it.
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "cuda_launch.h"

namespace mops {

// `what` (e.g. "int4_matmul_cuda: x") as a launcher dtype: float32, float16 or bfloat16 (the kernels'
// 16-byte vectors have no fp64 form), else a TORCH_CHECK error naming it.
inline cuda_launch::DType launch_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda_launch::DType::kFloat32;
    case at::kHalf: return cuda_launch::DType::kFloat16;
    case at::kBFloat16: return cuda_launch::DType::kBFloat16;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

}  // namespace mops
