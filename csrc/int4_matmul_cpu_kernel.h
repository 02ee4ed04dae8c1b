// int4_matmul CPU kernels: y[m, n] = sum_c x[m, c] * W[n, c] for a block-quantized W (SPEC §3).
// Raw pointers only, no torch headers. The glue (int4_matmul_cpu.cpp) checks, threads and dispatches.
//
//   4-bit (Q4_1): W[n, c] = q * s[n, g] + mn[n, g]    q in 0..15, two codes per byte (low nibble =
//                 even column), so   sum_c x W = sum_g ( s * sum_{c in g} x q  +  mn * sum_{c in g} x )
//                 The second term uses per-group sums of x (xsum [M, K/G], computed once per call).
//   8-bit (Q8_0): W[n, c] = q * s[n, g]               q int8, G = 32
//
// Layout trick for 4-bit: a 32-byte load holds 64 columns as 8 little-endian 32-bit words; word j
// carries columns 8j..8j+7 as its nibbles 0..7. For nibble pair k (positions 2k, 2k+1), t = v >> 8k
// gives (t & 0x0f) = q[2k] and (t & 0xf0) = 16 q[2k+1] in every 32-bit lane: no cross-lane shuffle,
// and 8 codes cost one and + one int->float convert (+ half a shift). The glue permutes x once per
// call to the same order and divides the odd positions by 16 (exact in fp32):
//   xp[64b + 8e + j] = x[64b + 8j + e] * (e odd ? 1/16 : 1).
// A trailing 32-column block (K % 64 == 32) keeps x's natural order and runs a scalar loop.
//
// M = 1 (decode): 8 weight rows per step (then 4, then 1), two FMA chains per row (even / odd
// positions), so the chains hide the FMA latency and each x load serves every row of the step; the
// group scale is applied once per 64-column chunk to the partial dot product. M = 2..16: each decoded
// chunk is reused for all M rows of x (tiles of 4 rows, passes of <= 16 rows) before the next one is
// read. On a CPU with AVX-512 VNNI, M = 1 runs an integer kernel instead ("AVX-512 VNNI" below).
//
// Instruction sets: this header is compiled into one namespace MOPS_INT4_ISA per copy.
// int4_matmul_cpu.cpp includes it as `base` (scalar code, any CPU: the build's baseline ISA);
// int4_matmul_cpu_avx2.cpp as `avx2` with MOPS_INT4_AVX2 defined, under a target pragma (AVX2 + FMA +
// F16C intrinsics) whatever the build flags; int4_matmul_cpu_avx512.cpp and int4_matmul_cpu_vnni.cpp
// likewise with AVX-512 F/BW/VL (and VNNI). The glue runs the avx2 copy only when CPUID says the CPU
// has all three (cpu_isa.h), the others where CPUID reports their extensions too.
//
// AVX-512 (F, BW, VL) "wide" layout, in the avx512 copy (int4_matmul_cpu_avx512.cpp: the avx2 code
// plus this, run when CPUID reports AVX-512; also in the avx2 copy of a MOPS_NATIVE=1 build on such
// a machine) when G divides 128:
// the same trick on a 64-byte load (128 columns, 16 words; word j = columns 8j..8j+7 of the chunk),
// x permuted per 128 columns as xp[128b + 16e + j] = x[128b + 8j + e] * (e odd ? 1/16 : 1): half
// the instructions per weight of the 8-lane code. A remaining 64-column chunk (K % 128 >= 64) keeps
// the 8-lane order and code, a trailing 32-column block the natural order. wide_columns() decides,
// for prepare_x and the kernels alike; MOPS_INT4_CPU_AVX512=0 (read per call) keeps the 8-lane layout.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef MOPS_INT4_ISA
#error "define MOPS_INT4_ISA (base, avx2 or avx512) before including int4_matmul_cpu_kernel.h"
#endif
#ifdef MOPS_INT4_AVX2
#include <immintrin.h>
#if !defined(MOPS_INT4_AVX512) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MOPS_INT4_AVX512 1
#endif
#endif

