// arm64 baseline kernels (Advanced SIMD, every ARMv8-A CPU): the `neon` path.
//
// i2 and base3 (ternary_neon_impl.h) with the multiply-accumulate of ARMv8.0: smull/smlal2 into
// int16 (two products u·x per lane, |u·x| <= 2·128), sadalp into int32. lut2: the lookup-table
// kernel below, with tbl instead of vpshufb (ternary_lut_avx2.cpp has the scheme): per K-pair
// one 32-byte record of 64 rows' nibbles, 4 index vectors, 8 lookups into the pair's 16-entry lo
// and hi byte tables of v = (t0-1)·x0 + (t1-1)·x1, and widening adds; no multiplies.
// Also the memory read-bandwidth probe (read_sum_neon).
#if defined(__aarch64__)  // arm64 builds only
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "ternary_dispatch.h"
#include "ternary_neon_impl.h"

namespace bn158 {
namespace {

struct MacNeon {
    static inline int32x4_t mac(int32x4_t acc, int8x16_t u, int8x16_t x) {
#ifdef BN158_BREAK_NEON  // test-only (scripts/check_arm.sh builds it): one wrong lane must fail the check
        u = vsetq_lane_s8(int8_t(vgetq_lane_s8(u, 5) ^ 1), u, 5);
#endif
        return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(u), vget_low_s8(x)), u, x));
    }
};

constexpr int64_t kGemmMinM = 4;

void range_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    (a.M >= kGemmMinM ? gemm_i2<ChunkMac<MacNeon>> : gemv_i2<MacNeon>)(a, w, s, out, ldo, t0, t1);
}

void range_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    (a.M >= kGemmMinM ? gemm_b3<ChunkMac<MacNeon>> : gemv_b3<MacNeon>)(a, w, s, out, ldo, t0, t1);
}

// ---------------------------------------------------------------- lut2
constexpr int64_t kBlockPairs = 127;  // int8 Σhi and uint16 Σlo (<= 255·127) stay exact up to here
constexpr int64_t kChunkPairs = 512;  // 512 pairs × 32 B of tables = 16 KiB (L1)
constexpr int64_t kRowGroup = 4;      // activation rows sharing one pass over the weights (M > 1)
constexpr int kPairBytes = int(sizeof(Lut2Pair));

// tab[32p .. 32p+15] = lo bytes, tab[32p+16 .. 32p+31] = hi bytes of v(idx) = lo + 256·hi for
// idx 0..15 (9..15, invalid: 0, as every path reads them), for pairs [0, np) of x.
void build_tables(const int8_t* x, int64_t np, uint8_t* tab) {
    // (t0-1) and (t1-1) by idx; invalid idx get (0, 0)
    const int16x8_t s0a = {-1, -1, -1, 0, 0, 0, 1, 1}, s0b = {1, 0, 0, 0, 0, 0, 0, 0};
    const int16x8_t s1a = {-1, 0, 1, -1, 0, 1, -1, 0}, s1b = {1, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t p = 0; p < np; ++p) {
        const int16_t x0 = x[2 * p], x1 = x[2 * p + 1];
        const int16x8_t va = vmlaq_n_s16(vmulq_n_s16(s0a, x0), s1a, x1);  // |v| <= 256: exact in int16
        const int16x8_t vb = vmlaq_n_s16(vmulq_n_s16(s0b, x0), s1b, x1);
        vst1q_u8(tab + 32 * p, vcombine_u8(vmovn_u16(vreinterpretq_u16_s16(va)), vmovn_u16(vreinterpretq_u16_s16(vb))));
        vst1q_u8(tab + 32 * p + 16,
                 vcombine_u8(vreinterpret_u8_s8(vshrn_n_s16(va, 8)), vreinterpret_u8_s8(vshrn_n_s16(vb, 8))));
    }
}

