// int8 × int8 → int32 matmul for the packed model's output head (int8 per-row weights, int8
// per-token activations). out[m, n] = sum_k x[m, k] * w[n, k], w row-major [N, K].
// This file: the driver (splits rows over the pool), the portable rows and the x86-64 AVX2 kernels;
// int8_gemm_avx512.cpp and int8_gemm_neon.cpp hold the AVX-512 VNNI and arm64 ones.
//
// AVX2 has no signed × signed byte multiply-add, so x·w = |x| · (w · sign(x)): vpsignb moves the
// sign of x onto w, vpmaddubsw multiplies the unsigned |x| (≤ 128) with it. The weights are
// quantized to [-127, 127] (never -128), so a pair sum is at most 2·128·127 = 32512 and the int16
// stage cannot saturate; vpmaddwd then widens to int32.
// M > 1: rows are processed 4 at a time and every activation row is run against them while the 4
// rows stay in L1. M = 1 (decode): the rows are memory-bound and short (2.5 KiB at 2B4T), and 4
// adjacent rows read side by side look to the hardware prefetcher like 4 streams that end every
// 10 KiB; instead 4 cursors, a quarter of the rows apart, each walk one row at a time, so memory
// sees 4 long sequential streams: the 2B4T head (328 MB) went from 48 % to 88 % of the read
// bandwidth on one core. Threads split the rows.
#include <cstdint>
#include <vector>

#include "int8_gemm.h"
#include "threadpool.h"

#if defined(BN158_X86)
#include <immintrin.h>
#endif

namespace bn158 {
namespace {

constexpr int64_t kRows = 4;

void rows_scalar(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
                 int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
            int32_t acc = 0;
            for (int64_t k = 0; k < K; ++k) acc += int32_t(x[m * K + k]) * int32_t(w[n * K + k]);
            out[m * N + n] = acc;
        }
}

#if defined(BN158_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

void rows_avx2(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
               int64_t n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t kv = K / 32 * 32;
    int64_t n = n0;
    // The next group's rows (contiguous) are fetched a slice per activation row while this group
    // is worked: the rows come from memory once per call, and nothing else hides their latency.
    if (M < 1) return;  // no rows (a step where no row wants logits)
    const int64_t group_lines = (kRows * K + 63) / 64, lines_per_m = (group_lines + M - 1) / M;
    for (; n + kRows <= n1; n += kRows) {
        const int8_t* wr = w + n * K;
        const bool fetch = n + 2 * kRows <= n1;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* xm = x + m * K;
            if (fetch)
                for (int64_t l = m * lines_per_m; l < (m + 1) * lines_per_m && l < group_lines; ++l)
                    _mm_prefetch(reinterpret_cast<const char*>(wr + kRows * K + l * 64), _MM_HINT_T0);
            __m256i acc[kRows];
            for (auto& a : acc) a = _mm256_setzero_si256();
            for (int64_t k = 0; k < kv; k += 32) {
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
                const __m256i ax = _mm256_abs_epi8(xv);
#pragma GCC unroll 4
                for (int r = 0; r < kRows; ++r) {
                    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + r * K + k));
                    const __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));
                }
            }
            for (int r = 0; r < kRows; ++r) {
                int32_t s = hsum(acc[r]);
                for (int64_t k = kv; k < K; ++k) s += int32_t(xm[k]) * int32_t(wr[r * K + k]);
                out[m * N + n + r] = s;
            }
        }
    }
    if (n < n1) rows_scalar(x, M, K, w, N, out, n, n1);
}

constexpr int kStreams = 4;

// One activation row (M = 1) against rows [n0, n1): kStreams cursors stepped together 32 bytes at a
// time. The signature is rows_avx2's, so the driver can pick either.
void gemv_avx2(const int8_t* x, int64_t, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
               int64_t n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t kv = K / 32 * 32, per = (n1 - n0) / kStreams;
    for (int64_t i = 0; i < per; ++i) {
        const int8_t* wr[kStreams];
        __m256i acc[kStreams];
        for (int c = 0; c < kStreams; ++c) {
            wr[c] = w + (n0 + c * per + i) * K;
            acc[c] = _mm256_setzero_si256();
        }
        for (int64_t k = 0; k < kv; k += 32) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
            const __m256i ax = _mm256_abs_epi8(xv);
#pragma GCC unroll 4
            for (int c = 0; c < kStreams; ++c) {
                const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[c] + k));
                const __m256i p = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv));
                acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(p, ones));
            }
        }
        for (int c = 0; c < kStreams; ++c) {
            int32_t s = hsum(acc[c]);
            for (int64_t k = kv; k < K; ++k) s += int32_t(x[k]) * int32_t(wr[c][k]);
            out[n0 + c * per + i] = s;
        }
    }
    if (n0 + kStreams * per < n1) rows_avx2(x, 1, K, w, N, out, n0 + kStreams * per, n1);
}

#pragma GCC pop_options
#endif  // BN158_X86

}  // namespace

void int8_matmul(Isa isa, const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out) {
    const int64_t groups = (N + kRows - 1) / kRows;
    const int64_t chunks = pool_chunks(groups);
    auto split = [&](auto&& fn) {  // fn(n0, n1) over row ranges of whole groups
        if (chunks <= 1) return fn(int64_t(0), N);
        pool_run(chunks, [&](int64_t c) {
            const int64_t n0 = groups * c / chunks * kRows, n1 = groups * (c + 1) / chunks * kRows;
            fn(n0, n1 < N ? n1 : N);
        });
    };
#if defined(BN158_ARM64)
    if (isa != Isa::Scalar)
        return split([&](int64_t n0, int64_t n1) { int8_rows_neon(isa, x, M, K, w, N, out, n0, n1); });
    split([&](int64_t n0, int64_t n1) { rows_scalar(x, M, K, w, N, out, n0, n1); });
#elif defined(BN158_X86)
    if (isa == Isa::Avx512Vnni && M > 1) {
        std::vector<int32_t> xsum(size_t(M), 0);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) xsum[size_t(m)] += x[m * K + k];
        if (M >= kInt8PanelMinM && K % 4 == 0) {
            thread_local std::vector<uint8_t> panels;
            panels.resize(size_t((M + 15) / 16 * 16 * K + 64));
            uint8_t* xv = panels.data() + (-reinterpret_cast<uintptr_t>(panels.data()) & 63);
            int8_prep_panels(x, M, K, xv);
            return split([&](int64_t n0, int64_t n1) { int8_panels_vnni(xv, x, M, K, w, N, out, n0, n1, xsum.data()); });
        }
        return split([&](int64_t n0, int64_t n1) { int8_rows_vnni(x, M, K, w, N, out, n0, n1, xsum.data()); });
    }
    auto fn = isa == Isa::Scalar ? rows_scalar : M == 1 ? gemv_avx2 : rows_avx2;
    split([&](int64_t n0, int64_t n1) { fn(x, M, K, w, N, out, n0, n1); });
#else
    (void)isa;
    split([&](int64_t n0, int64_t n1) { rows_scalar(x, M, K, w, N, out, n0, n1); });
#endif
}

}  // namespace bn158
