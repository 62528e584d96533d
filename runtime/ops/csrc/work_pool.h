// A small pool for the kernels' row loops, in which the caller never waits for a worker that is not running.
//
// OpenMP's parallel regions end in a barrier every thread must reach, so on a busy
// machine each region can cost a whole scheduler time slice while a descheduled
// thread is woken; a decode step has ~130 of them. Here chunks are claimed from an
// atomic counter tagged with the job's generation: the caller takes chunks too, and
// waits only for chunks a worker has already claimed (and is therefore running).
// A worker that wakes late finds the counter exhausted, or of a newer job, and
// claims nothing. Workers = torch's intra-op thread count - 1 (so -t governs it).
// A worker that has just finished spins for a moment before sleeping: the jobs of a
// decode step come every few microseconds, and a futex wake-up costs more than most.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

class WorkPool {
   public:
    using Fn = std::function<void(int64_t)>;

    ~WorkPool() {
        {
            std::lock_guard<std::mutex> g(mu_);
            stop_ = true;
            ++gen_;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

    // Runs fn(0) .. fn(chunks - 1) on up to `threads` threads (the caller included).
    void run(int64_t chunks, int threads, const Fn& fn) {
        if (chunks <= 0) return;
        if (threads <= 1 || chunks == 1) {
            for (int64_t c = 0; c < chunks; ++c) fn(c);
            return;
        }
        std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time
        grow(threads - 1);
        uint32_t gen;
        {
            std::lock_guard<std::mutex> g(mu_);
            gen = ++gen_;
            fn_ = &fn;
            chunks_ = chunks;
            done_.store(0, std::memory_order_relaxed);
            next_.store((uint64_t)gen << 32, std::memory_order_release);
            published_.store(gen, std::memory_order_release);
        }
        cv_.notify_all();
        work(gen, chunks, &fn);
        while (done_.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
    }

   private:
    // Claim and run chunks of job `gen` until none is left.
    void work(uint32_t gen, int64_t chunks, const Fn* fn) {
        uint64_t s = next_.load(std::memory_order_acquire);
        while ((uint32_t)(s >> 32) == gen && (int64_t)(s & 0xFFFFFFFFu) < chunks) {
            if (next_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
                (*fn)((int64_t)(s & 0xFFFFFFFFu));
                done_.fetch_add(1, std::memory_order_acq_rel);
                s = next_.load(std::memory_order_acquire);
            }
        }
    }

    // Busy-wait up to kSpin for a job newer than `seen` (the caller then takes the lock).
    void spin(uint32_t seen) const {
        const auto until = std::chrono::steady_clock::now() + kSpin;
        while (published_.load(std::memory_order_acquire) == seen) {
            for (int i = 0; i < 64; ++i) {
#if defined(__x86_64__)
                __builtin_ia32_pause();
#endif
            }
            if (std::chrono::steady_clock::now() > until) return;
        }
    }

    void grow(int n) {
        while ((int)workers_.size() < n) workers_.emplace_back([this] { loop(); });
    }

    void loop() {
        uint32_t seen = 0;
        for (;;) {
            const Fn* fn;
            int64_t chunks;
            uint32_t gen;
            spin(seen);
            {
                std::unique_lock<std::mutex> g(mu_);
                cv_.wait(g, [&] { return gen_ != seen; });
                if (stop_) return;
                seen = gen = gen_;
                fn = fn_;
                chunks = chunks_;
            }
            // fn stays valid while chunks of `gen` are unfinished: run() waits for them.
            work(gen, chunks, fn);
        }
    }

    static constexpr std::chrono::microseconds kSpin{200};
    std::mutex run_mu_, mu_;
    std::condition_variable cv_;
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> next_{0};  // generation << 32 | next chunk
    std::atomic<int64_t> done_{0};
    std::atomic<uint32_t> published_{0};  // gen_, readable without the lock
    const Fn* fn_ = nullptr;
    int64_t chunks_ = 0;
    uint32_t gen_ = 0;
    bool stop_ = false;
};

// The one pool of the compiled kernels (every translation unit shares it) and the thread
// count set_num_threads() gave it (0: torch's intra-op count).
inline WorkPool& kernel_pool() {
    static WorkPool p;
    return p;
}

inline std::atomic<int>& kernel_threads_setting() {
    static std::atomic<int> n{0};
    return n;
}

// Threads the kernels use now: set_num_threads()'s count, else torch's intra-op count.
inline int kernel_threads() {
    const int set = kernel_threads_setting().load(std::memory_order_relaxed);
    return std::max(1, set > 0 ? set : at::get_num_threads());
}

// f(r0, r1) over [0, n) in chunks of at least 64K multiply-adds (`work` per row), about
// four chunks per thread so a thread that runs late leaves its share to the others.
inline void parallel_rows(int64_t n, int64_t work, const std::function<void(int64_t, int64_t)>& f) {
    const int threads = kernel_threads();
    const int64_t min_rows = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work));
    const int64_t per = std::max(min_rows, (n + 4 * threads - 1) / (4 * threads));
    const int64_t chunks = (n + per - 1) / per;
    kernel_pool().run(chunks, threads, [&](int64_t c) { f(c * per, std::min(n, (c + 1) * per)); });
}

// f(i, i + 1) for each i in [0, n), one chunk each: for items as large as a GEMM's panels,
// so that the threads finish within one item of each other (parallel_rows's four chunks per
// thread left 6 of 10 panels to one thread and 4 to the other).
inline void parallel_items(int64_t n, const std::function<void(int64_t, int64_t)>& f) {
    kernel_pool().run(n, kernel_threads(), [&](int64_t c) { f(c, c + 1); });
}
