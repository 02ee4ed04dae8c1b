// prefix_attention decode (T = 1) on CUDA: split-K flash-decoding, raw pointers, no torch headers.
//
// Pass 1, grid (n_split, B*Hq), 128 threads (4 warps): split 0 is the prefix segment (the tokens
// p < len[slot] of each selected slot, read in place from the pool pk/pv [E, P, Hkv, D] through
// idx[b, j], logit bias log w[b, j]; slot < 0 or w == 0 skipped); split i >= 1 is the sequence
// chunk [(i-1)*chunk, i*chunk) with padding (mask == 0) skipped. Each warp walks every 4th key:
// lane l holds elements [l*EPL, (l+1)*EPL) of q and of its running sum (EPL = D/32), the score is
// a warp shuffle reduction, the softmax is online; the 4 warps merge in shared memory and write
// (acc [D], m, l) for the split. Pass 2, grid (B*Hq), D threads: merges the splits,
// out = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i, and 0 for a row with no valid key.
#pragma once
#include <cstdint>
#include <cmath>

namespace mops {
namespace pacuda {

constexpr int kWarps = 4;

template <typename T>
struct DecodeArgs {
  const T* q; int64_t sqb, sqh;               // q [B, Hq, 1, D], last dim contiguous
  const T* k; int64_t skb, skh, sks;          // k [B, Hkv, S, D]
  const T* v; int64_t svb, svh, svs;          // v [B, Hkv, S, D]
  const T* pk; int64_t spke, spkp, spkh;      // prefix_k [E, P, Hkv, D] (nullptr: no prefixes)
  const T* pv; int64_t spve, spvp, spvh;      // prefix_v
  const int32_t* idx; int64_t kk;             // prefix_index [B, kk] contiguous
  const float* w;                             // prefix_weight [B, kk] or nullptr (= 1)
  const int32_t* lens;                        // prefix_lens [E] or nullptr (= P)
  const uint8_t* mask;                        // attention_mask [B, S] or nullptr
  float* part_acc; float* part_m; float* part_l;  // [B*Hq, n_split, D], [B*Hq, n_split] x2
  T* out; int64_t sob, soh;                   // out [B, Hq, 1, D]
  int64_t Hq, Hkv, S, P, chunk, n_split;
  float scale;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
decode_split_kernel(DecodeArgs<T> a) {
  constexpr int EPL = D / 32;
  const int split = blockIdx.x;
  const int64_t bh = blockIdx.y;
  const int64_t b = bh / a.Hq, h = bh % a.Hq;
  const int64_t hkv = h / (a.Hq / a.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float qr[EPL], acc[EPL];
  const T* qp = a.q + b * a.sqb + h * a.sqh + lane * EPL;
#pragma unroll
  for (int e = 0; e < EPL; ++e) { qr[e] = static_cast<float>(qp[e]) * a.scale; acc[e] = 0.f; }
  float m = -INFINITY, l = 0.f;

  auto visit = [&](const T* kr, const T* vr, float bias) {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) s += qr[e] * static_cast<float>(kr[lane * EPL + e]);
    s = warp_sum(s) + bias;
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new);  // m = -inf at first: alpha = 0
    const float p = __expf(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * alpha + p * static_cast<float>(vr[lane * EPL + e]);
    m = m_new;
  };

  if (split == 0) {
    if (a.pk != nullptr) {
      for (int64_t n = warp; n < a.kk * a.P; n += kWarps) {
        const int64_t j = n / a.P, p = n % a.P;
        const int64_t slot = a.idx[b * a.kk + j];
        const float w = a.w ? a.w[b * a.kk + j] : 1.f;
        if (slot < 0 || !(w > 0.f)) continue;
        if (p >= (a.lens ? a.lens[slot] : a.P)) continue;
        visit(a.pk + slot * a.spke + p * a.spkp + hkv * a.spkh,
              a.pv + slot * a.spve + p * a.spvp + hkv * a.spvh, __logf(w));
      }
    }
  } else {
    const int64_t lo = (split - 1) * a.chunk;
    const int64_t hi = lo + a.chunk < a.S ? lo + a.chunk : a.S;
    const T* kb = a.k + b * a.skb + hkv * a.skh;
    const T* vb = a.v + b * a.svb + hkv * a.svh;
    for (int64_t s = lo + warp; s < hi; s += kWarps) {
      if (a.mask && a.mask[b * a.S + s] == 0) continue;
      visit(kb + s * a.sks, vb + s * a.svs, 0.f);
    }
  }

  // merge the warps: shared (m, l) per warp and acc [warp][D]
  __shared__ float sm[kWarps], sl[kWarps], sacc[kWarps][D];
  if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
  for (int e = 0; e < EPL; ++e) sacc[warp][lane * EPL + e] = acc[e];
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) M = fmaxf(M, sm[i]);
  const float Ms = M == -INFINITY ? 0.f : M;
  const int64_t base = bh * a.n_split + split;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float A = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) A += sacc[i][d] * __expf(sm[i] - Ms);
    a.part_acc[base * D + d] = A;
  }
  if (threadIdx.x == 0) {
    float L = 0.f;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) L += sl[i] * __expf(sm[i] - Ms);
    a.part_m[base] = M;
    a.part_l[base] = L;
  }
}

template <typename T, int D>
__global__ void decode_reduce_kernel(DecodeArgs<T> a) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.Hq, h = bh % a.Hq;
  const int d = threadIdx.x;
  float M = -INFINITY;
  for (int64_t i = 0; i < a.n_split; ++i) M = fmaxf(M, a.part_m[bh * a.n_split + i]);
  const float Ms = M == -INFINITY ? 0.f : M;
  float A = 0.f, L = 0.f;
  for (int64_t i = 0; i < a.n_split; ++i) {
    const int64_t base = bh * a.n_split + i;
    const float c = __expf(a.part_m[base] - Ms);
    A += c * a.part_acc[base * D + d];
    L += c * a.part_l[base];
  }
  a.out[b * a.sob + h * a.soh + d] = static_cast<T>(L > 0.f ? A / L : 0.f);
}

}  // namespace pacuda
}  // namespace mops
