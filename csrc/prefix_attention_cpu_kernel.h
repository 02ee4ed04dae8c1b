// prefix_attention decode (T = 1) on the CPU: raw pointers, no torch headers.
//
// One call handles one (request b, kv head hkv) and its G = Hq/Hkv query heads:
//   keys = the tokens p < len[slot] of every selected slot (read in place from the pool
//          pk/pv [E, P, Hkv, D] through idx[b, j]; bias log w[b, j]; slot < 0 or w == 0 skipped)
//        + the sequence keys s < S with mask[b, s] != 0 (T = 1: causal sees the whole cache)
//   out[g] = softmax_n(scale * q[g].k_n + bias_n) @ v_n, and 0 when no key is valid.
// Scores are computed once per key row for all G heads (GQA), softmax in fp32, accumulation in fp32.
// The last dimension of every tensor is contiguous (the glue guarantees it); other strides are free.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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
  T* out; int64_t sob, soh;                     // out [B, Hq, 1, D]
  int64_t Hkv, G, S, P, D;
  float scale;
};

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

// Scratch reused across calls by one thread: q (G*D), scores (G*n), value rows (n), acc (G*D).
template <typename T>
struct Scratch {
  std::vector<float> q, scores, acc;
  std::vector<const T*> vrows;
};

template <typename T>
void decode_one(const DecodeArgs<T>& a, int64_t b, int64_t hkv, Scratch<T>& sc) {
  const int64_t G = a.G, D = a.D;
  const int64_t max_keys = a.kk * a.P + a.S;
  sc.q.resize(G * D);
  sc.scores.resize(G * max_keys);
  sc.acc.assign(G * D, 0.f);
  sc.vrows.resize(max_keys);
  for (int64_t g = 0; g < G; ++g) {
    const T* qr = a.q + b * a.sqb + (hkv * G + g) * a.sqh;
    for (int64_t d = 0; d < D; ++d) sc.q[g * D + d] = static_cast<float>(qr[d]) * a.scale;
  }
  int64_t n = 0;  // valid keys gathered so far (scores [g * max_keys + n], value row pointer)
  auto add_key = [&](const T* kr, const T* vr, float bias) {
    for (int64_t g = 0; g < G; ++g) sc.scores[g * max_keys + n] = dot_row(&sc.q[g * D], kr, D) + bias;
    sc.vrows[n++] = vr;
  };
  if (a.pk != nullptr) {
    for (int64_t j = 0; j < a.kk; ++j) {
      const int64_t slot = a.idx[b * a.kk + j];
      const float w = a.w ? a.w[b * a.kk + j] : 1.f;
      if (slot < 0 || !(w > 0.f)) continue;  // empty or excluded slot
      const float bias = std::log(w);
      const int64_t ntok = a.lens ? a.lens[slot] : a.P;
      for (int64_t p = 0; p < ntok; ++p)
        add_key(a.pk + slot * a.spke + p * a.spkp + hkv * a.spkh,
                a.pv + slot * a.spve + p * a.spvp + hkv * a.spvh, bias);
    }
  }
  const T* kb = a.k + b * a.skb + hkv * a.skh;
  const T* vb = a.v + b * a.svb + hkv * a.svh;
  for (int64_t s = 0; s < a.S; ++s) {
    if (a.mask && a.mask[b * a.S + s] == 0) continue;
    add_key(kb + s * a.sks, vb + s * a.svs, 0.f);
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = &sc.scores[g * max_keys];
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = sg[i] > m ? sg[i] : m;
    float l = 0.f;
    for (int64_t i = 0; i < n; ++i) { sg[i] = std::exp(sg[i] - m); l += sg[i]; }
    const float inv = n > 0 ? 1.f / l : 0.f;  // no valid key: the row stays 0
    for (int64_t i = 0; i < n; ++i) sg[i] *= inv;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) axpy_row(&sc.acc[g * D], sc.scores[g * max_keys + i], sc.vrows[i], D);
  for (int64_t g = 0; g < G; ++g) {
    T* o = a.out + b * a.sob + (hkv * G + g) * a.soh;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(sc.acc[g * D + d]);
  }
}

}  // namespace pacpu
}  // namespace mops
