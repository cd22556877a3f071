#pragma once
#include <algorithm>
#include <cstdint>
#include <string>

#include "formats.h"

namespace bn158 {

const KernelTable* table_by_name(const std::string& name);
const KernelTable& current_table();
void set_path(const std::string& name);  // throws std::invalid_argument (unknown / unsupported)

// out[M, N] = x[M, K] · W[N, K]ᵀ exactly, W packed in `fmt`. Blocks until done.
void matmul(const KernelTable& kt, Format fmt, const int8_t* x, int64_t M, int64_t K, const uint8_t* w,
            int64_t N, int32_t* out, bool lut = false);

uint64_t read_sum_avx2(const uint8_t* p, int64_t n, int streams);  // ternary_avx2.cpp

}  // namespace bn158
