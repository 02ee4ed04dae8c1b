// The CPU kernels' helper-thread pool (cpu_pool.h).
#include "cpu_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

#include <unistd.h>

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
  std::atomic<int> lanes_taken{1};  // lane 0 is the caller's
  std::atomic<int64_t> done{0};
  int64_t n = 0, grain = 1, chunks = 0;
  int lanes = 1;
  Prefetch after;             // read by the helper of lane 1 after its chunks (parallel_chunks)
  bool has_after = false;
  std::function<void(int64_t, int64_t)> f;  // called only for a claimed chunk, while the caller waits

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
        f(c * grain, std::min(n, (c + 1) * grain));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  }

  // A helper's lane: the next one not taken (more helpers than lanes: they share).
  int take_lane() { return lanes_taken.fetch_add(1, std::memory_order_relaxed) % lanes; }
};

class HelperPool {
 public:
  static HelperPool& get() {
    static HelperPool* pool = new HelperPool();  // never destroyed: helpers may outlive main()
    return *pool;
  }

  // Runs f over [0, n) in chunks of `grain` with up to `threads` threads (the caller included).
  template <typename F>
  void run(int64_t n, int64_t grain, int threads, const F& f, const Prefetch* after, int64_t chunk_work) {
    const int64_t slow_us = std::max<int64_t>(kSlowWaitUs, 2 * chunk_work / kMacsPerUs);
    auto job = std::make_shared<Job>();
    if (after != nullptr) {
      job->after = *after;
      job->has_after = true;
    }
    job->n = n;
    job->grain = grain;
    job->chunks = (n + grain - 1) / grain;
    job->f = [&f](int64_t b, int64_t e) { f(b, e); };
    int helpers = (int)std::min<int64_t>(threads, job->chunks) - 1;
    const char* mode = std::getenv("MOPS_INT4_CPU_HELPERS");  // "0": never, "1": always, else auto
    const bool forced = mode && mode[0] == '1';
    if (mode && mode[0] == '0') helpers = 0;
    if (helpers > 0 && !forced && skip_.load(std::memory_order_relaxed) > 0) {  // backing off
      skip_.fetch_sub(1, std::memory_order_relaxed);
      helpers = 0;
    }
    if (helpers > 0 && !forced && machine_busy(threads)) helpers = 0;
    // a forked child has none of the parent's threads (and maybe a mutex the parent's helper held)
    if (helpers > 0 && owner_pid_.load(std::memory_order_relaxed) > 0 &&
        owner_pid_.load(std::memory_order_relaxed) != getpid())
      helpers = 0;
    job->split(helpers + 1);
    if (helpers > 0) {
      start(helpers);
      {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = job;
        want_ = helpers;
        gen_.fetch_add(1, std::memory_order_release);
      }
      if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    }
    job->work(0);
    if (job->done.load(std::memory_order_acquire) < job->chunks) {
      // A helper still holds a chunk. If it was preempted (no free core: a loaded machine), this
      // wait is a scheduler slice, not a chunk's few us: then run the next 2, 4, ... 1024 calls
      // alone (their helpers fall asleep meanwhile), and go back to helpers on fast waits.
      const auto t0 = std::chrono::steady_clock::now();
      while (job->done.load(std::memory_order_acquire) < job->chunks) cpu_relax();
      if (std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(slow_us)) {
        const int lv = std::min(level_.load(std::memory_order_relaxed) + 1, 10);
        level_.store(lv, std::memory_order_relaxed);
        skip_.store(1 << lv, std::memory_order_relaxed);
      } else if (level_.load(std::memory_order_relaxed) > 0) {
        level_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    if (helpers > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      if (job_ == job) job_.reset();  // late helpers find no job (or an exhausted one)
    }
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
    std::lock_guard<std::mutex> lk(start_mu_);
    owner_pid_.store(getpid(), std::memory_order_relaxed);
    while (started_ < helpers) {
      std::thread([this] { loop(); }).detach();
      ++started_;
    }
  }

  void loop() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin for kSpinUs, then sleep until the next job
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if ((i & 255) == 255 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinUs)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1, std::memory_order_acq_rel);
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          break;
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = gen_.load(std::memory_order_acquire);
        if (want_ > 0) {  // the job asked for this many helpers
          --want_;
          job = job_;
        }
      }
      if (job) {
        const int lane = job->take_lane();
        job->work(lane);
        if (job->has_after && lane == 1) read_ahead(job->after, seen, job->lanes);
      }
    }
  }

  std::mutex mu_, start_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleepers_{0};
  std::shared_ptr<Job> job_;
  std::atomic<int> skip_{0}, level_{0};  // calls left to run alone, and the back-off level
  std::atomic<int64_t> load_checked_ms_{-1000};
  std::atomic<bool> busy_{false};
  std::atomic<pid_t> owner_pid_{0};  // the process whose helpers these are
  int want_ = 0;
  int started_ = 0;
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

void parallel_chunks(int64_t n, int64_t grain, int64_t work, const std::function<void(int64_t, int64_t)>& f,
                     const Prefetch* after) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || n <= grain || work < kMinParallelWork || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  const char* mode = std::getenv("MOPS_INT4_CPU_HELPERS");  // "1": always our helpers (tests)
  if (openmp_spins() && !(mode && mode[0] == '1')) {
    if (HelperPool::get().busy(threads) || (mode && mode[0] == '0')) {
      f(0, n);
      return;
    }
    const int64_t chunks = (n + grain - 1) / grain;
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      f(b * grain, std::min(n, e * grain));
    });
    return;
  }
  HelperPool::get().run(n, grain, threads, f, after, work / ((n + grain - 1) / grain));
}


}  // namespace cpupool
}  // namespace mops
