// int4_matmul CPU glue: argument checks, dtype handling, threading over output rows N.
//   int4_matmul_cpu(x [M, K], qweight, scale, min, group_size, bits) -> y [M, N] in x's dtype
//   int4_matmul_backward_cpu(dy [M, N], qweight, scale, min, group_size, bits) -> dx [M, K]
// Kernels: int4_matmul_cpu_kernel.h. M <= 16 runs the fused GEMV kernels (each decoded chunk is
// reused for all M rows), and so does 4-bit M <= 64 in passes over each chunk (max_gemv_m); larger
// M dequantizes tiles of rows to fp32 and calls at::mm per tile. On an AVX-512 CPU, M >= 12
// (gemm_min_m) runs the GEMM kernels instead (12-row dequantized panels, register-blocked).
// The GEMV kernels exist twice: the baseline copy here (namespace int4cpu::base) and the AVX2 one
// (int4_matmul_cpu_avx2.cpp); each call takes the one cpu_isa.h says this CPU runs.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#define MOPS_INT4_ISA base
#include "cpu_isa.h"
#include "cpu_pool.h"
#include "int4_matmul_cpu_kernel.h"
#include "ops.h"

namespace mops {
namespace int4cpu {
// int4_matmul_cpu_avx2.cpp (x86 only: never called elsewhere, cpu_isa says base there)
void q4_chunk_avx2(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s,
                   const uint16_t* mn, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                   int64_t pass, int64_t b, int64_t e, int64_t K128);
int64_t wide_columns_avx2(int64_t K, int64_t G, bool allow);  // the avx2 copy's 128-column part of K
// int4_matmul_cpu_avx512.cpp (x86 only): the 4-bit kernels with the 128-column AVX-512 layout
void q4_chunk_avx512(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s,
                     const uint16_t* mn, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                     int64_t pass, int64_t b, int64_t e, int64_t K128);
int64_t wide_columns_avx512(int64_t K, int64_t G, bool allow);
bool has_avx512();  // CPUID: AVX-512 F, BW and VL
void gemm_pack_x_avx512(const float* x, float* xt, int64_t M, int64_t K);
void panel_chunk_avx512(const float* x, const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y,
                        int64_t M, int64_t N, int64_t K, int64_t G, int bits, int64_t b, int64_t e, float* w);
void gemm_chunk_avx512(const float* xt, const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y,
                       int64_t M, int64_t N, int64_t K, int64_t G, int bits, int64_t b, int64_t e, float* w);
void q8_chunk_avx2(const float* xp, const int8_t* q, const uint16_t* s, float* y, int64_t M,
                   int64_t N, int64_t K, int64_t G, int64_t pass, int64_t b, int64_t e);
// int4_matmul_cpu_vnni.cpp (x86 only): the 1-token 4-bit kernel on integer dot products
bool has_avx512_vnni();  // CPUID: AVX-512 F, BW, VL and VNNI
bool vnni_prepare_x(const float* x, int8_t* xd, float* lane_scale, float* xsum, int64_t K, int64_t G);
void q4_chunk_vnni(const int8_t* xd, const float* lane_scale, const float* x, const float* xsum, const uint8_t* q,
                   const uint16_t* s, const uint16_t* mn, float* y, int64_t N, int64_t K, int64_t G, int64_t b,
                   int64_t e);
}  // namespace int4cpu

namespace {

using int4cpu::base::kMaxGemvM;

// Rows of x up to which the GEMV kernels run (M > kMaxGemvM: in passes of rows_per_pass rows over
// each chunk of weight rows, which stays in L1/L2 meanwhile); above, dequantized tiles + at::mm
// (the tiles write and re-read the whole weight in fp32, and each tile is an OpenMP region: under
// OMP_WAIT_POLICY=PASSIVE, which our programs set, every region wakes sleeping workers). With gaps
// between calls, as in a prefill, the passes win up to M = 64 for 4-bit weights while they are at
// most 8 (K = 576: M <= 64; K = 1536: M <= 32); the 8-bit kernel loses to the tiles beyond 16 rows.
// `python3 benchmarks/bench_int4_matmul.py --ms 32,64` times both (ours/cpu-kernel,
// ours/cpu-kernel-tiles). MOPS_INT4_CPU_GEMV_MAX_M (read per call) lowers the bound: benchmarks and
// tests of the tile path.
constexpr int64_t kMaxPassedM = 64;
constexpr int64_t kMaxPasses = 8;
int64_t rows_per_pass(int64_t K);
int64_t max_gemv_m(int64_t K, int64_t bits) {
  int64_t bound = bits == 4 ? std::min<int64_t>(kMaxPassedM, kMaxPasses * rows_per_pass(K)) : kMaxGemvM;
  const char* env = std::getenv("MOPS_INT4_CPU_GEMV_MAX_M");
  if (env != nullptr && env[0] != '\0') bound = std::min<int64_t>(bound, std::max<long>(0, std::strtol(env, nullptr, 10)));
  return std::max<int64_t>(bound, 0);
}

// Output rows per chunk handed to a thread: ~32k weights (a few us), a multiple of 4 (the M = 1
// kernel's step), so a thread preempted inside a chunk holds up the caller for little.
int64_t chunk_rows(int64_t K) { return std::max<int64_t>(4, ((int64_t{1} << 15) / K + 3) / 4 * 4); }

// The GEMVs' rows per chunk: about chunk_rows(K), in a number of chunks that is a multiple of the
// thread count and of (nearly) equal rows, so that each thread's lane (cpu_pool: the caller's and a
// helper's, or OpenMP's static split) holds the same work. chunk_rows alone left 192 rows at K = 576
// as 56 + 56 + 56 + 24: lanes of 112 and 80 rows, 576 as 10 x 56 + 16 (OpenMP's static split: 336 and
// 240). Ad hoc, one token, 2 threads, OpenMP's default wait policy, 4 alternating rounds in one process:
// 192x576 3.93-3.96 -> 3.70-3.73 us, 576x576 7.33-7.39 -> 6.59-6.69; 1536x576, 576x1536, 960x576
// unchanged; under OMP_WAIT_POLICY=PASSIVE (our helpers, which take chunks left over) 192x576
// 3.97-4.03 -> 3.85-3.90, the others unchanged.
// balanced_grain: n items in chunks of about `base`, a multiple of `align` each, their number rounded
// up to a multiple of the thread count. balanced_rows: the GEMVs' rows (4-row aligned, the M = 1
// kernel's smallest step).
int64_t balanced_grain(int64_t n, int64_t base, int64_t align) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = std::max<int64_t>(1, (n + base - 1) / base);
  chunks = (chunks + threads - 1) / threads * threads;
  return std::max<int64_t>(align, ((n + chunks - 1) / chunks + align - 1) / align * align);
}
int64_t balanced_rows(int64_t N, int64_t K) { return balanced_grain(N, chunk_rows(K), 4); }

// Rows of W per dequantized tile: ~1 MiB of fp32, so a tile stays in L2 while BLAS reads it.
int64_t tile_rows(int64_t K) { return std::max<int64_t>(64, (int64_t{1} << 18) / K); }

void check_weight(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& min,
                  int64_t group_size, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "int4_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && scale.device().is_cpu(),
              "int4_matmul_cpu: qweight and scale must be CPU tensors");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(),
              "int4_matmul: qweight must be a contiguous 2-D tensor [N, K/2] (4-bit) or [N, K] (8-bit)");
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "int4_matmul: qweight must be ", bits == 4 ? "uint8" : "int8", " for bits=", bits);
  TORCH_CHECK(group_size % int4cpu::base::kChunk == 0 && group_size > 0,
              "int4_matmul: group_size must be a positive multiple of 32, got ", group_size);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(K % group_size == 0, "int4_matmul: K=", K, " must be a multiple of group_size ", group_size);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == N && scale.size(1) == K / group_size,
              "int4_matmul: scale must be contiguous float16 [N, K/G] = [", N, ", ", K / group_size, "]");
  if (bits == 4) {
    TORCH_CHECK(min.has_value(), "int4_matmul: min is required for bits=4");
    const at::Tensor& mn = *min;
    TORCH_CHECK(mn.device().is_cpu() && mn.scalar_type() == at::kHalf && mn.is_contiguous() &&
                    mn.sizes() == scale.sizes(),
                "int4_matmul: min must be a contiguous CPU float16 tensor shaped like scale [N, K/G]");
  }
}

