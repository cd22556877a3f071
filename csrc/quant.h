// Activation quantization helpers for the fused BitLinear call (quant_avx2.cpp).
#pragma once
#include <cstdint>

namespace bn158 {
float absmax_avx2(const float* x, int64_t n);                        // max |x[i]|, 0 for n = 0
void quantize_row_avx2(const float* x, int64_t n, float inv, int8_t* q);  // clamp(rint(x · inv))
}  // namespace bn158
