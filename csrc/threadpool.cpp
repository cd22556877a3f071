#include "threadpool.h"

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace bn158 {
namespace {

constexpr auto kSpin = std::chrono::microseconds(150);  // busy-wait window before sleeping

struct Pool {
    std::mutex mu;
    std::condition_variable cv;
    std::atomic<uint64_t> gen{0};
    std::atomic<int> remaining{0};
    std::atomic<int> sleepers{0};
    const std::function<void(int)>* job = nullptr;
    int njob = 0;
    std::vector<std::thread> workers;   // worker i runs task i + 1
    std::vector<std::atomic<bool>*> stop_flags;
    std::mutex run_mu;                  // one job at a time (callers release the GIL)

    // `seen` is the generation at creation, read by resize() — not by the new thread, which may
    // start only after the caller has already posted its first job (and would then miss it).
    void worker(int id, std::atomic<bool>* stop, uint64_t seen) {
        for (;;) {
            auto t0 = std::chrono::steady_clock::now();
            int spins = 0;
            while (gen.load(std::memory_order_acquire) == seen && !stop->load(std::memory_order_relaxed)) {
                _mm_pause();
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
            if (id < njob) (*job)(id);
            remaining.fetch_sub(1, std::memory_order_acq_rel);
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
            workers.emplace_back([this, i, s, now] { worker(i, s, now); });
        }
    }

    void run(int ntasks, const std::function<void(int)>& f) {
        std::lock_guard<std::mutex> rl(run_mu);
        if (ntasks <= 1 || workers.empty()) {
            for (int i = 0; i < ntasks; ++i) f(i);
            return;
        }
        job = &f;
        njob = ntasks;
        remaining.store(int(workers.size()), std::memory_order_release);
        {
            std::lock_guard<std::mutex> lk(mu);
            gen.fetch_add(1, std::memory_order_acq_rel);
            if (sleepers.load()) cv.notify_all();
        }
        f(0);
        while (remaining.load(std::memory_order_acquire) != 0) _mm_pause();
        job = nullptr;
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

void pool_run(int ntasks, const std::function<void(int)>& f) { pool().run(ntasks, f); }

}  // namespace bn158
