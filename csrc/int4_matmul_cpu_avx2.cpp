// The AVX2 + FMA + F16C copy of the int4_matmul CPU kernels (int4_matmul_cpu_kernel.h in namespace
// int4cpu::avx2), compiled for those instructions by a target pragma whatever the build's baseline,
// and called only when cpu_isa.h's CPUID check passes. Standard and intrinsic headers come first,
// outside the pragma, so that no inline function shared with other files gets AVX2 code.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define MOPS_INT4_ISA avx2
#define MOPS_INT4_AVX2 1
#include "int4_matmul_cpu_kernel.h"

namespace mops {
namespace int4cpu {

void q4_chunk_avx2(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s,
                   const uint16_t* mn, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                   int64_t pass, int64_t b, int64_t e, int64_t K128) {
  avx2::q4_chunk(xp, xsum, q, s, mn, y, M, N, K, G, pass, b, e, K128);
}

int64_t wide_columns_avx2(int64_t K, int64_t G, bool allow) { return avx2::wide_columns(K, G, allow); }

void q8_chunk_avx2(const float* xp, const int8_t* q, const uint16_t* s, float* y, int64_t M,
                   int64_t N, int64_t K, int64_t G, int64_t pass, int64_t b, int64_t e) {
  avx2::q8_chunk(xp, q, s, y, M, N, K, G, pass, b, e);
}

}  // namespace int4cpu
}  // namespace mops

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // x86
