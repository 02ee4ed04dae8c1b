// prefix_attention decode (T = 1) on the CPU: raw pointers, no torch headers, no std containers.
//
// One call handles one (request b, kv head hkv) and its G = Hq/Hkv query heads:
//   keys = the tokens p < len[slot] of every selected slot (read in place from the pool
//          pk/pv [E, P, Hkv, D] through idx[b, j]; bias log w[b, j]; slot < 0 or w == 0 skipped)
//        + the sequence keys s < S with mask[b, s] != 0 (T = 1: causal sees the whole cache)
//   out[g] = softmax_n(scale * q[g].k_n + bias_n) @ v_n, and 0 when no key is valid.
// The valid keys are first listed (row pointers and biases), then scored for each head, softmaxed
// in fp32 and their value rows accumulated in fp32.
// The last dimension of every tensor is contiguous (the glue guarantees it); other strides are free.
//
// Instruction sets, as int4_matmul_cpu_kernel.h: this header is compiled twice, into namespace
// MOPS_PA_ISA. prefix_attention_cpu.cpp includes it as `base` (portable loops, any CPU);
// prefix_attention_cpu_avx2.cpp as `avx2` with MOPS_PA_AVX2 defined, under an AVX2 + FMA target
// pragma, where fp32 inputs take the intrinsic paths below: scores of 8 keys at a time (8
// independent FMA chains, one transpose-add), a vectorised exp, and value rows accumulated 64
// columns at a time. The glue calls the avx2 copy only when cpu_isa.h says the CPU runs it.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#ifndef MOPS_PA_ISA
#error "define MOPS_PA_ISA (base or avx2) before including prefix_attention_cpu_kernel.h"
#endif
#ifdef MOPS_PA_AVX2
#include <immintrin.h>
#endif

namespace mops {
namespace pacpu {

template <typename T>
struct DecodeArgs {
  const T* q; int64_t sqb, sqh;                 // q [B, Hq, 1, D]
  const T* k; int64_t skb, skh, sks;            // k [B, Hkv, S, D]
  const T* v; int64_t svb, svh, svs;            // v [B, Hkv, S, D]
  const T* pk; int64_t spke, spkp, spkh;        // prefix_k [E, P, Hkv, D] (nullptr: no prefixes)
  const T* pv; int64_t spve, spvp, spvh;        // prefix_v [E, P, Hkv, D]
  const int32_t* idx; int64_t kk;               // prefix_index [B, kk] contiguous
  const float* w;                               // prefix_weight [B, kk] contiguous, or nullptr
  const int32_t* lens;                          // prefix_lens [E], or nullptr (= P)
  const uint8_t* mask;                          // attention_mask [B, S] contiguous, or nullptr
  const int64_t* mask64; int64_t smb;           // or an int64 mask, row stride smb (the decode step's cache mask)
  T* out; int64_t sob, soh;                     // out [B, Hq, 1, D]
  int64_t Hkv, G, S, P, D;
  float scale;
};

// The keys one (b, hkv) may have: every slot's P tokens plus the S sequence keys.
template <typename T>
inline int64_t max_keys(const DecodeArgs<T>& a) { return a.kk * a.P + a.S; }

// Per-thread scratch, owned by the glue (sizes from scratch_floats / max_keys): the scaled q
// [G, D], scores [G, max_keys], accumulators [G, D], key biases [max_keys] and key / value row
// pointers [max_keys] each.
struct Scratch {
  float* q; float* scores; float* acc; float* bias;
  const void** krows; const void** vrows;
};
template <typename T>
inline int64_t scratch_floats(const DecodeArgs<T>& a) { return 2 * a.G * a.D + (a.G + 1) * max_keys(a); }

namespace MOPS_PA_ISA {

template <typename T>
inline float dot_row(const float* __restrict q, const T* __restrict k, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

template <typename T>
inline void axpy_row(float* __restrict acc, float p, const T* __restrict v, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += p * static_cast<float>(v[d]);
}

// scores[i] = q . krows[i] + bias[i] for i < n (q already scaled).
template <typename T>
inline void score_keys(const float* q, const void* const* krows, const float* bias, float* scores, int64_t n,
                       int64_t D) {
  for (int64_t i = 0; i < n; ++i) scores[i] = dot_row(q, static_cast<const T*>(krows[i]), D) + bias[i];
}

// s[i] = exp(s[i] - m) for i < n; returns their sum.
inline float exp_shift_sum(float* s, int64_t n, float m) {
  float l = 0.f;
  for (int64_t i = 0; i < n; ++i) { s[i] = std::exp(s[i] - m); l += s[i]; }
  return l;
}

// acc[D] += sum_i p[i] * vrows[i][D] for i < n.
template <typename T>
inline void accumulate_values(float* acc, const float* p, const void* const* vrows, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) axpy_row(acc, p[i], static_cast<const T*>(vrows[i]), D);
}

#ifdef MOPS_PA_AVX2
// 8 dot products (lanes of 8 accumulators) as one vector [sum a0, ..., sum a7].
inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// fp32: 8 keys per block, one FMA chain per key over the D columns (8 at a time); a block's
// missing keys read the first key again and are not stored. Columns D - D % 8 .. D - 1 are scalar.
template <>
inline void score_keys<float>(const float* q, const void* const* krows, const float* bias, float* scores,
                              int64_t n, int64_t D) {
  const int64_t D8 = D - D % 8;
  for (int64_t i0 = 0; i0 < n; i0 += 8) {
    const int64_t nb = n - i0 < 8 ? n - i0 : 8;
    const float* k[8];
    for (int j = 0; j < 8; ++j) k[j] = static_cast<const float*>(krows[i0 + (j < nb ? j : 0)]);
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k[j] + d), a[j]);
    }
    alignas(32) float r[8];
    _mm256_store_ps(r, sum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
    for (int64_t j = 0; j < nb; ++j) {
      float t = r[j];
      for (int64_t d = D8; d < D; ++d) t += q[d] * k[j][d];
      scores[i0 + j] = t + bias[i0 + j];
    }
  }
}

// exp(x) for lanes x <= 0 (softmax logits minus their max): 2^n * 2^f with x log2(e) = n + f,
// |f| <= 1/2, 2^f by its degree-7 Taylor polynomial in f ln 2 (relative error < 1e-8 before
// rounding); below 2^-126 the result is 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 tiny = _mm256_cmp_ps(t, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  const __m256 tc = _mm256_max_ps(t, _mm256_set1_ps(-126.f));
  const __m256 nf = _mm256_round_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(tc, nf);
  __m256 p = _mm256_set1_ps(1.525273380405984e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float exp_shift_sum_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float l = hsum(acc);
  if (i < n) {  // the last < 8 logits through a padded copy (the pad lanes are not stored or summed)
    alignas(32) float t[8] = {m, m, m, m, m, m, m, m};
    for (int64_t j = i; j < n; ++j) t[j - i] = s[j];
    _mm256_store_ps(t, exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(t), mv)));
    for (int64_t j = i; j < n; ++j) { s[j] = t[j - i]; l += t[j - i]; }
  }
  return l;
}

