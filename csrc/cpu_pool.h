// The CPU kernels' helper threads (int4_matmul's GEMV, prefix_attention's decode): one pool per
// process, so the calls of a decode step never wake a second set of threads (OpenMP's) that would
// compete with spinning helpers for the same cores. Raw C++ plus ATen's thread count.
//
//   parallel_chunks(n, grain, work, f)   f(b, e) over [0, n) in chunks of `grain`, on the caller
//       plus helpers (up to at::get_num_threads() threads in all); serial inside another parallel
//       region, with one thread, or when `work` (multiply-adds) is below kMinParallelWork
//       (kMinOpenMPWork on OpenMP's threads).
//       f must not throw and must write disjoint outputs per chunk.
//       Where OpenMP's workers spin after a region (its default wait policy: neither
//       OMP_WAIT_POLICY=PASSIVE nor GOMP_SPINCOUNT=0), the chunks run on OpenMP's threads instead
//       (at::parallel_for; `after` is then not read ahead): two teams of spinning threads on the
//       same cores would hold each other up.
//       `after` (optional): memory the first helper prefetches once its chunks are done, while the
//       caller goes on (a decode step's next weight matrix: the Python and attention work between
//       two GEMVs hides its DRAM latency). It stops at the next job; nothing waits for it, and it
//       may be freed meanwhile (prefetches never fault).
#pragma once
#include <cstdint>
#include <type_traits>

namespace mops {
namespace cpupool {

// Calls with fewer multiply-adds than this run on the calling thread alone: below it a helper's
// share is shorter than what it costs to hand it over.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;
// The same bound on OpenMP's threads (where they spin, see parallel_chunks): a region costs ~0.55 us
// there against ~0.35 us for our helpers, and after an MKL call (torch.matmul) its worker may be
// slow to come for a while: a 192x576 one-token GEMV (110k multiply-adds, ~2 us of kernel) took 3.5
// us alone against 3.6-6.9 us on two threads (ad hoc, 2026-11-26).
constexpr int64_t kMinOpenMPWork = int64_t{1} << 17;

// Up to three byte ranges to prefetch (null pointers / 0 bytes: none).
struct Prefetch {
  const void* ptr[3] = {nullptr, nullptr, nullptr};
  int64_t bytes[3] = {0, 0, 0};
};

// A reference to a callable f(b, e) that parallel_chunks runs: no copy, no allocation per call (a
// std::function of a lambda capturing a kernel's dozen arguments allocates). The callable must
// outlive the call (a lambda written in the call's argument list does).
class ChunkFn {
 public:
  template <typename F, typename = typename std::enable_if<!std::is_same<typename std::decay<F>::type, ChunkFn>::value>::type>
  ChunkFn(const F& f)  // NOLINT: implicit, so that call sites pass a lambda
      : obj_(&f), call_([](const void* o, int64_t b, int64_t e) { (*static_cast<const F*>(o))(b, e); }) {}
  void operator()(int64_t b, int64_t e) const { call_(obj_, b, e); }

 private:
  const void* obj_;
  void (*call_)(const void*, int64_t, int64_t);
};

void parallel_chunks(int64_t n, int64_t grain, int64_t work, ChunkFn f, const Prefetch* after = nullptr);

}  // namespace cpupool
}  // namespace mops
