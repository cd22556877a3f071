// A small persistent thread pool (no OpenMP: the torch CPU wheel ships its own OpenMP runtime and
// two runtimes in one process oversubscribe the cores). run(n, f) calls f(0..n-1), f(0) on the
// caller; workers spin briefly after each job so back-to-back calls (a decode step) pay no wake-up.
#pragma once
#include <functional>

namespace bn158 {

void pool_set_threads(int n);  // total threads including the caller, >= 1
int pool_threads();
void pool_run(int ntasks, const std::function<void(int)>& f);  // ntasks <= pool_threads()

}  // namespace bn158
