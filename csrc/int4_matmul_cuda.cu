// int4_matmul CUDA glue: argument checks, device guard, current stream, dtype dispatch.
//   int4_matmul_cuda(x [M, K], qweight, scale, min, group_size, bits) -> y [M, N] in x's dtype
// The kernel (int4_matmul_kernel.cuh) is the decode GEMV: M <= int4cuda::kMaxM (4) rows of x;
// ops/int4_matmul.py sends larger M (and, on a GPU, M >= 2) to the Triton tensor-core kernel.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// CPU-only torch wheels (the compile check) lack this generated header; on Linux it only sets
// C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows. CUDA builds of torch have it.
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "int4_matmul_kernel.cuh"
#include "ops.h"

namespace mops {
namespace {

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
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& mins,
            at::Tensor& y, int M, int N, int K, int G) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const __half* s = reinterpret_cast<const __half*>(scale.data_ptr<at::Half>());
  const __half* mn = reinterpret_cast<const __half*>(mins.data_ptr<at::Half>());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const int64_t ldx = x.stride(0);
  // M is a template argument: every loop over rows of x unrolls, acc stays in registers
  switch (M) {
    case 1: launch_m<T, BITS, 1>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    case 2: launch_m<T, BITS, 2>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    case 3: launch_m<T, BITS, 3>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
    default: launch_m<T, BITS, 4>(xp, q, s, mn, yp, N, K, G, ldx, stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_bits(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                 const at::Tensor& mins, at::Tensor& y, int M, int N, int K, int G, int64_t bits) {
  if (bits == 4)
    launch<T, 4>(x, qweight, scale, mins, y, M, N, K, G);
  else
    launch<T, 8>(x, qweight, scale, mins, y, M, N, K, G);
}

}  // namespace

at::Tensor int4_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "int4_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.is_cuda() && qweight.is_cuda() && scale.is_cuda(),
              "int4_matmul_cuda: x, qweight and scale must be CUDA tensors");
  TORCH_CHECK(x.device() == qweight.device() && x.device() == scale.device(),
              "int4_matmul_cuda: x, qweight and scale must be on one device");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() &&
                  qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "int4_matmul: qweight must be a contiguous ", bits == 4 ? "uint8 [N, K/2]" : "int8 [N, K]",
              " tensor for bits=", bits);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(group_size % 32 == 0 && group_size > 0 && K % group_size == 0,
              "int4_matmul: group_size must be a multiple of 32 dividing K=", K, ", got ", group_size);
  TORCH_CHECK(bits == 4 || group_size == 32, "int4_matmul: 8-bit weights use group_size 32");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == N && scale.size(1) == K / group_size,
              "int4_matmul: scale must be contiguous float16 [N, K/G] = [", N, ", ", K / group_size, "]");
  at::Tensor mins = scale;  // 8-bit: never read
  if (bits == 4) {
    TORCH_CHECK(min.has_value(), "int4_matmul: min is required for bits=4");
    mins = *min;
    TORCH_CHECK(mins.device() == x.device() && mins.scalar_type() == at::kHalf && mins.is_contiguous() &&
                    mins.sizes() == scale.sizes(),
                "int4_matmul: min must be a contiguous float16 tensor shaped like scale [N, K/G]");
  }
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_matmul: x must have shape (M, K=", K, "), got ", x.sizes());
  TORCH_CHECK(x.size(0) <= int4cuda::kMaxM, "int4_matmul_cuda: the decode GEMV takes M <= ", int4cuda::kMaxM,
              " rows of x, got ", x.size(0));
  TORCH_CHECK(x.stride(1) == 1, "int4_matmul_cuda: x rows must be contiguous (stride(1) == 1)");
  const int64_t esize = x.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.stride(0) * esize) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "int4_matmul_cuda: x and qweight must be 16-byte aligned (rows too)");
  const at::cuda::CUDAGuard guard(x.device());
  const int M = (int)x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_bits<float>(x, qweight, scale, mins, y, M, (int)N, (int)K, (int)group_size, bits);
      break;
    case at::kHalf:
      launch_bits<__half>(x, qweight, scale, mins, y, M, (int)N, (int)K, (int)group_size, bits);
      break;
    case at::kBFloat16:
      launch_bits<__nv_bfloat16>(x, qweight, scale, mins, y, M, (int)N, (int)K, (int)group_size, bits);
      break;
    default:
      TORCH_CHECK(false, "int4_matmul_cuda: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return y;
}

}  // namespace mops
