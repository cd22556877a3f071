// The AVX-512 VNNI panel GEMM's two halves, shared by the ternary GEMM (ternary_avx512.cpp, on
// unpacked codes) and the int8 output head (int8_gemm_avx512.cpp, on its weight rows as they are).
// Include only inside a `#pragma GCC target(... avx512f,avx512bw,avx512vl,avx512vnni)` region.
//
// Layout: x re-laid as panels of 16 activation rows, one zmm per group of 4 consecutive k, each
// byte x + 128 (unsigned). A weight row's 4 bytes for the same k are one 32-bit broadcast (signed),
// so each vpdpbusd makes 64 products for 16 rows of one output column, with no horizontal sums:
//   sum_k (x_k + 128) w_k = sum_k x_k w_k + 128 sum_k w_k
// and the caller subtracts 128 × the weight row's sum (and whatever else its weights carry).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace bn158 {
namespace panel {

constexpr int kRows = 16;      // activation rows per panel (int32 lanes of a zmm)
constexpr int kMaxPanels = 3;  // 3 panels × 8 weight rows = 24 accumulators of 32 zmm

// res[i][r] = sum over L (a multiple of 4) k of panel i's 16 rows × weight row r, the 8 rows of
// L bytes one after another at w. The sums live in a local array written out once: accumulating into the caller's
// array made GCC store all 24 accumulators to the stack on every k-step. `next` (or null): 8 · L
// bytes the caller reads next, fetched into L2 a line every other k-group, for weights that come
// from memory (8 rows read side by side, 4 bytes at a time, keep too few lines in flight).
template <int MB>
inline void micro(const uint8_t* xv, int64_t pstride, const uint8_t* w, int64_t L,
                  __m512i (&res)[kMaxPanels][8], const uint8_t* next = nullptr) {
    __m512i acc[MB][8];
#pragma GCC unroll 3
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) acc[i][r] = _mm512_setzero_si512();
    for (int64_t g = 0; g < L / 4; ++g) {
        __m512i xs[MB];
#pragma GCC unroll 3
        for (int i = 0; i < MB; ++i) xs[i] = _mm512_load_si512(xv + i * pstride + 64 * g);
        if (next && !(g & 1)) _mm_prefetch(reinterpret_cast<const char*>(next + 32 * g), _MM_HINT_T1);
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) {
            int32_t quad;
            std::memcpy(&quad, w + r * L + 4 * g, 4);
            const __m512i wr = _mm512_set1_epi32(quad);
#pragma GCC unroll 3
            for (int i = 0; i < MB; ++i) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], xs[i], wr);
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int r = 0; r < 8; ++r) res[i][r] = acc[i][r];
}

// Writes one panel's 8 (weight rows) × 16 (panel rows) block, transposed, into out[m0 + m][n0 + r]
// for m < mr and r < rows: acc[r] - row_sub[r] - m_sub[m] (m_sub may be null), added to what out
// holds when `accumulate`.
inline void store(const __m512i acc[8], const int32_t row_sub[8], const int32_t* m_sub, int64_t mr,
                  bool accumulate, int32_t* out, int64_t ldo, int rows) {
    const __mmask16 live = __mmask16((1u << mr) - 1);
    const __m512i ms = m_sub ? _mm512_maskz_loadu_epi32(live, m_sub) : _mm512_setzero_si512();
    __m512i v[8];
    for (int r = 0; r < 8; ++r) v[r] = _mm512_sub_epi32(_mm512_sub_epi32(acc[r], ms), _mm512_set1_epi32(row_sub[r]));
    __m512i t[8];
    for (int q = 0; q < 4; ++q) {  // per 128-bit block: pairs of rows interleaved
        t[2 * q] = _mm512_unpacklo_epi32(v[2 * q], v[2 * q + 1]);
        t[2 * q + 1] = _mm512_unpackhi_epi32(v[2 * q], v[2 * q + 1]);
    }
    // A[j] (rows 0-3) and B[j] (rows 4-7): block q holds panel row 4q + j.
    const __m512i A[4] = {_mm512_unpacklo_epi64(t[0], t[2]), _mm512_unpackhi_epi64(t[0], t[2]),
                          _mm512_unpacklo_epi64(t[1], t[3]), _mm512_unpackhi_epi64(t[1], t[3])};
    const __m512i B[4] = {_mm512_unpacklo_epi64(t[4], t[6]), _mm512_unpackhi_epi64(t[4], t[6]),
                          _mm512_unpacklo_epi64(t[5], t[7]), _mm512_unpackhi_epi64(t[5], t[7])};
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), hi = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    const __mmask8 cols = __mmask8((1u << rows) - 1);
    for (int j = 0; j < 4; ++j) {
        const __m512i pairs[2] = {_mm512_permutex2var_epi64(A[j], lo, B[j]), _mm512_permutex2var_epi64(A[j], hi, B[j])};
        for (int q = 0; q < 4; ++q) {
            const int64_t m = 4 * q + j;
            if (m >= mr) continue;
            __m256i row = _mm512_extracti64x4_epi64(pairs[q / 2], 0);
            if (q & 1) row = _mm512_extracti64x4_epi64(pairs[q / 2], 1);
            int32_t* o = out + m * ldo;
            if (accumulate) row = _mm256_add_epi32(row, _mm256_maskz_loadu_epi32(cols, o));
            _mm256_mask_storeu_epi32(o, cols, row);
        }
    }
}

// Every panel of x (M rows; panel p at xv + p * pstride) against the 8 weight rows at w, stored as
// `store` does into out (activation row m at out + m * ldo); m_sub indexed by activation row. next:
// as micro's, fetched while the first group of panels runs (later groups find w in cache).
inline void all_panels(const uint8_t* xv, int64_t M, int64_t pstride, const uint8_t* w, int64_t L,
                       const int32_t row_sub[8], const int32_t* m_sub, bool accumulate, int32_t* out, int64_t ldo,
                       int rows, const uint8_t* next = nullptr) {
    const int64_t panels = (M + kRows - 1) / kRows;
    for (int64_t p0 = 0; p0 < panels; p0 += kMaxPanels) {
        __m512i acc[kMaxPanels][8];
        const int64_t mb = panels - p0 < kMaxPanels ? panels - p0 : kMaxPanels;
        const uint8_t* x0 = xv + p0 * pstride;
        const uint8_t* fetch = p0 == 0 ? next : nullptr;
        switch (mb) {
            case 3: micro<3>(x0, pstride, w, L, acc, fetch); break;
            case 2: micro<2>(x0, pstride, w, L, acc, fetch); break;
            default: micro<1>(x0, pstride, w, L, acc, fetch); break;
        }
        for (int64_t i = 0; i < mb; ++i) {
            const int64_t m0 = (p0 + i) * kRows;
            store(acc[i], row_sub, m_sub ? m_sub + m0 : nullptr, M - m0 < kRows ? M - m0 : kRows, accumulate,
                  out + m0 * ldo, ldo, rows);
        }
    }
}

}  // namespace panel
}  // namespace bn158