namespace mops {
namespace int4cpu {
namespace MOPS_INT4_ISA {

constexpr int kChunk = 32;  // columns per decoded chunk (the smallest group size)
constexpr int64_t kMaxGemvM = 16;  // rows of x the GEMV kernels take per call

inline float half_to_float(uint16_t h) {
#ifdef MOPS_INT4_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise the mantissa
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// c / G for the group index of column c: a shift when G is a power of two (it always is for
// 32/64/128), since a 64-bit division per 64-column chunk costs as much as the chunk's FMAs.
struct GroupOf {
  int64_t G;
  int sh;
  explicit GroupOf(int64_t g) : G(g), sh(-1) {
    if ((g & (g - 1)) == 0)
      for (sh = 0; (int64_t{1} << sh) < g; ++sh) {}
  }
  int64_t operator()(int64_t c) const { return sh >= 0 ? c >> sh : c / G; }
};

// Columns [0, K128) of a 4-bit weight run in 128-column chunks (the AVX-512 layout above): K rounded
// down to 128 when `allow` and the build has AVX-512 and G divides 128, else 0.
inline int64_t wide_columns(int64_t K, int64_t G, bool allow) {
#ifdef MOPS_INT4_AVX512
  return allow && 128 % G == 0 ? K - K % 128 : 0;
#else
  (void)K; (void)G; (void)allow;
  return 0;
#endif
}

// xp [M, K]: x in the 4-bit kernels' order (columns [0, K128) in 128-column chunks, then 64-column
// chunks, then a natural 32-column tail; see the top), or a copy (8-bit).
// xsum [M, K/G]: per-group sums of x (4-bit only; may be null for 8-bit).
inline void prepare_x(const float* x, float* xp, float* xsum, int64_t M, int64_t K, int64_t G,
                      int bits, int64_t K128 = 0) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* pr = xp + m * K;
    if (bits == 4) {
      const int64_t K64 = K - K % 64;
      for (int64_t b = 0; b < K128; b += 128)
        for (int e = 0; e < 8; ++e)
          for (int j = 0; j < 16; ++j) pr[b + 16 * e + j] = xr[b + 8 * j + e] * (e % 2 ? 0.0625f : 1.f);
      for (int64_t b = K128; b < K64; b += 64)
        for (int e = 0; e < 8; ++e)
          for (int j = 0; j < 8; ++j) pr[b + 8 * e + j] = xr[b + 8 * j + e] * (e % 2 ? 0.0625f : 1.f);
      for (int64_t c = K64; c < K; ++c) pr[c] = xr[c];
      for (int64_t g = 0; g < K / G; ++g) {
        float s = 0.f;
        for (int64_t c = 0; c < G; ++c) s += xr[g * G + c];
        xsum[m * (K / G) + g] = s;
      }
    } else {
      std::memcpy(pr, xr, sizeof(float) * K);
    }
  }
}

#ifdef MOPS_INT4_AVX2
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// sum_g h[g] * f[g] for fp16 bits h (the Q4_1 min terms: min[n, g] * sum of x over group g).
inline float dot_half_float(const uint16_t* h, const float* f, int64_t n) {
  float t = 0.f;
  int64_t g = 0;
#ifdef MOPS_INT4_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; g + 8 <= n; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + g))),
                          _mm256_loadu_ps(f + g), acc);
  t = hsum256(acc);
#endif
  for (; g < n; ++g) t += half_to_float(h[g]) * f[g];
  return t;
}

// ---- 4-bit ------------------------------------------------------------------------------------
// Decoding a 64-column chunk (32 bytes = 8 words v): pair k = 0..3 of nibble positions (2k, 2k+1)
// comes from t = v >> 8k as  (t & 0x0f) = q[2k]  and  (t & 0xf0) = 16 q[2k+1]; the factor 16 is
// taken out of x (prepare_x stores x / 16 at odd nibble positions, exact in fp32). So 8 codes cost
// one and + one convert, plus one shift per 16 codes, and one FMA with x.

// Scalar fallback: the 64-column chunks c < K64 of one weight row, x in prepare_x's order.
inline float q4_dot_scalar(const float* xp, const uint8_t* row, const uint16_t* srow, int64_t K64,
                           int64_t G) {
  const GroupOf gof(G);
  float acc = 0.f;
  for (int64_t c = 0; c < K64; c += 64) {
    float d[2] = {0.f, 0.f};  // columns c..c+31 (words j < 4) / c+32..c+63 (words j >= 4)
    for (int e = 0; e < 8; ++e)  // nibble e of little-endian word j = byte 4j + e/2
      for (int j = 0; j < 8; ++j)
        d[j / 4] += (float)(row[c / 2 + 4 * j + e / 2] & (e % 2 ? 0xf0 : 0x0f)) * xp[c + 8 * e + j];
    acc += d[0] * half_to_float(srow[gof(c)]) + d[1] * half_to_float(srow[gof(c + 32)]);
  }
  return acc;
}

// The scalar part of rows n..n+ROWS-1: the min terms sum_g mn[g] * xsum[g] plus the trailing
// 32-column block (K % 64 == 32, x in natural order there), one value per (row, row of x).
// (MINS = false: the trailing block only; the VNNI kernel adds the min terms itself.)
template <int ROWS, int MAXM, bool MINS = true>
inline void q4_tail(const float* xp, const float* xsum, const uint8_t* qw, const uint16_t* scale,
                    const uint16_t* mins, int64_t K, int64_t G, int64_t n, int mm,
                    float (&tail)[ROWS][MAXM]) {
  const int64_t ng = K / G;
  const int64_t K64 = K - K % 64;
  for (int r = 0; r < ROWS; ++r)
    for (int m = 0; m < mm; ++m) {
      float t = 0.f;
      if (K64 < K) {
        const uint8_t* row = qw + (n + r) * (K / 2) + K64 / 2;
        const float* xr = xp + m * K + K64;
        float d = 0.f;
        for (int i = 0; i < 16; ++i)
          d += (float)(row[i] & 0x0f) * xr[2 * i] + (float)(row[i] >> 4) * xr[2 * i + 1];
        t = d * half_to_float(scale[(n + r) * ng + K64 / G]);
      }
      tail[r][m] = MINS ? t + dot_half_float(mins + (n + r) * ng, xsum + m * ng, ng) : t;
    }
}

#ifdef MOPS_INT4_AVX2
// The scales of one 64-column chunk as 8 lanes: lanes 0..3 scale columns c..c+31 (their partial
// dot products are lanes 0..3 of the accumulators), lanes 4..7 columns c+32..c+63.
inline __m256 chunk_scale(const uint16_t* srow, int64_t c, const GroupOf& gof) {
  return _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_set1_epi16((short)srow[gof(c)]),
                                            _mm_set1_epi16((short)srow[gof(c + 32)])));
}

// Codes of one 64-column chunk, pair k of nibble positions: (t & 0x0f) and (t & 0xf0) of t = v >> 8k.
inline void decode64(__m256i v, int k, __m256& w0, __m256& w1) {
  const __m256i t = k ? _mm256_srli_epi32(v, 8 * k) : v;
  w0 = _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(0x0f)));
  w1 = _mm256_cvtepi32_ps(_mm256_and_si256(t, _mm256_set1_epi32(0xf0)));
}
#endif

#ifdef MOPS_INT4_AVX512
// The scales of one 128-column chunk (G divides 128) as 16 lanes: lane j covers columns
// c + 8j .. c + 8j + 7, group c/G + 8j/G. The chunk's 128/G fp16 scales are loaded with a mask (no
// read past the row) and spread to the lanes with one permute.
struct WideScale {
  __m256i idx;
  __mmask8 mask;
  explicit WideScale(int64_t G) {
    alignas(32) uint16_t ix[16];
    for (int j = 0; j < 16; ++j) ix[j] = (uint16_t)(8 * j / G);
    idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(ix));
    mask = (__mmask8)((1u << (128 / G)) - 1);
  }
  __m512 operator()(const uint16_t* srow, int64_t g) const {
    const __m128i h = _mm_maskz_loadu_epi16(mask, srow + g);
    return _mm512_cvtph_ps(_mm256_permutexvar_epi16(idx, _mm256_castsi128_si256(h)));
  }
};

inline void decode128(__m512i v, int k, __m512& w0, __m512& w1) {
  const __m512i t = k ? _mm512_srli_epi32(v, 8 * k) : v;
  w0 = _mm512_cvtepi32_ps(_mm512_and_si512(t, _mm512_set1_epi32(0x0f)));
  w1 = _mm512_cvtepi32_ps(_mm512_and_si512(t, _mm512_set1_epi32(0xf0)));
}
#endif

// Software prefetch distance of the M = 1 kernels, in bytes of the weight codes ahead of the ones
// being read (the scales and mins follow at the same distance in rows). A decode step reads each
// matrix once, from DRAM: one core keeps too few lines in flight for the DRAM latency on its own,
// and the hardware prefetcher restarts at every thread's chunk of rows. The distance runs past the
// chunk, into the rows another thread (or this one) takes next: prefetches never fault, and the
// addresses stay inside the matrix.
#ifndef MOPS_INT4_PREFETCH_BYTES
#define MOPS_INT4_PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = MOPS_INT4_PREFETCH_BYTES;

// Rows [b, e) of a 1-token kernel in steps of 8, then 4, then one by one: run(rows, lo, hi) with
// rows a std::integral_constant (the kernel's ROWS). Each row's arithmetic is the same in all three
// steps, so its bits do not depend on where a thread's chunk starts.
template <typename Run>
inline void rows_by_8_4_1(int64_t b, int64_t e, const Run& run) {
  const int64_t m8 = b + (e - b) / 8 * 8;
  const int64_t mid = m8 + (e - m8) / 4 * 4;
  run(std::integral_constant<int, 8>(), b, m8);
  run(std::integral_constant<int, 4>(), m8, mid);
  run(std::integral_constant<int, 1>(), mid, e);
}

