// int8 × int8 → int32 for the int8 output head when several rows are decoded at once (a batched
// step, a speculative verify, a prefill's logits), with AVX-512 VNNI.
//
// vpdpbusd multiplies unsigned by signed bytes, 4 products into each int32 lane. The weights are
// in [-127, 127], so w ^ 0x80 = w + 128 is an unsigned byte and Σ (w + 128)·x = Σ w·x + 128·Σ x:
// one XOR per weight vector, and 128·xsum[m] subtracted at the end. A block is 4 weight rows (one
// from each of 4 far-apart cursors, so memory sees 4 long streams) × up to 4 activation rows (16
// zmm accumulators): each weight vector, loaded once, serves every row of x. The AVX2 kernel
// (int8_gemm.cpp) makes 32 products per vpmaddubsw and needs a vpsignb and a vpmaddwd beside it.
// From kInt8PanelMinM rows (a batched decode step, a prefill's logits) x is re-laid once per call
// into 16-row panels and the ternary GEMM's panel kernel runs on the weight rows as they are
// (panel_avx512.h): no horizontal sums, no XOR, one broadcast per 64 products; the blocks spend a
// fifth of their time reducing accumulators and reached ~30 % of vpdpbusd's rate at 16 rows.
// No standard-library templates here: an instantiation compiled for AVX-512 could be the copy the
// linker keeps for every path.
#if defined(__x86_64__) || defined(_M_X64)  // x86-64 builds only (an arm64 build holds the NEON files)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int8_gemm.h"

#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#include "panel_avx512.h"  // after the target: its inline functions are AVX-512 code

namespace bn158 {
namespace {

// RB weight rows (indices row[]) × MB activation rows from m0. fetch: each weight row's successor
// (row + 1) is read from memory meanwhile, a line per step: the callers walk RB far-apart cursors
// a row at a time, so memory sees RB long sequential streams (4 adjacent rows read side by side
// look like short streams that end every few KiB, and kept too few lines in flight).
template <int MB, int RB>
void block(const int8_t* x, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t m0, const int64_t* row,
           const int32_t* xsum, bool fetch) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    __m512i acc[MB][RB];
    for (auto& rw : acc)
        for (auto& a : rw) a = _mm512_setzero_si512();
    auto step = [&](int64_t k, __mmask64 mask) {
        __m512i wv[RB];
        if (fetch)
            for (int r = 0; r < RB; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + (row[r] + 1) * K + k), _MM_HINT_T0);
        for (int r = 0; r < RB; ++r)  // masked-off bytes load as 0 and flip to 128, times x = 0
            wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + row[r] * K + k), flip);
        for (int i = 0; i < MB; ++i) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + (m0 + i) * K + k);
            for (int r = 0; r < RB; ++r) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], wv[r], xv);
        }
    };
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) step(k, ~__mmask64(0));
    if (k < K) step(k, (__mmask64(1) << (K - k)) - 1);
    for (int i = 0; i < MB; ++i)
        for (int r = 0; r < RB; ++r)
            out[(m0 + i) * N + row[r]] = _mm512_reduce_add_epi32(acc[i][r]) - 128 * xsum[m0 + i];
}

// Every activation row against weight rows row[0..RB), 4 activation rows a pass.
template <int RB>
void rows(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, const int64_t* row,
          const int32_t* xsum, bool fetch) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) block<4, RB>(x, K, w, N, out, m, row, xsum, fetch && m == 0);
    switch (M - m) {  // the rest in one pass: each weight vector loaded once for them all
        case 3: block<3, RB>(x, K, w, N, out, m, row, xsum, fetch && m == 0); break;
        case 2: block<2, RB>(x, K, w, N, out, m, row, xsum, fetch && m == 0); break;
        case 1: block<1, RB>(x, K, w, N, out, m, row, xsum, fetch && m == 0); break;
        default: break;
    }
}

// 128 × the sum of each of 8 weight rows of length K.
inline void weight_row_sums(const int8_t* w, int64_t K, int32_t sub[8]) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int r = 0; r < 8; ++r) {
        __m512i acc = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 64) {
            const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
            acc = _mm512_dpbusd_epi32(acc, ones, _mm512_maskz_loadu_epi8(mask, w + r * K + k));
        }
        sub[r] = 128 * _mm512_reduce_add_epi32(acc);
    }
}

}  // namespace

void int8_prep_panels(const int8_t* x, int64_t M, int64_t K, uint8_t* xv) {
    const int64_t groups = K / 4, panels = (M + panel::kRows - 1) / panel::kRows;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t g = 0; g < groups; ++g)
            for (int i = 0; i < panel::kRows; ++i) {
                const int64_t m = p * panel::kRows + i;
                uint32_t quad = 0;  // rows past M: x = 0, their sums are never stored
                if (m < M) std::memcpy(&quad, x + m * K + 4 * g, 4);
                quad ^= 0x80808080u;  // x + 128 in every byte
                std::memcpy(xv + (p * groups + g) * 64 + 4 * i, &quad, 4);
            }
}

void int8_panels_vnni(const uint8_t* xv, const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                      int32_t* out, int64_t n0, int64_t n1, const int32_t* xsum) {
    const int64_t whole = n0 + (n1 - n0) / 8 * 8;
    for (int64_t n = n0; n < whole; n += 8) {
        const auto* wu = reinterpret_cast<const uint8_t*>(w + n * K);
        int32_t sub[8];
        weight_row_sums(w + n * K, K, sub);
        // the next 8 rows come from memory while these are worked
        panel::all_panels(xv, M, panel::kRows * K, wu, K, sub, nullptr, false, out + n, N, 8,
                          n + 16 <= whole ? wu + 8 * K : nullptr);
    }
    for (int64_t n = whole; n < n1; ++n) rows<1>(x, M, K, w, N, out, &n, xsum, false);  // < 8 rows left
}

void int8_rows_vnni(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
                    int64_t n1, const int32_t* xsum) {
    constexpr int kCursors = 4;
    const int64_t per = (n1 - n0) / kCursors;
    for (int64_t i = 0; i < per; ++i) {
        const int64_t row[kCursors] = {n0 + i, n0 + per + i, n0 + 2 * per + i, n0 + 3 * per + i};
        rows<kCursors>(x, M, K, w, N, out, row, xsum, i + 1 < per);
    }
    for (int64_t n = n0 + kCursors * per; n < n1; ++n) rows<1>(x, M, K, w, N, out, &n, xsum, false);
}

}  // namespace bn158

#endif  // x86-64
