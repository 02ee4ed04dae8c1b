// The CPU kernels' helper-thread pool (cpu_pool.h).
#include "cpu_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>

#include <pthread.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace mops {
namespace cpupool {
namespace {

// Helper threads for the CPU kernels (int4 GEMV, decode attention). A decode step makes hundreds of calls of 10-100 us each, so
// what matters is how fast a helper joins: at::launch (the inter-op pool) wakes a sleeping thread
// through a condition variable (several us, often more than the helper's share of the work), and
// at::parallel_for's barrier waits for every worker, which on a loaded machine costs a scheduler
// slice when a worker has no free core (measured by the previous version: batch-1 1536x576 took
// 12 ms instead of 0.1 ms under load 5). So: own helpers that spin (with pause) for kSpinUs after
// their last job and then sleep; the caller publishes a job, takes chunks from a shared counter
// itself, and waits only for chunks a helper has claimed, never for a helper that has not started.
// The handoff takes no lock and allocates nothing (a ring of job slots, below): a spinning helper
// starts its first chunk ~0.25 us after the caller published the job (it was ~0.55 us through a
// mutex and a shared_ptr per call; ad hoc, 2026-11-26, two chunks of 1 us: 1.4 against 2.1-2.3 us).
// On a machine whose cores are all taken by other processes (load average), and for a while after
// a helper was preempted inside a chunk, the caller runs alone.
// MOPS_INT4_CPU_HELPERS=0 never uses helpers, =1 always does (tests, benchmarks), unset: as above.
// Helpers are detached and the pool is never destroyed (no joins at exit); a forked child never
// publishes jobs (it has no helpers) and runs every chunk itself.
constexpr int64_t kSpinUs = 300;
// A wait for a helper's chunk longer than kSlowWaitUs, or than twice the chunk's work at
// kMacsPerUs multiply-adds per us (a slow core's fp32 rate), is a preempted helper: chunks of a
// batch-1 GEMV are a few us, those of a 64-token one ~100 us, and neither may count as preempted.
constexpr int64_t kSlowWaitUs = 30;
constexpr int64_t kMacsPerUs = 8000;

// The chunks are split into one contiguous lane per thread (the caller's lane 0, each helper the
// next free one); a thread runs its own lane in order, then takes what is left of the others, in
// their order. So each thread streams one contiguous range of weight rows (the hardware prefetcher
// and the kernels' software prefetch keep running across its chunks, where interleaved chunks
// restart both at every chunk: see bench_int4_matmul.py --decode, weights rotated past the LLC),
// and a helper that never comes or is preempted leaves its remaining chunks to the others.
constexpr int kMaxLanes = 16;

struct Job {
  struct alignas(64) Lane {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  Lane lane[kMaxLanes];
  alignas(64) std::atomic<int> lanes_taken{1};  // lane 0 is the caller's
  std::atomic<int> want{0};      // helpers still wanted: each that joins takes one
  std::atomic<int64_t> done{0};
  alignas(64) std::atomic<uint64_t> seq{0};  // the call this slot holds (0: being set up)
  std::atomic<int> users{0};     // helpers inside this slot (the caller reuses it at 0 only)
  int64_t n = 0, grain = 1, chunks = 0;
  int lanes = 1;
  Prefetch after;             // read by the helper of lane 1 after its chunks (parallel_chunks)
  bool has_after = false;
  const ChunkFn* f = nullptr;  // called only for a claimed chunk, while the caller waits

  // A call's chunks for `threads` threads (lanes): everything but the handoff's own fields.
  void set(int64_t n_, int64_t grain_, const ChunkFn* f_, int threads) {
    n = n_;
    grain = grain_;
    chunks = (n_ + grain_ - 1) / grain_;
    f = f_;
    split(threads);
  }