#ifdef MOPS_INT4_AVX2
// The M = 1 kernels' software prefetch for a step of `rows` weight rows from row n: at the step's
// start the scale and min lines of the rows kPrefetchBytes ahead (step), and per 64 columns the code
// lines that far ahead of the rows x 32 bytes the step reads there (codes; the rows' codes are
// contiguous). N (all rows of the matrix) bounds the addresses.
struct RowPrefetch {
  const uint8_t* qw;
  const uint16_t* scale;
  const uint16_t* mins;
  int64_t K, ng, N;

  void step(int64_t n, int rows) const {
    const int64_t pf_row = n + kPrefetchBytes / (K / 2);
    if (pf_row >= N) return;
    const int64_t last = (pf_row + rows < N ? pf_row + rows : N) * ng * 2 - 1;  // bytes of scale/min
    for (int64_t o = pf_row * ng * 2; o <= last + 63; o += 64) {
      const int64_t b = o < last ? o : last;
      _mm_prefetch(reinterpret_cast<const char*>(scale) + b, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(mins) + b, _MM_HINT_T0);
    }
  }
  void codes(int64_t n, int rows, int64_t c) const {  // c: the chunk's first column
    const int64_t code_end = N * (K / 2) - 64;
    int64_t o = n * (K / 2) + kPrefetchBytes + (c / 64) * rows * 32;
    for (int i = 0; i < (rows * 32 + 63) / 64; ++i, o += 64)
      if (o <= code_end) _mm_prefetch(reinterpret_cast<const char*>(qw) + o, _MM_HINT_T0);
  }
};
#endif

// M = 1: rows n in [n0, n1) of y [N], ROWS weight rows per step (independent FMA chains sharing the
// x loads; two chains per row, even / odd nibble positions, so 2 * ROWS chains hide the FMA latency).
// Columns [0, K128) in 128-column chunks (AVX-512), then 64-column chunks (AVX2), then the tail.
// N (all rows of the matrix) bounds the prefetches.
template <int ROWS>
void q4_gemv1(const float* xp, const float* xsum, const uint8_t* qw, const uint16_t* scale,
              const uint16_t* mins, float* y, int64_t K, int64_t G, int64_t n0, int64_t n1,
              int64_t K128 = 0, int64_t N = 0) {
  const int64_t ng = K / G;
  const int64_t K64 = K - K % 64;
  const GroupOf gof(G);
#ifdef MOPS_INT4_AVX512
  const WideScale wscale(K128 ? G : 32);
#endif
  if (N < n1) N = n1;
  for (int64_t n = n0; n + ROWS <= n1; n += ROWS) {
    float tail[ROWS][1];
    q4_tail<ROWS, 1>(xp, xsum, qw, scale, mins, K, G, n, 1, tail);
#ifdef MOPS_INT4_AVX2
    const RowPrefetch pf{qw, scale, mins, K, ng, N};
    pf.step(n, ROWS);
    auto prefetch = [&](int64_t c) { pf.codes(n, ROWS, c); };
    float wide[ROWS];
    for (int r = 0; r < ROWS; ++r) wide[r] = 0.f;
#ifdef MOPS_INT4_AVX512
    if (K128) {
      __m512 acc[ROWS];
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < K128; c += 128) {
        prefetch(c);
        prefetch(c + 64);
        __m512 d0[ROWS], d1[ROWS];
        for (int k = 0; k < 4; ++k) {
          const __m512 x0 = _mm512_loadu_ps(xp + c + 32 * k), x1 = _mm512_loadu_ps(xp + c + 32 * k + 16);
          for (int r = 0; r < ROWS; ++r) {
            __m512 w0, w1;
            decode128(_mm512_loadu_si512(qw + (n + r) * (K / 2) + c / 2), k, w0, w1);
            d0[r] = k ? _mm512_fmadd_ps(w0, x0, d0[r]) : _mm512_mul_ps(w0, x0);
            d1[r] = k ? _mm512_fmadd_ps(w1, x1, d1[r]) : _mm512_mul_ps(w1, x1);
          }
        }
        for (int r = 0; r < ROWS; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_add_ps(d0[r], d1[r]), wscale(scale + (n + r) * ng, gof(c)), acc[r]);
      }
      for (int r = 0; r < ROWS; ++r) wide[r] = _mm512_reduce_add_ps(acc[r]);
    }
#endif
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = K128; c < K64; c += 64) {
      prefetch(c);
      __m256 d0[ROWS], d1[ROWS];
      for (int k = 0; k < 4; ++k) {
        const __m256 x0 = _mm256_loadu_ps(xp + c + 16 * k), x1 = _mm256_loadu_ps(xp + c + 16 * k + 8);
        for (int r = 0; r < ROWS; ++r) {
          __m256 w0, w1;
          decode64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + (n + r) * (K / 2) + c / 2)), k,
                   w0, w1);
          d0[r] = k ? _mm256_fmadd_ps(w0, x0, d0[r]) : _mm256_mul_ps(w0, x0);
          d1[r] = k ? _mm256_fmadd_ps(w1, x1, d1[r]) : _mm256_mul_ps(w1, x1);
        }
      }
      for (int r = 0; r < ROWS; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_add_ps(d0[r], d1[r]), chunk_scale(scale + (n + r) * ng, c, gof), acc[r]);
    }
    for (int r = 0; r < ROWS; ++r) y[n + r] = wide[r] + hsum256(acc[r]) + tail[r][0];
#else
    for (int r = 0; r < ROWS; ++r) y[n + r] = q4_dot_scalar(xp, qw + (n + r) * (K / 2), scale + (n + r) * ng, K64, G) + tail[r][0];
#endif
  }
}

