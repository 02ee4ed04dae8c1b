// prefix_attention CPU glue (decode, T = 1): argument checks, dtype dispatch, threads over B*Hkv.
//   prefix_attention_cpu(q [B,Hq,1,D], k, v [B,Hkv,S,D], prefix_k, prefix_v [E,P,Hkv,D] | None,
//                        prefix_index [B,kk] | None, prefix_weight [B,kk] fp32 | None,
//                        prefix_lens [E] | None, attention_mask [B,S] | None, causal, scale)
//     -> out [B, Hq, 1, D] in q's dtype
// The Python dispatcher has already validated values (index range, w >= 0, lens <= P); this layer
// re-checks shapes, dtypes and devices so a direct call cannot read out of bounds.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "ops.h"
#include "prefix_attention_cpu_kernel.h"

namespace mops {
namespace {

at::Tensor last_dim_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace

at::Tensor prefix_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const c10::optional<at::Tensor>& prefix_k,
                                const c10::optional<at::Tensor>& prefix_v,
                                const c10::optional<at::Tensor>& prefix_index,
                                const c10::optional<at::Tensor>& prefix_weight,
                                const c10::optional<at::Tensor>& prefix_lens,
                                const c10::optional<at::Tensor>& attention_mask, bool causal, double scale) {
  (void)causal;  // T = 1: the bottom-right causal rule lets the query see every cache key
  TORCH_CHECK(q_in.device().is_cpu() && k_in.device().is_cpu() && v_in.device().is_cpu(),
              "prefix_attention_cpu: q, k, v must be CPU tensors");
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, "prefix_attention_cpu: q must have shape (B, Hq, 1, D)");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(3);
  TORCH_CHECK(k_in.dim() == 4 && k_in.size(0) == B && k_in.size(3) == D,
              "prefix_attention_cpu: k must have shape (B, Hkv, S, D)");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "prefix_attention_cpu: v must have k's shape (B, Hkv, S, D)");
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_attention_cpu: Hq must be a multiple of Hkv");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "prefix_attention_cpu: k and v must have q's dtype");
  const at::Tensor q = last_dim_contig(q_in), k = last_dim_contig(k_in), v = last_dim_contig(v_in);

  const bool has_prefix = prefix_k.has_value() && prefix_index.has_value();
  at::Tensor pk, pv, idx, w, lens, mask;
  int64_t kk = 0, P = 0, E = 0;
  if (has_prefix) {
    TORCH_CHECK(prefix_v.has_value(), "prefix_attention_cpu: prefix_v is required with prefix_k");
    pk = last_dim_contig(*prefix_k);
    pv = last_dim_contig(*prefix_v);
    TORCH_CHECK(pk.dim() == 4 && pk.size(2) == Hkv && pk.size(3) == D && pv.sizes() == pk.sizes(),
                "prefix_attention_cpu: prefix_k/prefix_v must have shape (E, P, Hkv, D)");
    TORCH_CHECK(pk.scalar_type() == q.scalar_type() && pv.scalar_type() == q.scalar_type(),
                "prefix_attention_cpu: prefix_k/prefix_v must have q's dtype");
    E = pk.size(0);
    P = pk.size(1);
    idx = prefix_index->to(at::kInt).contiguous();
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B, "prefix_attention_cpu: prefix_index must have shape (B, kk)");
    kk = idx.size(1);
    if (idx.numel())
      TORCH_CHECK(idx.min().item<int>() >= -1 && idx.max().item<int>() < E,
                  "prefix_attention_cpu: prefix_index values must lie in [-1, E)");
    if (prefix_weight.has_value()) {
      w = prefix_weight->to(at::kFloat).contiguous();
      TORCH_CHECK(w.sizes() == idx.sizes(), "prefix_attention_cpu: prefix_weight must have shape (B, kk)");
    }
    if (prefix_lens.has_value()) {
      lens = prefix_lens->to(at::kInt).contiguous();
      TORCH_CHECK(lens.dim() == 1 && lens.size(0) == E, "prefix_attention_cpu: prefix_lens must have shape (E,)");
      if (E)
        TORCH_CHECK(lens.min().item<int>() >= 0 && lens.max().item<int>() <= P,
                    "prefix_attention_cpu: prefix_lens values must lie in [0, P]");
    }
  }
  if (attention_mask.has_value()) {
    mask = attention_mask->ne(0).to(at::kByte).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S,
                "prefix_attention_cpu: attention_mask must have shape (B, S)");
  }
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_attention_cpu", [&] {
    pacpu::DecodeArgs<scalar_t> a{};
    a.q = q.data_ptr<scalar_t>(); a.sqb = q.stride(0); a.sqh = q.stride(1);
    a.k = k.data_ptr<scalar_t>(); a.skb = k.stride(0); a.skh = k.stride(1); a.sks = k.stride(2);
    a.v = v.data_ptr<scalar_t>(); a.svb = v.stride(0); a.svh = v.stride(1); a.svs = v.stride(2);
    if (has_prefix) {
      a.pk = pk.data_ptr<scalar_t>(); a.spke = pk.stride(0); a.spkp = pk.stride(1); a.spkh = pk.stride(2);
      a.pv = pv.data_ptr<scalar_t>(); a.spve = pv.stride(0); a.spvp = pv.stride(1); a.spvh = pv.stride(2);
      a.idx = idx.data_ptr<int32_t>();
      a.w = w.defined() ? w.data_ptr<float>() : nullptr;
      a.lens = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
    }
    a.kk = kk;
    a.mask = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
    a.out = out.data_ptr<scalar_t>(); a.sob = out.stride(0); a.soh = out.stride(1);
    a.Hkv = Hkv; a.G = Hq / Hkv; a.S = S; a.P = P; a.D = D;
    a.scale = static_cast<float>(scale);
    at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
      pacpu::Scratch<scalar_t> sc;
      for (int64_t i = lo; i < hi; ++i) pacpu::decode_one(a, i / Hkv, i % Hkv, sc);
    });
  });
  return out;
}

}  // namespace mops
