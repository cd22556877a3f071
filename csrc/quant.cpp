// Absmax int8 activation quantization for the fused BitLinear call (bindings.cpp), portable and
// AVX2 (chosen at run time) or NEON on arm64.
//
// All give q = clamp(round_half_even(x · inv), -128, 127) in fp32, bit for bit as bitnet158.quant
// does. In AVX2, vroundps with _MM_FROUND_TO_NEAREST_INT is round-half-to-even and the saturating
// packs (int32 → int16 → int8) are the clamp. The portable loop calls libm's nearbyintf per
// element (no SSE4.1 in the baseline ISA) and cost more than the matmul it fed at decode sizes.
#include "quant.h"

#include <cmath>
#include <cstdint>

#include "cpu_features.h"

#if defined(BN158_X86)
#include <immintrin.h>
#elif defined(BN158_ARM64)
#include <arm_neon.h>
#endif

namespace bn158 {
namespace {

float absmax_scalar(const float* x, int64_t n) {
    float a = 0.0f;
    for (int64_t i = 0; i < n; ++i) a = a > std::fabs(x[i]) ? a : std::fabs(x[i]);
    return a;
}

void quantize_scalar(const float* x, int64_t n, float inv, int8_t* q) {
    for (int64_t i = 0; i < n; ++i) {
        const float r = std::nearbyint(x[i] * inv);
        q[i] = int8_t(r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r));
    }
}

#if defined(BN158_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

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
    float a = absmax_scalar(x + i, n - i);
    for (float v : t) a = a > v ? a : v;
    return a;
}

void quantize_avx2(const float* x, int64_t n, float inv, int8_t* q) {
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
    quantize_scalar(x + i, n - i, inv, q + i);
}

#pragma GCC pop_options
#endif  // BN158_X86

#if defined(BN158_ARM64)
// Advanced SIMD is in every arm64 CPU. fcvtns rounds half to even, sqxtn saturates (the clamp).
float absmax_neon(const float* x, int64_t n) {
    float32x4_t m0 = vdupq_n_f32(0.0f), m1 = m0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        m0 = vmaxq_f32(m0, vabsq_f32(vld1q_f32(x + i)));
        m1 = vmaxq_f32(m1, vabsq_f32(vld1q_f32(x + i + 4)));
    }
    const float v = vmaxvq_f32(vmaxq_f32(m0, m1)), t = absmax_scalar(x + i, n - i);
    return v > t ? v : t;
}

void quantize_neon(const float* x, int64_t n, float inv, int8_t* q) {
    const float32x4_t s = vdupq_n_f32(inv);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        int32x4_t v[4];
        for (int j = 0; j < 4; ++j) v[j] = vcvtnq_s32_f32(vmulq_f32(vld1q_f32(x + i + 4 * j), s));
        const int16x8_t a = vcombine_s16(vqmovn_s32(v[0]), vqmovn_s32(v[1]));
        const int16x8_t b = vcombine_s16(vqmovn_s32(v[2]), vqmovn_s32(v[3]));
        vst1q_s8(q + i, vcombine_s8(vqmovn_s16(a), vqmovn_s16(b)));
    }
    quantize_scalar(x + i, n - i, inv, q + i);
}
#endif  // BN158_ARM64

}  // namespace

#if defined(BN158_X86)
float absmax(const float* x, int64_t n) {
    static const bool simd = isa_supported(Isa::Avx2);
    return simd ? absmax_avx2(x, n) : absmax_scalar(x, n);
}

void quantize_row(const float* x, int64_t n, float inv, int8_t* q) {
    static const bool simd = isa_supported(Isa::Avx2);
    simd ? quantize_avx2(x, n, inv, q) : quantize_scalar(x, n, inv, q);
}
#elif defined(BN158_ARM64)
float absmax(const float* x, int64_t n) { return absmax_neon(x, n); }
void quantize_row(const float* x, int64_t n, float inv, int8_t* q) { quantize_neon(x, n, inv, q); }
#else
float absmax(const float* x, int64_t n) { return absmax_scalar(x, n); }
void quantize_row(const float* x, int64_t n, float inv, int8_t* q) { quantize_scalar(x, n, inv, q); }
#endif

}  // namespace bn158
