// AVX2 absmax int8 activation quantization for the fused BitLinear call (bindings.cpp).
//
// Bit-identical to the scalar loop there and to bitnet158.quant: q = clamp(round_half_even(x · inv),
// -128, 127) in fp32. vroundps with _MM_FROUND_TO_NEAREST_INT is round-half-to-even, and the
// saturating packs (int32 → int16 → int8) are the clamp. The scalar loop calls libm's nearbyintf
// per element (no SSE4.1 in the baseline ISA) and cost more than the matmul it fed at decode sizes.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "quant.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace bn158 {

float absmax_avx2(const float* x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m0 = _mm256_setzero_ps(), m1 = m0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
        m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i + 8)));
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_max_ps(m0, m1));
    float a = 0.0f;
    for (float v : t) a = a > v ? a : v;
    for (; i < n; ++i) a = a > std::fabs(x[i]) ? a : std::fabs(x[i]);
    return a;
}

void quantize_row_avx2(const float* x, int64_t n, float inv, int8_t* q) {
    const __m256 s = _mm256_set1_ps(inv);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i v[4];
        for (int j = 0; j < 4; ++j)
            v[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), s), kRound));
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; i < n; ++i) {
        const float r = std::nearbyint(x[i] * inv);
        q[i] = int8_t(r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r));
    }
}

}  // namespace bn158

#pragma GCC pop_options
