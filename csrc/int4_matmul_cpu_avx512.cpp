// The AVX-512 copy of the int4_matmul CPU kernels (int4_matmul_cpu_kernel.h in namespace
// int4cpu::avx512): the avx2 copy's code plus the 128-column "wide" layout of the 4-bit kernels,
// compiled for AVX2 + FMA + F16C + AVX-512 F/BW/VL by a target pragma whatever the build's baseline,
// and called only when the avx2 copy is the active one (cpu_isa.h) and CPUID reports the three
// AVX-512 subsets (has_avx512). Standard and intrinsic headers come first, outside the pragma.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#endif

#define MOPS_INT4_ISA avx512
#define MOPS_INT4_AVX2 1
#define MOPS_INT4_AVX512 1
#include "int4_matmul_cpu_kernel.h"

namespace mops {
namespace int4cpu {

void q4_chunk_avx512(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s,
                     const uint16_t* mn, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                     int64_t pass, int64_t b, int64_t e, int64_t K128) {
  avx512::q4_chunk(xp, xsum, q, s, mn, y, M, N, K, G, pass, b, e, K128);
}

int64_t wide_columns_avx512(int64_t K, int64_t G, bool allow) { return avx512::wide_columns(K, G, allow); }

void gemm_pack_x_avx512(const float* x, float* xt, int64_t M, int64_t K) { avx512::gemm_pack_x(x, xt, M, K); }

void panel_chunk_avx512(const float* x, const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y,
                        int64_t M, int64_t N, int64_t K, int64_t G, int bits, int64_t b, int64_t e, float* w) {
  avx512::panel_chunk(x, q, s, mn, y, M, N, K, G, bits, b, e, w);
}

void gemm_chunk_avx512(const float* xt, const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y,
                       int64_t M, int64_t N, int64_t K, int64_t G, int bits, int64_t b, int64_t e, float* w) {
  avx512::gemm_chunk(xt, q, s, mn, y, M, N, K, G, bits, b, e, w);
}

}  // namespace int4cpu
}  // namespace mops

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mops {
namespace int4cpu {
bool has_avx512() {  // outside the pragma: runs on any x86 CPU
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
}
}  // namespace int4cpu
}  // namespace mops

#endif  // x86
