// The arm64 ternary kernels' shared body, included by ternary_neon.cpp (baseline Advanced SIMD),
// ternary_neon_dot.cpp (sdot) and ternary_neon_i8mm.cpp (smmla), each after its own
// `#pragma GCC target`, so every copy is compiled for its path. Everything here has internal
// linkage (an unnamed namespace): no inline function is shared between the translation units, so
// none built for a wider path can be picked by the linker for a narrower one. The includer puts
// kernels.h (and the standard headers) before its pragma for the same reason.
//
// The kernels are templates over a Mac policy, the one step that differs between paths:
//   Mac::mac(acc, u, x): acc (4 int32 lanes) += the 16 products u[i] · x[i] (int8 × int8), in any
//   grouping of lanes (the caller only ever sums all 4 lanes).
// Both formats decode to codes u = w + 1 (i2: 2-bit fields; base3: trits, as -(c >= 86) - (c >= 171)
// of the byte times 3^n mod 256, exact for every byte: trit = (3c) >> 8), 16 at a time, aligned with
// 16 consecutive activations; out = Σ u·x − Σ x (Act::xsum), exactly as on x86 (ternary_avx2.cpp).
//   GEMV (M below the GEMM threshold): one pass over each 8-row tile per activation row.
//   GEMM: each tile's K-chunk is unpacked once into an L1 buffer of codes, then every activation
//   row is run against it: 4 rows of x × 4 tile rows with Mac, or (i8mm) 2×2 smmla tiles of
//   x-row pairs × weight-row pairs, 4 rows of x × 8 tile rows per step.
// lut2 (ternary_neon.cpp only): the lookup-table kernel with tbl, no multiplies.
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace bn158 {
namespace {

constexpr int64_t kChunkK = 1920;  // GEMM: codes per row unpacked at once, 8 rows × 1920 B = 15 KiB (L1)
constexpr int64_t kPrefetchBlocks = 8;  // GEMV: tile blocks ahead (the stream runs on into the next tile)
// i8mm GEMM: readable memory standing in for the partner of an odd last row of x (smmla keeps the
// two rows apart; the partner's products are dropped)
alignas(64) constexpr int8_t kZeroRow[kChunkK] = {};

inline int tile_rows_at(const WShape& s, int64_t t) {
    const int64_t left = s.N - t * s.tile_rows;
    return int(left < s.tile_rows ? left : s.tile_rows);
}

inline void prefetch_block(const uint8_t* p) {  // prfm never faults, so running past the end is harmless
    __builtin_prefetch(p);
    __builtin_prefetch(p + 64);
    __builtin_prefetch(p + 128);
    __builtin_prefetch(p + 192);
}

// i2: the 4 fields of 16 bytes; field n of byte j is weight 32n + j of the block.
inline void i2_fields(uint8x16_t q, int8x16_t u[4]) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    u[0] = vreinterpretq_s8_u8(vandq_u8(q, m3));
    u[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(q, 2), m3));
    u[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(q, 4), m3));
    u[3] = vreinterpretq_s8_u8(vshrq_n_u8(q, 6));
}

// base3: minus the leading trit of each byte: trit = (3c) >> 8 is 0 below 86, 1 up to 170, 2 above.
inline int8x16_t b3_negtrit(uint8x16_t c) {
    return vreinterpretq_s8_u8(vaddq_u8(vcgeq_u8(c, vdupq_n_u8(86)), vcgeq_u8(c, vdupq_n_u8(171))));
}
inline uint8x16_t times3(uint8x16_t c) { return vmulq_u8(c, vdupq_n_u8(3)); }  // mod 256: the next trit leads

// The base3 tail of a tile as a whole block: 8 rows of 32 bytes, zero past tail_bytes (activations
// were permuted to match in Act::xp, and the zero bytes meet zero activations).
inline void b3_tail_copy(const uint8_t* tile, const WShape& s, uint8_t* dst /*[8][32]*/) {
    std::memset(dst, 0, 8 * 32);
    const uint8_t* tail = tile + s.nfull * kB3TileBlockBytes;
    for (int r = 0; r < 8; ++r) std::memcpy(dst + 32 * r, tail + r * s.tail_bytes, size_t(s.tail_bytes));
}

