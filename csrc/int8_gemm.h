#pragma once
#include <cstdint>

namespace bn158 {

// out[M, N] = x[M, K] · w[N, K]ᵀ in exact int32; w must lie in [-127, 127]. simd: the AVX2 path
// (the caller checks the CPU supports it). Blocks until done; threads from the shared pool.
void int8_matmul(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, bool simd);

}  // namespace bn158
