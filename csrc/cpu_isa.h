// Which CPU instruction set the C++ kernels run (raw C++, no torch headers).
//
// The extension is built for the baseline ISA of the compiler's target (x86-64: SSE2), so a wheel
// built on one machine runs on any other; the AVX2 + FMA + F16C kernels are compiled separately
// (target pragmas, int4_matmul_cpu_avx2.cpp) and chosen here at run time by CPUID, falling back to
// the baseline copy when the CPU lacks any of the three. MOPS_NATIVE=1 at build time compiles
// everything with -march=native instead (the baseline copy then uses the build machine's ISA).
//
//   active()            the ISA the kernels use now: kAvx2 or kBase
//   request(name)       "auto" (CPUID), "base" (force the scalar kernels) or "avx2" (refused with
//                       an exception when the CPU lacks it); returns the active ISA's name
//   pretend_cpu(flag)   tests only: -1 real CPUID, 0 a CPU without AVX2/FMA/F16C, 1 one with them
#pragma once
#include <string>

namespace mops {
namespace isa {

enum Level { kBase = 0, kAvx2 = 1 };

bool cpu_has_avx2();          // AVX2 and FMA and F16C, by CPUID (or the pretend_cpu value)
Level active();
const char* name(Level level);
std::string request(const std::string& want);   // throws std::invalid_argument / std::runtime_error
void pretend_cpu(int has_avx2);
bool avx2_compiled();         // false on non-x86 builds: the avx2 copy does not exist there

}  // namespace isa
}  // namespace mops
