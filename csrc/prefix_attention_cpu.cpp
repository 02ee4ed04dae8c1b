// prefix_attention CPU glue (decode, T = 1): argument checks, dtype dispatch, threads over B*Hkv.
//   prefix_attention_cpu(q [B,Hq,1,D], k, v [B,Hkv,S,D], prefix_k, prefix_v [E,P,Hkv,D] | None,
//                        prefix_index [B,kk] | None, prefix_weight [B,kk] fp32 | None,
//                        prefix_lens [E] | None, attention_mask [B,S] | None, causal, scale)
//     -> out [B, Hq, 1, D] in q's dtype
// The Python dispatcher has already validated values (index range, w >= 0, lens <= P); this layer
// re-checks shapes, dtypes, devices and the index / lens ranges (prefix_attention_args.h) so a
// direct call cannot read out of bounds.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ops.h"
#include "prefix_attention_args.h"
#include "prefix_attention_cpu_kernel.h"

namespace mops {

at::Tensor prefix_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const c10::optional<at::Tensor>& prefix_k,
                                const c10::optional<at::Tensor>& prefix_v,
                                const c10::optional<at::Tensor>& prefix_index,
                                const c10::optional<at::Tensor>& prefix_weight,
                                const c10::optional<at::Tensor>& prefix_lens,
                                const c10::optional<at::Tensor>& attention_mask, bool causal, double scale) {
  (void)causal;  // T = 1: the bottom-right causal rule lets the query see every cache key
  // check_values: a direct call must not read out of bounds, so the index / lens values are re-checked.
  const paargs::Inputs in = paargs::check_prefix_attention_args(
      "prefix_attention_cpu", q_in, k_in, v_in, prefix_k, prefix_v, prefix_index, prefix_weight, prefix_lens,
      attention_mask, at::kCPU, /*check_values=*/true);
  const int64_t B = in.B, Hq = in.Hq, Hkv = in.Hkv, D = in.D;
  at::Tensor out = at::empty({B, Hq, 1, D}, in.q.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.q.scalar_type(), "prefix_attention_cpu", [&] {
    pacpu::DecodeArgs<scalar_t> a{};
    paargs::fill_common_args(a, in, out, scale);
    a.G = Hq / Hkv; a.D = D;
    at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
      pacpu::Scratch<scalar_t> sc;
      for (int64_t i = lo; i < hi; ++i) pacpu::decode_one(a, i / Hkv, i % Hkv, sc);
    });
  });
  return out;
}

}  // namespace mops