const uint16_t* half_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
}

// W[n0:n1] as dense fp32 [n1 - n0, K], dequantized in parallel.
at::Tensor dequant_tile(const at::Tensor& qweight, const at::Tensor& scale, const uint16_t* mins,
                        int64_t K, int64_t G, int64_t bits, int64_t n0, int64_t n1) {
  at::Tensor w = at::empty({n1 - n0, K}, qweight.options().dtype(at::kFloat));
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* s = half_ptr(scale);
  float* o = w.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t b, int64_t e) {
    int4cpu::base::dequant_rows(q, s, mins, o + (b - n0) * K, K, G, (int)bits, b, e);
  });
  return w;
}

// Rows of x per pass of the GEMV kernels: the permuted x of one pass (rows * K fp32) should stay
// in L1 (measured: 16 rows at K = 576, 36 KiB, ran 2.7x slower than 8 rows). A multiple of 4.
int64_t rows_per_pass(int64_t K) {
  const int64_t rows = (int64_t{24} * 1024 / (K * 4)) / 4 * 4;
  return std::min<int64_t>(kMaxGemvM, std::max<int64_t>(4, rows));
}

void gemv_q4(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s, const uint16_t* mn,
             float* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t K128, int level,
             const cpupool::Prefetch* after) {
  const int64_t pass = rows_per_pass(K);
  cpupool::parallel_chunks(N, balanced_rows(N, K), M * N * K, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) || defined(__i386__)
    if (level == 2) return int4cpu::q4_chunk_avx512(xp, xsum, q, s, mn, y, M, N, K, G, pass, b, e, K128);
    if (level == 1) return int4cpu::q4_chunk_avx2(xp, xsum, q, s, mn, y, M, N, K, G, pass, b, e, K128);
#endif
    int4cpu::base::q4_chunk(xp, xsum, q, s, mn, y, M, N, K, G, pass, b, e, K128);
  }, after);
}