#ifdef MOPS_INT4_VNNI
// ---- 4-bit, M = 1, AVX-512 VNNI: integer dot products ------------------------------------------
// x as 23-bit fixed point per 8 columns l (one 32-bit lane of the kernels' accumulators):
// x = X * 2^(e_l - 22), |x| < 2^e_l, X an integer with |X| <= 2^22, so rounding x to X errs by at
// most 2^-23 * 2^e_l <= 2^-22 * (the largest |x| of those 8 columns): about fp32's own rounding of
// the products for x of one scale (the tests: within 2x of the fp32 kernel's error against fp64,
// relative to the size of the terms), coarser beside an outlier in the same 8 columns (200x: ~4e-6
// against the fp32 kernel's ~1.4e-6, where SPEC allows 1e-4). X is split into three signed bytes,
// X = 2^16 d2 + 2^8 d1 + d0 (d0, d1 in [-128, 127], |d2| <= 65), and the codes stay integers:
// vpdpbusd multiplies 4 unsigned bytes (codes 0..15) by 4 signed bytes (digits) and adds them into a
// 32-bit lane. A 64-byte load of codes (128 columns: byte t = columns 2t (low nibble) and 2t + 1
// (high)) gives the even columns' codes as v & 0x0f and the odd columns' as (v >> 4) & 0x0f: three
// instructions for 128 codes, six vpdpbusd for their products with the three digits, then per lane
// a0 + 2^8 a1 + 2^16 a2 (|a| <= 8 * 15 * 128 per lane and chunk: below 2^30, exact as int32) and one
// conversion, so y += (that sum) * scale_g * 2^(e_l - 22): where the fp32 kernel spends two ands, two
// converts and two FMAs per 16 codes, this spends 1.5 vpdpbusd (whose throughput bounds it: ~8.5 ns
// per 576-column row on the development machine's Zen 5, against ~12 for the fp32 kernel; ad hoc).
// x's layout (vnni_prepare_x): per chunk of W = 128 (or 64) columns at c, for digit i = 0..2, the
// W/2 bytes of the even columns (byte t: column c + 2t), then of the odd ones, at 3c + i W.
// Runs where G divides 128 (the wide layout's chunks); the K % 64 == 32 tail as in the fp32 kernel
// (q4_tail, with x in natural order), the min terms in the lanes (16 groups per step).

// x [K] -> xd [3 K] (the digits, the layout above), lane_scale [K/8] (2^(e_l - 22) of columns
// 8l..8l+7), xsum [K/G]. False (nothing usable) when x holds a NaN or an infinity, or 8 columns
// below 2^-64 that are not all zeros (their scale would lose precision as an fp32 subnormal): the
// caller runs the fp32 kernel then.
inline bool vnni_prepare_x(const float* x, int8_t* xd, float* lane_scale, float* xsum, int64_t K, int64_t G) {
  const int64_t ng = K / G, K64 = K - K % 64, K128 = K - K % 128;
  for (int64_t g = 0; g < ng; ++g) {  // the min terms' sums of x
    __m512 sum = _mm512_loadu_ps(x + g * G);
    for (int64_t c = 16; c < G; c += 16) sum = _mm512_add_ps(sum, _mm512_loadu_ps(x + g * G + c));
    xsum[g] = _mm512_reduce_add_ps(sum);
  }
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i expo = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  for (int64_t c = 0; c < K64; c += 32) {  // 32 columns (4 lanes of 8): 16 even, 16 odd
    __m512i X2[2];
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_loadu_ps(x + c + 16 * h);
      // each lane's largest |x| in all 8 of its places (pairs, quads, then the lanes' two halves)
      __m512 m = _mm512_abs_ps(v);
      m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xb1));
      m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4e));
      m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xb1));
      const __m512i mb = _mm512_castps_si512(m);
      bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(mb, expo), expo);         // NaN or +-inf
      // m < 2^e: e = biased exponent - 126 (-126 for a subnormal or zero m)
      const __m512i e = _mm512_sub_epi32(_mm512_max_epi32(_mm512_srli_epi32(mb, 23), _mm512_set1_epi32(0)),
                                         _mm512_set1_epi32(126));
      const __mmask16 zero = _mm512_cmpeq_epi32_mask(mb, _mm512_setzero_si512());
      bad |= _mm512_mask_cmplt_epi32_mask(~zero, e, _mm512_set1_epi32(-64));  // a lane below 2^-64
      X2[h] = _mm512_cvtps_epi32(_mm512_scalef_ps(v, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(22), e))));
      // 2^(e - 22) from its bits (e - 22 >= -86 where used: a normal float), 0 for a lane of zeros
      const __m512 ls = _mm512_maskz_mov_ps(~zero, _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_add_epi32(e, _mm512_set1_epi32(127 - 22)), 23)));
      lane_scale[(c + 16 * h) / 8] = _mm512_cvtss_f32(ls);
      lane_scale[(c + 16 * h) / 8 + 1] = _mm512_cvtss_f32(_mm512_shuffle_f32x4(ls, ls, 0x0e));
    }
    const int64_t c0 = c < K128 ? c - c % 128 : c - (c - K128) % 64;  // its chunk
    const int64_t W = c < K128 ? 128 : 64;
    for (int par = 0; par < 2; ++par) {
      const __m512i X = _mm512_permutex2var_epi32(X2[0], par ? odd : even, X2[1]);
      // balanced digits from bytes: X + 0x8080 = sum 2^8i c_i (c_0, c_1 in 0..255), so d_i = c_i - 128
      // (the byte xor 0x80, read as signed) for i < 2, and d2 = (X + 0x8080) >> 16 (|X| <= 2^22: |d2| <= 65)
      const __m512i Xb = _mm512_add_epi32(X, _mm512_set1_epi32(0x8080));
      const __m512i V = _mm512_xor_si512(Xb, _mm512_set1_epi32(0x8080));
      int8_t* o = xd + 3 * c0 + par * (W / 2) + (c - c0) / 2;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm512_cvtepi32_epi8(V));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + W), _mm512_cvtepi32_epi8(_mm512_srli_epi32(V, 8)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * W), _mm512_cvtepi32_epi8(_mm512_srai_epi32(Xb, 16)));
    }
  }
  return !bad;
}

// The sum of a row's 16 partial sums, in the order of sum8 below (so that a row's bits do not depend
// on the step it ran in): lanes i + 8, then i + 4, i + 2, i + 1.
inline float sum16(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  const __m128 u = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 v = _mm_add_ps(u, _mm_movehl_ps(u, u));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

// The 8 sums of 8 rows' partial sums (the order of sum16), stored to y[0..7]: one transposing tree
// instead of 8 horizontal sums.
inline void sum8(const __m512 (&a)[8], float* y) {
  __m256 h[8];
  for (int r = 0; r < 8; ++r)
    h[r] = _mm256_add_ps(_mm512_castps512_ps256(a[r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[r]), 1)));
  __m256 u[4];  // u[p] = rows 2p (low 128 bits), 2p + 1 (high): lanes i + 4 added
  for (int p = 0; p < 4; ++p)
    u[p] = _mm256_add_ps(_mm256_permute2f128_ps(h[2 * p], h[2 * p + 1], 0x20),
                         _mm256_permute2f128_ps(h[2 * p], h[2 * p + 1], 0x31));
  // v[q]: lanes i + 2 added; 128-bit halves [row 4q (2), row 4q + 2 (2) | row 4q + 1 (2), row 4q + 3 (2)]
  __m256 v[2];
  for (int q = 0; q < 2; ++q)
    v[q] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * q], u[2 * q + 1], 0x44), _mm256_shuffle_ps(u[2 * q], u[2 * q + 1], 0xee));
  // w: lanes i + 1 added; [rows 0, 2, 4, 6 | rows 1, 3, 5, 7]
  const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(v[0], v[1], 0x88), _mm256_shuffle_ps(v[0], v[1], 0xdd));
  _mm256_storeu_ps(y, _mm256_permutevar8x32_ps(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

// a0 + 2^8 a1 + 2^16 a2 as fp32 (exact as int32: below 2^30, see above; one rounding to fp32)
inline __m512 digits_sum(const __m512i (&a)[3]) {
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(a[0], _mm512_slli_epi32(a[1], 8)), _mm512_slli_epi32(a[2], 16)));
}
inline __m256 digits_sum(const __m256i (&a)[3]) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_add_epi32(a[0], _mm256_slli_epi32(a[1], 8)), _mm256_slli_epi32(a[2], 16)));
}

