// Host build of the CUDA GEMV's arithmetic (csrc/int4_matmul_kernel.cuh, MOPS_HD helpers), for
// tests/test_int4_matmul.py: g++ compiles the same code the kernel runs, so the bit tricks and the
// per-group sum are checked without a GPU.
//   int4_gemv_host codes            -> every byte value at every byte position of a word, decoded
//   int4_gemv_host gemv DIR M N K G BITS [KS]
//       reads DIR/x.f32 [M, K], DIR/q.u8 (the packed rows), DIR/s.f32 and DIR/mn.f32 [N, K/G]
//       (the fp16 values as fp32), runs the kernel's loop lane by lane (KS warps of 32 lanes per group
//       of R rows, warp j's lane l on column blocks j * 32 + l, stepping by 32 * KS; each warp's
//       butterfly, then the KS partial sums in warp order) and writes DIR/y.f32 [M, N].
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "int4_matmul_kernel.cuh"

using namespace mops::int4cuda;

static std::vector<char> slurp(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) { std::perror(path.c_str()); std::exit(2); }
  std::vector<char> buf;
  char tmp[1 << 16];
  size_t n;
  while ((n = std::fread(tmp, 1, sizeof tmp, f)) > 0) buf.insert(buf.end(), tmp, tmp + n);
  std::fclose(f);
  return buf;
}

template <int BITS, int M>
static void gemv(const std::string& dir, int N, int K, int G, int KS) {
  constexpr int C = Cols<BITS>::value;
  constexpr int R = kRowsPerWarp;
  const std::vector<char> xb = slurp(dir + "/x.f32"), qb = slurp(dir + "/q.u8"), sb = slurp(dir + "/s.f32"),
                          mb = slurp(dir + "/mn.f32");
  const float* x = reinterpret_cast<const float*>(xb.data());
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qb.data());
  const float* sc = reinterpret_cast<const float*>(sb.data());
  const float* mi = reinterpret_cast<const float*>(mb.data());
  const int nvec = K / C, ng = K / G, row_bytes = BITS == 4 ? K / 2 : K;
  std::vector<float> y((size_t)M * N, 0.f);
  for (int n0 = 0; n0 < N; n0 += R) {
   float part[4][R][M] = {};
   for (int ks = 0; ks < KS; ++ks) {
    float lanes[32][R][M] = {};
    for (int lane = 0; lane < 32; ++lane) {
      for (int c = ks * 32 + lane; c < nvec; c += 32 * KS) {
        uint32_t w[R][4];
        float s[R], mn[R], xf[M][C];
        for (int r = 0; r < R; ++r) {
          const int n = n0 + r < N ? n0 + r : N - 1;
          std::memcpy(w[r], q + (size_t)n * row_bytes + (size_t)c * 16, 16);
          const int g = c * C / G;
          s[r] = sc[(size_t)n * ng + g];
          mn[r] = BITS == 4 ? mi[(size_t)n * ng + g] : 0.f;
        }
        for (int m = 0; m < M; ++m)
          for (int i = 0; i < C; ++i) xf[m][i] = x[(size_t)m * K + (size_t)c * C + i];
        lane_block<BITS, M, R>(w, xf, s, mn, lanes[lane]);
      }
    }
    for (int r = 0; r < R && n0 + r < N; ++r)
      for (int m = 0; m < M; ++m) {
        float v[32];
        for (int l = 0; l < 32; ++l) v[l] = lanes[l][r][m];
        for (int off = 16; off > 0; off >>= 1)       // the warp's butterfly, in its order
          for (int l = 0; l < off; ++l) v[l] += v[l + off];
        part[ks][r][m] = v[0];
      }
   }
    for (int r = 0; r < R && n0 + r < N; ++r)
      for (int m = 0; m < M; ++m) {
        float v = 0.f;                                 // the first warp sums the KS partials in order
        for (int ks = 0; ks < KS; ++ks) v += part[ks][r][m];
        y[(size_t)m * N + n0 + r] = KS == 1 ? part[0][r][m] : v;
      }
  }
  FILE* f = std::fopen((dir + "/y.f32").c_str(), "wb");
  std::fwrite(y.data(), 4, y.size(), f);
  std::fclose(f);
}

template <int BITS>
static void gemv_m(const std::string& dir, int M, int N, int K, int G, int KS) {
  switch (M) {
    case 1: gemv<BITS, 1>(dir, N, K, G, KS); break;
    case 2: gemv<BITS, 2>(dir, N, K, G, KS); break;
    case 3: gemv<BITS, 3>(dir, N, K, G, KS); break;
    case 4: gemv<BITS, 4>(dir, N, K, G, KS); break;
    default: std::fprintf(stderr, "M must be 1..%d\n", kMaxM); std::exit(2);
  }
}

int main(int argc, char** argv) {
  if (argc >= 2 && !std::strcmp(argv[1], "codes")) {
    for (int pos = 0; pos < 4; ++pos)
      for (uint32_t b = 0; b < 256; ++b) {
        const uint32_t w = b << (8 * pos);
        float f4[8], f8[4];
        decode_q4_word(w, f4);
        decode_q8_word(w, f8);
        std::printf("%d %u", pos, b);
        for (float v : f4) std::printf(" %.9g", v);
        for (float v : f8) std::printf(" %.9g", v);
        std::printf("\n");
      }
    return 0;
  }
  if ((argc == 8 || argc == 9) && !std::strcmp(argv[1], "gemv")) {
    const int M = std::atoi(argv[3]), N = std::atoi(argv[4]), K = std::atoi(argv[5]), G = std::atoi(argv[6]);
    const int KS = argc == 9 ? std::atoi(argv[8]) : 1;
    if (KS != 1 && KS != 2 && KS != 4) { std::fprintf(stderr, "KS must be 1, 2 or 4\n"); return 2; }
    if (std::atoi(argv[7]) == 4) gemv_m<4>(argv[2], M, N, K, G, KS);
    else gemv_m<8>(argv[2], M, N, K, G, KS);
    return 0;
  }
  std::fprintf(stderr, "usage: %s codes | gemv DIR M N K G BITS [KS]\n", argv[0]);
  return 2;
}
