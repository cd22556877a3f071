// Rotary embedding and RMSNorm rows in fp32 for inference (decode_ops.cpp).
#pragma once
#include <cstdint>

namespace bn158 {
// x [rows, t, hd] (rows = batch·heads), cos/sin [t, hd]: out = x·cos + rotate_half(x)·sin.
void rope_rows(const float* x, int64_t rows, int64_t t, int64_t hd, const float* cos, const float* sin,
               float* out);
// out[r] = x[r] · (1 / sqrt(mean(x[r]²) + eps)) · w, rounding as torch's CPU rms_norm does when its
// vector width is `vec_width` floats (8 or 16); sq: scratch of n floats.
void rms_norm_rows(const float* x, int64_t rows, int64_t n, const float* w, float eps, int vec_width,
                   float* sq, float* out);
}  // namespace bn158