// Rows n in [n0, n1) of y [N], ROWS weight rows per step (they share the x loads); x: natural order
// (the tail), xsum: per-group sums. K128 = K - K % 128 > 0 and G divides 128 (the caller checks).
// A row's 16 partial sums take its 128-column chunks, its 64-column chunk (lanes 0..7) and its min
// terms (16 groups per step), then one sum (sum16 / sum8).
template <int ROWS>
void q4_gemv1_vnni(const int8_t* xd, const float* lane_scale, const float* x, const float* xsum,
                   const uint8_t* qw, const uint16_t* scale, const uint16_t* mins, float* y, int64_t K,
                   int64_t G, int64_t n0, int64_t n1, int64_t N) {
  const int64_t ng = K / G, K64 = K - K % 64, K128 = K - K % 128;
  const GroupOf gof(G);
  const WideScale wscale(G);
  if (N < n1) N = n1;
  for (int64_t n = n0; n + ROWS <= n1; n += ROWS) {
    float tail[ROWS][1];
    if (K64 < K) q4_tail<ROWS, 1, false>(x, xsum, qw, scale, mins, K, G, n, 1, tail);
    const RowPrefetch pf{qw, scale, mins, K, ng, N};
    pf.step(n, ROWS);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K128; c += 128) {
      pf.codes(n, ROWS, c);
      pf.codes(n, ROWS, c + 64);
      const int8_t* d = xd + 3 * c;
      const __m512 xs = _mm512_loadu_ps(lane_scale + c / 8);
      for (int r = 0; r < ROWS; ++r) {
        const __m512i v = _mm512_loadu_si512(qw + (n + r) * (K / 2) + c / 2);
        const __m512i qe = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
        const __m512i qo = _mm512_and_si512(_mm512_srli_epi32(v, 4), _mm512_set1_epi8(0x0f));
        __m512i a[3];
        for (int i = 0; i < 3; ++i)
          a[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), qe, _mm512_loadu_si512(d + 128 * i)),
                                     qo, _mm512_loadu_si512(d + 128 * i + 64));
        acc[r] = _mm512_fmadd_ps(digits_sum(a), _mm512_mul_ps(wscale(scale + (n + r) * ng, gof(c)), xs), acc[r]);
      }
    }
    for (int64_t c = K128; c < K64; c += 64) {  // a 64-column chunk: 8 lanes, the same scheme
      pf.codes(n, ROWS, c);
      const int8_t* d = xd + 3 * c;
      const __m256 xs = _mm256_loadu_ps(lane_scale + c / 8);
      if constexpr (ROWS % 2 == 0) {  // two rows per 512-bit register (row r: lanes 0..7, r + 1: 8..15)
        const __m512 xs2 = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(xs)));
        for (int r = 0; r < ROWS; r += 2) {
          const uint8_t* r0 = qw + (n + r) * (K / 2) + c / 2;
          const __m512i v = _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0))),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + K / 2)), 1);
          const __m512i qe = _mm512_and_si512(v, _mm512_set1_epi8(0x0f));
          const __m512i qo = _mm512_and_si512(_mm512_srli_epi32(v, 4), _mm512_set1_epi8(0x0f));
          __m512i a[3];
          for (int i = 0; i < 3; ++i) {
            const __m512i de = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 64 * i)));
            const __m512i dd = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 64 * i + 32)));
            a[i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), qe, de), qo, dd);
          }
          const __m512 s2 = _mm512_castpd_ps(_mm512_insertf64x4(
              _mm512_castpd256_pd512(_mm256_castps_pd(chunk_scale(scale + (n + r) * ng, c, gof))),
              _mm256_castps_pd(chunk_scale(scale + (n + r + 1) * ng, c, gof)), 1));
          const __m512 prod = _mm512_mul_ps(digits_sum(a), _mm512_mul_ps(s2, xs2));
          acc[r] = _mm512_mask_add_ps(acc[r], 0x00ff, acc[r], prod);
          const __m512 high = _mm512_castps256_ps512(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(prod), 1)));
          acc[r + 1] = _mm512_mask_add_ps(acc[r + 1], 0x00ff, acc[r + 1], high);
        }
      } else {
        for (int r = 0; r < ROWS; ++r) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qw + (n + r) * (K / 2) + c / 2));
          const __m256i qe = _mm256_and_si256(v, _mm256_set1_epi8(0x0f));
          const __m256i qo = _mm256_and_si256(_mm256_srli_epi32(v, 4), _mm256_set1_epi8(0x0f));
          __m256i a[3];
          for (int i = 0; i < 3; ++i) {
            const __m256i de = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 64 * i));
            const __m256i dd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 64 * i + 32));
            a[i] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), qe, de), qo, dd);
          }
          const __m256 prod = _mm256_mul_ps(digits_sum(a),
                                            _mm256_mul_ps(chunk_scale(scale + (n + r) * ng, c, gof), xs));
          acc[r] = _mm512_mask_add_ps(acc[r], 0x00ff, acc[r], _mm512_castps256_ps512(prod));  // into lanes 0..7
        }
      }
    }
    for (int64_t g = 0; g < ng; g += 16) {  // the min terms: mn[g] * sum of x over group g
      const __mmask16 mk = ng - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (ng - g)) - 1);
      const __m512 xg = _mm512_maskz_loadu_ps(mk, xsum + g);
      for (int r = 0; r < ROWS; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, mins + (n + r) * ng + g)), xg, acc[r]);
    }
    if constexpr (ROWS == 8) {
      float out[8];
      sum8(acc, out);
      for (int r = 0; r < ROWS; ++r) y[n + r] = K64 < K ? out[r] + tail[r][0] : out[r];
    } else {
      for (int r = 0; r < ROWS; ++r) y[n + r] = K64 < K ? sum16(acc[r]) + tail[r][0] : sum16(acc[r]);
    }
  }
}