// fp32: 64 columns (8 accumulators) at a time over all keys, then 8, then scalar.
template <>
inline void accumulate_values<float>(float* acc, const float* p, const void* const* vrows, int64_t n, int64_t D) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_ps(acc + d + 8 * j);
    for (int64_t i = 0; i < n; ++i) {
      const __m256 pi = _mm256_set1_ps(p[i]);
      const float* v = static_cast<const float*>(vrows[i]) + d;
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(pi, _mm256_loadu_ps(v + 8 * j), a[j]);
    }
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(acc + d + 8 * j, a[j]);
  }
  for (; d + 8 <= D; d += 8) {
    __m256 a = _mm256_loadu_ps(acc + d);
    for (int64_t i = 0; i < n; ++i)
      a = _mm256_fmadd_ps(_mm256_set1_ps(p[i]), _mm256_loadu_ps(static_cast<const float*>(vrows[i]) + d), a);
    _mm256_storeu_ps(acc + d, a);
  }
  for (; d < D; ++d) {
    float a = acc[d];
    for (int64_t i = 0; i < n; ++i) a += p[i] * static_cast<const float*>(vrows[i])[d];
    acc[d] = a;
  }
}
#endif

template <typename T>
void decode_one(const DecodeArgs<T>& a, int64_t b, int64_t hkv, const Scratch& sc) {
  const int64_t G = a.G, D = a.D;
  const int64_t mk = max_keys(a);
  for (int64_t g = 0; g < G; ++g) {
    const T* qr = a.q + b * a.sqb + (hkv * G + g) * a.sqh;
    for (int64_t d = 0; d < D; ++d) sc.q[g * D + d] = static_cast<float>(qr[d]) * a.scale;
  }
  int64_t n = 0;  // valid keys listed so far
  if (a.pk != nullptr) {
    for (int64_t j = 0; j < a.kk; ++j) {
      const int64_t slot = a.idx[b * a.kk + j];
      const float w = a.w ? a.w[b * a.kk + j] : 1.f;
      if (slot < 0 || !(w > 0.f)) continue;  // empty or excluded slot
      const float bias = std::log(w);
      const int64_t ntok = a.lens ? a.lens[slot] : a.P;
      for (int64_t p = 0; p < ntok; ++p, ++n) {
        sc.krows[n] = a.pk + slot * a.spke + p * a.spkp + hkv * a.spkh;
        sc.vrows[n] = a.pv + slot * a.spve + p * a.spvp + hkv * a.spvh;
        sc.bias[n] = bias;
      }
    }
  }
  const T* kb = a.k + b * a.skb + hkv * a.skh;
  const T* vb = a.v + b * a.svb + hkv * a.svh;
  for (int64_t s = 0; s < a.S; ++s) {
    if (a.mask && a.mask[b * a.S + s] == 0) continue;
    if (a.mask64 && a.mask64[b * a.smb + s] == 0) continue;
    sc.krows[n] = kb + s * a.sks;
    sc.vrows[n] = vb + s * a.svs;
    sc.bias[n++] = 0.f;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = sc.scores + g * mk;
    float* acc = sc.acc + g * D;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
    score_keys<T>(sc.q + g * D, sc.krows, sc.bias, sg, n, D);
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = sg[i] > m ? sg[i] : m;
#ifdef MOPS_PA_AVX2
    const float l = exp_shift_sum_avx2(sg, n, m);
#else
    const float l = exp_shift_sum(sg, n, m);
#endif
    const float inv = n > 0 ? 1.f / l : 0.f;  // no valid key: the row stays 0
    for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
    accumulate_values<T>(acc, sg, sc.vrows, n, D);
    T* o = a.out + b * a.sob + (hkv * G + g) * a.soh;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d]);
  }
}

}  // namespace MOPS_PA_ISA
}  // namespace pacpu
}  // namespace mops
