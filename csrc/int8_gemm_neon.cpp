// int8 × int8 → int32 for the int8 output head on arm64 (int8_gemm.cpp has the driver and the
// x86 kernels). Weights are in [-127, 127] (never -128), activations int8.
//   neon   : smull/smlal2 (two products per int16 lane, |sum| <= 2·128·127 < 2^15), sadalp to int32
//   dotprod: sdot, 16 products into 4 int32 lanes per instruction
//   i8mm   : for M > 1, smmla on 2 activation rows × 2 weight rows × 8 k (a 2×2 int32 tile);
//            M = 1 runs the sdot kernel
// M > 1: a block is 4 weight rows × every activation row (2 at a time with smmla), the 4 rows
// staying in L1 while x passes them. M = 1: 4 row streams a quarter of the range apart. K's last
// K % 16 values are summed in scalar code.
#if defined(__aarch64__)  // arm64 builds only
#include <arm_neon.h>

#include <cstdint>

#include "int8_gemm.h"

namespace bn158 {
namespace {

constexpr int64_t kRows = 4;

inline int32_t dot_tail(const int8_t* x, const int8_t* w, int64_t k0, int64_t K) {
    int32_t s = 0;
    for (int64_t k = k0; k < K; ++k) s += int32_t(x[k]) * int32_t(w[k]);
    return s;
}

void rows_scalar(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
                 int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) out[m * N + n] = dot_tail(x + m * K, w + n * K, 0, K);
}

// Blocks of kRows weight rows against each activation row, 16 k per step through Mac.
#define BN158_INT8_ROWS(NAME, MAC)                                                                                 \
    void NAME(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,         \
              int64_t n1) {                                                                                        \
        const int64_t kv = K / 16 * 16;                                                                            \
        int64_t n = n0;                                                                                            \
        for (; n + kRows <= n1; n += kRows) {                                                                      \
            const int8_t* wr = w + n * K;                                                                          \
            for (int64_t m = 0; m < M; ++m) {                                                                      \
                const int8_t* xm = x + m * K;                                                                      \
                int32x4_t acc[kRows];                                                                              \
                for (auto& a : acc) a = vdupq_n_s32(0);                                                            \
                for (int64_t k = 0; k < kv; k += 16) {                                                             \
                    const int8x16_t xv = vld1q_s8(xm + k);                                                         \
                    for (int r = 0; r < kRows; ++r) acc[r] = MAC(acc[r], vld1q_s8(wr + r * K + k), xv);            \
                }                                                                                                  \
                for (int r = 0; r < kRows; ++r)                                                                    \
                    out[m * N + n + r] = vaddvq_s32(acc[r]) + dot_tail(xm, wr + r * K, kv, K);                     \
            }                                                                                                      \
        }                                                                                                          \
        if (n < n1) rows_scalar(x, M, K, w, N, out, n, n1);                                                        \
    }

// One activation row (M = 1, decode) against rows [n0, n1): 4 cursors a quarter of the rows apart,
// stepped together, so memory sees 4 long sequential streams rather than 4 adjacent short rows
// (the reason int8_gemm.cpp's AVX2 GEMV does the same); the leftover rows go through ROWS.
#define BN158_INT8_GEMV(NAME, MAC, ROWS)                                                                           \
    void NAME(const int8_t* x, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0, int64_t n1) {      \
        const int64_t kv = K / 16 * 16, per = (n1 - n0) / kRows;                                                   \
        for (int64_t i = 0; i < per; ++i) {                                                                        \
            const int8_t* wr[kRows];                                                                               \
            int32x4_t acc[kRows];                                                                                  \
            for (int c = 0; c < kRows; ++c) {                                                                      \
                wr[c] = w + (n0 + c * per + i) * K;                                                                \
                acc[c] = vdupq_n_s32(0);                                                                           \
            }                                                                                                      \
            for (int64_t k = 0; k < kv; k += 16) {                                                                 \
                const int8x16_t xv = vld1q_s8(x + k);                                                              \
                for (int c = 0; c < kRows; ++c) acc[c] = MAC(acc[c], vld1q_s8(wr[c] + k), xv);                     \
            }                                                                                                      \
            for (int c = 0; c < kRows; ++c)                                                                        \
                out[n0 + c * per + i] = vaddvq_s32(acc[c]) + dot_tail(x, wr[c], kv, K);                            \
        }                                                                                                          \
        if (n0 + kRows * per < n1) ROWS(x, 1, K, w, N, out, n0 + kRows * per, n1);                                 \
    }

inline int32x4_t mac_neon(int32x4_t acc, int8x16_t w, int8x16_t x) {
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x));
}
BN158_INT8_ROWS(rows_neon, mac_neon)
BN158_INT8_GEMV(gemv_neon, mac_neon, rows_neon)

