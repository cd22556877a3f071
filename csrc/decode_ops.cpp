// Rotary embedding in one native call for inference. torch spends seven ops on it (chunk, neg, cat,
// two muls, add, cast), 70-150 µs per call inside a 2B4T decode step once the kernels' weight
// streams have pushed torch's code out of the caches; a step has 60 of them (~9 ms of ~100).
// Bit-identical to the torch formula: each product is rounded, then the two are added (contraction
// into an FMA is switched off for this file, whatever the build flags).
//
// RMSNorm stays in torch on purpose: every norm feeds an int8 activation quantizer, and any
// change in summation order flips a rounding tie somewhere (a native norm moved logits by 0.03
// against transformers' own BitNet, which our torch route matches to 1e-5).
#include "decode_ops.h"

#pragma GCC optimize("fp-contract=off")

namespace bn158 {

void rope_rows(const float* x, int64_t rows, int64_t t, int64_t hd, const float* cos, const float* sin,
               float* out) {
    const int64_t h = hd / 2;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t p = 0; p < t; ++p) {
            const float* xr = x + (r * t + p) * hd;
            const float* c = cos + p * hd;
            const float* s = sin + p * hd;
            float* o = out + (r * t + p) * hd;
            for (int64_t j = 0; j < h; ++j) o[j] = xr[j] * c[j] - xr[j + h] * s[j];          // rotate_half: -x2
            for (int64_t j = h; j < hd; ++j) o[j] = xr[j] * c[j] + xr[j - h] * s[j];         //              x1
        }
}

}  // namespace bn158
