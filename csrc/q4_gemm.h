// The 4-bit grouped output head (q4_gemm.cpp): int8 activations × 4-bit codes with an fp16 scale
// per 32 values, fp32 out. Layout (bitnet158.packed_layers.quantize_rows_q4): each row is blocks of
// 64 values in 32 bytes, byte j holding value j in its low nibble and value j + 32 in its high
// one; codes c in [0, 15] stand for (c − 8) · scale.
#pragma once
#include <cstdint>

#include "cpu_features.h"
#include "half.h"

namespace bn158 {

constexpr int64_t kQ4Group = 32, kQ4Block = 64;

// out[m, n] = sum_g scale[n, g] · sum_{k in g} (c[n, k] − 8) · x[m, k]; K a multiple of kQ4Block.
// scales: fp16 bit patterns [N, K / 32]. Blocks until done; threads from the shared pool.
void q4_matmul(Isa isa, const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales,
               int64_t N, float* out);

}  // namespace bn158
