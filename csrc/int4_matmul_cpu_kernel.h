// int4_matmul CPU kernels: y[m, n] = sum_c x[m, c] * W[n, c] for a block-quantized W (SPEC §3).
// Raw pointers only, no torch headers. The glue (int4_matmul_cpu.cpp) checks, threads and dispatches.
//
//   4-bit (Q4_1): W[n, c] = q * s[n, g] + mn[n, g]    q in 0..15, two codes per byte (low nibble =
//                 even column), so   sum_c x W = sum_g ( s * sum_{c in g} x q  +  mn * sum_{c in g} x )
//                 The second term uses per-group sums of x (xsum [M, K/G], computed once per call).
//   8-bit (Q8_0): W[n, c] = q * s[n, g]               q int8, G = 32
//
// Layout trick for 4-bit: a 32-byte load holds 64 columns as 8 little-endian 32-bit words; word j
// carries columns 8j..8j+7 as its nibbles 0..7. `(word >> 4e) & 15` for e = 0..7 gives 8 vectors of
// codes with no cross-lane shuffle (shift, and, convert: ports every core has plenty of), and the
// glue permutes x once per call to the same order (xp[64b + 8e + j] = x[64b + 8j + e]). A trailing
// 32-column block (K % 64 == 32) keeps x's natural order and runs a scalar loop.
//
// Each decoded 64-column chunk is reused for all M (<= 16) rows of x before the next one is read;
// for M = 1 two weight rows are decoded per step (independent FMA chains, shared x loads).
// AVX2 + FMA + F16C intrinsics when compiled with them (-march=native), else a scalar fallback.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MOPS_INT4_AVX2 1
#endif

namespace mops {
namespace int4cpu {

constexpr int kChunk = 32;  // columns per decoded chunk (the smallest group size)

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

// xp [M, K]: x with every 32-column block permuted to [even | odd] (4-bit), or a copy (8-bit).
// xsum [M, K/G]: per-group sums of x (4-bit only; may be null for 8-bit).
inline void prepare_x(const float* x, float* xp, float* xsum, int64_t M, int64_t K, int64_t G,
                      int bits) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* pr = xp + m * K;
    if (bits == 4) {
      const int64_t K64 = K - K % 64;
      for (int64_t b = 0; b < K64; b += 64)
        for (int e = 0; e < 8; ++e)
          for (int j = 0; j < 8; ++j) pr[b + 8 * e + j] = xr[b + 8 * j + e];
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
// Rows n in [n0, n1) of y [M, N] (fp32). qw: K/2 bytes per row; scale, mins: fp16 bits [N, K/G].
// ROWS weight rows per step (2 for M = 1). Rows of x go in tiles of MT (1 or 4) whose dot products
// are independent FMA chains; xp and xsum hold M rounded up to MT rows (zero padded), MAXM >= that.
template <int ROWS, int MT, int MAXM>
void q4_rows(const float* xp, const float* xsum, const uint8_t* qw, const uint16_t* scale,
             const uint16_t* mins, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
             int64_t n0, int64_t n1) {
  const int64_t ng = K / G;
  const int64_t K64 = K - K % 64;
  const int mm = (int)(M < MAXM ? M : MAXM);
  const int mpad = (mm + MT - 1) / MT * MT;
  for (int64_t n = n0; n + ROWS <= n1; n += ROWS) {
    float tail[ROWS][MAXM];  // the trailing 32-column block and the min terms, in scalar
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < mm; ++m) {
        float t = 0.f;
        const uint8_t* row = qw + (n + r) * (K / 2);
        if (K64 < K) {
          const float* xr = xp + m * K + K64;
          float d = 0.f;
          for (int i = 0; i < 16; ++i)
            d += (float)(row[K64 / 2 + i] & 0x0f) * xr[2 * i] + (float)(row[K64 / 2 + i] >> 4) * xr[2 * i + 1];
          t += d * half_to_float(scale[(n + r) * ng + K64 / G]);
        }
        tail[r][m] = t + dot_half_float(mins + (n + r) * ng, xsum + m * ng, ng);
      }
#ifdef MOPS_INT4_AVX2
    const __m256i mask = _mm256_set1_epi32(0x0f);
    __m256 acc[ROWS][MAXM];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < mpad; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K64; c += 64) {
      __m256 w[ROWS][8];
      __m256 sv[ROWS];
      for (int r = 0; r < ROWS; ++r) {
        const uint8_t* row = qw + (n + r) * (K / 2);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c / 2));
        for (int e = 0; e < 8; ++e)
          w[r][e] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * e), mask));
        // lanes 0..3 hold columns c..c+31, lanes 4..7 columns c+32..c+63 (maybe the next group)
        const uint16_t* sr = scale + (n + r) * ng;
        sv[r] = _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_set1_epi16((short)sr[c / G]),
                                                   _mm_set1_epi16((short)sr[(c + 32) / G])));
      }
      for (int m0 = 0; m0 < mpad; m0 += MT) {
        __m256 d[ROWS][MT];
        for (int r = 0; r < ROWS; ++r)
          for (int k = 0; k < MT; ++k) d[r][k] = _mm256_setzero_ps();
        for (int e = 0; e < 8; ++e)
          for (int k = 0; k < MT; ++k) {
            const __m256 xv = _mm256_loadu_ps(xp + (m0 + k) * K + c + 8 * e);
            for (int r = 0; r < ROWS; ++r) d[r][k] = _mm256_fmadd_ps(w[r][e], xv, d[r][k]);
          }
        for (int r = 0; r < ROWS; ++r)
          for (int k = 0; k < MT; ++k) acc[r][m0 + k] = _mm256_fmadd_ps(d[r][k], sv[r], acc[r][m0 + k]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < mm; ++m) y[m * N + n + r] = hsum256(acc[r][m]) + tail[r][m];
#else
    float acc[ROWS][MAXM];
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < mm; ++m) acc[r][m] = 0.f;
    for (int64_t c = 0; c < K64; c += 64) {
      float w[ROWS][64];
      float sv[ROWS][2];
      for (int r = 0; r < ROWS; ++r) {
        const uint8_t* row = qw + (n + r) * (K / 2) + c / 2;
        for (int e = 0; e < 8; ++e)
          for (int j = 0; j < 8; ++j)  // nibble e of little-endian word j = byte 4j + e/2
            w[r][8 * e + j] = (float)((row[4 * j + e / 2] >> (4 * (e % 2))) & 0x0f);
        sv[r][0] = half_to_float(scale[(n + r) * ng + c / G]);
        sv[r][1] = half_to_float(scale[(n + r) * ng + (c + 32) / G]);
      }
      for (int m = 0; m < mm; ++m) {
        const float* xr = xp + m * K + c;
        for (int r = 0; r < ROWS; ++r) {
          float d0 = 0.f, d1 = 0.f;  // lanes 0..3 / 4..7 of each 8-vector: the two 32-column halves
          for (int e = 0; e < 8; ++e)
            for (int j = 0; j < 8; ++j) (j < 4 ? d0 : d1) += w[r][8 * e + j] * xr[8 * e + j];
          acc[r][m] += d0 * sv[r][0] + d1 * sv[r][1];
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      for (int m = 0; m < mm; ++m) y[m * N + n + r] = acc[r][m] + tail[r][m];
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
      const __m256 s = _mm256_set1_ps(half_to_float(scale[n * ng + c / G]));
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
      const float s = half_to_float(scale[n * ng + c / G]);
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

}  // namespace int4cpu
}  // namespace mops