// Rows of x from which an AVX-512 CPU runs the GEMM kernels (int4_matmul_cpu_kernel.h, "GEMM")
// instead of the GEMV passes or the dequantized tiles; MOPS_INT4_CPU_GEMM_MIN_M (read per call)
// moves the bound (tests and benchmarks compare the paths).
constexpr int64_t kGemmMinM = 12;
int64_t gemm_min_m() {
  const char* env = std::getenv("MOPS_INT4_CPU_GEMM_MIN_M");
  return env != nullptr && env[0] != '\0' ? std::max<long>(1, std::strtol(env, nullptr, 10)) : kGemmMinM;
}

// Rows of x from which an AVX-512 CPU multiplies from dequantized panels (panel_chunk) below the
// GEMM's bound instead of the GEMV passes; MOPS_INT4_CPU_PANEL_MIN_M (read per call) moves it. Only
// where the fp32 panel (12 rows x K) fits in 32 KiB of L1 and, for 8-bit weights, from 4 rows: one
// token's worth of ad-hoc timings (2 threads, alternating in one process, medians of 5 x 1000 calls):
// 4-bit K = 576 at M = 2 / 4 / 8 / 11: 1536x576 51.1 / 56.9 / 77.6 / 118.2 us -> 37.4 / 38.7 / 68.3 /
// 83.9, 576x576 15.7 / 17.7 / 30.6 / 46.8 -> 14.4 / 15.6 / 25.2 / 31.8, 960x576 25.8 / 29.1 / 50.9 /
// 84.7 -> 24.0 / 24.7 / 45.3 / 57.9; but 576x1536 (a 74 KiB panel, read from L2) 32.5 / 35.6 / 68.0
// / 100.6 -> 39.2 / 38.4 / 66.9 / 101.3, and the 8-bit 49152x576 head 892 / 1363 / 2757 / 3784 ->
// 1084 / 1240 / 2326 / 3553.
constexpr int64_t kPanelMinM = 2;
// MOPS_INT4_CPU_AVX512=0 (read per call; tests compare both): the 8-lane layout, and so none of the
// 128-column kernels (the wide fp32 GEMV, the VNNI one).
bool wide_allowed() {
  const char* env = std::getenv("MOPS_INT4_CPU_AVX512");
  return !(env && env[0] == '0');
}

