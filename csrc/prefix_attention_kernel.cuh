// prefix_attention decode (T = 1) on CUDA: split-K flash-decoding over the GQA group, raw pointers,
// no torch headers. The math that does not need a GPU (online-softmax rescale, state merges, the
// packed prefix tile, the launch plan) is in prefix_attention_decode_math.h, shared with the host
// emulation the CPU tests run.
//
// Pass 1, decode_split_kernel<T, D, GT>, grid (B*Hkv*n_gchunk, n_split), 128 threads (4 warps).
//   One CTA = (request b, kv head, chunk of GT query heads of its group, split): every K/V row is
//   read ONCE for all the group's query heads (GT = 1/2/4/8 covers G; G > 8 takes ceil(G/8) CTAs).
//   Split 0 (when there are prefixes) is the request's packed prefix tile: the tokens
//   p < lens[slot] of every selected slot with slot >= 0 and w > 0, back to back (holes, w = 0 and
//   p >= lens cost nothing), read in place from the pool [E, P, Hkv, D] with the bias log2 w, in
//   passes of kPackTile tokens whose row offsets a shared table holds. Splits >= 1 are sequence
//   chunks of `chunk` keys (padding: mask == 0, skipped by -inf logits).
//   Lanes: a key row of D elements is D*sizeof(T)/16 16-byte vectors, one per lane of a key group
//   of LPK lanes (fp16/bf16: LPK = 16 at D = 128, 8 at D = 64; fp32: 32, 16), so a warp holds
//   KPW = 32/LPK key groups and the CTA NG = 4*KPW. Each iteration a key group takes U = 2 keys
//   (2 K + 2 V 16-byte loads in flight per lane, issued before any math), their logits for all GT
//   heads (fp32 FMAs on the lane's slice, then log2(LPK) xor shuffles inside the group), and ONE
//   online-softmax rescale for the tile. Each key group keeps its own state (m, l, acc); the
//   groups of a warp merge by shuffles, the warps in shared memory, and the CTA writes
//   (acc [D], m, l) of each of its heads for its split.
// Pass 2, decode_merge_kernel<T, D>, grid (B*Hq), D threads: merges the n_split partials of a
//   (b, head), out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i, 0 for a row with no valid key.
//
// Roofline (H100 SXM: 3.35 TB/s HBM, 132 SMs, 4 schedulers/SM each issuing 1 warp-instruction per
// clock at ~1.8 GHz). At full bandwidth one SM must take 3.35e12 / 132 / 1.8e9 = 14.1 B per clock;
// a warp-instruction of a 16-byte vector load moves 512 B, so the main loop may issue
// 4 * 512 / 14.1 = 145 warp-instructions per (lane, 16 B of K/V) before issue, not memory, bounds
// it (H200, 4.8 TB/s at ~1.98 GHz: 111). Measured (tests/test_sass_budget_attention.py, sm_90,
// fp16/bf16, the sequence loop per lane-16 B of K/V) and the budgets CI holds them to:
//   GT = 1: 35-36 (budget 40)   GT = 2: 51-53 (56)   GT = 4: 86-90 (96)   GT = 8: 156-164 (176)
// GT <= 4 stays under the H200 bound with >= 20% of the issue slots left for stalls, the prefix
// split and the merges; GT = 8 is issue-bound (each key row costs 8 heads x (8 + 8) FMAs and
// 8 shuffle trees per lane): tensor-core QK^T / PV (mma.sync, FlashInfer's GQA decode) is the
// fix, not done here. The Triton split kernel does it (~24 per 16 B at any G <= 16), so
// DECODE_ORDER_CUDA (ops/prefix_attention.py) puts Triton first until a GPU measures both.
// The kernel this replaced issued 69 (D = 128) / 102 (D = 64) per 16 B with
// scalar 2-byte loads and read every K/V row once per QUERY head: x G per 16 B of HBM.
// Bytes: q + K/V of each (b, kv head) once + the selected prefix rows once + partials
// (n_split * G * (D + 2) fp32 per (b, kv head), written and read) + out: ~1.6% of the K/V bytes at
// SPEC §6's decode shape (B = 64, S = 2048: 3 splits of 688 keys + the prefix split). Occupancy
// (ptxas -v, sm_90): 64-68 registers at GT = 1, ~145-165 at GT = 4..8 (3 CTAs of 128 threads per
// SM), 8-22 KB static shared memory; the plan launches >= 8 CTAs per SM so the last wave's tail
// stays short.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "prefix_attention_cuda_args.h"
#include "prefix_attention_decode_math.h"

