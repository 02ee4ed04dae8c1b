// The CUDA decode kernel's arguments (prefix_attention_kernel.cuh) as a plain struct: no CUDA, no
// torch. The g++-compiled glue (prefix_attention_cuda_glue.cpp) fills DecodeArgs<void>; the launcher
// (prefix_attention_cuda.cu) reads the same bytes as DecodeArgs<T> for the element type T: every
// field is a pointer, an int64_t or a float, so the layout does not depend on T.
#pragma once
#include <cstdint>

namespace mops {
namespace pacuda {

template <typename T>
struct DecodeArgs {
  const T* q; int64_t sqb, sqh;               // q [B, Hq, 1, D], last dim contiguous
  const T* k; int64_t skb, skh, sks;          // k [B, Hkv, S, D], 16-byte aligned rows
  const T* v; int64_t svb, svh, svs;          // v [B, Hkv, S, D]
  const T* pk; int64_t spke, spkp, spkh;      // prefix_k [E, P, Hkv, D] (nullptr: no prefixes)
  const T* pv; int64_t spve, spvp, spvh;      // prefix_v
  const int32_t* idx; int64_t kk;             // prefix_index [B, kk] contiguous, kk <= kMaxSlots
  const float* w;                             // prefix_weight [B, kk] or nullptr (= 1)
  const int32_t* lens;                        // prefix_lens [E] or nullptr (= P)
  const uint8_t* mask;                        // attention_mask [B, S] or nullptr
  float* part_acc; float* part_m; float* part_l;  // [B*Hq, n_split, D], [B*Hq, n_split] x2 (base 2)
  T* out; int64_t sob, soh;                   // out [B, Hq, 1, D]
  int64_t Hq, Hkv, S, P, chunk, n_split, n_gchunk;
  float scale;
};

}  // namespace pacuda
}  // namespace mops
