// prefix_attention CPU glue (decode, T = 1): argument checks, dtype / ISA dispatch, threads over
// B*Hkv on the int4 kernels' helper pool (cpu_pool.h: no OpenMP region between two GEMVs of a
// decode step), only when there is enough work to share (a batch-1 call is a few us).
//   prefix_attention_cpu(q [B,Hq,1,D], k, v [B,Hkv,S,D], prefix_k, prefix_v [E,P,Hkv,D] | None,
//                        prefix_index [B,kk] | None, prefix_weight [B,kk] fp32 | None,
//                        prefix_lens [E] | None, attention_mask [B,S] | None, causal, scale)
//     -> out [B, Hq, 1, D] in q's dtype
// The Python dispatcher has already validated values (index range, w >= 0, lens <= P); this layer
// re-checks shapes, dtypes, devices and the index / lens ranges (prefix_attention_args.h) so a
// direct call cannot read out of bounds.
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#define MOPS_PA_ISA base
#include "cpu_isa.h"
#include "cpu_pool.h"
#include "ops.h"
#include "prefix_attention_args.h"
#include "prefix_attention_cpu_kernel.h"

namespace mops {
namespace pacpu {
// prefix_attention_cpu_avx2.cpp (x86 only: never called elsewhere, cpu_isa says base there)
void decode_range_avx2(const DecodeArgs<float>& a, int64_t lo, int64_t hi, const Scratch& sc);
}  // namespace pacpu

namespace {

// The avx2 copy takes fp32 only (other dtypes: false, the caller runs the base copy).
template <typename T>
bool run_avx2(const pacpu::DecodeArgs<T>&, int64_t, int64_t, const pacpu::Scratch&) { return false; }
template <>
bool run_avx2<float>(const pacpu::DecodeArgs<float>& a, int64_t lo, int64_t hi, const pacpu::Scratch& sc) {
#if defined(__x86_64__) || defined(__i386__)
  pacpu::decode_range_avx2(a, lo, hi, sc);
  return true;
#else
  (void)a; (void)lo; (void)hi; (void)sc;
  return false;
#endif
}
// Every (b, kv head) of a filled DecodeArgs: the avx2 copy for fp32 when the CPU runs it, on the
// helper pool when there is enough work.
template <typename T>
void run_decode(const pacpu::DecodeArgs<T>& a, int64_t B) {
  const int64_t Hkv = a.Hkv, D = a.D;
  const bool avx2 = std::is_same<T, float>::value && isa::avx2_compiled() && isa::active() == isa::kAvx2;
  const int64_t mk = pacpu::max_keys(a);
  const int64_t item = std::max<int64_t>(1, 2 * a.G * mk * D);  // multiply-adds of one (b, kv head)
  const int64_t grain = std::max<int64_t>(1, cpupool::kMinParallelWork / item);
  auto run = [&](int64_t lo, int64_t hi) {
    thread_local std::vector<float> f;
    thread_local std::vector<const void*> rows;
    f.resize(pacpu::scratch_floats(a));
    rows.resize(2 * mk);
    const pacpu::Scratch sc{f.data(), f.data() + a.G * D, f.data() + a.G * D + a.G * mk,
                            f.data() + 2 * a.G * D + a.G * mk, rows.data(), rows.data() + mk};
    if (avx2 && run_avx2(a, lo, hi, sc)) return;
    for (int64_t i = lo; i < hi; ++i) pacpu::base::decode_one(a, i / Hkv, i % Hkv, sc);
  };
  cpupool::parallel_chunks(B * Hkv, grain, B * Hkv * item, run);
}
}  // namespace

void prefix_attention_decode_cpu(const pacpu::DecodeArgs<float>& a, int64_t B) { run_decode(a, B); }

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
    run_decode(a, B);
  });
  return out;
}

}  // namespace mops
