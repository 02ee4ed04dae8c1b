// int4_matmul CPU glue: argument checks, dtype handling, threading over output rows N.
//   int4_matmul_cpu(x [M, K], qweight, scale, min, group_size, bits) -> y [M, N] in x's dtype
//   int4_matmul_backward_cpu(dy [M, N], qweight, scale, min, group_size, bits) -> dx [M, K]
// Kernels: int4_matmul_cpu_kernel.h. M <= 16 runs the fused GEMV kernels (each decoded chunk is
// reused for all M rows); larger M dequantizes tiles of rows to fp32 and calls at::mm per tile.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <memory>
#include <thread>

#include "int4_matmul_cpu_kernel.h"
#include "ops.h"

namespace mops {
namespace {

constexpr int64_t kMaxGemvM = 16;

// Rows of W per dequantized tile: ~1 MiB of fp32, so a tile stays in L2 while BLAS reads it.
int64_t tile_rows(int64_t K) { return std::max<int64_t>(64, (int64_t{1} << 18) / K); }

void check_weight(const at::Tensor& qweight, const at::Tensor& scale, const c10::optional<at::Tensor>& min,
                  int64_t group_size, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "int4_matmul: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && scale.device().is_cpu(),
              "int4_matmul_cpu: qweight and scale must be CPU tensors");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(),
              "int4_matmul: qweight must be a contiguous 2-D tensor [N, K/2] (4-bit) or [N, K] (8-bit)");
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "int4_matmul: qweight must be ", bits == 4 ? "uint8" : "int8", " for bits=", bits);
  TORCH_CHECK(group_size % int4cpu::kChunk == 0 && group_size > 0,
              "int4_matmul: group_size must be a positive multiple of 32, got ", group_size);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(K % group_size == 0, "int4_matmul: K=", K, " must be a multiple of group_size ", group_size);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == N && scale.size(1) == K / group_size,
              "int4_matmul: scale must be contiguous float16 [N, K/G] = [", N, ", ", K / group_size, "]");
  if (bits == 4) {
    TORCH_CHECK(min.has_value(), "int4_matmul: min is required for bits=4");
    const at::Tensor& mn = *min;
    TORCH_CHECK(mn.device().is_cpu() && mn.scalar_type() == at::kHalf && mn.is_contiguous() &&
                    mn.sizes() == scale.sizes(),
                "int4_matmul: min must be a contiguous CPU float16 tensor shaped like scale [N, K/G]");
  }
}

const uint16_t* half_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
}

// W[n0:n1] as dense fp32 [n1 - n0, K], dequantized in parallel.
at::Tensor dequant_tile(const at::Tensor& qweight, const at::Tensor& scale, const uint16_t* mins,
                        int64_t K, int64_t G, int64_t bits, int64_t n0, int64_t n1) {
  at::Tensor w = at::empty({n1 - n0, K}, qweight.options().dtype(at::kFloat));
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const uint16_t* s = half_ptr(scale);
  float* o = w.data_ptr<float>();
  at::parallel_for(n0, n1, 16, [&](int64_t b, int64_t e) {
    int4cpu::dequant_rows(q, s, mins, o + (b - n0) * K, K, G, (int)bits, b, e);
  });
  return w;
}

// Rows of x per pass of the GEMV kernels: the permuted x of one pass (rows * K fp32) should stay
// in L1 (measured: 16 rows at K = 576, 36 KiB, ran 2.7x slower than 8 rows). A multiple of 4.
int64_t rows_per_pass(int64_t K) {
  const int64_t rows = (int64_t{24} * 1024 / (K * 4)) / 4 * 4;
  return std::min<int64_t>(kMaxGemvM, std::max<int64_t>(4, rows));
}

