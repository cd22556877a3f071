#pragma once
#include <cstdint>

#include "cpu_features.h"
#include "formats.h"

namespace bn158 {

Isa current_isa();      // best_isa() until set_isa
void set_isa(Isa isa);  // the caller has checked isa_supported(isa)

// out[M, N] = x[M, K] · W[N, K]ᵀ exactly, W packed in `fmt`, with isa's kernel for that format (or
// the nearest narrower ISA's, see kernels.h). Blocks until done.
void matmul(Isa isa, Format fmt, const int8_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
            int32_t* out);

// Several matrices in one format against the same x [M, K]: out_i[M, N_i] = x · W_iᵀ, as matmul
// would give each, with x prepared once and the tiles of all of them split over the pool in one
// job (q, k and v, or gate and up: one dispatch and one wait instead of three or two).
struct MatmulTarget {
    const uint8_t* w;
    int64_t N;
    int32_t* out;
};
void matmul_many(Isa isa, Format fmt, const int8_t* x, int64_t M, int64_t K, const MatmulTarget* targets,
                 int count);

// Memory read-bandwidth probes: the uint64 sum of n bytes read as `streams` interleaved parts.
uint64_t read_sum_avx2(const uint8_t* p, int64_t n, int streams);  // ternary_avx2.cpp
uint64_t read_sum_neon(const uint8_t* p, int64_t n, int streams);  // ternary_neon.cpp

}  // namespace bn158