namespace mops {
namespace pacuda {

using pamath::kThreads;
using pamath::kUnroll;
using pamath::kWarps;

// DecodeArgs<T>: prefix_attention_cuda_args.h (shared with the g++-compiled glue)


// A 16-byte vector of T as floats, and a float stored as T.
template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void to_float(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static float scalar(float x) { return x; }
  __device__ __forceinline__ static float from(float x) { return x; }
};
template <> struct Vec<__half> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void to_float(const uint4& r, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) { const float2 t = __half22float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
  }
  __device__ __forceinline__ static float scalar(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void to_float(const uint4& r, float* f) {
    // bf16 -> fp32 is a 16-bit shift: two integer ops per pair, no conversion instruction
    const uint32_t u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { f[2 * i] = __uint_as_float(u[i] << 16); f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u); }
  }
  __device__ __forceinline__ static float scalar(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

template <typename T, int D>
struct Geo {
  static constexpr int EPT = Vec<T>::N;      // elements per lane per 16-byte vector
  static constexpr int LPK = D / EPT;        // lanes per key row
  static constexpr int KPW = 32 / LPK;       // key groups per warp
  static constexpr int NG = kWarps * KPW;    // key groups per CTA
  static constexpr int TILE = NG * kUnroll;  // keys per CTA iteration
  static_assert(LPK >= 1 && LPK <= 32 && 32 % LPK == 0, "D * sizeof(T) must be 16..512 bytes, a power of 2");
};

__device__ __forceinline__ uint4 load16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The math of one tile: kUnroll keys per key group (16-byte K and V vectors kr, vr of this lane's
// slice; ok = the key is valid, bias = its log2 w when BIAS) folded into the states of GT heads.
template <typename T, int D, int GT, bool BIAS>
__device__ __forceinline__ void tile_math(const uint4 (&kr)[kUnroll], const uint4 (&vr)[kUnroll],
                                          const bool (&ok)[kUnroll], const float (&bias)[kUnroll],
                                          const float (&q)[GT][Vec<T>::N], float (&m)[GT], float (&l)[GT],
                                          float (&acc)[GT][Vec<T>::N]) {
  using G_ = Geo<T, D>;
  constexpr int EPT = G_::EPT;
  float s[kUnroll][GT];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    float kf[EPT];
    Vec<T>::to_float(kr[u], kf);
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      float d = q[g][0] * kf[0];
#pragma unroll
      for (int e = 1; e < EPT; ++e) d = fmaf(q[g][e], kf[e], d);
      s[u][g] = d;
    }
  }
#pragma unroll
  for (int o = G_::LPK / 2; o > 0; o >>= 1)  // the row's dot product: sum over the key group
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int g = 0; g < GT; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
  float vf[kUnroll][EPT];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) Vec<T>::to_float(vr[u], vf[u]);
#pragma unroll
  for (int g = 0; g < GT; ++g) {  // one online-softmax rescale per tile
    float sg[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sg[u] = ok[u] ? (BIAS ? s[u][g] + bias[u] : s[u][g]) : pamath::neg_inf();
    pamath::online_tile<kUnroll, EPT>(m[g], l[g], acc[g], sg, vf);
  }
}

// A mask byte that says "valid": the mask pointer of a call without attention_mask (step 0), so
// the main loop has no branch on the mask's presence.
static __device__ const uint8_t kAllValid[1] = {1};

// The main loop: sequence keys [lo, hi) (lo < hi) of one (b, kv head), rows kb + n * sks
// (vb + n * svs), padding (mask[n * mstep] == 0) masked. Branch-free: row pointers advance by a
// tile per iteration; a key past hi loads row lo instead (valid memory) and gets logit -inf.
template <typename T, int D, int GT>
__device__ __forceinline__ void seq_keys(const T* __restrict__ kb, const T* __restrict__ vb, int64_t sks,
                                         int64_t svs, const uint8_t* __restrict__ mask, int64_t mstep,
                                         int64_t lo, int64_t hi, const float (&q)[GT][Vec<T>::N],
                                         float (&m)[GT], float (&l)[GT], float (&acc)[GT][Vec<T>::N], int vg,
                                         int sub) {
  using G_ = Geo<T, D>;
  constexpr int EPT = G_::EPT;
  const T* k0 = kb + lo * sks + sub * EPT;  // row lo: the stand-in for keys past hi
  const T* v0 = vb + lo * svs + sub * EPT;
  const uint8_t* m0 = mask + lo * mstep;
  const T* kp[kUnroll];
  const T* vp[kUnroll];
  const uint8_t* mp[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    kp[u] = k0 + (u * G_::NG + vg) * sks;
    vp[u] = v0 + (u * G_::NG + vg) * svs;
    mp[u] = m0 + (u * G_::NG + vg) * mstep;
  }
  const int64_t kstep = G_::TILE * sks, vstep = G_::TILE * svs, mtile = G_::TILE * mstep;
  const int n_tiles = static_cast<int>((hi - lo + G_::TILE - 1) / G_::TILE);
  int left = static_cast<int>(hi - lo) - vg;  // keys of this group left, from the tile's first
  const float nob[kUnroll] = {};
  for (int t = 0; t < n_tiles; ++t) {
    uint4 kr[kUnroll], vr[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the tile issued before any math
      const bool in = u * G_::NG < left;
      kr[u] = load16(in ? kp[u] : k0);
      vr[u] = load16(in ? vp[u] : v0);
      ok[u] = in && *(in ? mp[u] : m0) != 0;
      kp[u] += kstep;
      vp[u] += vstep;
      mp[u] += mtile;
    }
    left -= G_::TILE;
    tile_math<T, D, GT, false>(kr, vr, ok, nob, q, m, l, acc);
  }
}

// The packed prefix tokens [0, cnt) of one pass: row offsets and log2 w from the shared table.
template <typename T, int D, int GT>
__device__ __forceinline__ void packed_keys(const T* __restrict__ pk, const T* __restrict__ pv,
                                            const int64_t* koff, const int64_t* voff, const float* tbias,
                                            int cnt, const float (&q)[GT][Vec<T>::N], float (&m)[GT],
                                            float (&l)[GT], float (&acc)[GT][Vec<T>::N], int vg, int sub) {
  using G_ = Geo<T, D>;
  constexpr int EPT = G_::EPT;
  uint4 kr[kUnroll], vr[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) { kr[u] = make_uint4(0, 0, 0, 0); vr[u] = kr[u]; }
  for (int base = 0; base < cnt; base += G_::TILE) {
    bool ok[kUnroll];
    float bias[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int n = base + u * G_::NG + vg;
      ok[u] = n < cnt;
      bias[u] = 0.f;
      if (ok[u]) {
        kr[u] = load16(pk + koff[n] + sub * EPT);
        vr[u] = load16(pv + voff[n] + sub * EPT);
        bias[u] = tbias[n];
      }
    }
    tile_math<T, D, GT, true>(kr, vr, ok, bias, q, m, l, acc);
  }
}

template <typename T, int D, int GT>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(DecodeArgs<T> a) {
  using G_ = Geo<T, D>;
  constexpr int EPT = G_::EPT;
  const int64_t bx = blockIdx.x;
  const int64_t gchunk = bx % a.n_gchunk;
  const int64_t bk = bx / a.n_gchunk;
  const int64_t b = bk / a.Hkv, hkv = bk % a.Hkv;
  const int64_t G = a.Hq / a.Hkv;
  const int64_t g0 = gchunk * GT;
  const int n_here = static_cast<int>(G - g0 < GT ? G - g0 : GT);
  const int split = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int sub = lane % G_::LPK;                       // which 16-byte vector of the row
  const int vg = warp * G_::KPW + lane / G_::LPK;       // key group in the CTA
  const float qscale = a.scale * pamath::kLog2e;

  float q[GT][EPT], acc[GT][EPT], m[GT], l[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    const T* qp = a.q + b * a.sqb + (hkv * G + g0 + g) * a.sqh + sub * EPT;
#pragma unroll
    for (int e = 0; e < EPT; ++e) {
      q[g][e] = g < n_here ? Vec<T>::scalar(qp[e]) * qscale : 0.f;
      acc[g][e] = 0.f;
    }
    m[g] = pamath::neg_inf();
    l[g] = 0.f;
  }

  __shared__ float s_m[kWarps][GT], s_l[kWarps][GT], s_acc[kWarps][GT][D];
  const bool prefix_split = a.pk != nullptr && split == 0;
  if (prefix_split) {
    __shared__ int32_t s_slot[pamath::kMaxSlots], s_start[pamath::kMaxSlots + 1];
    __shared__ float s_bj[pamath::kMaxSlots];
    __shared__ int64_t s_koff[pamath::kPackTile], s_voff[pamath::kPackTile];
    __shared__ float s_bias[pamath::kPackTile];
    __shared__ int s_total;
    const int kk = static_cast<int>(a.kk), P = static_cast<int>(a.P);
    if (tid == 0)
      s_total = pamath::pack_prefix_slots(a.idx + b * a.kk, a.w ? a.w + b * a.kk : nullptr, a.lens, kk, P,
                                          s_slot, s_bj, s_start);
    __syncthreads();
    const int total = s_total;
    for (int pass = 0; pass < total; pass += pamath::kPackTile) {
      const int cnt = total - pass < pamath::kPackTile ? total - pass : pamath::kPackTile;
      for (int t = tid; t < cnt; t += kThreads) {
        const pamath::PackedToken pt = pamath::packed_token(pass + t, s_start, kk);
        const int64_t slot = s_slot[pt.j];
        s_koff[t] = slot * a.spke + pt.p * a.spkp + hkv * a.spkh;
        s_voff[t] = slot * a.spve + pt.p * a.spvp + hkv * a.spvh;
        s_bias[t] = s_bj[pt.j];
      }
      __syncthreads();
      packed_keys<T, D, GT>(a.pk, a.pv, s_koff, s_voff, s_bias, cnt, q, m, l, acc, vg, sub);
      __syncthreads();  // the table is rewritten by the next pass
    }
  } else {
    const int64_t c = split - (a.pk != nullptr ? 1 : 0);
    const int64_t lo = c * a.chunk;
    const int64_t hi = lo + a.chunk < a.S ? lo + a.chunk : a.S;
    if (lo < hi)
      seq_keys<T, D, GT>(a.k + b * a.skb + hkv * a.skh, a.v + b * a.svb + hkv * a.svh, a.sks, a.svs,
                         a.mask ? a.mask + b * a.S : kAllValid, a.mask ? 1 : 0, lo, hi, q, m, l, acc, vg, sub);
  }

  // merge the key groups of the warp (lanes l and l ^ LPK*2^i hold the same row slice)
#pragma unroll
  for (int o = G_::LPK; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float lo_ = __shfl_xor_sync(0xffffffffu, l[g], o);
      const pamath::MergeCoef c = pamath::merge_coef(m[g], mo);
      l[g] = c.ca * l[g] + c.cb * lo_;
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        acc[g][e] = c.ca * acc[g][e] + c.cb * ao;
      }
      m[g] = c.m;
    }
  }
  // ... then the warps, in shared memory
  if (lane < G_::LPK) {
#pragma unroll
    for (int g = 0; g < GT; ++g) {
#pragma unroll
      for (int e = 0; e < EPT; ++e) s_acc[warp][g][sub * EPT + e] = acc[g][e];
      if (lane == 0) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
    }
  }
  __syncthreads();
  for (int i = tid; i < n_here * D; i += kThreads) {
    const int g = i / D, d = i % D;
    float M = s_m[0][g], L = s_l[0][g], A = s_acc[0][g][d];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const pamath::MergeCoef c = pamath::merge_coef(M, s_m[w][g]);
      L = c.ca * L + c.cb * s_l[w][g];
      A = c.ca * A + c.cb * s_acc[w][g][d];
      M = c.m;
    }
    const int64_t row = (b * a.Hq + hkv * G + g0 + g) * a.n_split + split;
    a.part_acc[row * D + d] = A;
    if (d == 0) { a.part_m[row] = M; a.part_l[row] = L; }
  }
}

template <typename T, int D>
__global__ void decode_merge_kernel(DecodeArgs<T> a) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / a.Hq, h = bh % a.Hq;
  const int d = threadIdx.x;
  float M = pamath::neg_inf(), L = 0.f, A = 0.f;
  for (int64_t i = 0; i < a.n_split; ++i) {
    const int64_t row = bh * a.n_split + i;
    const pamath::MergeCoef c = pamath::merge_coef(M, a.part_m[row]);
    L = c.ca * L + c.cb * a.part_l[row];
    A = c.ca * A + c.cb * a.part_acc[row * D + d];
    M = c.m;
  }
  a.out[b * a.sob + h * a.soh + d] = Vec<T>::from(pamath::finish(A, L));
}

}  // namespace pacuda
}  // namespace mops
