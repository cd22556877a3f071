// int8 × int8 → int32 for the int8 output head when several rows are decoded at once (a batched
// step, a speculative verify, a prefill's logits), with AVX-512 VNNI.
//
// vpdpbusd multiplies unsigned by signed bytes, 4 products into each int32 lane. The weights are
// in [-127, 127], so w ^ 0x80 = w + 128 is an unsigned byte and Σ (w + 128)·x = Σ w·x + 128·Σ x:
// one XOR per weight vector, and 128·xsum[m] subtracted at the end. A block is 4 weight rows × 4
// activation rows (16 zmm accumulators): each weight vector, loaded once, serves 4 rows of x, and
// the 4 weight rows stay in L1 while every block of x passes them. The AVX2 kernel (int8_gemm.cpp)
// makes 32 products per vpmaddubsw and needs a vpsignb and a vpmaddwd beside it.
#if defined(__x86_64__) || defined(_M_X64)  // x86-64 builds only (an arm64 build holds the NEON files)
#include <immintrin.h>

#include <cstdint>

#include "int8_gemm.h"

#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")

namespace bn158 {
namespace {

template <int MB, int RB>
void block(const int8_t* x, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t m0, int64_t n,
           const int32_t* xsum) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    __m512i acc[MB][RB];
    for (auto& row : acc)
        for (auto& a : row) a = _mm512_setzero_si512();
    auto step = [&](int64_t k, __mmask64 mask) {
        __m512i wv[RB];
        for (int r = 0; r < RB; ++r)  // masked-off bytes load as 0 and flip to 128, times x = 0
            wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + (n + r) * K + k), flip);
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
            out[(m0 + i) * N + n + r] = _mm512_reduce_add_epi32(acc[i][r]) - 128 * xsum[m0 + i];
}

template <int RB>
void rows(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n,
          const int32_t* xsum) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) block<4, RB>(x, K, w, N, out, m, n, xsum);
    for (; m < M; ++m) block<1, RB>(x, K, w, N, out, m, n, xsum);
}

}  // namespace

void int8_rows_vnni(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
                    int64_t n1, const int32_t* xsum) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) rows<4>(x, M, K, w, N, out, n, xsum);
    for (; n < n1; ++n) rows<1>(x, M, K, w, N, out, n, xsum);
}

}  // namespace bn158

#endif  // x86-64
