// int4_matmul CUDA glue (g++): argument checks, device guard, current stream, dtype, error report.
//   int4_matmul_cuda(x [M, K], qweight, scale, min, group_size, bits) -> y [M, N] in x's dtype
// The kernel (int4_matmul_kernel.cuh, launched by int4_matmul_cuda.cu) is the decode GEMV: M <= 4
// rows of x; ops/int4_matmul.py sends larger M (and, on a GPU, M >= 2) to the Triton tensor-core
// kernel. Compiled only in a CUDA build (WITH_CUDA).
#ifdef WITH_CUDA
#include "cuda_glue.h"
#include "ops.h"

namespace mops {

at::Tensor int4_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits,
                            int64_t ksplit) {
  TORCH_CHECK(bits == 4 || bits == 8, "int4_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(ksplit == 1 || ksplit == 2 || ksplit == 4,
              "int4_matmul_cuda: ksplit (warps splitting one row group's K) must be 1, 2 or 4, got ", ksplit);
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
  TORCH_CHECK(x.size(0) <= cuda_launch::kGemvMaxM, "int4_matmul_cuda: the decode GEMV takes M <= ",
              cuda_launch::kGemvMaxM, " rows of x, got ", x.size(0));
  TORCH_CHECK(x.stride(1) == 1, "int4_matmul_cuda: x rows must be contiguous (stride(1) == 1)");
  const int64_t esize = x.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && (x.stride(0) * esize) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "int4_matmul_cuda: x and qweight must be 16-byte aligned (rows too)");
  const cuda_launch::DType dt = launch_dtype(x, "int4_matmul_cuda: x");
  const at::cuda::CUDAGuard guard(x.device());
  const int M = static_cast<int>(x.size(0));
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  C10_CUDA_CHECK(cuda_launch::int4_gemv(dt, static_cast<int>(bits), x.data_ptr(),
                                        static_cast<const uint8_t*>(qweight.data_ptr()), scale.data_ptr(),
                                        mins.data_ptr(), y.data_ptr(), M, static_cast<int>(N),
                                        static_cast<int>(K), static_cast<int>(group_size), x.stride(0),
                                        c10::cuda::getCurrentCUDAStream(), static_cast<int>(ksplit)));
  return y;
}

}  // namespace mops
#endif  // WITH_CUDA
