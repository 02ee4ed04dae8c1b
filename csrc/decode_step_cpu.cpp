// The CPU decode step's attention block in one call (mops_kernels/serving/decode.py): for each row
// b < n, the rotary embedding of its new token's q and k heads (the position's cos and sign-folded
// sin rows: x * cos + flip_halves(x) * sin_s, as the Python step computes it, product by product),
// k and v written into the cache at column pos[b], then prefix attention of q over cache columns
// [0, S) (prefix_attention_cpu's kernel and threads, its arguments read in place: the cache and
// its int64 mask with their strides, no views or converted copies).
//   decode_attention_cpu(y [n, (Hq + 2 Hkv) * D] fp32 (q, k, v heads of the fused projection),
//                        cos, sin_s [n, D] fp32, K, V [B, Hkv, L, D] fp32 contiguous (the cache,
//                        written in place), pos [n] int64 (each < L), prefix_k, prefix_v,
//                        prefix_index, prefix_weight, prefix_lens (as prefix_attention_cpu),
//                        mask [B, L] (the cache's valid columns), S, Hq, scale) -> o [n, Hq * D]
// One call replaces ~10 aten ops per layer of the Python step (rotation, two index writes, views).
#include <torch/extension.h>

#include <cstring>

#define MOPS_PA_ISA base
#include "ops.h"
#include "prefix_attention_args.h"
#include "prefix_attention_cpu_kernel.h"

namespace mops {
// prefix_attention_cpu.cpp: every (b, kv head) of filled arguments, on its ISA and threads
void prefix_attention_decode_cpu(const pacpu::DecodeArgs<float>& a, int64_t B);

namespace {

// dst[d] = x[d] * c[d] + x[(d + D/2) % D] * s[d]: two rounded products, then their rounded sum (no
// fused multiply-add), so the result equals the aten expression bit for bit.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rotate_row(const float* x, const float* c, const float* s, float* dst, int64_t D) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t h = D / 2;
  for (int64_t d = 0; d < D; ++d) {
    const float a = x[d] * c[d];
    const float b = x[d < h ? d + h : d - h] * s[d];
    dst[d] = a + b;
  }
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin_s,
                                const at::Tensor& K, const at::Tensor& V, const at::Tensor& pos,
                                const c10::optional<at::Tensor>& prefix_k,
                                const c10::optional<at::Tensor>& prefix_v,
                                const c10::optional<at::Tensor>& prefix_index,
                                const c10::optional<at::Tensor>& prefix_weight,
                                const c10::optional<at::Tensor>& prefix_lens, const at::Tensor& mask,
                                int64_t S, int64_t Hq, double scale) {
  const char* op = "decode_attention_cpu";
  TORCH_CHECK(K.device().is_cpu() && K.scalar_type() == at::kFloat && K.dim() == 4 && K.is_contiguous() &&
                  V.sizes() == K.sizes() && V.scalar_type() == at::kFloat && V.is_contiguous() && V.device().is_cpu(),
              op, ": K and V must be contiguous float32 CPU caches of one shape (B, Hkv, L, D)");
  const int64_t B = K.size(0), Hkv = K.size(1), L = K.size(2), D = K.size(3);
  TORCH_CHECK(D % 2 == 0 && Hkv > 0 && Hq > 0 && Hq % Hkv == 0, op, ": need an even D and Hq a multiple of Hkv");
  const int64_t W = (Hq + 2 * Hkv) * D;
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 && y.is_contiguous() &&
                  y.size(1) == W && y.size(0) <= B,
              op, ": y must be a contiguous float32 CPU tensor (n <= ", B, ", ", W, "), got ", y.sizes());
  const int64_t n = y.size(0);
  for (const at::Tensor* t : {&cos, &sin_s})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * D,
                op, ": cos and sin_s must be contiguous float32 CPU tensors of n x D = ", n, " x ", D, " values");
  TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == n,
              op, ": pos must be a contiguous int64 CPU tensor of n = ", n, " values");
  TORCH_CHECK(S >= 1 && S <= L, op, ": S must lie in [1, L = ", L, "], got ", S);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L, op, ": mask must have shape (B, L)");
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] < S, op, ": pos[", b, "] = ", p[b], " must lie in [0, S = ", S, ")");

  at::Tensor q = at::empty({n, Hq, 1, D}, y.options());
  // Every check before the cache is written: the prefix arguments as prefix_attention_cpu checks
  // them. q, the full caches (their strides; S bounds the columns) and the int64 mask go in as are.
  paargs::Inputs in;
  in.B = n; in.Hq = Hq; in.Hkv = Hkv; in.D = D; in.S = S;
  in.q = q; in.k = K; in.v = V;
  paargs::check_prefix_pool(op, in, at::kFloat, y.device(), prefix_k, prefix_v, prefix_index, prefix_weight,
                            prefix_lens, /*check_values=*/true);
  TORCH_CHECK(mask.device().is_cpu(), op, ": mask must be a CPU tensor");
  const at::Tensor m = mask.scalar_type() == at::kLong && mask.stride(1) == 1 ? mask : mask.ne(0).to(at::kLong);
  const float* yp = y.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin_s.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = K.data_ptr<float>();
  float* vp = V.data_ptr<float>();
  for (int64_t b = 0; b < n; ++b) {
    const float* yr = yp + b * W;
    for (int64_t h = 0; h < Hq; ++h) rotate_row(yr + h * D, cp + b * D, sp + b * D, qp + (b * Hq + h) * D, D);
    for (int64_t j = 0; j < Hkv; ++j) {
      const int64_t at_pos = ((b * Hkv + j) * L + p[b]) * D;
      rotate_row(yr + (Hq + j) * D, cp + b * D, sp + b * D, kp + at_pos, D);
      std::memcpy(vp + at_pos, yr + (Hq + Hkv + j) * D, sizeof(float) * D);
    }
  }
  at::Tensor out = at::empty({n, Hq, 1, D}, y.options());
  pacpu::DecodeArgs<float> a{};
  paargs::fill_common_args(a, in, out, scale);
  a.G = Hq / Hkv; a.D = D;
  a.mask64 = m.data_ptr<int64_t>(); a.smb = m.stride(0);
  prefix_attention_decode_cpu(a, n);
  return out.view({n, Hq * D});
}

}  // namespace mops