// One thread's share of a 1-token call on the VNNI kernel: output rows [b, e) (rows_by_8_4_1).
inline void q4_chunk_vnni(const int8_t* xd, const float* lane_scale, const float* x, const float* xsum,
                          const uint8_t* q, const uint16_t* s, const uint16_t* mn, float* y, int64_t N,
                          int64_t K, int64_t G, int64_t b, int64_t e) {
  rows_by_8_4_1(b, e, [&](auto rows, int64_t lo, int64_t hi) {
    q4_gemv1_vnni<decltype(rows)::value>(xd, lane_scale, x, xsum, q, s, mn, y, K, G, lo, hi, N);
  });
}
#endif  // MOPS_INT4_VNNI

// M > 1: rows n in [n0, n1) of y [M, N], rows of x in tiles of MT (1 or 4) whose dot products are
// independent FMA chains; each chunk (128 columns below K128, then 64) is decoded once into
// registers and reused for all M rows. xp and xsum hold M rounded up to MT rows (zero padded),
// MAXM >= that.
template <int MT, int MAXM>
void q4_rows(const float* xp, const float* xsum, const uint8_t* qw, const uint16_t* scale,
             const uint16_t* mins, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
             int64_t n0, int64_t n1, int64_t K128 = 0) {
  const int64_t ng = K / G;
  const int64_t K64 = K - K % 64;
  const int mm = (int)(M < MAXM ? M : MAXM);
  const int mpad = (mm + MT - 1) / MT * MT;
  const GroupOf gof(G);
#ifdef MOPS_INT4_AVX512
  const WideScale wscale(K128 ? G : 32);
#endif
  for (int64_t n = n0; n < n1; ++n) {
    float tail[1][MAXM];
    q4_tail<1, MAXM>(xp, xsum, qw, scale, mins, K, G, n, mm, tail);
    const uint8_t* row = qw + n * (K / 2);
#ifdef MOPS_INT4_AVX2
    float wide[MAXM];
    for (int m = 0; m < mpad; ++m) wide[m] = 0.f;
#ifdef MOPS_INT4_AVX512
    if (K128) {
      __m512 acc[MAXM];
      for (int m = 0; m < mpad; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t c = 0; c < K128; c += 128) {
        const __m512i v = _mm512_loadu_si512(row + c / 2);
        __m512 w[8];
        for (int k = 0; k < 4; ++k) decode128(v, k, w[2 * k], w[2 * k + 1]);
        const __m512 sv = wscale(scale + n * ng, gof(c));
        for (int m0 = 0; m0 < mpad; m0 += MT) {
          __m512 d[MT];
          for (int k = 0; k < MT; ++k) d[k] = _mm512_setzero_ps();
          for (int e = 0; e < 8; ++e)
            for (int k = 0; k < MT; ++k)
              d[k] = _mm512_fmadd_ps(w[e], _mm512_loadu_ps(xp + (m0 + k) * K + c + 16 * e), d[k]);
          for (int k = 0; k < MT; ++k) acc[m0 + k] = _mm512_fmadd_ps(d[k], sv, acc[m0 + k]);
        }
      }
      for (int m = 0; m < mpad; ++m) wide[m] = _mm512_reduce_add_ps(acc[m]);
    }
#endif
    __m256 acc[MAXM];
    for (int m = 0; m < mpad; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t c = K128; c < K64; c += 64) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2));
      __m256 w[8];
      for (int k = 0; k < 4; ++k) decode64(v, k, w[2 * k], w[2 * k + 1]);
      const __m256 sv = chunk_scale(scale + n * ng, c, gof);
      for (int m0 = 0; m0 < mpad; m0 += MT) {
        __m256 d[MT];
        for (int k = 0; k < MT; ++k) d[k] = _mm256_setzero_ps();
        for (int e = 0; e < 8; ++e)
          for (int k = 0; k < MT; ++k)
            d[k] = _mm256_fmadd_ps(w[e], _mm256_loadu_ps(xp + (m0 + k) * K + c + 8 * e), d[k]);
        for (int k = 0; k < MT; ++k) acc[m0 + k] = _mm256_fmadd_ps(d[k], sv, acc[m0 + k]);
      }
    }
    for (int m = 0; m < mm; ++m) y[m * N + n] = wide[m] + hsum256(acc[m]) + tail[0][m];
#else
    (void)mpad;  // the scalar path needs no padded rows
    for (int m = 0; m < mm; ++m)
      y[m * N + n] = q4_dot_scalar(xp + m * K, row, scale + n * ng, K64, G) + tail[0][m];
#endif
  }
}

// ---- 8-bit ------------------------------------------------------------------------------------
// Rows n in [n0, n1) of y [M, N]; qw: K int8 per row (G = 32), xp = x (natural order).
template <int MAXM>
void q8_rows(const float* xp, const int8_t* qw, const uint16_t* scale, float* y, int64_t M,
             int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t ng = K / G;
  const int mm = (int)(M < MAXM ? M : MAXM);
  const GroupOf gof(G);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = qw + n * K;
#ifdef MOPS_INT4_AVX2
    __m256 acc[MAXM];
    for (int m = 0; m < mm; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K; c += kChunk) {
      const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
      const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b0));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b0, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b1));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b1, 8)));
      const __m256 s = _mm256_set1_ps(half_to_float(scale[n * ng + gof(c)]));
      for (int m = 0; m < mm; ++m) {
        const float* xr = xp + m * K + c;
        __m256 d0 = _mm256_mul_ps(w0, _mm256_loadu_ps(xr));
        __m256 d1 = _mm256_mul_ps(w1, _mm256_loadu_ps(xr + 8));
        d0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), d0);
        d1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), d1);
        acc[m] = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), s, acc[m]);
      }
    }
    for (int m = 0; m < mm; ++m) y[m * N + n] = hsum256(acc[m]);
#else
    float acc[MAXM];
    for (int m = 0; m < mm; ++m) acc[m] = 0.f;
    for (int64_t c = 0; c < K; c += kChunk) {
      float w[kChunk];
      for (int i = 0; i < kChunk; ++i) w[i] = (float)row[c + i];
      const float s = half_to_float(scale[n * ng + gof(c)]);
      for (int m = 0; m < mm; ++m) {
        const float* xr = xp + m * K + c;
        float d = 0.f;
        for (int i = 0; i < kChunk; ++i) d += w[i] * xr[i];
        acc[m] += d * s;
      }
    }
    for (int m = 0; m < mm; ++m) y[m * N + n] = acc[m];
#endif
  }
}

// Dense fp32 rows W[n0:n1, :] -> out [(n1 - n0), K] in natural column order (for the large-M
// forward, which multiplies dequantized tiles with BLAS, and for the backward dx = dy @ W).
inline void dequant_rows(const uint8_t* qw, const uint16_t* scale, const uint16_t* mins,
                         float* out, int64_t K, int64_t G, int bits, int64_t n0, int64_t n1) {
  const int64_t ng = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
    for (int64_t g = 0; g < ng; ++g) {
      const float s = half_to_float(scale[n * ng + g]);
      if (bits == 4) {
        const float mn = half_to_float(mins[n * ng + g]);
        const uint8_t* p = qw + n * (K / 2) + g * G / 2;
        for (int64_t i = 0; i < G / 2; ++i) {
          o[g * G + 2 * i] = (float)(p[i] & 0x0f) * s + mn;
          o[g * G + 2 * i + 1] = (float)(p[i] >> 4) * s + mn;
        }
      } else {
        const int8_t* p = reinterpret_cast<const int8_t*>(qw) + n * K + g * G;
        for (int64_t i = 0; i < G; ++i) o[g * G + i] = (float)p[i] * s;
      }
    }
  }
}

