// The AVX-512 VNNI copy of the int4_matmul CPU kernels (int4_matmul_cpu_kernel.h in namespace
// int4cpu::vnni): the avx512 copy's code plus the integer 1-token kernel (MOPS_INT4_VNNI there),
// compiled for AVX2 + FMA + F16C + AVX-512 F/BW/VL/VNNI by a target pragma whatever the build's
// baseline, and called only when the avx2 copy is the active one (cpu_isa.h) and CPUID reports
// those AVX-512 subsets (has_avx512_vnni). Standard and intrinsic headers come first, outside the pragma.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#endif

#define MOPS_INT4_ISA vnni
#define MOPS_INT4_AVX2 1
#define MOPS_INT4_AVX512 1
#define MOPS_INT4_VNNI 1
#include "int4_matmul_cpu_kernel.h"

namespace mops {
namespace int4cpu {

bool vnni_prepare_x(const float* x, int8_t* xd, float* lane_scale, float* xsum, int64_t K, int64_t G) {
  return vnni::vnni_prepare_x(x, xd, lane_scale, xsum, K, G);
}

void q4_chunk_vnni(const int8_t* xd, const float* lane_scale, const float* x, const float* xsum, const uint8_t* q,
                   const uint16_t* s, const uint16_t* mn, float* y, int64_t N, int64_t K, int64_t G, int64_t b,
                   int64_t e) {
  vnni::q4_chunk_vnni(xd, lane_scale, x, xsum, q, s, mn, y, N, K, G, b, e);
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
bool has_avx512();  // int4_matmul_cpu_avx512.cpp: AVX-512 F, BW and VL
bool has_avx512_vnni() {  // outside the pragma: runs on any x86 CPU
  static const bool yes = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return yes;
}
}  // namespace int4cpu
}  // namespace mops

#endif  // x86