  void split(int threads) {
    lanes = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)threads, (int64_t)kMaxLanes, chunks}));
    for (int i = 0; i < lanes; ++i) {
      lane[i].next.store(chunks * i / lanes, std::memory_order_relaxed);
      lane[i].end = chunks * (i + 1) / lanes;
    }
  }

  // Runs the chunks of lane `first`, then of the other lanes.
  void work(int first) {
    for (int k = 0; k < lanes; ++k) {
      Lane& ln = lane[(first + k) % lanes];
      for (int64_t c; (c = ln.next.fetch_add(1, std::memory_order_relaxed)) < ln.end;) {
        (*f)(c * grain, std::min(n, (c + 1) * grain));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }

  // A helper's lane: the next one not taken (more helpers than lanes: they share).
  int take_lane() { return lanes_taken.fetch_add(1, std::memory_order_relaxed) % lanes; }
};

// The handoff: one caller at a time publishes a job (a caller that finds another one's job running
// runs alone), in a ring of job slots that are never freed, by writing the slot and then the call's
// number (gen_). A spinning helper sees the number, enters the slot (users), checks that the slot
// still holds that call (seq), and takes a lane: no lock, no allocation, a few cache lines crossing
// cores. A slot is set up again kSlots calls later, once no helper is inside it (a late helper
// that entered an old call finds its seq changed, or its lanes empty, and leaves).
constexpr int kSlots = 8;

class HelperPool {
 public:
  static HelperPool& get() {
    static HelperPool* pool = new HelperPool();  // never destroyed: helpers may outlive main()
    return *pool;
  }

  // Runs f over [0, n) in chunks of `grain` with up to `threads` threads (the caller included).
  void run(int64_t n, int64_t grain, int threads, const ChunkFn& f, const Prefetch* after, int64_t chunk_work) {
    const int64_t chunks = (n + grain - 1) / grain;
    int helpers = (int)std::min<int64_t>(threads, chunks) - 1;
    const char* mode = std::getenv("MOPS_INT4_CPU_HELPERS");  // "0": never, "1": always, else auto
    const bool forced = mode && mode[0] == '1';
    if (mode && mode[0] == '0') helpers = 0;
    if (helpers > 0 && !forced && skip_.load(std::memory_order_relaxed) > 0) {  // backing off
      skip_.fetch_sub(1, std::memory_order_relaxed);
      helpers = 0;
    }
    if (helpers > 0 && !forced && machine_busy(threads)) helpers = 0;
    // a forked child has none of the parent's threads (and maybe a lock the parent's helper held)
    if (helpers > 0 && forked_.load(std::memory_order_relaxed)) helpers = 0;
    // another thread's call is running on the helpers: this one runs alone
    if (helpers > 0 && owned_.exchange(true, std::memory_order_acquire)) helpers = 0;
    if (helpers <= 0) {
      f(0, n);
      return;
    }
    start(helpers);
    const uint64_t seq = gen_.load(std::memory_order_relaxed) + 1;
    Job& job = slot_[seq % kSlots];
    job.seq.store(0, std::memory_order_seq_cst);  // closed: a helper entering now leaves
    if (job.users.load(std::memory_order_seq_cst) != 0) {  // one still inside (preempted?): no wait
      owned_.store(false, std::memory_order_release);
      f(0, n);
      return;
    }
    job.set(n, grain, &f, helpers + 1);
    job.has_after = after != nullptr;
    if (after != nullptr) job.after = *after;
    job.lanes_taken.store(1, std::memory_order_relaxed);
    job.done.store(0, std::memory_order_relaxed);
    job.want.store(helpers, std::memory_order_relaxed);
    job.seq.store(seq, std::memory_order_seq_cst);
    gen_.store(seq, std::memory_order_seq_cst);  // published
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }  // a helper between its check and its wait gets the notify
      cv_.notify_all();
    }
    job.work(0);
    if (job.done.load(std::memory_order_acquire) < job.chunks) {
      // A helper still holds a chunk. If it was preempted (no free core: a loaded machine), this
      // wait is a scheduler slice, not a chunk's few us: then run the next 2, 4, ... 1024 calls
      // alone (their helpers fall asleep meanwhile), and go back to helpers on fast waits.
      const int64_t slow_us = std::max<int64_t>(kSlowWaitUs, 2 * chunk_work / kMacsPerUs);
      const auto t0 = std::chrono::steady_clock::now();
      while (job.done.load(std::memory_order_acquire) < job.chunks) cpu_relax();
      if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(slow_us)) {
        const int lv = std::min(level_.load(std::memory_order_relaxed) + 1, 10);
        level_.store(lv, std::memory_order_relaxed);
        skip_.store(1 << lv, std::memory_order_relaxed);
      } else if (level_.load(std::memory_order_relaxed) > 0) {
        level_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    job.want.store(0, std::memory_order_relaxed);  // late helpers take no lane
    owned_.store(false, std::memory_order_release);
  }

  bool busy(int threads) { return machine_busy(threads); }  // for parallel_chunks' OpenMP path

 private:
  // Prefetches each 64-byte line of each range into this core's L2 (and so the shared L3), until
  // done or until the caller publishes the next job. Prefetch instructions never fault: the caller
  // may free the memory meanwhile (an Engine dropped right after a step) without harm. x86 only.
  void read_ahead(const Prefetch& pf, uint64_t seen, int lanes) {
#if defined(__x86_64__) || defined(__i386__)
    // Lane 1's share first (the rows this helper takes in the next call, if it splits as this one
    // did: into this core's L2), then the lanes after it, then lane 0's (the caller's: it reads them
    // from another core's cache rather than DRAM). Codes, scales and mins in step, so the rows come
    // whole. (An A/B in one process, 4 rounds, batch-1 decode: this order 197-204 tok/s, the former
    // one - all codes from row 0, then scales, then mins - 187-196, lane 0's rows first 185-189.)
    const int L = lanes > 1 ? lanes : 2;
    for (int k = 1; k <= L; ++k) {
      const int lane = k % L;  // 1, 2, ..., L - 1, 0
      constexpr int kSteps = 64;
      for (int i = 0; i < kSteps; ++i) {
        for (int r = 0; r < 3; ++r) {
          const char* p = static_cast<const char*>(pf.ptr[r]);
          if (p == nullptr) continue;
          const int64_t lo = pf.bytes[r] * lane / L, hi = pf.bytes[r] * (lane + 1) / L;
          const int64_t a = lo + (hi - lo) * i / kSteps, b = lo + (hi - lo) * (i + 1) / kSteps;
          for (int64_t o = a & ~int64_t{63}; o < b; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
        }
        if (gen_.load(std::memory_order_relaxed) != seen) return;  // the next job is out: stop
      }
    }
#else
    (void)pf; (void)seen; (void)lanes;
#endif
  }

  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  // True when the 1-minute load average says other processes keep every core busy (load >=
  // threads + 1: our caller and spinning helpers count for `threads`): a helper would then mostly
  // wait for a core, and its spinning would take time from the caller. Read every 100 ms.
  bool machine_busy(int threads) {
    const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now().time_since_epoch()).count();
    if (now - load_checked_ms_.load(std::memory_order_relaxed) >= 100) {
      load_checked_ms_.store(now, std::memory_order_relaxed);
      double load = 0.0;
      busy_.store(getloadavg(&load, 1) == 1 && load >= threads + 1.0, std::memory_order_relaxed);
    }
    return busy_.load(std::memory_order_relaxed);
  }

  void start(int helpers) {
    if (started_.load(std::memory_order_acquire) >= helpers) return;
    std::lock_guard<std::mutex> lk(start_mu_);
    while (started_.load(std::memory_order_relaxed) < helpers) {
      std::thread([this] { loop(); }).detach();
      started_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin for kSpinUs, then sleep until the next call
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if ((i & 255) == 255 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinUs)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
          break;
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      Job& job = slot_[seen % kSlots];
      job.users.fetch_add(1, std::memory_order_seq_cst);
      if (job.seq.load(std::memory_order_seq_cst) == seen && job.want.fetch_sub(1, std::memory_order_acq_rel) > 0) {
        const int lane = job.take_lane();
        job.work(lane);
        if (job.has_after && lane == 1) read_ahead(job.after, seen, job.lanes);
      }
      job.users.fetch_sub(1, std::memory_order_release);
    }
  }

  HelperPool() {
    // in a forked child, the helpers started before the fork do not exist: it runs every chunk itself
    pthread_atfork(nullptr, nullptr, [] { HelperPool::get().forked_.store(get().started_.load() > 0, std::memory_order_relaxed); });
  }

  std::mutex mu_, start_mu_;
  std::condition_variable cv_;
  alignas(64) std::atomic<uint64_t> gen_{0};  // the number of the last call published
  alignas(64) std::atomic<int> sleepers_{0};
  std::atomic<bool> owned_{false};       // a call is running on the helpers
  Job slot_[kSlots];
  std::atomic<int> skip_{0}, level_{0};  // calls left to run alone, and the back-off level
  std::atomic<int64_t> load_checked_ms_{-1000};
  std::atomic<bool> busy_{false};
  std::atomic<bool> forked_{false};      // this process is a fork of one that had started helpers
  std::atomic<int> started_{0};
};

}  // namespace