constexpr int kGemmNR = 12;  // weight rows per GEMM panel (the glue splits N in panels)
constexpr int kGemmMR = 32;  // rows of x per GEMM block

#ifdef MOPS_INT4_AVX512
// ---- GEMM (many rows of x: a prefill), AVX-512 ---------------------------------------------------
// The register-blocked outer product of a BLAS kernel, on weights dequantized per panel:
//   - x is packed once per call, transposed, in blocks of up to kGemmMR = 32 rows (xt [K][rows of the
//     block]; a last block of <= 16 rows holds 16): one k step loads the block's column as 1-2 vectors;
//   - each thread dequantizes kGemmNR = 12 weight rows at a time into fp32 [12][K] (natural column
//     order; rows past N are zeros), which stays in L1/L2 while every x block runs against it;
//   - the tile: 12 x 32 outputs in 24 accumulators, per k 2 vector loads of x, 12 broadcasts of a
//     weight and 24 FMAs (FMA-bound), then written to y [M, N] (only the rows and columns that exist).
// Each output is an fp32 sum over k of x[m, k] * (q * s + mn) (8-bit: q * s), in order within blocks
// of kGemmKB columns, the blocks' sums added in order.

// Rows of the x block that starts at row m0 (of M): 32, or 16 for a last block of <= 16 rows.
inline int gemm_block_rows(int64_t M, int64_t m0) { return M - m0 > 16 ? kGemmMR : 16; }

// x [M, K] -> xt: block b (rows m0 = 32 b ..) at xt + m0 * K, laid out [K][gemm_block_rows], zero
// rows past M.
inline void gemm_pack_x(const float* x, float* xt, int64_t M, int64_t K) {
  for (int64_t m0 = 0; m0 < M; m0 += kGemmMR) {
    const int R = gemm_block_rows(M, m0);
    const int rows = (int)(M - m0 < R ? M - m0 : R);
    float* o = xt + m0 * K;
    for (int64_t k = 0; k < K; ++k) {
      int i = 0;
      for (; i < rows; ++i) o[k * R + i] = x[(m0 + i) * K + k];
      for (; i < R; ++i) o[k * R + i] = 0.f;
    }
  }
}

// Weight rows [n, n + 12) of W (rows >= N: zeros) as fp32 [12][K] in natural column order.
inline void gemm_panel(const uint8_t* qw, const uint16_t* scale, const uint16_t* mins, int64_t N,
                       int64_t K, int64_t G, int bits, int64_t n, float* w) {
  const int64_t ng = K / G;
  const GroupOf gof(G);
  // 4-bit: byte i of a 32-column block holds columns 2i (low nibble) and 2i + 1 (high nibble)
  alignas(64) int32_t i0[16], i1[16];
  for (int j = 0; j < 16; ++j) {
    i0[j] = (j % 2 ? 16 : 0) + j / 2;
    i1[j] = (j % 2 ? 16 : 0) + 8 + j / 2;
  }
  const __m512i idx0 = _mm512_load_si512(i0), idx1 = _mm512_load_si512(i1);
  for (int r = 0; r < kGemmNR; ++r) {
    float* o = w + r * K;
    if (n + r >= N) {
      std::memset(o, 0, sizeof(float) * K);
      continue;
    }
    for (int64_t c = 0; c < K; c += 32) {
      const int64_t g = (n + r) * ng + gof(c);
      const __m512 s = _mm512_set1_ps(half_to_float(scale[g]));
      if (bits == 4) {
        const __m512 mn = _mm512_set1_ps(half_to_float(mins[g]));
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qw + (n + r) * (K / 2) + c / 2)));
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f))), s, mn);
        const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, mn);
        _mm512_storeu_ps(o + c, _mm512_permutex2var_ps(lo, idx0, hi));
        _mm512_storeu_ps(o + c + 16, _mm512_permutex2var_ps(lo, idx1, hi));
      } else {
        const int8_t* p = reinterpret_cast<const int8_t*>(qw) + (n + r) * K + c;
        const __m128i* pv = reinterpret_cast<const __m128i*>(p);
        _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pv))), s));
        _mm512_storeu_ps(o + c + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(pv + 1))), s));
      }
    }
  }
}