// ---------------------------------------------------------------- GEMV (few activation rows)
template <class Mac>
void gemv_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = tile_rows_at(s, t);
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = a.xp + m * a.ldxp;
            int32x4_t acc[8];
            for (auto& v : acc) v = vdupq_n_s32(0);
            for (int64_t kb = 0; kb < s.nfull; ++kb) {
                const uint8_t* wb = tile + kb * kI2TileBlockBytes;
                if (m == 0) prefetch_block(wb + kPrefetchBlocks * kI2TileBlockBytes);  // later rows find it cached
                const int8_t* xb = x + kb * kI2BlockK;
                int8x16_t xv[8];
                for (int i = 0; i < 8; ++i) xv[i] = vld1q_s8(xb + 16 * i);
#pragma GCC unroll 8
                for (int r = 0; r < 8; ++r) {
                    int8x16_t u[4], v[4];
                    i2_fields(vld1q_u8(wb + 32 * r), u);       // weights 32n + 0..15
                    i2_fields(vld1q_u8(wb + 32 * r + 16), v);  // weights 32n + 16..31
                    for (int n = 0; n < 4; ++n) {
                        acc[r] = Mac::mac(acc[r], u[n], xv[2 * n]);
                        acc[r] = Mac::mac(acc[r], v[n], xv[2 * n + 1]);
                    }
                }
            }
            int32_t* o = out + m * ldo + t * kTileN;
            for (int r = 0; r < rows; ++r) o[r] = vaddvq_s32(acc[r]) - a.xsum[m];
        }
    }
}

// base3: the tail, laid out as one more block, is the last block of the loop (one loop body keeps
// the accumulators in registers; passed to a helper by pointer, GCC kept them on the stack).
template <class Mac>
void gemv_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    alignas(16) uint8_t tailbuf[8 * 32];
    const int64_t nblocks = s.nfull + (s.tail_bytes ? 1 : 0);
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = tile_rows_at(s, t);
        if (s.tail_bytes) b3_tail_copy(tile, s, tailbuf);
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = a.xp + m * a.ldxp;
            int32_t* o = out + m * ldo + t * kTileN;
            // 4 rows at a time: 8 accumulators with 10 activation vectors, 5 trit decodes and their
            // constants spilled heavily (GCC 12, -O3)
            for (int r0 = 0; r0 < rows; r0 += 4) {
                int32x4_t acc[4];
                for (auto& v : acc) v = vdupq_n_s32(0);
                for (int64_t kb = 0; kb < nblocks; ++kb) {
                    const uint8_t* wb = (kb < s.nfull ? tile + kb * kB3TileBlockBytes : tailbuf) + 32 * r0;
                    if (m == 0 && r0 == 0) prefetch_block(tile + (kb + kPrefetchBlocks) * kB3TileBlockBytes);
                    const int8_t* xb = x + kb * kB3BlockK;
                    int8x16_t xv[10];
                    for (int i = 0; i < 10; ++i) xv[i] = vld1q_s8(xb + 16 * i);
#pragma GCC unroll 4
                    for (int r = 0; r < 4; ++r) {
                        uint8x16_t c = vld1q_u8(wb + 32 * r), d = vld1q_u8(wb + 32 * r + 16);
                        for (int n = 0; n < 5; ++n) {  // Σ (−u)·x: b3_negtrit gives −u
                            acc[r] = Mac::mac(acc[r], b3_negtrit(c), xv[2 * n]);
                            acc[r] = Mac::mac(acc[r], b3_negtrit(d), xv[2 * n + 1]);
                            if (n < 4) {
                                c = times3(c);
                                d = times3(d);
                            }
                        }
                    }
                }
                const int nr = rows - r0 < 4 ? rows - r0 : 4;
                for (int r = 0; r < nr; ++r) o[r0 + r] = -vaddvq_s32(acc[r]) - a.xsum[m];  // Σ u·x − Σ x
            }
        }
    }
}

// ---------------------------------------------------------------- GEMM (many activation rows)
// Unpack the 8 rows of one block into ub[r * L + k] (codes u, natural k order from d0).
inline void unpack_i2_block(const uint8_t* wb, uint8_t* d0, int64_t L) {
    for (int r = 0; r < 8; ++r)
        for (int h = 0; h < 2; ++h) {
            int8x16_t u[4];
            i2_fields(vld1q_u8(wb + 32 * r + 16 * h), u);
            for (int n = 0; n < 4; ++n) vst1q_s8(reinterpret_cast<int8_t*>(d0 + r * L + 32 * n + 16 * h), u[n]);
        }
}

inline void unpack_b3_block(const uint8_t* wb, uint8_t* d0, int64_t L) {
    for (int r = 0; r < 8; ++r)
        for (int h = 0; h < 2; ++h) {
            uint8x16_t c = vld1q_u8(wb + 32 * r + 16 * h);
            for (int n = 0; n < 5; ++n) {
                vst1q_s8(reinterpret_cast<int8_t*>(d0 + r * L + 32 * n + 16 * h), vnegq_s8(b3_negtrit(c)));
                c = times3(c);
            }
        }
}

