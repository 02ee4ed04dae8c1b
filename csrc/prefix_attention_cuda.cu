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
#include "prefix_attention_kernel.cuh"

namespace mops {
namespace {

at::Tensor last_dim_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

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
  TORCH_CHECK(q_in.is_cuda() && k_in.is_cuda() && v_in.is_cuda(),
              "prefix_attention_cuda: q, k, v must be CUDA tensors");
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, "prefix_attention_cuda: q must have shape (B, Hq, 1, D)");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(3);
  TORCH_CHECK(D == 64 || D == 128, "prefix_attention_cuda: head dim D must be 64 or 128, got ", D);
  TORCH_CHECK(k_in.dim() == 4 && k_in.size(0) == B && k_in.size(3) == D,
              "prefix_attention_cuda: k must have shape (B, Hkv, S, D)");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "prefix_attention_cuda: v must have k's shape (B, Hkv, S, D)");
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "prefix_attention_cuda: Hq must be a multiple of Hkv");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "prefix_attention_cuda: k and v must have q's dtype");
  TORCH_CHECK(k_in.device() == q_in.device() && v_in.device() == q_in.device(),
              "prefix_attention_cuda: k and v must be on q's device");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contig(q_in), k = last_dim_contig(k_in), v = last_dim_contig(v_in);

  const bool has_prefix = prefix_k.has_value() && prefix_index.has_value();
  at::Tensor pk, pv, idx, w, lens, mask;
  int64_t kk = 0, P = 0;
  if (has_prefix) {
    TORCH_CHECK(prefix_v.has_value(), "prefix_attention_cuda: prefix_v is required with prefix_k");
    pk = last_dim_contig(*prefix_k);
    pv = last_dim_contig(*prefix_v);
    TORCH_CHECK(pk.dim() == 4 && pk.size(2) == Hkv && pk.size(3) == D && pv.sizes() == pk.sizes(),
                "prefix_attention_cuda: prefix_k/prefix_v must have shape (E, P, Hkv, D)");
    TORCH_CHECK(pk.scalar_type() == q.scalar_type() && pv.scalar_type() == q.scalar_type() &&
                    pk.device() == q.device() && pv.device() == q.device(),
                "prefix_attention_cuda: prefix_k/prefix_v must have q's dtype and device");
    P = pk.size(1);
    idx = prefix_index->to(q.device(), at::kInt).contiguous();
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == B, "prefix_attention_cuda: prefix_index must have shape (B, kk)");
    kk = idx.size(1);
    if (prefix_weight.has_value()) {
      w = prefix_weight->to(q.device(), at::kFloat).contiguous();
      TORCH_CHECK(w.sizes() == idx.sizes(), "prefix_attention_cuda: prefix_weight must have shape (B, kk)");
    }
    if (prefix_lens.has_value()) {
      lens = prefix_lens->to(q.device(), at::kInt).contiguous();
      TORCH_CHECK(lens.dim() == 1 && lens.size(0) == pk.size(0),
                  "prefix_attention_cuda: prefix_lens must have shape (E,)");
    }
  }
  if (attention_mask.has_value()) {
    mask = attention_mask->to(q.device()).ne(0).to(at::kByte).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == S,
                "prefix_attention_cuda: attention_mask must have shape (B, S)");
  }
  const int64_t n_split = 1 + (S + kChunk - 1) / kChunk;
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_acc = at::empty({B * Hq, n_split, D}, f32);
  at::Tensor part_m = at::empty({B * Hq, n_split}, f32);
  at::Tensor part_l = at::empty({B * Hq, n_split}, f32);
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "prefix_attention_cuda", [&] {
    pacuda::DecodeArgs<scalar_t> a{};
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
    a.part_acc = part_acc.data_ptr<float>(); a.part_m = part_m.data_ptr<float>(); a.part_l = part_l.data_ptr<float>();
    a.out = out.data_ptr<scalar_t>(); a.sob = out.stride(0); a.soh = out.stride(1);
    a.Hq = Hq; a.Hkv = Hkv; a.S = S; a.P = P; a.chunk = kChunk; a.n_split = n_split;
    a.scale = static_cast<float>(scale);
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