// out [12][16 MV] (+)= W panel [12][k0, k0 + kn) x (x block [k0, k0 + kn)[16 MV])^T: xt and w point at
// column k0 (w's rows are ld apart); add: out holds the earlier blocks' sums, and this block's own sum
// (from zero) is added to them.
template <int MV>
inline void gemm_tile(const float* xt, const float* w, int64_t ld, int64_t kn, float* out, bool add) {
  __m512 acc[kGemmNR][MV];
#pragma GCC unroll 12
  for (int r = 0; r < kGemmNR; ++r)
    for (int i = 0; i < MV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kn; ++k) {
    __m512 xv[MV];
    for (int i = 0; i < MV; ++i) xv[i] = _mm512_loadu_ps(xt + k * 16 * MV + 16 * i);
#pragma GCC unroll 12
    for (int r = 0; r < kGemmNR; ++r) {
      const __m512 b = _mm512_set1_ps(w[r * ld + k]);
      for (int i = 0; i < MV; ++i) acc[r][i] = _mm512_fmadd_ps(xv[i], b, acc[r][i]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kGemmNR; ++r)
    for (int i = 0; i < MV; ++i) {
      float* o = out + r * 16 * MV + 16 * i;
      _mm512_storeu_ps(o, add ? _mm512_add_ps(_mm512_loadu_ps(o), acc[r][i]) : acc[r][i]);
    }
}

// Columns per k block of a GEMM tile: each output sums its block in order, then adds the block's sum to
// the earlier blocks' (the rounding error grows with the block and the number of blocks, not with K).
constexpr int64_t kGemmKB = 256;

// One thread's share: output columns [b, e) of y [M, N] (b a multiple of 12), x packed by
// gemm_pack_x, w a [12][K] fp32 scratch buffer of this thread.
inline void gemm_chunk(const float* xt, const uint8_t* qw, const uint16_t* scale, const uint16_t* mins,
                       float* y, int64_t M, int64_t N, int64_t K, int64_t G, int bits, int64_t b,
                       int64_t e, float* w) {
  alignas(64) float out[kGemmNR * kGemmMR];
  for (int64_t n = b; n < e; n += kGemmNR) {
    gemm_panel(qw, scale, mins, N, K, G, bits, n, w);
    const int cols = (int)(e - n < kGemmNR ? e - n : kGemmNR);
    for (int64_t m0 = 0; m0 < M; m0 += kGemmMR) {
      const int R = gemm_block_rows(M, m0);
      for (int64_t k0 = 0; k0 < K; k0 += kGemmKB) {
        const int64_t kn = K - k0 < kGemmKB ? K - k0 : kGemmKB;
        if (R == kGemmMR)
          gemm_tile<2>(xt + m0 * K + k0 * R, w + k0, K, kn, out, k0 > 0);
        else
          gemm_tile<1>(xt + m0 * K + k0 * R, w + k0, K, kn, out, k0 > 0);
      }
      const int rows = (int)(M - m0 < R ? M - m0 : R);
      for (int i = 0; i < rows; ++i)
        for (int r = 0; r < cols; ++r) y[(m0 + i) * N + n + r] = out[r * R + i];
    }
  }
}
// ---- few rows of x (2 <= M < the GEMM's 12): dot products from the dequantized panel --------------
// The GEMV passes read 8 x vectors per 128 weights and row of x, and run at about half the FMA
// rate; the GEMM's 16- or 32-row x blocks waste most of their lanes below 12 rows. Here each thread
// dequantizes 12 weight rows into the GEMM's fp32 panel [12][K] and multiplies RB of them with all
// M rows of x at once: per 16 columns RB + M vector loads feed RB * M FMAs into RB * M accumulators
// (<= 24 registers), each lane summing its columns k = l (mod 16); one horizontal sum per output.
template <int RB, int MM>
inline void panel_dots(const float* x, const float* w, int64_t K, float* out /* [RB][MM] */) {
  __m512 acc[RB][MM];
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MM; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = _mm512_loadu_ps(w + r * K + k);
    for (int m = 0; m < MM; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < RB; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int m = 0; m < MM; ++m) {
      float t = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t c = k; c < K; ++c) t += w[r * K + c] * x[m * K + c];  // K % 16 (K is a multiple of 32: none)
      out[r * MM + m] = t;
    }
}

// Weight rows RB at a time for MM rows of x (RB * MM <= 24, RB divides 12).
template <int MM>
inline void panel_rows(const float* x, const float* w, int64_t K, float* out /* [12][MM] */) {
  constexpr int RB = MM <= 2 ? 12 : MM <= 3 ? 6 : MM <= 4 ? 6 : MM <= 6 ? 4 : MM <= 8 ? 3 : 2;
  for (int r0 = 0; r0 < kGemmNR; r0 += RB) panel_dots<RB, MM>(x, w + r0 * K, K, out + r0 * MM);
}

// One thread's share: output columns [b, e) of y [M, N] (b a multiple of 12), 2 <= M <= 11, x [M, K]
// row-major fp32, w a [12][K] fp32 scratch buffer of this thread.
inline void panel_chunk(const float* x, const uint8_t* qw, const uint16_t* scale, const uint16_t* mins,
                        float* y, int64_t M, int64_t N, int64_t K, int64_t G, int bits, int64_t b,
                        int64_t e, float* w) {
  alignas(64) float out[kGemmNR * 11];
  for (int64_t n = b; n < e; n += kGemmNR) {
    gemm_panel(qw, scale, mins, N, K, G, bits, n, w);
    switch (M) {
      case 2: panel_rows<2>(x, w, K, out); break;
      case 3: panel_rows<3>(x, w, K, out); break;
      case 4: panel_rows<4>(x, w, K, out); break;
      case 5: panel_rows<5>(x, w, K, out); break;
      case 6: panel_rows<6>(x, w, K, out); break;
      case 7: panel_rows<7>(x, w, K, out); break;
      case 8: panel_rows<8>(x, w, K, out); break;
      case 9: panel_rows<9>(x, w, K, out); break;
      case 10: panel_rows<10>(x, w, K, out); break;
      default: panel_rows<11>(x, w, K, out); break;
    }
    const int cols = (int)(e - n < kGemmNR ? e - n : kGemmNR);
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < cols; ++r) y[m * N + n + r] = out[r * M + m];
  }
}
#endif  // MOPS_INT4_AVX512

// One thread's share of a GEMV call (M <= the glue's max_gemv_m, at most 64): output rows [b, e) of y [M, N],
// rows of x in passes of `pass` (<= kMaxGemvM) (xp / xsum zero-padded to a multiple of 4 rows).
inline void q4_chunk(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s,
                     const uint16_t* mn, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                     int64_t pass, int64_t b, int64_t e, int64_t K128) {
  const int64_t ng = K / G;
  if (M == 1) {
    // 8 rows per step, then 4, then one by one (rows_by_8_4_1). 8 rows keep twice the weight lines in
    // flight: from DRAM (a decode step) they stream faster, though the 8 rows' accumulators spill.
    // Ad hoc, one token, 2 threads, OMP_WAIT_POLICY=PASSIVE, weights rotated past the LLC, medians
    // of 3000 calls, best of 3 alternating rounds: 3072x576 64.1 -> 42.9 us, 960x576 26.9 -> 20.3,
    // 576x576 16.8 -> 13.0, 576x1536 26.5 -> 24.9, 192x576 9.2 -> 8.8; cache-resident 7-13% slower
    // (576x576 6.94 -> 7.72 us); SmolLM2 batch-1 decode in one process, alternating rounds:
    // 220-224 against 191-198 tok/s, and 189-221 against 164-193.
    rows_by_8_4_1(b, e, [&](auto rows, int64_t lo, int64_t hi) {
      q4_gemv1<decltype(rows)::value>(xp, xsum, q, s, mn, y, K, G, lo, hi, K128, N);
    });
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += pass)
    q4_rows<4, kMaxGemvM>(xp + m0 * K, xsum + m0 * ng, q, s, mn, y + m0 * N,
                          pass < M - m0 ? pass : M - m0, N, K, G, b, e, K128);
}

inline void q8_chunk(const float* xp, const int8_t* q, const uint16_t* s, float* y, int64_t M,
                     int64_t N, int64_t K, int64_t G, int64_t pass, int64_t b, int64_t e) {
  for (int64_t m0 = 0; m0 < M; m0 += pass) {
    const int64_t mm = pass < M - m0 ? pass : M - m0;
    if (mm == 1)
      q8_rows<1>(xp + m0 * K, q, s, y + m0 * N, mm, N, K, G, b, e);
    else if (mm <= 4)
      q8_rows<4>(xp + m0 * K, q, s, y + m0 * N, mm, N, K, G, b, e);
    else
      q8_rows<16>(xp + m0 * K, q, s, y + m0 * N, mm, N, K, G, b, e);
  }
}

}  // namespace MOPS_INT4_ISA
}  // namespace int4cpu
}  // namespace mops
