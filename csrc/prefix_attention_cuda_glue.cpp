// prefix_attention CUDA glue (g++, decode, T = 1): checks, device guard, plan, allocations, stream.
//   prefix_attention_cuda(q [B,Hq,1,D], k, v [B,Hkv,S,D], prefix_k, prefix_v [E,P,Hkv,D] | None,
//                         prefix_index [B,kk] | None, prefix_weight [B,kk] | None,
//                         prefix_lens [E] | None, attention_mask [B,S] | None, causal, scale)
//     -> out [B, Hq, 1, D] in q's dtype; D in {64, 128}; fp32 / fp16 / bf16; kk <= 64.
// Index/weight/lens values are validated where they enter (the Python dispatcher); nothing here
// reads a value back, so the call is CUDA-graph capturable. The kernels are launched by
// prefix_attention_cuda.cu. Compiled only in a CUDA build (WITH_CUDA).
#ifdef WITH_CUDA
#include "cuda_glue.h"
#include "ops.h"
#include "prefix_attention_args.h"

namespace mops {

at::Tensor prefix_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const c10::optional<at::Tensor>& prefix_k,
                                 const c10::optional<at::Tensor>& prefix_v,
                                 const c10::optional<at::Tensor>& prefix_index,
                                 const c10::optional<at::Tensor>& prefix_weight,
                                 const c10::optional<at::Tensor>& prefix_lens,
                                 const c10::optional<at::Tensor>& attention_mask, bool causal, double scale) {
  (void)causal;  // T = 1: bottom-right causal sees the whole cache
  // check_values = false: the Python dispatcher validated the values; reading them here would sync.
  paargs::Inputs in = paargs::check_prefix_attention_args(
      "prefix_attention_cuda", q_in, k_in, v_in, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
      attention_mask, at::kCUDA, /*check_values=*/false);
  const int64_t B = in.B, Hq = in.Hq, S = in.S, D = in.D;
  TORCH_CHECK(D == 64 || D == 128, "prefix_attention_cuda: head dim D must be 64 or 128, got ", D);
  const cuda_launch::DType dt = launch_dtype(in.q, "prefix_attention_cuda: q");
  TORCH_CHECK(in.kk <= pamath::kMaxSlots, "prefix_attention_cuda: prefix_index may select at most ",
              pamath::kMaxSlots, " slots per request (kk), got ", in.kk);
  const c10::cuda::CUDAGuard guard(in.q.device());
  // 16-byte vector loads of K/V rows: aligned base pointers and row strides (a copy otherwise)
  const int64_t ept = 16 / in.q.element_size();
  in.k = paargs::vec16_rows(in.k, ept);
  in.v = paargs::vec16_rows(in.v, ept);
  if (in.has_prefix) {
    in.pk = paargs::vec16_rows(in.pk, ept);
    in.pv = paargs::vec16_rows(in.pv, ept);
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, in.q.device().index()));
  const pamath::Plan pl = pamath::make_plan(B, Hq, in.Hkv, S, D, in.q.element_size(), in.has_prefix, sms);
  TORCH_CHECK(pl.ok, "prefix_attention_cuda: B*Hq = ", B * Hq, " exceeds the launch grid (2^31 - 1)");
  auto f32 = in.q.options().dtype(at::kFloat);
  at::Tensor part_acc = at::empty({B * Hq, pl.n_split, D}, f32);
  at::Tensor part_m = at::empty({B * Hq, pl.n_split}, f32);
  at::Tensor part_l = at::empty({B * Hq, pl.n_split}, f32);
  at::Tensor out = at::empty({B, Hq, 1, D}, in.q.options());
  if (B == 0 || Hq == 0) return out;
  pacuda::DecodeArgs<void> a{};
  paargs::fill_common_args(a, in, out, scale);
  a.part_acc = part_acc.data_ptr<float>(); a.part_m = part_m.data_ptr<float>(); a.part_l = part_l.data_ptr<float>();
  a.Hq = Hq; a.chunk = pl.chunk; a.n_split = pl.n_split; a.n_gchunk = pl.n_gchunk;
  C10_CUDA_CHECK(cuda_launch::prefix_decode(dt, static_cast<int>(D), a, pl, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace mops
#endif  // WITH_CUDA