// res[i][r] = Σ_k u_r[k] · x_i[k] for MR rows of x and 4 tile rows, over nsteps × 16 values.
template <class Mac, int MR>
inline void micro_mac(const uint8_t* u, int64_t L, const int8_t* x, int64_t ldx, int64_t nsteps, int32_t res[4][4]) {
    int32x4_t acc[MR][4];
    for (auto& row : acc)
        for (auto& v : row) v = vdupq_n_s32(0);
    for (int64_t st = 0; st < nsteps; ++st) {
        int8x16_t uv[4];
        for (int r = 0; r < 4; ++r) uv[r] = vld1q_s8(reinterpret_cast<const int8_t*>(u + r * L + 16 * st));
        for (int i = 0; i < MR; ++i) {
            const int8x16_t xv = vld1q_s8(x + i * ldx + 16 * st);
            for (int r = 0; r < 4; ++r) acc[i][r] = Mac::mac(acc[i][r], uv[r], xv);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int r = 0; r < 4; ++r) res[i][r] = vaddvq_s32(acc[i][r]);
}

// out rows of the tile (+)= the chunk [k0, k0 + L) of x · codes, for every activation row.
inline void store_chunk(const Act& a, int64_t m, int64_t n0, int r0, int nr, const int32_t* sums, bool first,
                        int32_t* out, int64_t ldo) {
    int32_t* o = out + m * ldo + n0 + r0;
    for (int r = 0; r < nr; ++r) o[r] = first ? sums[r] - a.xsum[m] : o[r] + sums[r];
}

template <class Mac>
struct ChunkMac {
    static void run(const Act& a, uint8_t* ub, int64_t L, int64_t k0, bool first, int32_t* out, int64_t ldo,
                    int64_t n0, int rows) {
        const int64_t nsteps = L / 16;
        for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
            const int mr = int(a.M - m0 < 4 ? a.M - m0 : 4);
            const int8_t* x = a.xp + m0 * a.ldxp + k0;
            for (int r0 = 0; r0 < rows; r0 += 4) {
                int32_t res[4][4];
                const uint8_t* u = ub + r0 * L;
                switch (mr) {
                    case 4: micro_mac<Mac, 4>(u, L, x, a.ldxp, nsteps, res); break;
                    case 3: micro_mac<Mac, 3>(u, L, x, a.ldxp, nsteps, res); break;
                    case 2: micro_mac<Mac, 2>(u, L, x, a.ldxp, nsteps, res); break;
                    default: micro_mac<Mac, 1>(u, L, x, a.ldxp, nsteps, res); break;
                }
                const int nr = rows - r0 < 4 ? rows - r0 : 4;
                for (int i = 0; i < mr; ++i) store_chunk(a, m0 + i, n0, r0, nr, res[i], first, out, ldo);
            }
        }
    }
};

// The tile loop shared by both formats and every chunk kernel: unpack a K-chunk of the tile's 8
// rows, hand it to Chunk::run.
template <class Chunk>
void gemm_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    alignas(64) uint8_t ub[8 * kChunkK];
    constexpr int64_t cb = kChunkK / kI2BlockK;  // 15 blocks per chunk
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = tile_rows_at(s, t);
        for (int64_t b0 = 0; b0 < s.nfull; b0 += cb) {
            const int64_t nb = s.nfull - b0 < cb ? s.nfull - b0 : cb;
            const int64_t L = nb * kI2BlockK;
            for (int64_t b = 0; b < nb; ++b)
                unpack_i2_block(tile + (b0 + b) * kI2TileBlockBytes, ub + b * kI2BlockK, L);
            Chunk::run(a, ub, L, b0 * kI2BlockK, b0 == 0, out, ldo, t * kTileN, rows);
        }
    }
}

template <class Chunk>
void gemm_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    alignas(64) uint8_t ub[8 * kChunkK];
    alignas(16) uint8_t tailbuf[8 * 32];
    constexpr int64_t cb = kChunkK / kB3BlockK;  // 12 blocks per chunk
    const int64_t nblocks = s.nfull + (s.tail_bytes ? 1 : 0);
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = tile_rows_at(s, t);
        for (int64_t b0 = 0; b0 < nblocks; b0 += cb) {
            const int64_t nb = nblocks - b0 < cb ? nblocks - b0 : cb;
            const int64_t L = nb * kB3BlockK;
            for (int64_t b = 0; b < nb; ++b) {
                const int64_t blk = b0 + b;
                if (blk < s.nfull) {
                    unpack_b3_block(tile + blk * kB3TileBlockBytes, ub + b * kB3BlockK, L);
                } else {
                    b3_tail_copy(tile, s, tailbuf);
                    unpack_b3_block(tailbuf, ub + b * kB3BlockK, L);
                }
            }
            Chunk::run(a, ub, L, b0 * kB3BlockK, b0 == 0, out, ldo, t * kTileN, rows);
        }
    }
}

}  // namespace
}  // namespace bn158
