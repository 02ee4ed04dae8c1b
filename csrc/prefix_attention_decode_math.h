// prefix_attention decode (T = 1): the math of the CUDA kernel that does not depend on the GPU,
// as __host__ __device__ helpers. The CUDA kernel (prefix_attention_kernel.cuh) calls them on the
// device; the host emulation (prefix_attention_cuda_emulate.cpp, built into the CPU extension)
// calls the same helpers in the kernel's own decomposition (launch plan, splits, packed prefix
// tile, key groups, tiles of U keys, warp/split merges), so the CPU tests prove this math against
// mops_kernels.reference. No CUDA or torch headers here.
//
// Logits are base 2 throughout: s2 = log2(e) * scale * q.k + log2(w), p = 2^(s2 - m).
// A softmax state (m, l, acc) holds the running max m (-inf while empty), the running sum l and
// acc = sum p v; merging two states and finishing one never produce NaN (an empty state has m =
// -inf, l = 0, acc = 0, and a row with no valid key finishes as 0).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MOPS_HD __host__ __device__ __forceinline__
#define MOPS_UNROLL _Pragma("unroll")
#else
#define MOPS_HD inline
#define MOPS_UNROLL
#endif

namespace mops {
namespace pamath {

constexpr float kLog2e = 1.4426950408889634f;
// The prefix slots one request may select (prefix_index's kk): the packing table lives in
// shared memory. The glue rejects more with a message; the dispatcher sends such calls to Triton.
constexpr int kMaxSlots = 64;
// Packed prefix tokens per pass of the prefix split (the per-token table in shared memory).
constexpr int kPackTile = 256;

MOPS_HD float neg_inf() { return -INFINITY; }

MOPS_HD float exp2_(float x) {
#ifdef __CUDA_ARCH__
  return exp2f(x);  // ex2.approx under --use_fast_math: 2^-inf = 0
#else
  return std::exp2(x);
#endif
}

// One tile's online-softmax rescale: the new running max from the tile's max, and
// alpha = 2^(m_old - m_new) to rescale (l, acc). The returned m_safe is the max to subtract from
// the tile's logits (0 while everything is masked: no -inf - -inf).
struct Rescale {
  float m_new, m_safe, alpha;
};
MOPS_HD Rescale tile_rescale(float m_old, float tile_max) {
  Rescale r;
  r.m_new = m_old > tile_max ? m_old : tile_max;
  r.m_safe = r.m_new == neg_inf() ? 0.f : r.m_new;
  r.alpha = exp2_(m_old - r.m_safe);  // m_old = -inf: 0
  return r;
}

// Coefficients to merge two states a, b into one: m = max(m_a, m_b),
// l = ca * l_a + cb * l_b, acc = ca * acc_a + cb * acc_b (warp, CTA and split merges).
struct MergeCoef {
  float m, ca, cb;
};
MOPS_HD MergeCoef merge_coef(float m_a, float m_b) {
  MergeCoef c;
  c.m = m_a > m_b ? m_a : m_b;
  const float ms = c.m == neg_inf() ? 0.f : c.m;
  c.ca = exp2_(m_a - ms);
  c.cb = exp2_(m_b - ms);
  return c;
}

// One tile of U keys into a state (m, l, acc[N]): logits s[u] (base 2, -inf = masked), value
// rows v[u][N]. ONE rescale per tile: m' = max(m, max_u s), acc = 2^(m-m') acc + sum_u p_u v_u.
template <int U, int N>
MOPS_HD void online_tile(float& m, float& l, float (&acc)[N], const float (&s)[U], const float (&v)[U][N]) {
  float tmax = s[0];
  MOPS_UNROLL for (int u = 1; u < U; ++u) tmax = tmax > s[u] ? tmax : s[u];
  const Rescale r = tile_rescale(m, tmax);
  float p[U];
  MOPS_UNROLL for (int u = 0; u < U; ++u) p[u] = exp2_(s[u] - r.m_safe);
  float psum = p[0];
  MOPS_UNROLL for (int u = 1; u < U; ++u) psum += p[u];
  l = l * r.alpha + psum;
  MOPS_UNROLL for (int e = 0; e < N; ++e) {
    float a = acc[e] * r.alpha;
    MOPS_UNROLL for (int u = 0; u < U; ++u) a = p[u] * v[u][e] + a;
    acc[e] = a;
  }
  m = r.m_new;
}

// out = acc / l, and 0 for a row with no valid key (l = 0).
MOPS_HD float finish(float acc, float l) { return l > 0.f ? acc / l : 0.f; }

// The packed prefix tile of request b: the selected slots j < kk with slot >= 0 and w > 0, each
// contributing its first lens[slot] tokens (P when lens is null), back to back. Fills
// slot_out[j] (>= 0), bias_out[j] = log2 w (0 when w is null) and start[j] (exclusive prefix sum
// of the counts, start[kk] = the total, which it returns). Holes and w == 0 contribute 0 tokens.
MOPS_HD int pack_prefix_slots(const int32_t* idx_row, const float* w_row, const int32_t* lens, int kk,
                              int P, int32_t* slot_out, float* bias_out, int32_t* start) {
  int total = 0;
  for (int j = 0; j < kk; ++j) {
    const int32_t slot = idx_row[j];
    const float w = w_row ? w_row[j] : 1.f;
    const bool on = slot >= 0 && w > 0.f;
    start[j] = total;
    slot_out[j] = on ? slot : 0;
    bias_out[j] = on && w_row ? std::log2(w) : 0.f;
    total += on ? (lens ? lens[slot] : P) : 0;
  }
  start[kk] = total;
  return total;
}

// The (selection j, token p) of packed token n < start[kk]: start[j] <= n < start[j + 1].
struct PackedToken {
  int j, p;
};
MOPS_HD PackedToken packed_token(int n, const int32_t* start, int kk) {
  int j = 0;
  while (j + 1 < kk && n >= start[j + 1]) ++j;
  return {j, n - start[j]};
}

// The launch plan of the decode kernels (pure host arithmetic; tested at B*Hq > 65,535).
//   split kernel:  grid (B*Hkv*n_gchunk, n_split), kThreads threads; CTA (b, kv head, head chunk,
//                  split) serves the query heads [gchunk*GT, min(G, (gchunk+1)*GT)) of the kv head;
//                  split 0 is the packed prefix tile when there are prefixes, the others the
//                  sequence chunks of `chunk` keys.
//   merge kernel:  grid (B*Hq), D threads.
// grid.x holds the (b, head) products: up to 2^31 - 1; grid.y = n_split stays <= 65,535.
struct Plan {
  int64_t gt = 1, n_gchunk = 1, chunk = 0, n_seq_split = 0, n_split = 1, tile = 1;
  int64_t grid1_x = 0, grid1_y = 0, grid2_x = 0;
  bool ok = true;  // false: a grid dimension would overflow
};
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 2;   // keys per key group per tile: loads in flight per lane (K and V)

// Query heads per CTA: the smallest of 1, 2, 4, 8 that covers G (G > 8: chunks of 8).
MOPS_HD int heads_per_cta(int64_t G) { return G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : 8; }

// Keys one CTA reads per tile: kWarps warps x (32 / lanes per key) key groups x kUnroll keys;
// a key row is D * elt bytes read as 16-byte vectors, one per lane.
MOPS_HD int64_t keys_per_tile(int64_t D, int64_t elt) {
  const int64_t lanes_per_key = D * elt / 16;
  return kWarps * (32 / lanes_per_key) * kUnroll;
}

MOPS_HD Plan make_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t elt, bool has_prefix,
                       int64_t num_sms) {
  Plan pl;
  const int64_t G = Hq / Hkv;
  pl.gt = heads_per_cta(G);
  pl.n_gchunk = (G + pl.gt - 1) / pl.gt;
  pl.tile = keys_per_tile(D, elt);
  const int64_t ctas = B * Hkv * pl.n_gchunk;
  // Enough splits for >= 8 CTAs per SM (2-3 are resident at ~160 registers: the last wave's
  // tail stays small), chunks a whole number of tiles and >= 4 tiles (each split adds one partial
  // to merge), and <= 65,535 splits in grid.y.
  const int64_t want = ctas > 0 ? (8 * num_sms + ctas - 1) / ctas : 1;
  int64_t chunk = want > 0 ? (S + want - 1) / want : S;
  const int64_t min_chunk = 4 * pl.tile;
  if (chunk < min_chunk) chunk = min_chunk;
  const int64_t cap = 65534;  // + 1 prefix split
  if ((S + chunk - 1) / chunk > cap) chunk = (S + cap - 1) / cap;
  chunk = (chunk + pl.tile - 1) / pl.tile * pl.tile;
  pl.chunk = chunk;
  pl.n_seq_split = (S + chunk - 1) / chunk;
  pl.n_split = pl.n_seq_split + (has_prefix ? 1 : 0);
  if (pl.n_split == 0) pl.n_split = 1;  // S = 0 and no prefix: one empty split writes the zeros
  pl.grid1_x = ctas;
  pl.grid1_y = pl.n_split;
  pl.grid2_x = B * Hq;
  const int64_t max_x = 2147483647LL;
  pl.ok = pl.grid1_x <= max_x && pl.grid2_x <= max_x && pl.grid1_y <= 65535;
  return pl;
}

}  // namespace pamath
}  // namespace mops