// acc[4g + i] (+)= rows 16g + 4i .. 16g + 4i + 3 of one tile, over np pairs of records `wp`.
inline void tile_pairs(const uint8_t* wp, const uint8_t* tab, int64_t np, int32x4_t acc[16]) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    for (int64_t b0 = 0; b0 < np; b0 += kBlockPairs) {
        const int64_t nb = np - b0 < kBlockPairs ? np - b0 : kBlockPairs;
        uint16x8_t lw[8];  // Σlo of rows 8j .. 8j+7
        int8x16_t hs[4];   // Σhi of rows 16g .. 16g+15
        for (auto& v : lw) v = vdupq_n_u16(0);
        for (auto& v : hs) v = vdupq_n_s8(0);
        const uint8_t* w = wp + b0 * kPairBytes;
        const uint8_t* t = tab + b0 * 32;
        for (int64_t i = 0; i < nb; ++i, w += kPairBytes, t += 32) {
            __builtin_prefetch(w + 1024);  // out-run memory latency, as the AVX2 kernel does
            const uint8x16_t q0 = vld1q_u8(w), q1 = vld1q_u8(w + 16);
            const uint8x16_t tl = vld1q_u8(t), th = vld1q_u8(t + 16);
            // byte j: low nibble row j, high nibble row 32 + j
            const uint8x16_t idx[4] = {vandq_u8(q0, m4), vandq_u8(q1, m4), vshrq_n_u8(q0, 4), vshrq_n_u8(q1, 4)};
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                const uint8x16_t l = vqtbl1q_u8(tl, idx[g]);
                lw[2 * g] = vaddw_u8(lw[2 * g], vget_low_u8(l));
                lw[2 * g + 1] = vaddw_high_u8(lw[2 * g + 1], l);
                hs[g] = vaddq_s8(hs[g], vreinterpretq_s8_u8(vqtbl1q_u8(th, idx[g])));
            }
        }
        for (int g = 0; g < 4; ++g) {  // row sum = Σlo + 256·Σhi
            const int16x8_t h[2] = {vmovl_s8(vget_low_s8(hs[g])), vmovl_high_s8(hs[g])};
            for (int j = 0; j < 2; ++j) {
                const uint16x8_t l = lw[2 * g + j];
                const int32x4_t lo = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(l)));
                const int32x4_t hi = vreinterpretq_s32_u32(vmovl_high_u16(l));
                acc[4 * g + 2 * j] = vaddq_s32(acc[4 * g + 2 * j], vaddq_s32(lo, vshll_n_s16(vget_low_s16(h[j]), 8)));
                acc[4 * g + 2 * j + 1] = vaddq_s32(acc[4 * g + 2 * j + 1], vaddq_s32(hi, vshll_high_n_s16(h[j], 8)));
            }
        }
    }
}

void lut2_range(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    alignas(16) uint8_t tab[kRowGroup][kChunkPairs * 32];
    alignas(16) int32_t res[kLut2TileN];
    const int64_t npairs = s.nfull, nch = (npairs + kChunkPairs - 1) / kChunkPairs;
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowGroup) {
        const int64_t mg = a.M - m0 < kRowGroup ? a.M - m0 : kRowGroup;
        for (int64_t c = 0; c < nch; ++c) {  // balanced chunks of <= kChunkPairs pairs
            const int64_t p0 = npairs * c / nch, np = npairs * (c + 1) / nch - p0;
            for (int64_t g = 0; g < mg; ++g) build_tables(a.xp + (m0 + g) * a.ldxp + 2 * p0, np, tab[g]);
            for (int64_t t = t0; t < t1; ++t) {
                const uint8_t* wt = w + t * s.tile_bytes + p0 * kPairBytes;
                const int64_t n0 = t * kLut2TileN;
                const int rows = tile_rows_at(s, t);
                for (int64_t g = 0; g < mg; ++g) {  // the tile's chunk stays in L1 across the group
                    int32x4_t acc[16];
                    for (auto& v : acc) v = vdupq_n_s32(0);
                    tile_pairs(wt, tab[g], np, acc);
                    for (int i = 0; i < 16; ++i) vst1q_s32(res + 4 * i, acc[i]);
                    int32_t* o = out + (m0 + g) * ldo + n0;
                    for (int r = 0; r < rows; ++r) o[r] = c == 0 ? res[r] : o[r] + res[r];
                }
            }
        }
    }
}

}  // namespace

// The read-bandwidth probe (bindings' read_sum): the uint64 sum of n bytes (n a multiple of 128),
// read as `streams` contiguous parts visited 64 bytes at a time in turn; the same sum as on x86.
uint64_t read_sum_neon(const uint8_t* p, int64_t n, int streams) {
    auto ld64 = [](const uint8_t* q) { return vreinterpretq_u64_u8(vld1q_u8(q)); };  // 2 words, any alignment
    if (streams < 1) streams = 1;
    if (streams > 8) streams = 8;
    uint64x2_t acc[8];
    for (auto& v : acc) v = vdupq_n_u64(0);
    const int64_t part = n / streams / 64 * 64;
    for (int64_t i = 0; i < part; i += 64)
        for (int st = 0; st < streams; ++st) {
            const uint8_t* q = p + st * part + i;
            const uint64x2_t a = vaddq_u64(ld64(q), ld64(q + 16)), b = vaddq_u64(ld64(q + 32), ld64(q + 48));
            acc[st] = vaddq_u64(acc[st], vaddq_u64(a, b));
        }
    for (int64_t i = part * streams; i < n; i += 16) acc[0] = vaddq_u64(acc[0], ld64(p + i));
    uint64x2_t total = acc[0];
    for (int st = 1; st < 8; ++st) total = vaddq_u64(total, acc[st]);
    return vgetq_lane_u64(total, 0) + vgetq_lane_u64(total, 1);
}

const KernelTable kNeonKernels = KernelTable{}
                                     .with(Format::I2, {range_i2})
                                     .with(Format::Base3, {range_b3})
                                     .with(Format::Lut2, {lut2_range});

}  // namespace bn158

#endif  // arm64