bool panel_fits(int64_t K) { return int64_t{12} * K * 4 <= 32 * 1024; }
int64_t panel_min_m() {
  const char* env = std::getenv("MOPS_INT4_CPU_PANEL_MIN_M");
  return env != nullptr && env[0] != '\0' ? std::max<long>(2, std::strtol(env, nullptr, 10)) : kPanelMinM;
}

#if defined(__x86_64__) || defined(__i386__)
// y [M, N] = x W^T for 2 <= M < the GEMM's bound: panels of 12 weight rows dequantized by the thread
// that runs them, multiplied with every row of x at once (int4_matmul_cpu_kernel.h, "few rows").
void panels(const float* x, const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y, int64_t M,
            int64_t N, int64_t K, int64_t G, int bits, const cpupool::Prefetch* after) {
  const int64_t nr = int4cpu::base::kGemmNR;
  const int64_t count = (N + nr - 1) / nr;
  const int64_t grain = balanced_grain(count, std::max<int64_t>(1, (int64_t{1} << 15) / (nr * K)), 1);  // ~32k weights
  cpupool::parallel_chunks(count, grain, M * N * K, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> w;
    w.resize(nr * K);
    int4cpu::panel_chunk_avx512(x, q, s, mn, y, M, N, K, G, bits, b * nr, std::min(N, e * nr), w.data());
  }, after);
}

// y [M, N] = x W^T with the GEMM kernels: x packed once (transposed blocks), panels of 12 weight
// rows dequantized by the thread that runs them, in chunks on the helper pool.
void gemm(const float* x, const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y, int64_t M,
          int64_t N, int64_t K, int64_t G, int bits, const cpupool::Prefetch* after) {
  const int64_t nr = int4cpu::base::kGemmNR;
  thread_local std::vector<float> packed;
  packed.resize((M + 31) / 32 * 32 * K);
  int4cpu::gemm_pack_x_avx512(x, packed.data(), M, K);
  const float* xt = packed.data();
  const int64_t panels = (N + nr - 1) / nr;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / (nr * K * M));
  cpupool::parallel_chunks(panels, grain, M * N * K, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> w;
    w.resize(nr * K);
    int4cpu::gemm_chunk_avx512(xt, q, s, mn, y, M, N, K, G, bits, b * nr, std::min(N, e * nr), w.data());
  }, after);
}
#endif

void gemv_q8(const float* xp, const int8_t* q, const uint16_t* s, float* y, int64_t M, int64_t N,
             int64_t K, int64_t G, const cpupool::Prefetch* after) {
  const int64_t pass = rows_per_pass(K);
#if defined(__x86_64__) || defined(__i386__)
  const bool avx2 = isa::active() == isa::kAvx2;
#else
  const bool avx2 = false;
#endif
  cpupool::parallel_chunks(N, balanced_rows(N, K), M * N * K, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) || defined(__i386__)
    if (avx2) return int4cpu::q8_chunk_avx2(xp, q, s, y, M, N, K, G, pass, b, e);
#endif
    int4cpu::base::q8_chunk(xp, q, s, y, M, N, K, G, pass, b, e);
  }, after);
}

}  // namespace

