// The 4-bit grouped output head: see q4_gemm.h for the layout.
//
// Per 64 values the AVX2 kernel loads 32 bytes of codes once, splits the nibbles (the low ones are
// values 0..31 of the block, the high ones 32..63, each aligned with 32 consecutive activations),
// multiplies unsigned codes by signed activations with vpmaddubsw (pair sums ≤ 2·15·128), widens
// with vpmaddwd and accumulates each group's 8 int32 lanes in fp32 times its scale. The −8 offset
// of the codes comes off at the end as −8 · Σ_g scale_g · Σ_{k in g} x_k (the group sums of x are
// computed once per activation row). Half the bytes of the int8 head, a few more instructions a
// value: a win where the head streams from memory (one decoding sequence). On arm64 every path
// runs one NEON kernel (rows_neon) that gives the portable loop's bits.
#include "q4_gemm.h"

#include <cstring>
#include <vector>

#include "threadpool.h"

#if defined(BN158_X86)
#include <immintrin.h>
#elif defined(BN158_ARM64)
#include <arm_neon.h>
#endif

namespace bn158 {

float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);  // inf / nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: renormalize
        int e = -1;
        uint32_t m = man;
        do {
            ++e;
            m <<= 1;
        } while (!(m & 0x400));
        bits = sign | (uint32_t(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

namespace {

// Group sums of x: xs[m * G + g] = sum of the 32 activations of group g.
void group_sums(const int8_t* x, int64_t M, int64_t K, int32_t* xs) {
    const int64_t G = K / kQ4Group;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            int32_t s = 0;
            for (int64_t k = 0; k < kQ4Group; ++k) s += x[m * K + g * kQ4Group + k];
            xs[m * G + g] = s;
        }
}

void rows_scalar(const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales, int64_t N,
                 float* out, const int32_t* xs, int64_t n0, int64_t n1) {
    const int64_t G = K / kQ4Group;
    std::vector<float> d(static_cast<size_t>(G));
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* c = codes + n * (K / 2);
        for (int64_t g = 0; g < G; ++g) d[size_t(g)] = half_to_float(scales[n * G + g]);
        for (int64_t m = 0; m < M; ++m) {
            float acc = 0.0f;
            for (int64_t b = 0; b < K / kQ4Block; ++b)
                for (int half = 0; half < 2; ++half) {
                    int32_t s = 0;
                    for (int64_t j = 0; j < kQ4Block / 2; ++j) {
                        const int32_t code = half ? c[b * 32 + j] >> 4 : c[b * 32 + j] & 15;
                        s += code * x[m * K + b * kQ4Block + half * 32 + j];
                    }
                    const int64_t g = 2 * b + half;
                    acc += d[size_t(g)] * float(s - 8 * xs[m * G + g]);
                }
            out[m * N + n] = acc;
        }
    }
}

#if defined(BN158_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void rows_avx2(const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales, int64_t N,
               float* out, const int32_t* xs, int64_t n0, int64_t n1) {
    const int64_t G = K / kQ4Group, B = K / kQ4Block;
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    std::vector<float> dbuf(static_cast<size_t>(G + 8)), xsf(static_cast<size_t>(M * G + 8));
    for (int64_t i = 0; i < M * G; ++i) xsf[size_t(i)] = float(xs[i]);
    float* d = dbuf.data();
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* c = codes + n * (K / 2);
        const uint16_t* sc = scales + n * G;
        int64_t g = 0;
        for (; g + 8 <= G; g += 8)
            _mm256_storeu_ps(d + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g))));
        for (; g < G; ++g) d[g] = half_to_float(sc[g]);
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* xm = x + m * K;
            // four accumulators: each fma waits on its own chain only every other block
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t b = 0; b < B; ++b) {
                const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * b));
                const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + kQ4Block * b));
                const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + kQ4Block * b + 32));
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones);
                const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones);
                const int a = int(b & 1) * 2;
                acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(d + 2 * b), acc[a]);
                acc[a + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(d + 2 * b + 1), acc[a + 1]);
            }
            // the −8 offset: Σ_g d_g · xs_g, 8 groups at a time
            const float* xg = xsf.data() + m * G;
            __m256 corr = _mm256_setzero_ps();
            int64_t gg = 0;
            for (; gg + 8 <= G; gg += 8) corr = _mm256_fmadd_ps(_mm256_loadu_ps(d + gg), _mm256_loadu_ps(xg + gg), corr);
            float tail = 0.0f;
            for (; gg < G; ++gg) tail += d[gg] * xg[gg];
            const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            out[m * N + n] = hsum_ps(sum) - 8.0f * (hsum_ps(corr) + tail);
        }
    }
}

