#include "threadpool.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace bn158 {
namespace {

// The spin-wait hint: pause on x86-64, yield on arm64 (both let a sibling hardware thread run).
inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

constexpr auto kSpin = std::chrono::microseconds(150);  // busy-wait window before sleeping
constexpr int64_t kChunksPerThread = 8;

using ChunkFn = std::function<void(int64_t)>;

// One job at a time. `claim` packs the job's generation (low 32 bits) with the next unclaimed
// chunk: a claim is a compare-exchange on that word, so a worker that wakes after its job ended
// (or while the next one runs) sees another generation or no chunk left, and never calls into a
// finished job. The caller returns once every chunk is done, whoever ran it.
struct Pool {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<uint64_t> gen{0};
    std::atomic<int> sleepers{0};
    std::atomic<uint64_t> claim{0};
    std::atomic<const ChunkFn*> fn{nullptr};
    std::atomic<int64_t> nchunks{0};
    std::atomic<int64_t> done{0};
    std::vector<std::thread> workers;
    std::vector<std::atomic<bool>*> stop_flags;
    std::mutex run_mu;  // one job at a time (callers release the GIL)

    static uint64_t tag(uint64_t g) { return (g & 0xffffffffu) << 32; }

    // Run chunks of job g until none is left.
    void drain(uint64_t g) {
        for (;;) {
            uint64_t cur = claim.load(std::memory_order_acquire);
            if ((cur & ~uint64_t(0xffffffffu)) != tag(g)) return;  // job g is over
            const int64_t c = int64_t(cur & 0xffffffffu);
            const ChunkFn* f = fn.load(std::memory_order_acquire);
            if (c >= nchunks.load(std::memory_order_acquire)) return;
            // Success proves job g still had chunk c unclaimed, so f and nchunks were job g's.
            if (!claim.compare_exchange_weak(cur, cur + 1, std::memory_order_acq_rel)) continue;
            (*f)(c);
            done.fetch_add(1, std::memory_order_release);
        }
    }

    // `seen` is the generation at creation, read by resize() — not by the new thread, which may
    // start only after the caller has already posted its first job (and would then miss it).
    void worker(std::atomic<bool>* stop, uint64_t seen) {
        for (;;) {
            auto t0 = std::chrono::steady_clock::now();
            int spins = 0;
            while (gen.load(std::memory_order_acquire) == seen && !stop->load(std::memory_order_relaxed)) {
                cpu_relax();
                if (++spins == 256) {
                    spins = 0;
                    if (std::chrono::steady_clock::now() - t0 > kSpin) {
                        std::unique_lock<std::mutex> lk(mu);
                        sleepers.fetch_add(1);
                        cv.wait(lk, [&] { return gen.load() != seen || stop->load(); });
                        sleepers.fetch_sub(1);
                        break;
                    }
                }
            }
            if (stop->load()) return;
            seen = gen.load(std::memory_order_acquire);
            drain(seen);
        }
    }

    void resize(int n) {  // n = total threads including the caller
        std::lock_guard<std::mutex> rl(run_mu);
        for (auto* s : stop_flags) s->store(true);
        {
            std::lock_guard<std::mutex> lk(mu);
            cv.notify_all();
        }
        for (auto& t : workers) t.join();
        for (auto* s : stop_flags) delete s;
        workers.clear();
        stop_flags.clear();
        for (int i = 1; i < n; ++i) {
            auto* s = new std::atomic<bool>(false);
            stop_flags.push_back(s);
            const uint64_t now = gen.load(std::memory_order_acquire);
            workers.emplace_back([this, s, now] { worker(s, now); });
        }
    }

    void run(int64_t n, const ChunkFn& f) {
        std::lock_guard<std::mutex> rl(run_mu);
        if (n <= 1 || workers.empty()) {
            for (int64_t c = 0; c < n; ++c) f(c);
            return;
        }
        const uint64_t g = gen.load(std::memory_order_relaxed) + 1;
        fn.store(&f, std::memory_order_relaxed);
        nchunks.store(n, std::memory_order_relaxed);
        done.store(0, std::memory_order_relaxed);
        claim.store(tag(g), std::memory_order_release);
        {
            std::lock_guard<std::mutex> lk(mu);
            gen.store(g, std::memory_order_release);
            if (sleepers.load()) cv.notify_all();
        }
        drain(g);
        // Only chunks a worker has claimed are left; if that worker lost its core, give it ours.
        for (int spins = 0; done.load(std::memory_order_acquire) != n;) {
            if (++spins < 4096) {
                cpu_relax();
            } else {
                std::this_thread::yield();
            }
        }
    }
};

Pool& pool() {
    static Pool* p = new Pool();  // leaked on purpose: no thread joins during interpreter exit
    return *p;
}

}  // namespace

void pool_set_threads(int n) {
    if (n < 1) n = 1;
    if (n != pool_threads()) pool().resize(n);
}

int pool_threads() { return int(pool().workers.size()) + 1; }

void pool_run(int64_t nchunks, const std::function<void(int64_t)>& f) { pool().run(nchunks, f); }

int64_t pool_chunks(int64_t units) {
    const int64_t t = pool_threads();
    if (t <= 1 || units <= 1) return units < 1 ? 0 : 1;
    return units < t * kChunksPerThread ? units : t * kChunksPerThread;
}

}  // namespace bn158