// f(b, e) over [0, n) in chunks of `grain`: the calling thread and helpers from the inter-op pool
// (up to at::get_num_threads() in all) take chunks from a shared counter, and the caller waits only
// for chunks a helper has claimed, never for a helper that has not started. Why not parallel_for:
// its barrier waits for every worker, and on a loaded machine a worker with no free core costs a
// scheduler slice (measured here: batch-1 1536x576 took 12 ms instead of 0.1 ms under load 5).
// f must not throw (the raw kernels do not) and must write disjoint outputs per chunk.
template <typename F>
void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), chunks) - 1;
  if (helpers <= 0 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto st = std::make_shared<State>();
  const F* fp = &f;  // dereferenced only for a claimed chunk, while the caller is still waiting
  auto work = [st, fp, n, grain, chunks]() {
    for (int64_t c; (c = st->next.fetch_add(1)) < chunks;) {
      (*fp)(c * grain, std::min(n, (c + 1) * grain));
      st->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) at::launch(work);
  work();
  while (st->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

void gemv_q4(const float* xp, const float* xsum, const uint8_t* q, const uint16_t* s, const uint16_t* mn,
             float* y, int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t ng = K / G;
  const int64_t pass = rows_per_pass(K);
  // grain: 64 rows per chunk amortise the claim; small enough that threads share the work.
  parallel_chunks(N, 64, [&](int64_t b, int64_t e) {
    if (M == 1) {
      const int64_t mid = b + (e - b) / 2 * 2;  // pairs of rows, then the odd one out
      int4cpu::q4_rows<2, 1, 1>(xp, xsum, q, s, mn, y, M, N, K, G, b, mid);
      int4cpu::q4_rows<1, 1, 1>(xp, xsum, q, s, mn, y, M, N, K, G, mid, e);
      return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += pass)  // xp / xsum are zero-padded to a multiple of 4 rows
      int4cpu::q4_rows<1, 4, kMaxGemvM>(xp + m0 * K, xsum + m0 * ng, q, s, mn, y + m0 * N,
                                        std::min(pass, M - m0), N, K, G, b, e);
  });
}

void gemv_q8(const float* xp, const int8_t* q, const uint16_t* s, float* y, int64_t M, int64_t N,
             int64_t K, int64_t G) {
  const int64_t pass = rows_per_pass(K);
  parallel_chunks(N, 64, [&](int64_t b, int64_t e) {
    for (int64_t m0 = 0; m0 < M; m0 += pass) {
      const int64_t mm = std::min(pass, M - m0);
      if (mm == 1)
        int4cpu::q8_rows<1>(xp + m0 * K, q, s, y + m0 * N, mm, N, K, G, b, e);
      else if (mm <= 4)
        int4cpu::q8_rows<4>(xp + m0 * K, q, s, y + m0 * N, mm, N, K, G, b, e);
      else
        int4cpu::q8_rows<16>(xp + m0 * K, q, s, y + m0 * N, mm, N, K, G, b, e);
    }
  });
}

}  // namespace

at::Tensor int4_matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& min, int64_t group_size, int64_t bits) {
  check_weight(qweight, scale, min, group_size, bits);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(x.device().is_cpu(), "int4_matmul_cpu: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_matmul: x must have shape (M, K=", K, "), got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "int4_matmul: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // bf16/fp16: computed in fp32
  const uint16_t* mn = bits == 4 ? half_ptr(*min) : nullptr;
  if (M == 0) return at::empty({0, N}, x.options());

  if (M <= kMaxGemvM) {
    const int64_t Mpad = (M + 3) / 4 * 4;  // the 4-bit kernel runs rows of x in tiles of 4
    at::Tensor xp = at::zeros({Mpad, K}, xf.options());
    at::Tensor xsum = at::zeros({Mpad, K / group_size}, xf.options());
    int4cpu::prepare_x(xf.data_ptr<float>(), xp.data_ptr<float>(), xsum.data_ptr<float>(), M, K,
                       group_size, (int)bits);
    at::Tensor y = at::empty({M, N}, xf.options());
    if (bits == 4)
      gemv_q4(xp.data_ptr<float>(), xsum.data_ptr<float>(), qweight.data_ptr<uint8_t>(),
              half_ptr(scale), mn, y.data_ptr<float>(), M, N, K, group_size);
    else
      gemv_q8(xp.data_ptr<float>(), qweight.data_ptr<int8_t>(), half_ptr(scale), y.data_ptr<float>(),
              M, N, K, group_size);
    return y.to(x.scalar_type());
  }

  // Large M: y^T [N, M], one contiguous slab of rows per dequantized tile.
  at::Tensor yt = at::empty({N, M}, xf.options());
  const int64_t T = tile_rows(K);
  for (int64_t n0 = 0; n0 < N; n0 += T) {
    const int64_t n1 = std::min(N, n0 + T);
    at::Tensor w = dequant_tile(qweight, scale, mn, K, group_size, bits, n0, n1);
    at::Tensor out = yt.narrow(0, n0, n1 - n0);
    at::mm_out(out, w, xf.t());
  }
  return yt.t().to(x.scalar_type()).contiguous();
}

at::Tensor int4_matmul_backward_cpu(const at::Tensor& dy, const at::Tensor& qweight,
                                    const at::Tensor& scale, const c10::optional<at::Tensor>& min,
                                    int64_t group_size, int64_t bits) {
  check_weight(qweight, scale, min, group_size, bits);
  const int64_t N = qweight.size(0);
  const int64_t K = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(dy.device().is_cpu(), "int4_matmul_backward_cpu: dy must be a CPU tensor");
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == N, "int4_matmul_backward: dy must have shape (M, N=", N,
              "), got ", dy.sizes());
  const at::Tensor dyf = dy.to(at::kFloat).contiguous();
  const uint16_t* mn = bits == 4 ? half_ptr(*min) : nullptr;
  at::Tensor dx = at::zeros({dy.size(0), K}, dyf.options());
  const int64_t T = tile_rows(K);
  for (int64_t n0 = 0; n0 < N; n0 += T) {  // dx += dy[:, tile] @ W[tile]
    const int64_t n1 = std::min(N, n0 + T);
    at::Tensor w = dequant_tile(qweight, scale, mn, K, group_size, bits, n0, n1);
    dx.addmm_(dyf.narrow(1, n0, n1 - n0), w);
  }
  return dx.to(dy.scalar_type());
}

}  // namespace mops