// True when OpenMP's workers spin after a region (libgomp's default; OMP_WAIT_POLICY=ACTIVE):
// OMP_WAIT_POLICY is not PASSIVE and GOMP_SPINCOUNT is not 0, read once (libgomp read them when
// it loaded). A helper of ours spinning beside spinning workers would hold up every aten region
// after our calls, and they our calls (ad hoc, a drop-in Hugging Face forward of 64 tokens: 111-134
// ms with our helpers, 104 ms with none, 62-63 ms on OpenMP's threads): so then our chunks run on
// OpenMP's threads instead (at::parallel_for), one team of spinning threads in all.
bool openmp_spins() {
  static const bool spins = [] {
    const char* p = std::getenv("OMP_WAIT_POLICY");
    const char* c = std::getenv("GOMP_SPINCOUNT");
    const bool passive = p != nullptr && (p[0] == 'p' || p[0] == 'P');
    const bool zero = c != nullptr && c[0] == '0' && c[1] == '\0';
    return !passive && !zero;
  }();
  return spins;
}

void parallel_chunks(int64_t n, int64_t grain, int64_t work, ChunkFn f, const Prefetch* after) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || n <= grain || work < kMinParallelWork || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  const char* mode = std::getenv("MOPS_INT4_CPU_HELPERS");  // "1": always our helpers (tests)
  if (openmp_spins() && !(mode && mode[0] == '1')) {
    if (work < kMinOpenMPWork || HelperPool::get().busy(threads) || (mode && mode[0] == '0')) {
      f(0, n);
      return;
    }
    // OpenMP's threads run the same lanes as our helpers would: each its own contiguous lane, then
    // what is left of the others (the caller starts ~0.25 us before a woken worker: it takes over
    // the worker's last chunks instead of waiting for them)
    Job job;
    job.set(n, grain, &f, threads);
    at::parallel_for(0, job.lanes, 1, [&](int64_t b, int64_t e) {
      for (int64_t l = b; l < e; ++l) job.work((int)l);
    });
    return;
  }
  HelperPool::get().run(n, grain, threads, f, after, work / ((n + grain - 1) / grain));
}


}  // namespace cpupool
}  // namespace mops
