// A small persistent thread pool (no OpenMP: the torch CPU wheel ships its own OpenMP runtime and
// two runtimes in one process oversubscribe the cores). run(n, f) calls f(0..n-1) once each; the
// caller and the workers claim chunks from a shared counter, so a thread that is descheduled
// (another process on its core) holds up only the chunk it is on, never a fixed share of the work.
// Workers spin briefly after each job so back-to-back calls (a decode step) pay no wake-up.
#pragma once
#include <cstdint>
#include <functional>

namespace bn158 {

void pool_set_threads(int n);  // total threads including the caller, >= 1
int pool_threads();
void pool_run(int64_t nchunks, const std::function<void(int64_t)>& f);

// Chunks to split `units` of work into for the pool: several per thread (so the split adapts to
// threads that run slower), never more than the units, and one when the pool has one thread.
int64_t pool_chunks(int64_t units);

}  // namespace bn158