#pragma GCC pop_options
#endif  // BN158_X86

#if defined(BN158_ARM64)
// arm64 (baseline Advanced SIMD): each group's integer sum Σ c·x with smull/smlal (|c·x| <= 15·128,
// two per int16 lane) and a widening add, then the scalar loop's own float steps in the scalar
// loop's order, so every arm64 path gives the scalar path's bits.
void rows_neon(const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales, int64_t N,
               float* out, const int32_t* xs, int64_t n0, int64_t n1) {
    const int64_t G = K / kQ4Group;
    const uint8x16_t low = vdupq_n_u8(15);
    std::vector<float> d(static_cast<size_t>(G));
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* c = codes + n * (K / 2);
        for (int64_t g = 0; g < G; ++g) d[size_t(g)] = half_to_float(scales[n * G + g]);
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* xm = x + m * K;
            float acc = 0.0f;
            for (int64_t b = 0; b < K / kQ4Block; ++b) {
                const uint8x16_t w0 = vld1q_u8(c + 32 * b), w1 = vld1q_u8(c + 32 * b + 16);
                const int8x16_t c0 = vreinterpretq_s8_u8(vandq_u8(w0, low)), c1 = vreinterpretq_s8_u8(vandq_u8(w1, low));
                const int8x16_t c2 = vreinterpretq_s8_u8(vshrq_n_u8(w0, 4)), c3 = vreinterpretq_s8_u8(vshrq_n_u8(w1, 4));
                const int8_t* xb = xm + kQ4Block * b;
                const int8x16_t x0 = vld1q_s8(xb), x1 = vld1q_s8(xb + 16), x2 = vld1q_s8(xb + 32), x3 = vld1q_s8(xb + 48);
                int16x8_t lo = vmlal_high_s8(vmull_s8(vget_low_s8(c0), vget_low_s8(x0)), c0, x0);
                lo = vaddq_s16(lo, vmlal_high_s8(vmull_s8(vget_low_s8(c1), vget_low_s8(x1)), c1, x1));
                int16x8_t hi = vmlal_high_s8(vmull_s8(vget_low_s8(c2), vget_low_s8(x2)), c2, x2);
                hi = vaddq_s16(hi, vmlal_high_s8(vmull_s8(vget_low_s8(c3), vget_low_s8(x3)), c3, x3));
                const int32_t s_lo = vaddvq_s32(vpaddlq_s16(lo)), s_hi = vaddvq_s32(vpaddlq_s16(hi));
                acc += d[size_t(2 * b)] * float(s_lo - 8 * xs[m * G + 2 * b]);
                acc += d[size_t(2 * b + 1)] * float(s_hi - 8 * xs[m * G + 2 * b + 1]);
            }
            out[m * N + n] = acc;
        }
    }
}
#endif  // BN158_ARM64

}  // namespace

void q4_matmul(Isa isa, const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales,
               int64_t N, float* out) {
    std::vector<int32_t> xs(static_cast<size_t>(M * (K / kQ4Group)));
    group_sums(x, M, K, xs.data());
#if defined(BN158_X86)
    auto fn = isa == Isa::Scalar ? rows_scalar : rows_avx2;
#elif defined(BN158_ARM64)
    auto fn = isa == Isa::Scalar ? rows_scalar : rows_neon;  // one kernel for every arm64 path
#else
    auto fn = rows_scalar;
#endif
    const int64_t chunks = pool_chunks(N / 8 + 1);
    if (chunks <= 1) return fn(x, M, K, codes, scales, N, out, xs.data(), 0, N);
    pool_run(chunks, [&](int64_t i) {
        fn(x, M, K, codes, scales, N, out, xs.data(), N * i / chunks, N * (i + 1) / chunks);
    });
}

}  // namespace bn158