// int4_matmul_cpu with the GEMV path's read-ahead of the next weight (`after`, may be null).
static at::Tensor int4_matmul_cpu_impl(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits,
                                const cpupool::Prefetch* after) {
  check_weight(qweight, scale, min, group_size, bits);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(x.device().is_cpu(), "int4_matmul_cpu: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_matmul: x must have shape (M, K=", K, "), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "int4_matmul: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0);
  // bf16/fp16: computed in fp32. No aten call when x is already contiguous fp32 (decode: ~120 per step)
  const bool f32 = x.scalar_type() == at::kFloat;
  const at::Tensor xf = f32 && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  const uint16_t* mn = bits == 4 ? half_ptr(*min) : nullptr;
  if (M == 0) return at::empty({0, N}, x.options());
#if defined(__x86_64__) || defined(__i386__)
  if (isa::active() == isa::kAvx2 && int4cpu::has_avx512()) {  // the kernels on 12-row fp32 panels
    const bool use_gemm = M >= gemm_min_m();
    if (use_gemm || (M >= panel_min_m() && M <= 11 && panel_fits(K) && (bits == 4 || M >= 4))) {
      at::Tensor y = at::empty({M, N}, xf.options());
      (use_gemm ? gemm : panels)(xf.data_ptr<float>(), reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
                                 half_ptr(scale), mn, y.data_ptr<float>(), M, N, K, group_size, (int)bits, after);
      return f32 ? y : y.to(x.scalar_type());
    }
  }
  // One token, 4-bit, G dividing 128, K >= 128, on an AVX-512 VNNI CPU: the integer kernel
  // (int4_matmul_cpu_kernel.h, "AVX-512 VNNI"), unless x holds what its fixed point cannot carry
  // (vnni_prepare_x says no) or MOPS_INT4_CPU_VNNI=0 (read per call; tests compare both kernels).
  if (M == 1 && bits == 4 && 128 % group_size == 0 && K >= 128 &&
      isa::active() == isa::kAvx2 && int4cpu::has_avx512_vnni()) {
    const char* env = std::getenv("MOPS_INT4_CPU_VNNI");
    if (!(env && env[0] == '0') && wide_allowed()) {
      const int64_t ng = K / group_size;
      thread_local struct { std::vector<int8_t> digits; std::vector<float> f; } scratch;  // x prepared
      scratch.digits.resize(3 * K);
      scratch.f.resize(K / 8 + ng);
      int8_t* xd = scratch.digits.data();
      float* lane_scale = scratch.f.data();
      float* xsum = lane_scale + K / 8;
      const float* xr = xf.data_ptr<float>();
      if (int4cpu::vnni_prepare_x(xr, xd, lane_scale, xsum, K, group_size)) {
        // (at::detail::empty_cpu: no trip through the dispatcher, ~0.1 us of a 3 us call)
        at::Tensor y = at::detail::empty_cpu({1, N}, at::kFloat);
        float* yp = y.data_ptr<float>();
        const uint8_t* q = qweight.data_ptr<uint8_t>();
        const uint16_t* s = half_ptr(scale);
        cpupool::parallel_chunks(N, balanced_rows(N, K), N * K, [&](int64_t b, int64_t e) {
          int4cpu::q4_chunk_vnni(xd, lane_scale, xr, xsum, q, s, mn, yp, N, K, group_size, b, e);
        }, after);
        return f32 ? y : y.to(x.scalar_type());
      }
    }
  }
#endif

  if (M <= max_gemv_m(K, bits)) {
    // x in the kernels' order (+ per-group sums) in a per-thread scratch buffer: two tensor
    // allocations per call cost ~1 us, a tenth of a small decode GEMV.
    const int64_t Mpad = (M + 3) / 4 * 4;  // the 4-bit kernel runs rows of x in tiles of 4
    const int64_t ng = K / group_size;
    thread_local std::vector<float> scratch;
    scratch.resize(Mpad * (K + ng));
    float* xp = scratch.data();
    float* xsum = xp + Mpad * K;
    std::fill(xp + M * K, xp + Mpad * K, 0.f);  // padding rows: zeros
    std::fill(xsum + M * ng, xsum + Mpad * ng, 0.f);
    // columns in the AVX-512 layout (the avx2 copy built with AVX-512 only), unless wide_allowed() says no
    const bool allow_wide = wide_allowed();
    int64_t K128 = 0;
    int level = 0;  // the 4-bit kernels' copy: 0 base, 1 avx2, 2 avx512 (the avx2 one + AVX-512 layout)
#if defined(__x86_64__) || defined(__i386__)
    if (isa::active() == isa::kAvx2) level = int4cpu::has_avx512() ? 2 : 1;
    if (bits == 4 && level == 2) K128 = int4cpu::wide_columns_avx512(K, group_size, allow_wide);
    if (bits == 4 && level == 1) K128 = int4cpu::wide_columns_avx2(K, group_size, allow_wide);
#endif
    int4cpu::base::prepare_x(xf.data_ptr<float>(), xp, xsum, M, K, group_size, (int)bits, K128);
    at::Tensor y = at::empty({M, N}, xf.options());
    if (bits == 4)
      gemv_q4(xp, xsum, qweight.data_ptr<uint8_t>(), half_ptr(scale), mn, y.data_ptr<float>(), M, N,
              K, group_size, K128, level, after);
    else
      gemv_q8(xp, qweight.data_ptr<int8_t>(), half_ptr(scale), y.data_ptr<float>(), M, N, K,
              group_size, after);
    return f32 ? y : y.to(x.scalar_type());
  }

  // Large M: y^T [N, M], one contiguous slab of rows per dequantized tile.
  at::Tensor yt = at::empty({N, M}, xf.options());
  const int64_t T = tile_rows(K);
  for (int64_t n0 = 0; n0 < N; n0 += T) {
    const int64_t n1 = std::min(N, n0 + T);
    at::Tensor w = dequant_tile(qweight, scale, mn, K, group_size, bits, n0, n1);
    at::Tensor out = yt.narrow(0, n0, n1 - n0);
    at::mm_out(out, w, xf.t());
  }
  return yt.t().to(x.scalar_type()).contiguous();
}

