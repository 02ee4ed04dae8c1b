// prefix_attention CUDA glue (decode, T = 1): checks, device guard, current stream, dispatch.
//   prefix_attention_cuda(q [B,Hq,1,D], k, v [B,Hkv,S,D], prefix_k, prefix_v [E,P,Hkv,D] | None,
//                         prefix_index [B,kk] | None, prefix_weight [B,kk] | None,
//                         prefix_lens [E] | None, attention_mask [B,S] | None, causal, scale)
//     -> out [B, Hq, 1, D] in q's dtype; D in {64, 128}; fp32 / fp16 / bf16.
// Index/weight/lens values are validated by the Python dispatcher (it syncs once for that).
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
// CPU-only torch wheels (the compile check) lack this generated header; on Linux it only sets
// C10_CUDA_BUILD_SHARED_LIBS (Windows). CUDA builds of torch have it.
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "ops.h"
#include "prefix_attention_args.h"
#include "prefix_attention_kernel.cuh"

namespace mops {
namespace {

// Sequence keys per split: 256 keys keep S = 2048 at 8 splits (+1 prefix), enough blocks for
// B*Hq >= 64 on 132 SMs, while the merge reads only n_split partials per row.
constexpr int64_t kChunk = 256;

}  // namespace

at::Tensor prefix_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const c10::optional<at::Tensor>& prefix_k,
                                 const c10::optional<at::Tensor>& prefix_v,
                                 const c10::optional<at::Tensor>& prefix_index,
                                 const c10::optional<at::Tensor>& prefix_weight,
                                 const c10::optional<at::Tensor>& prefix_lens,
                                 const c10::optional<at::Tensor>& attention_mask, bool causal, double scale) {
  (void)causal;  // T = 1: bottom-right causal sees the whole cache
  // check_values = false: the Python dispatcher validated the values; reading them here would sync.
  const paargs::Inputs in = paargs::check_prefix_attention_args(
      "prefix_attention_cuda", q_in, k_in, v_in, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
      attention_mask, at::kCUDA, /*check_values=*/false);
  const int64_t B = in.B, Hq = in.Hq, S = in.S, D = in.D;
  TORCH_CHECK(D == 64 || D == 128, "prefix_attention_cuda: head dim D must be 64 or 128, got ", D);
  const c10::cuda::CUDAGuard guard(in.q.device());
  const int64_t n_split = 1 + (S + kChunk - 1) / kChunk;
  auto f32 = in.q.options().dtype(at::kFloat);
  at::Tensor part_acc = at::empty({B * Hq, n_split, D}, f32);
  at::Tensor part_m = at::empty({B * Hq, n_split}, f32);
  at::Tensor part_l = at::empty({B * Hq, n_split}, f32);
  at::Tensor out = at::empty({B, Hq, 1, D}, in.q.options());
  if (B == 0 || Hq == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "prefix_attention_cuda", [&] {
    pacuda::DecodeArgs<scalar_t> a{};
    paargs::fill_common_args(a, in, out, scale);
    a.part_acc = part_acc.data_ptr<float>(); a.part_m = part_m.data_ptr<float>(); a.part_l = part_l.data_ptr<float>();
    a.Hq = Hq; a.chunk = kChunk; a.n_split = n_split;
    const dim3 grid1(static_cast<unsigned>(n_split), static_cast<unsigned>(B * Hq));
    if (D == 64) {
      pacuda::decode_split_kernel<scalar_t, 64><<<grid1, pacuda::kWarps * 32, 0, stream>>>(a);
      pacuda::decode_reduce_kernel<scalar_t, 64><<<static_cast<unsigned>(B * Hq), 64, 0, stream>>>(a);
    } else {
      pacuda::decode_split_kernel<scalar_t, 128><<<grid1, pacuda::kWarps * 32, 0, stream>>>(a);
      pacuda::decode_reduce_kernel<scalar_t, 128><<<static_cast<unsigned>(B * Hq), 128, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace mops
