// The 4-bit grouped output head: see q4_gemm.h for the layout.
//
// The AVX2 kernel (q4_row_avx2 below) multiplies unsigned codes by signed activations with
// vpmaddubsw and scales each group's integer sum in fp32; the −8 offset of the codes comes off as
// −8 · Σ_g scale_g · Σ_{k in g} x_k (the group sums of x are computed once per activation row).
// Half the bytes of the int8 head, more instructions a value: on one AVX2 core it is bound by
// instructions, not memory, yet 1.3× faster than the int8 head at one activation row (decode); at
// several rows (batched decode, 16) it is ~0.77× the int8 head's speed. On arm64 every path
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

// Rows are short (1.25 KiB at 2B4T) and one after another: software prefetch 4 KiB ahead keeps the
// stream going across row ends (the 2B4T head at one row: 11.0-11.4 → 9.0-9.2 ms on one core).
constexpr int64_t kPrefetchBytes = 4096;

inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The 64 codes of a block's 32 bytes: low nibbles (values 0..31), high nibbles (32..63).
inline void split_nibbles(__m256i w, __m256i& lo, __m256i& hi) {
    const __m256i low = _mm256_set1_epi8(15);
    lo = _mm256_and_si256(w, low);
    hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
}

// One row against one activation row. Per block of 64 values: the nibbles split (the low ones meet
// x's first 32 activations, the high ones the next 32), two vpmaddubsw give int16 pair sums (each
// ≤ 2·15·128 in size; two added stay far inside int16), unpacking 32-bit pairs then one vpaddw and
// one vpmaddwd leave both groups' integer sums in 8 int32 lanes — group 2b in the even lanes, 2b + 1
// in the odd — so one conversion and one fma with the scale pair [d0, d1, d0, d1, ...] take both.
// The −8 offset of the codes starts the sums: Σ_g d_g · (−8 · Σ_{k in g} x_k), eight groups a vector (xs8: those −8 · group sums).
// The loop is bound by vector instructions (11 a block), not by loads: a second row sharing the x
// loads measured no faster. Split: c holds the row's nibbles already split by rows_avx2 (64 bytes a
// block, low then high), for rows met by several activation rows: 3 instructions a block fewer.
template <bool Split>
inline float q4_row_avx2(const int8_t* xm, const float* xs8, const uint8_t* c, const float* d, int64_t G) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;  // even blocks, odd blocks
    int64_t g = 0;
    for (; g + 16 <= G; g += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(d + g), _mm256_loadu_ps(xs8 + g), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(d + g + 8), _mm256_loadu_ps(xs8 + g + 8), acc1);
    }
    if (g + 8 <= G) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(d + g), _mm256_loadu_ps(xs8 + g), acc0), g += 8;
    float tail = 0.0f;
    for (; g < G; ++g) tail += d[g] * xs8[g];
    const auto block = [&](int64_t b, __m256& acc) {
        __m256i cl, ch;
        if constexpr (Split) {
            cl = _mm256_load_si256(reinterpret_cast<const __m256i*>(c + 64 * b));
            ch = _mm256_load_si256(reinterpret_cast<const __m256i*>(c + 64 * b + 32));
        } else {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * b));
            _mm_prefetch(reinterpret_cast<const char*>(c + 32 * b + kPrefetchBytes), _MM_HINT_T0);
            split_nibbles(w, cl, ch);
        }
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + kQ4Block * b));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + kQ4Block * b + 32));
        const __m256i lo = _mm256_maddubs_epi16(cl, x0), hi = _mm256_maddubs_epi16(ch, x1);
        const __m256i pairs = _mm256_add_epi16(_mm256_unpacklo_epi32(lo, hi), _mm256_unpackhi_epi32(lo, hi));
        const __m256i sums = _mm256_madd_epi16(pairs, ones);
        const __m256 scale = _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(d + 2 * b)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc);
    };
    const int64_t B = G / 2;
    int64_t b = 0;
    for (; b + 2 <= B; b += 2) {
        block(b, acc0);
        block(b + 1, acc1);
    }
    if (b < B) block(b, acc0);
    return hsum_ps(_mm256_add_ps(acc0, acc1)) + tail;
}

void rows_avx2(const int8_t* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales, int64_t N,
               float* out, const int32_t* xs, int64_t n0, int64_t n1) {
    const int64_t G = K / kQ4Group;
    std::vector<float> dbuf(static_cast<size_t>(G + 8)), xs8(static_cast<size_t>(M * G));
    for (int64_t i = 0; i < M * G; ++i) xs8[size_t(i)] = float(-8 * xs[i]);  // exact: |8 · Σ x| < 2^24
    float* d = dbuf.data();
    std::vector<uint8_t> split_buf(static_cast<size_t>(M > 1 ? K + 64 : 0));  // one row's nibbles, split
    uint8_t* split = split_buf.data() + (-reinterpret_cast<uintptr_t>(split_buf.data()) & 63);
    for (int64_t n = n0; n < n1; ++n) {
        const uint16_t* sc = scales + n * G;
        int64_t g = 0;
        for (; g + 8 <= G; g += 8)
            _mm256_storeu_ps(d + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g))));
        for (; g < G; ++g) d[g] = half_to_float(sc[g]);
        const uint8_t* c = codes + n * (K / 2);
        if (M == 1) {
            out[n] = q4_row_avx2<false>(x, xs8.data(), c, d, G);
            continue;
        }
        for (int64_t b = 0; b < K / kQ4Block; ++b) {
            __m256i lo, hi;
            split_nibbles(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * b)), lo, hi);
            _mm256_store_si256(reinterpret_cast<__m256i*>(split + 64 * b), lo);
            _mm256_store_si256(reinterpret_cast<__m256i*>(split + 64 * b + 32), hi);
        }
        for (int64_t m = 0; m < M; ++m) out[m * N + n] = q4_row_avx2<true>(x + m * K, xs8.data() + m * G, split, d, G);
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
