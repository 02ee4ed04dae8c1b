// int4_matmul CUDA kernel: decode GEMV y[m, n] = sum_c x[m, c] * W[n, c] for M <= 4 rows of x.
// Raw pointers only (no torch headers); launched by int4_matmul_cuda.cu, whose arguments are
// checked by the g++-compiled int4_matmul_cuda_glue.cpp. The arithmetic lives in
// MOPS_HD helpers that a plain C++ compiler builds too (tests/test_int4_matmul.py compiles this
// header with g++ and checks every code and a whole emulated launch against the reference).
//
//   4-bit (Q4_1): W[n, c] = q * s[n, c / G] + mn[n, c / G], q in 0..15, byte i of a row holds
//                 column 2i (low nibble) and 2i + 1 (high nibble);  G in {32, 64, 128}
//   8-bit (Q8_0): W[n, c] = q * s[n, c / 32], q int8
//
// Design (per 16-byte weight vector = 32 columns of 4-bit or 16 of 8-bit, one lane):
//   * dequant by bit tricks straight to fp32, no int->float convert (I2F runs at 1/8 of the issue
//     rate): 4-bit: per 32-bit word two shift+LOP3 put every nibble q at bits 3..6 of its byte with
//     bit 7 set, then one PRMT per nibble builds the float 0x3F80_0000 | q << 19 = 1 + q/16 exactly.
//     The offset 1 is folded into the group sum (below), so no FADD per nibble. 8-bit: an XOR per
//     word, then per byte PRMT builds 2^23 + (q + 128) and one FADD leaves q exactly.
//   * the sum trick, per row n and group g, with Sx = sum of the group's x computed ONCE per
//     (row of x, 16-byte column block) and shared by the R weight rows of the lane:
//         sum_c W x = 16 s * sum_c (1 + q/16) x + (mn - 16 s) * Sx          (4-bit)
//     All FMAs are fp32 (products of (1 + q/16) and x are exact-ish: 5 x 24 significant bits), so
//     the error stays at fp32 level: half2 FMA chains were measured (an fp16/bf16 emulation of
//     16-long HFMA2 chains per group) at 2.2-2.4x plain PyTorch's error in that dtype, over
//     SPEC §6's 2x bound; the fp32 path costs one FFMA per column and row of x instead of half one.
//   * R = 4 weight rows per warp (the same 32 columns of 4 rows): x is loaded and converted once
//     for 4 rows, and every lane has R = 4 independent 16-byte loads in flight.
//   * no shared memory, no split-K: a warp walks its rows' K; blocks of 4 warps = 16 rows.
//
// Roofline (H100 SXM: 3.35 TB/s HBM, 132 SMs, 4 schedulers/SM issuing 1 warp-instruction/clk at
// ~1.8 GHz). One warp-instruction serves 32 lanes, each lane streams its own 16-byte vector, so a
// warp-iteration moves 512 B of weights; at full bandwidth an SM receives 3.35e12 / 132 / 1.8e9 =
// 14.1 B/clk, i.e. 512 B every 36.3 clk, in which its 4 schedulers issue 145 warp-instructions.
// So ISSUE BUDGET = 145 SASS instructions per 16 B of weights per lane at 100% HBM: a main loop
// above it cannot reach the roofline whatever the occupancy; SPEC §6's 85% needs <= ~0.85 x that
// at perfect issue, less in practice.
// Main loop per 16 B of weights (sm_90, nvcc 13, bf16 x; tests/test_sass_budget.py counts the loop
// and divides by its R = 4 vectors; budget = count + ~5% so that a regression fails CI):
//            this kernel   previous kernel (one row per warp, I2F per nibble)   budget
//   4-bit M=1    129          249                                                135
//   4-bit M=4    287          653                                                300
//   8-bit M=1     70.5        111                                                 75
//   8-bit M=4    148          266                                                155
//   4-bit M=1: 32 PRMT + 16 LOP3 + 8 shifts (decode) + 32 FFMA per 16 B are the floor (~88); the
//   rest is x conversion and Sx (shared by the 4 rows), the group's scale/min, addresses. At 129 the
//   loop needs 0.89 of the issue slots that full HBM bandwidth allows: the M=1 GEMV is not
//   issue-bound, but has little slack. At M=4 the fp32 FFMAs alone are 128 per 16 B: issue-bound at
//   ~145/287 = 50% of HBM, so ops/int4_matmul.py gives M >= 2 to the tensor-core kernel on a GPU.
// Occupancy: <= 128 registers at M = 1 (4 blocks of 128 threads per SM), 4 x 16 B loads in flight
// per lane = 2 KB per warp; a 4096-row matrix has 1024 warps (7.8 per SM).
// Requires: 16-byte aligned qweight and x base pointers and row strides (K % 32 == 0 gives rows).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MOPS_HD __host__ __device__ __forceinline__
#else
#define MOPS_HD inline
#endif

