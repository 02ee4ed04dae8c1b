// Declarations of the glue functions that bindings.cpp exposes (torch types only here).
#pragma once
#include <torch/extension.h>

#include "cpu_isa.h"   // cpu_isa / _pretend_cpu: the CPU kernels' instruction set

namespace mops {

// ---- CPU ------------------------------------------------------------------------------------
at::Tensor int4_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits);
// The decode step's norm / MLP activation / residual folded into the matmul's call (inference only):
// pre = 0: y = x @ W^T; pre = 1: y = (x * rsqrt(mean(x^2) + eps) * norm_weight) @ W^T;
// pre = 2: y = (silu(x[:, :K]) * x[:, K:]) @ W^T; then y += residual when given. next_*: the weight
// the step multiplies next, read ahead by a helper thread while the caller goes on (cpu_pool.h).
at::Tensor int4_matmul_cpu_pre(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits,
                               int64_t pre, const c10::optional<at::Tensor>& norm_weight, double eps,
                               const c10::optional<at::Tensor>& residual,
                               const c10::optional<at::Tensor>& next_qweight,
                               const c10::optional<at::Tensor>& next_scale,
                               const c10::optional<at::Tensor>& next_min);
at::Tensor int4_matmul_backward_cpu(const at::Tensor& dy, const at::Tensor& qweight,
                                    const at::Tensor& scale, const c10::optional<at::Tensor>& min,
                                    int64_t group_size, int64_t bits);

at::Tensor prefix_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& prefix_k,
                                const c10::optional<at::Tensor>& prefix_v,
                                const c10::optional<at::Tensor>& prefix_index,
                                const c10::optional<at::Tensor>& prefix_weight,
                                const c10::optional<at::Tensor>& prefix_lens,
                                const c10::optional<at::Tensor>& attention_mask, bool causal, double scale);
// The CPU decode step's rotary + cache write + prefix attention in one call (decode_step_cpu.cpp)
at::Tensor decode_attention_cpu(const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin_s,
                                const at::Tensor& K, const at::Tensor& V, const at::Tensor& pos,
                                const c10::optional<at::Tensor>& prefix_k,
                                const c10::optional<at::Tensor>& prefix_v,
                                const c10::optional<at::Tensor>& prefix_index,
                                const c10::optional<at::Tensor>& prefix_weight,
                                const c10::optional<at::Tensor>& prefix_lens, const at::Tensor& mask,
                                int64_t S, int64_t Hq, double scale);
// The CUDA decode kernel's decomposition on the host (tests; prefix_attention_cuda_emulate.cpp)
at::Tensor prefix_attention_cuda_emulate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const c10::optional<at::Tensor>& prefix_k,
                                         const c10::optional<at::Tensor>& prefix_v,
                                         const c10::optional<at::Tensor>& prefix_index,
                                         const c10::optional<at::Tensor>& prefix_weight,
                                         const c10::optional<at::Tensor>& prefix_lens,
                                         const c10::optional<at::Tensor>& attention_mask, bool causal,
                                         double scale, int64_t num_sms);
pybind11::dict prefix_attention_cuda_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t elt,
                                          bool has_prefix, int64_t num_sms);

#ifdef WITH_CUDA
// ---- CUDA -----------------------------------------------------------------------------------
at::Tensor prefix_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& prefix_k,
                                 const c10::optional<at::Tensor>& prefix_v,
                                 const c10::optional<at::Tensor>& prefix_index,
                                 const c10::optional<at::Tensor>& prefix_weight,
                                 const c10::optional<at::Tensor>& prefix_lens,
                                 const c10::optional<at::Tensor>& attention_mask, bool causal, double scale);
at::Tensor int4_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits,
                            int64_t ksplit = 1);
#endif

}  // namespace mops
