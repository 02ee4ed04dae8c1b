// The AVX2 + FMA copy of the prefix_attention CPU decode kernel (prefix_attention_cpu_kernel.h in
// namespace pacpu::avx2, fp32 inputs), compiled for those instructions by a target pragma whatever
// the build's baseline, and called only when cpu_isa.h's CPUID check passes. Standard and intrinsic
// headers come first, outside the pragma, so that no inline function shared with other files gets
// AVX2 code; the kernel itself uses no std containers (its scratch comes from the glue).
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define MOPS_PA_ISA avx2
#define MOPS_PA_AVX2 1
#include "prefix_attention_cpu_kernel.h"

namespace mops {
namespace pacpu {

void decode_range_avx2(const DecodeArgs<float>& a, int64_t lo, int64_t hi, const Scratch& sc) {
  for (int64_t i = lo; i < hi; ++i) avx2::decode_one(a, i / a.Hkv, i % a.Hkv, sc);
}

}  // namespace pacpu
}  // namespace mops

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86