#if defined(BN158_BUILD_DOTPROD)
#if !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif
inline int32x4_t mac_dot(int32x4_t acc, int8x16_t w, int8x16_t x) { return vdotq_s32(acc, w, x); }
BN158_INT8_ROWS(rows_dot, mac_dot)
BN158_INT8_GEMV(gemv_dot, mac_dot, rows_dot)
#if !defined(__clang__)
#pragma GCC pop_options
#endif
#endif

#if defined(BN158_BUILD_I8MM)
#if !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod+i8mm")
#endif
inline int8x16_t zip_lo(int8x16_t a, int8x16_t b) {  // [a k0..7, b k0..7]
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
inline int8x16_t zip_hi(int8x16_t a, int8x16_t b) {  // [a k8..15, b k8..15]
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

// Activation rows m, m + 1 (pair; an odd last row is paired with itself and its copy dropped) ×
// weight rows n .. n + 3 (two pairs).
void mmla_block(const int8_t* x, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t m, bool pair,
                int64_t n) {
    const int64_t kv = K / 16 * 16;
    const int8_t* x0 = x + m * K;
    const int8_t* x1 = pair ? x0 + K : x0;
    const int8_t* wr = w + n * K;
    int32x4_t acc[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};  // lanes [x0·w0, x0·w1, x1·w0, x1·w1] of weight pair p
    for (int64_t k = 0; k < kv; k += 16) {
        const int8x16_t a0 = vld1q_s8(x0 + k), a1 = vld1q_s8(x1 + k);
        const int8x16_t xa = zip_lo(a0, a1), xb = zip_hi(a0, a1);
        for (int p = 0; p < 2; ++p) {
            const int8x16_t b0 = vld1q_s8(wr + 2 * p * K + k), b1 = vld1q_s8(wr + (2 * p + 1) * K + k);
            acc[p] = vmmlaq_s32(acc[p], xa, zip_lo(b0, b1));
            acc[p] = vmmlaq_s32(acc[p], xb, zip_hi(b0, b1));
        }
    }
    alignas(16) int32_t r[2][4];
    vst1q_s32(r[0], acc[0]);
    vst1q_s32(r[1], acc[1]);
    for (int p = 0; p < 2; ++p)
        for (int j = 0; j < 2; ++j) {
            const int64_t nn = n + 2 * p + j;
            out[m * N + nn] = r[p][j] + dot_tail(x0, w + nn * K, kv, K);
            if (pair) out[(m + 1) * N + nn] = r[p][2 + j] + dot_tail(x1, w + nn * K, kv, K);
        }
}

void rows_i8mm(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
               int64_t n1) {
    int64_t n = n0;
    for (; n + kRows <= n1; n += kRows)
        for (int64_t m = 0; m < M; m += 2) mmla_block(x, K, w, N, out, m, m + 1 < M, n);
    if (n < n1) rows_dot(x, M, K, w, N, out, n, n1);  // the last N % 4 rows
}
#if !defined(__clang__)
#pragma GCC pop_options
#endif
#endif

}  // namespace

void int8_rows_neon(Isa isa, const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out,
                    int64_t n0, int64_t n1) {
#if defined(BN158_BUILD_I8MM)
    if (isa == Isa::NeonI8mm && M > 1) return rows_i8mm(x, M, K, w, N, out, n0, n1);
#endif
#if defined(BN158_BUILD_DOTPROD)
    if (isa == Isa::NeonDot || isa == Isa::NeonI8mm)
        return M == 1 ? gemv_dot(x, K, w, N, out, n0, n1) : rows_dot(x, M, K, w, N, out, n0, n1);
#endif
    if (isa == Isa::Scalar) return rows_scalar(x, M, K, w, N, out, n0, n1);
    M == 1 ? gemv_neon(x, K, w, N, out, n0, n1) : rows_neon(x, M, K, w, N, out, n0, n1);
}

}  // namespace bn158

#endif  // arm64
