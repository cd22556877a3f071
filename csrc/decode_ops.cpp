// Rotary embedding in one native call for inference. torch spends seven ops on it (chunk, neg, cat,
// two muls, add, cast), 70-150 µs per call inside a 2B4T decode step once the kernels' weight
// streams have pushed torch's code out of the caches; a step has 60 of them (~9 ms of ~100).
// Bit-identical to the torch formula: each product is rounded, then the two are added (contraction
// into an FMA is switched off for this file, whatever the build flags).
//
// RMSNorm too (torch's fused op runs ~10 small ops: 40 µs hot, 60-350 µs inside a decode step; a
// step has 121). Every norm feeds an int8 activation quantizer, so it must round exactly as torch
// does — a norm that merely summed in another order flipped rounding ties and moved logits by
// 0.03 against transformers' own BitNet, which the torch route matches to 1e-5. So the sum of
// squares follows torch's CPU reduction order for a contiguous row: V-float lanes, 4 interleaved
// vector accumulators feeding a 4-level cascade, the leftover vectors, then the scalar tail and
// the lanes in order. V is torch's vector width (8 floats with AVX2, 16 with AVX-512), passed in;
// kernels.py checks the result bit for bit against torch before using it.
#include "decode_ops.h"

#include <cmath>
#include <cstring>

#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)  // clang ignores the line above and contracts by default on arm64
#pragma STDC FP_CONTRACT OFF
#endif

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

namespace {

int64_t ceil_log2(int64_t v) {
    int64_t r = 0;
    while ((int64_t(1) << r) < v) ++r;
    return r;
}

// Sum of q[0..n) (squares, already rounded) in torch's order; V <= 16.
float torch_order_sum(const float* q, int64_t n, int V) {
    constexpr int kRows = 4, kLevels = 4;
    float acc[kLevels][kRows][16];
    std::memset(acc, 0, sizeof(acc));
    const int64_t nv = n / V, size = nv / kRows;
    const int64_t lp = ceil_log2(size) / kLevels > 4 ? ceil_log2(size) / kLevels : 4;
    const int64_t step = int64_t(1) << lp, mask0 = step - 1;
    auto add_row = [&](float dst[kRows][16], int64_t i) {  // row i: vectors 4i .. 4i+3
        for (int k = 0; k < kRows; ++k)
            for (int l = 0; l < V; ++l) dst[k][l] += q[(i * kRows + k) * V + l];
    };
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; ++j, ++i) add_row(acc[0], i);
        for (int lev = 1; lev < kLevels; ++lev) {
            for (int k = 0; k < kRows; ++k)
                for (int l = 0; l < V; ++l) {
                    acc[lev][k][l] += acc[lev - 1][k][l];
                    acc[lev - 1][k][l] = 0.0f;
                }
            if (i & (mask0 << (lev * lp))) break;
        }
    }
    for (; i < size; ++i) add_row(acc[0], i);
    for (int lev = 1; lev < kLevels; ++lev)
        for (int k = 0; k < kRows; ++k)
            for (int l = 0; l < V; ++l) acc[0][k][l] += acc[lev][k][l];
    float* ps = acc[0][0];  // partial sums of the 4 accumulators, folded into the first
    for (int64_t v = size * kRows; v < nv; ++v)
        for (int l = 0; l < V; ++l) ps[l] += q[v * V + l];
    for (int k = 1; k < kRows; ++k)
        for (int l = 0; l < V; ++l) ps[l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t t = nv * V; t < n; ++t) total += q[t];
    for (int l = 0; l < V; ++l) total += ps[l];
    return total;
}

}  // namespace

void rms_norm_rows(const float* x, int64_t rows, int64_t n, const float* w, float eps, int vec_width,
                   float* sq, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        float* o = out + r * n;
        for (int64_t j = 0; j < n; ++j) sq[j] = xr[j] * xr[j];
        const float mean = torch_order_sum(sq, n, vec_width) / float(n);
        const float inv = 1.0f / std::sqrt(mean + eps);
        for (int64_t j = 0; j < n; ++j) o[j] = (xr[j] * inv) * w[j];
    }
}

}  // namespace bn158
