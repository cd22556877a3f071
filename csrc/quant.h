// Activation quantization for the fused BitLinear call (quant.cpp): AVX2 where the CPU has it, NEON on arm64,
// the same bits from a portable loop elsewhere.
#pragma once
#include <cstdint>

namespace bn158 {
float absmax(const float* x, int64_t n);                            // max |x[i]|, 0 for n = 0
void quantize_row(const float* x, int64_t n, float inv, int8_t* q);  // clamp(rint(x · inv), -128, 127)
}  // namespace bn158