namespace mops {
namespace int4cuda {

constexpr int kWarpsPerBlock = 4;   // 128-thread blocks
constexpr int kRowsPerWarp = 4;     // R: weight rows that share one lane's x (and 4 loads in flight)
constexpr int kMaxM = 4;            // rows of x the GEMV takes

// ---- host/device bit helpers ---------------------------------------------------------------
MOPS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// PRMT (byte permute) as the hardware defines it: result byte i = byte sel_i of {b:a} (a is
// bytes 0..3, b bytes 4..7); only the default mode is used here.
MOPS_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t ab = ((uint64_t)b << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= (uint32_t)((ab >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
#endif
}

// Columns per 16-byte weight vector.
template <int BITS> struct Cols { static constexpr int value = BITS == 4 ? 32 : 16; };

// 4-bit: the 8 columns of one 32-bit word w (byte i = column 2i low nibble, 2i + 1 high) as the
// exact floats f[c] = 1 + q[c] / 16. Two shift+LOP3 give bytes 0x80 | q << 3 (low nibbles: w << 3,
// high nibbles: w >> 1); PRMT puts such a byte in bits 16..23 under the 0x3F exponent byte:
// 0x3F80_0000 | q << 19. Cost: 4 + 8 = 12 instructions per 8 columns.
MOPS_HD void decode_q4_word(uint32_t w, float f[8]) {
  const uint32_t lo = ((w << 3) & 0x78787878u) | 0x80808080u;   // columns 0, 2, 4, 6
  const uint32_t hi = ((w >> 1) & 0x78787878u) | 0x80808080u;   // columns 1, 3, 5, 7
  // selector: byte 0, 1 = zero bytes of the magic (4), byte 2 = the code byte j, byte 3 = 0x3F (7)
  const uint32_t magic = 0x3F000000u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = bits_to_float(prmt(lo, magic, 0x7044u | ((uint32_t)j << 8)));
    f[2 * j + 1] = bits_to_float(prmt(hi, magic, 0x7044u | ((uint32_t)j << 8)));
  }
}

// 8-bit: the 4 int8 codes of w as exact floats q. XOR 0x80 makes them u = q + 128 in 0..255;
// PRMT builds 0x4B00_00uu = 2^23 + u, and one FADD removes 2^23 + 128. 2.25 instructions per code.
MOPS_HD void decode_q8_word(uint32_t w, float f[4]) {
  const uint32_t u = w ^ 0x80808080u;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    f[j] = bits_to_float(prmt(u, 0x4B000000u, 0x7440u | (uint32_t)j)) - 8388736.0f;  // 2^23 + 128
}

// One group's contribution for one (row n, row m): acc = sum_c f[c] x[c] (f from decode_q*_word),
// sx = sum_c x[c] over the same columns, s/mn the group's fp16 scale and min as float.
template <int BITS>
MOPS_HD float group_dot(float acc, float sx, float s, float mn) {
  if (BITS == 4) {
    const float s16 = 16.f * s;
    return s16 * acc + (mn - s16) * sx;   // 16 s sum (1 + q/16) x + (mn - 16 s) sum x
  }
  (void)sx; (void)mn;
  return s * acc;
}

// The work of one lane on one 16-byte column block for its R weight rows and M rows of x.
// w[r]: the R rows' vectors (4 words each); xf[m][c]: x in fp32; s[r], mn[r]: the group's scale
// and min of row r; acc[r][m] += that block's share of y[m, n_r].
template <int BITS, int M, int R>
MOPS_HD void lane_block(const uint32_t (&w)[R][4], const float (&xf)[M][Cols<BITS>::value],
                        const float (&s)[R], const float (&mn)[R], float (&acc)[R][M]) {
  constexpr int C = Cols<BITS>::value;
  float sx[M];
  if (BITS == 4) {
#pragma unroll
    for (int m = 0; m < M; ++m) {   // Sx once per (row of x, block), shared by the R rows
      float a = 0.f, b = 0.f;       // two chains: half the dependent-add latency
#pragma unroll
      for (int c = 0; c < C; c += 2) { a += xf[m][c]; b += xf[m][c + 1]; }
      sx[m] = a + b;
    }
  } else {
#pragma unroll
    for (int m = 0; m < M; ++m) sx[m] = 0.f;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float d[M];
#pragma unroll
    for (int m = 0; m < M; ++m) d[m] = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      constexpr int per = BITS == 4 ? 8 : 4;
      float f[8];
      if (BITS == 4) decode_q4_word(w[r][k], f);
      else decode_q8_word(w[r][k], f);
#pragma unroll
      for (int i = 0; i < per; ++i)
#pragma unroll
        for (int m = 0; m < M; ++m) d[m] += f[i] * xf[m][k * per + i];
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] += group_dot<BITS>(d[m], sx[m], s[r], mn[r]);
  }
}

#if defined(__CUDACC__)
// ---- device part -----------------------------------------------------------------------------
__device__ __forceinline__ void bf16x2_to_f32(uint32_t v, float& a, float& b) {
  a = __uint_as_float(v << 16);          // bf16 -> fp32 is a shift
  b = __uint_as_float(v & 0xffff0000u);
}

// C consecutive activations at p (16-byte aligned) as fp32.
template <typename T, int C>
__device__ __forceinline__ void load_x(const T* p, float* out) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < C; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x; out[i + 1] = v.y; out[i + 2] = v.z; out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < C; i += 8) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p + i));
      const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (std::is_same<T, __nv_bfloat16>::value) {
          bf16x2_to_f32(u[j], out[i + 2 * j], out[i + 2 * j + 1]);
        } else {
          const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u[j]));
          out[i + 2 * j] = f.x; out[i + 2 * j + 1] = f.y;
        }
      }
    }
  }
}

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// y [M, N] (T), x [M, K] (T, row stride ldx), qw rows of K/2 (4-bit) or K (8-bit) bytes,
// scale/mins [N, K/G] fp16 (mins unused for 8-bit; any valid pointer). Block (32, kWarpsPerBlock).
// KS = warps that share one group of R rows, splitting its K (1, 2 or 4 = kWarpsPerBlock): a block
// holds kWarpsPerBlock / KS row groups; warp w works on group w / KS, rows n0 .. n0 + R - 1, and its
// lane l reads column blocks (w % KS) * 32 + l, stepping by 32 * KS. KS = 1 is the kernel measured on
// the H200 (947-1076 GB/s at M = 1); KS > 1 puts KS times more warps (and loads in flight) on a
// matrix, for the next GPU session to time (sweep_int4_tc.py --gemv): the per-warp partial sums meet
// in shared memory.
template <typename T, int BITS, int M, int KS = 1>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
int4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const __half* __restrict__ scale,
                 const __half* __restrict__ mins, T* __restrict__ y, int N, int K, int gshift, int64_t ldx) {
  // gshift = log2(G / C): column block c lies in group c >> gshift (a shift, not a division)
  static_assert(KS == 1 || KS == 2 || KS == 4, "KS must be 1, 2 or 4");
  constexpr int C = Cols<BITS>::value;
  constexpr int R = kRowsPerWarp;
  constexpr int kGroups = kWarpsPerBlock / KS;   // row groups per block
  const int lane = threadIdx.x;
  const int ks = threadIdx.y % KS;
  const int64_t n0 = ((int64_t)blockIdx.x * kGroups + threadIdx.y / KS) * R;
  if (KS == 1 && n0 >= N) return;                // KS > 1: every warp reaches the barrier below
  const bool active = n0 < N;
  const int nvec = K / C;                        // 16-byte vectors per weight row
  const int ng = nvec >> gshift;                 // groups per row
  const uint4* rows[R];
  const __half* srow[R];
  const __half* mrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    int64_t n = n0 + r < N ? n0 + r : N - 1;     // tail rows re-read the last row, never stored
    if (n < 0) n = 0;
    rows[r] = reinterpret_cast<const uint4*>(qw) + n * nvec;
    srow[r] = scale + n * ng;
    mrow[r] = mins + n * ng;
  }
  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  const unsigned first = active ? (unsigned)(ks * 32 + lane) : (unsigned)nvec;
  for (unsigned c = first; c < (unsigned)nvec; c += 32 * KS) {
    uint32_t w[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {   // R independent 16-byte loads in flight
      const uint4 v = __ldg(rows[r] + c);
      w[r][0] = v.x; w[r][1] = v.y; w[r][2] = v.z; w[r][3] = v.w;
    }
    const unsigned g = (unsigned)c >> gshift;   // a vector never straddles a group (G % 32 == 0);
                                                // unsigned: one IMAD.WIDE.U32 per address
    float s[R], mn[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r] = __half2float(__ldg(srow[r] + g));
      mn[r] = BITS == 4 ? __half2float(__ldg(mrow[r] + g)) : 0.f;
    }
    float xf[M][C];
#pragma unroll
    for (int m = 0; m < M; ++m) load_x<T, C>(x + m * ldx + (int64_t)c * C, xf[m]);
    lane_block<BITS, M, R>(w, xf, s, mn, acc);
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[r][m] = v;                             // every lane holds the warp's sum
    }
  if (KS == 1) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (lane == 0 && n0 + r < N) y[(int64_t)m * N + n0 + r] = from_f<T>(acc[r][m]);
    return;
  }
  __shared__ float part[kWarpsPerBlock][R * M];  // each warp's partial sums
  if (lane < R * M) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (lane == r * M + m) part[threadIdx.y][lane] = acc[r][m];
  }
  __syncthreads();
  if (ks == 0 && active && lane < R * M) {       // lane (r, m) of the group's first warp sums its KS warps
    const int r = lane / M, m = lane % M;
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < KS; ++j) v += part[threadIdx.y + j][lane];
    if (n0 + r < N) y[(int64_t)m * N + n0 + r] = from_f<T>(v);
  }
}
#endif  // __CUDACC__

}  // namespace int4cuda
}  // namespace mops
