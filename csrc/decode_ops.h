// Rotary embedding rows in fp32 for inference (decode_ops.cpp).
#pragma once
#include <cstdint>

namespace bn158 {
// x [rows, t, hd] (rows = batch·heads), cos/sin [t, hd]: out = x·cos + rotate_half(x)·sin.
void rope_rows(const float* x, int64_t rows, int64_t t, int64_t hd, const float* cos, const float* sin,
               float* out);
}  // namespace bn158
