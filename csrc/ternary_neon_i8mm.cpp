// arm64 kernels with the int8 matrix multiply (FEAT_I8MM, ARMv8.6, optional from v8.2): the
// `i8mm` path. For M >= 2 (prefill, batched decode) smmla multiplies a pair of activation rows by
// a pair of weight rows, 8 k each: a 2×2 int32 tile of 32 products per instruction, twice sdot's
// work. The tile's unpacked codes are re-laid as row pairs, [pair][k / 8][2 rows × 8 bytes], and
// x row pairs are interleaved the same way on the fly (zip of 64-bit halves); one step is 4 rows of
// x × 8 tile rows × 16 k in 16 smmla. M = 1 runs the sdot GEMV (every i8mm CPU has the dot product).
// lut2 borrows the `neon` kernel.
//
// Compiled for armv8.2-a+dotprod+i8mm with `#pragma GCC target` (GCC 10 and later); with clang
// only when the compiler's own target has both (see ternary_neon_dot.cpp); otherwise the `i8mm`
// path is not offered (BN158_BUILD_I8MM, cpu_features.h).
#if defined(__aarch64__)  // arm64 builds only
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(BN158_BUILD_I8MM)  // cpu_features.h: this compiler builds the i8mm kernels
#if !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod+i8mm")
#endif
#include "ternary_neon_impl.h"

namespace bn158 {
namespace {

struct MacDot {
    static inline int32x4_t mac(int32x4_t acc, int8x16_t u, int8x16_t x) { return vdotq_s32(acc, u, x); }
};

inline int8x16_t zip_lo(int8x16_t a, int8x16_t b) {  // [a k0..7, b k0..7]
    return vreinterpretq_s8_s64(vzip1q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}
inline int8x16_t zip_hi(int8x16_t a, int8x16_t b) {  // [a k8..15, b k8..15]
    return vreinterpretq_s8_s64(vzip2q_s64(vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b)));
}

// res[i][r] = Σ_k x_i[k] · u_r[k] for 2·MP rows of x (xr; a missing one reads kZeroRow) and the
// 8 tile rows, over nsteps × 16 k. uz: the codes as row pairs, pair p at uz + p · 2L.
template <int MP>
inline void micro_mmla(const int8_t* uz, int64_t L, const int8_t* const xr[4], int64_t nsteps, int32_t res[4][8]) {
    int32x4_t acc[MP][4];  // lanes [m0·r0, m0·r1, m1·r0, m1·r1] of x pair mp, weight pair p
    for (auto& row : acc)
        for (auto& v : row) v = vdupq_n_s32(0);
    for (int64_t st = 0; st < nsteps; ++st) {
        int8x16_t xa[MP], xb[MP];
        for (int mp = 0; mp < MP; ++mp) {
            const int8x16_t x0 = vld1q_s8(xr[2 * mp] + 16 * st), x1 = vld1q_s8(xr[2 * mp + 1] + 16 * st);
            xa[mp] = zip_lo(x0, x1);
            xb[mp] = zip_hi(x0, x1);
        }
        for (int p = 0; p < 4; ++p) {
            const int8_t* wp = uz + p * 2 * L + 32 * st;
            const int8x16_t wa = vld1q_s8(wp), wb = vld1q_s8(wp + 16);
            for (int mp = 0; mp < MP; ++mp) {
                acc[mp][p] = vmmlaq_s32(acc[mp][p], xa[mp], wa);
                acc[mp][p] = vmmlaq_s32(acc[mp][p], xb[mp], wb);
            }
        }
    }
    for (int mp = 0; mp < MP; ++mp)
        for (int p = 0; p < 4; ++p) {
            res[2 * mp][2 * p] = vgetq_lane_s32(acc[mp][p], 0);
            res[2 * mp][2 * p + 1] = vgetq_lane_s32(acc[mp][p], 1);
            res[2 * mp + 1][2 * p] = vgetq_lane_s32(acc[mp][p], 2);
            res[2 * mp + 1][2 * p + 1] = vgetq_lane_s32(acc[mp][p], 3);
        }
}

struct ChunkMmla {
    static void run(const Act& a, uint8_t* ub, int64_t L, int64_t k0, bool first, int32_t* out, int64_t ldo,
                    int64_t n0, int rows) {
        // rows 2p and 2p+1 of ub, 8 bytes of each in turn: the right operand of smmla
        alignas(64) int8_t uz[8 * kChunkK];
        for (int p = 0; p < 4; ++p) {
            const int8_t* r0 = reinterpret_cast<const int8_t*>(ub + 2 * p * L);
            const int8_t* r1 = r0 + L;
            int8_t* d = uz + p * 2 * L;
            for (int64_t k = 0; k < L; k += 16) {
                const int8x16_t a0 = vld1q_s8(r0 + k), a1 = vld1q_s8(r1 + k);
                vst1q_s8(d + 2 * k, zip_lo(a0, a1));
                vst1q_s8(d + 2 * k + 16, zip_hi(a0, a1));
            }
        }
        const int64_t nsteps = L / 16;
        for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
            const int mr = int(a.M - m0 < 4 ? a.M - m0 : 4);
            const int8_t* xr[4];
            for (int i = 0; i < 4; ++i) xr[i] = i < mr ? a.xp + (m0 + i) * a.ldxp + k0 : kZeroRow;
            int32_t res[4][8];
            if (mr > 2)
                micro_mmla<2>(uz, L, xr, nsteps, res);
            else
                micro_mmla<1>(uz, L, xr, nsteps, res);
            for (int i = 0; i < mr; ++i) store_chunk(a, m0 + i, n0, 0, rows, res[i], first, out, ldo);
        }
    }
};

constexpr int64_t kGemmMinM = 2;

void range_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    (a.M >= kGemmMinM ? gemm_i2<ChunkMmla> : gemv_i2<MacDot>)(a, w, s, out, ldo, t0, t1);
}

void range_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    (a.M >= kGemmMinM ? gemm_b3<ChunkMmla> : gemv_b3<MacDot>)(a, w, s, out, ldo, t0, t1);
}

}  // namespace
}  // namespace bn158

#if !defined(__clang__)
#pragma GCC pop_options
#endif
#endif  // BN158_BUILD_I8MM

namespace bn158 {
#if defined(BN158_BUILD_I8MM)
const KernelTable kNeonI8mmKernels = KernelTable{}.with(Format::I2, {range_i2}).with(Format::Base3, {range_b3});
#else
const KernelTable kNeonI8mmKernels = KernelTable{};  // never used: the path is not offered
#endif
}  // namespace bn158

#endif  // arm64