at::Tensor int4_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits) {
  return int4_matmul_cpu_impl(x, qweight, scale, min, group_size, bits, nullptr);
}

at::Tensor int4_matmul_cpu_pre(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                               const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits,
                               int64_t pre, const c10::optional<at::Tensor>& norm_weight, double eps,
                               const c10::optional<at::Tensor>& residual,
                               const c10::optional<at::Tensor>& next_qweight,
                               const c10::optional<at::Tensor>& next_scale,
                               const c10::optional<at::Tensor>& next_min) {
  check_weight(qweight, scale, min, group_size, bits);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(pre == 0 || pre == 1 || pre == 2,
              "int4_matmul_cpu_pre: pre must be 0 (none), 1 (RMSNorm) or 2 (SiLU * up), got ", pre);
  const int64_t Kx = pre == 2 ? 2 * K : K;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "int4_matmul_cpu_pre: x must be a contiguous float32 CPU tensor (M, ", Kx, "), got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == Kx, "int4_matmul_cpu_pre: x must have shape (M, ", Kx, ") for pre=", pre, " and K=", K,
              ", got ", x.sizes());
  const int64_t M = x.size(0);
  if (residual.has_value())
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                    residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N,
                "int4_matmul_cpu_pre: residual must be a contiguous float32 CPU tensor (", M, ", ", N, "), got ",
                residual->sizes());
  // the next weight to read ahead: its codes, scales and mins as byte ranges (no checks needed: only read)
  cpupool::Prefetch next;
  const c10::optional<at::Tensor>* nx[3] = {&next_qweight, &next_scale, &next_min};
  bool has_next = false;
  for (int i = 0; i < 3; ++i)
    if (nx[i]->has_value() && (*nx[i])->device().is_cpu() && (*nx[i])->is_contiguous()) {
      next.ptr[i] = (*nx[i])->data_ptr();
      next.bytes[i] = (*nx[i])->nbytes();
      has_next = true;
    }
  at::Tensor xn = pre == 0 ? x : at::empty({M, K}, x.options());  // pre = 0: x itself
  const float* xi = x.data_ptr<float>();
  float* o = xn.data_ptr<float>();
  if (pre == 1) {
    TORCH_CHECK(norm_weight.has_value() && norm_weight->device().is_cpu() &&
                    norm_weight->scalar_type() == at::kFloat && norm_weight->is_contiguous() &&
                    norm_weight->numel() == K,
                "int4_matmul_cpu_pre: norm_weight must be a contiguous float32 CPU tensor of ", K, " values");
    const float* w = norm_weight->data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {  // Llama's RMSNorm in fp32: (x * rsqrt(mean(x^2) + eps)) * w
      const float* xr = xi + m * K;
      double ss = 0.0;
      for (int64_t c = 0; c < K; ++c) ss += (double)xr[c] * xr[c];
      const float r = 1.f / std::sqrt((float)(ss / K) + (float)eps);
      for (int64_t c = 0; c < K; ++c) o[m * K + c] = (xr[c] * r) * w[c];
    }
  } else if (pre == 2) {
    for (int64_t m = 0; m < M; ++m) {  // SiLU(gate) * up, as torch: g / (1 + exp(-g)) * u
      const float* g = xi + m * 2 * K;
      const float* u = g + K;
      for (int64_t c = 0; c < K; ++c) o[m * K + c] = g[c] / (1.f + std::exp(-g[c])) * u[c];
    }
  }
  at::Tensor y = int4_matmul_cpu_impl(xn, qweight, scale, min, group_size, bits, has_next ? &next : nullptr);
  if (residual.has_value()) {  // y + residual, one rounding: the aten add's result
    float* yp = y.data_ptr<float>();
    const float* rp = residual->data_ptr<float>();
    for (int64_t i = 0, n = M * N; i < n; ++i) yp[i] = rp[i] + yp[i];
  }
  return y;
}

at::Tensor int4_matmul_backward_cpu(const at::Tensor& dy, const at::Tensor& qweight,
                                    const at::Tensor& scale, const c10::optional<at::Tensor>& min,
                                    int64_t group_size, int64_t bits) {
  check_weight(qweight, scale, min, group_size, bits);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(dy.device().is_cpu(), "int4_matmul_backward_cpu: dy must be a CPU tensor");
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == N, "int4_matmul_backward: dy must have shape (M, N=", N,
              "), got ", dy.sizes());
  const at::Tensor dyf = dy.to(at::kFloat).contiguous();
  const uint16_t* mn = bits == 4 ? half_ptr(*min) : nullptr;
  at::Tensor dx = at::zeros({dy.size(0), K}, dyf.options());
  const int64_t T = tile_rows(K);
  for (int64_t n0 = 0; n0 < N; n0 += T) {  // dx += dy[:, tile] @ W[tile]
    const int64_t n1 = std::min(N, n0 + T);
    at::Tensor w = dequant_tile(qweight, scale, mn, K, group_size, bits, n0, n1);
    dx.addmm_(dyf.narrow(1, n0, n1 - n0), w);
  }
  return dx.to(dy.scalar_type());
}

}  // namespace mops
