// Run-time choice of the CPU kernels' instruction set (see cpu_isa.h).
#include "cpu_isa.h"

#include <atomic>
#include <stdexcept>

namespace mops {
namespace isa {
namespace {

std::atomic<int> g_pretend{-1};   // -1: real CPUID
std::atomic<int> g_forced{-1};    // -1: auto; else a Level

bool cpuid_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace

bool avx2_compiled() {
#if defined(__x86_64__) || defined(__i386__)
  return true;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
  const int p = g_pretend.load(std::memory_order_relaxed);
  if (p >= 0) return p == 1;
  static const bool has = cpuid_avx2();
  return has;
}

Level active() {
  const int f = g_forced.load(std::memory_order_relaxed);
  if (f >= 0) return f == kAvx2 && cpu_has_avx2() && avx2_compiled() ? kAvx2 : kBase;
  return cpu_has_avx2() && avx2_compiled() ? kAvx2 : kBase;
}

const char* name(Level level) { return level == kAvx2 ? "avx2" : "base"; }

std::string request(const std::string& want) {
  if (want == "auto") {
    g_forced.store(-1);
  } else if (want == "base") {
    g_forced.store(kBase);
  } else if (want == "avx2") {
    if (!avx2_compiled() || !cpu_has_avx2())
      throw std::runtime_error(avx2_compiled()
                                   ? "cpu_isa: this CPU lacks AVX2, FMA or F16C; the avx2 kernels cannot run here"
                                   : "cpu_isa: the avx2 kernels are not built on this architecture");
    g_forced.store(kAvx2);
  } else if (!want.empty()) {
    throw std::invalid_argument("cpu_isa: want must be 'auto', 'base' or 'avx2', got '" + want + "'");
  }
  return name(active());
}

void pretend_cpu(int has_avx2) { g_pretend.store(has_avx2 < 0 ? -1 : (has_avx2 ? 1 : 0)); }

}  // namespace isa
}  // namespace mops
