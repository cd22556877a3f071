// AVX2 kernels (int8 activations × ternary weights, exact int32 results).
//
// Both formats decode to unsigned codes u = w + 1 in {0, 1, 2}, 32 at a time, aligned with 32
// consecutive activations; vpmaddubsw(u, x) multiplies unsigned × signed into int16 pair sums
// (|pair| <= 2*2*128 = 512, no saturation), a few are summed in int16 (<= 5 per widening: 2560),
// then vpmaddwd(·, 1) widens to int32. The +1 offset is undone with the row's activation sum:
//   sum_k w x = sum_k u x - sum_k x.
// The i2 GEMV is the decode hot path and is compute-bound on AVX2 (one core decodes ~22 GB/s of
// weights from L1, barely above a DRAM stream), so it trims work per weight byte: one shift
// instead of three (fields 1 and 3 are used in place, ×4, and the ×4 is shifted out of the int16
// sum, exactly: it is a multiple of 4) and int16 sums across up to 16 blocks before widening.
// M < kGemmMinM: GEMV, one pass over each 8-row tile per activation row (tile stays in L1).
// Larger M: each tile's K-chunk is unpacked once into an L1 buffer of codes, then reused by every
// activation row with a 4×2 (rows of x × rows of W) register-blocked micro-kernel.
//
// Compiled for AVX2 with `#pragma GCC target`, so one build holds every path. Nothing here uses
// the standard library (no inline templates compiled for AVX2 could leak into other paths).
#if defined(__x86_64__) || defined(_M_X64)  // x86-64 builds only (an arm64 build holds the NEON files)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi2")

namespace bn158 {
namespace {

constexpr int64_t kGemmMinM = 4;
constexpr int64_t kChunkK = 1920;  // GEMM: codes per row unpacked at once, 8 rows × 1920 B = 15 KiB (L1)
#ifndef BN158_PF_BLOCKS
#define BN158_PF_BLOCKS 8
#endif
// GEMV software prefetch: every cache line of the tile block this many blocks ahead (the stream
// runs on into the next tile, which is what is read next). One line 1 KB ahead left the kernel
// waiting on DRAM: 2.5x slower on weights out of cache than in L3.
constexpr int64_t kPrefetchBlocks = BN158_PF_BLOCKS;

inline void prefetch_block(const uint8_t* p) {
    const char* c = reinterpret_cast<const char*>(p);
    _mm_prefetch(c, _MM_HINT_T0);
    _mm_prefetch(c + 64, _MM_HINT_T0);
    _mm_prefetch(c + 128, _MM_HINT_T0);
    _mm_prefetch(c + 192, _MM_HINT_T0);
}

// 8 vectors of int32 → one vector of their 8 horizontal sums.
inline __m256i hsum8(const __m256i v[8]) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

inline void store_rows(int32_t* dst, __m256i v, int rows) {
    if (rows == kTileN) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
    } else {
        alignas(32) int32_t tmp[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
        for (int r = 0; r < rows; ++r) dst[r] = tmp[r];
    }
}

inline __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// base3: unsigned trit of each byte of c (bytes already XORed with 0x80): (c > -43) + (c > 42).
inline __m256i b3_trit(__m256i c) {
    const __m256i c1 = _mm256_cmpgt_epi8(c, _mm256_set1_epi8(-43));
    const __m256i c2 = _mm256_cmpgt_epi8(c, _mm256_set1_epi8(42));
    return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), c1), c2);
}
inline __m256i times3(__m256i c) { return _mm256_add_epi8(c, _mm256_add_epi8(c, c)); }

// ---------------------------------------------------------------- GEMV (one activation row)
// Blocks whose int16 sums may run together before widening: per block and lane |sum| <= 4 fields
// × 2 pairs × 2 × 128 = 2048 at most (2032 for positive sums, x <= 127), so 16 blocks stay within
// [-32768, 32512].
constexpr int64_t kI2Int16Blocks = 16;

// s[r] += sum over one i2 block of u[r] * x, as int16 lanes. Field n of byte j is weight
// 32n + j: f0 = b & 3, f1 = b & 12 (= 4 u1), f2 = (b >> 4) & 3, f3 = (b >> 4) & 12 (= 4 u3).
// The 16-bit shift drags the next byte's low bits into bits 4..7, which the masks drop.
inline void i2_block16(const uint8_t* wb, const int8_t* xb, __m256i s[8]) {
    const __m256i m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
    const __m256i x0 = ld(xb), x1 = ld(xb + 32), x2 = ld(xb + 64), x3 = ld(xb + 96);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
        const __m256i w = ld(wb + 32 * r), h = _mm256_srli_epi16(w, 4);
        const __m256i even = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, m3), x0),
                                              _mm256_maddubs_epi16(_mm256_and_si256(h, m3), x2));
        const __m256i odd4 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, m12), x1),
                                              _mm256_maddubs_epi16(_mm256_and_si256(h, m12), x3));
        s[r] = _mm256_add_epi16(s[r], _mm256_add_epi16(even, _mm256_srai_epi16(odd4, 2)));
    }
}

inline void b3_block(const uint8_t* wb, const int8_t* xb, __m256i acc[8]) {
    const __m256i k80 = _mm256_set1_epi8(char(0x80)), ones = _mm256_set1_epi16(1);
    const __m256i x0 = ld(xb), x1 = ld(xb + 32), x2 = ld(xb + 64), x3 = ld(xb + 96), x4 = ld(xb + 128);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
        __m256i c = _mm256_xor_si256(ld(wb + 32 * r), k80);  // ×3 mod 256 commutes with ^0x80
        __m256i s = _mm256_maddubs_epi16(b3_trit(c), x0);
        c = times3(c);
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(b3_trit(c), x1));
        c = times3(c);
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(b3_trit(c), x2));
        c = times3(c);
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(b3_trit(c), x3));
        c = times3(c);
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(b3_trit(c), x4));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(s, ones));
    }
}

// The base3 tail of a tile, copied into whole zero-filled 32-byte rows (activations were
// permuted to match in Act::xp, and the zero bytes meet zero activations).
inline void b3_tail_copy(const uint8_t* tile, const WShape& s, uint8_t* dst /*[8][32]*/) {
    std::memset(dst, 0, 8 * 32);
    const uint8_t* tail = tile + s.nfull * kB3TileBlockBytes;
    for (int r = 0; r < 8; ++r) std::memcpy(dst + 32 * r, tail + r * s.tail_bytes, size_t(s.tail_bytes));
}

// The GEMV reads a range's tiles as G contiguous parts in lockstep, one block of each in turn. One
// stream leaves bandwidth unused (the prefetchers restart at every 4 KiB page, and the software
// prefetch alone keeps too few lines in flight): on weights out of cache, 2560×6912 at M = 1 read
// 56–61 % of a 4-stream read probe with one stream and 78–85 % with four at 1 thread (70–75 % →
// 92–96 % at 2 threads), paired rounds in one process. With G > 1 the int16 sums live in an L1
// buffer instead of registers (~5 % slower with the weights in cache), and a short range (a small
// matrix split across threads) gains nothing from streams of a tile or two, so it keeps G = 1.
constexpr int kGemvStreams = 4;
constexpr int64_t kGemvMinTilesPerStream = 2;

template <int G>
void gemv_i2_streams(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                     int64_t t1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t n = t1 - t0, per = ceil_div(n, G);
    alignas(32) __m256i acc[G][8], s16[G][8];
    for (int64_t j = 0; j < per; ++j) {
        const uint8_t* tile[G];
        int64_t tid[G];
        int ng = 0;
        for (int g = 0; g < G; ++g) {
            if (g * per + j >= n) break;
            tid[ng] = t0 + g * per + j;
            tile[ng] = w + tid[ng] * s.tile_bytes;
            ++ng;
        }
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = a.xp + m * a.ldxp;
            const bool fetch = m == 0;  // later rows find the tiles in cache
            for (int g = 0; g < ng; ++g)
                for (auto& v : acc[g]) v = _mm256_setzero_si256();
            for (int64_t k0 = 0; k0 < s.nfull; k0 += kI2Int16Blocks) {
                const int64_t k1 = s.nfull - k0 < kI2Int16Blocks ? s.nfull : k0 + kI2Int16Blocks;
                for (int g = 0; g < ng; ++g)
                    for (auto& v : s16[g]) v = _mm256_setzero_si256();
                for (int64_t kb = k0; kb < k1; ++kb)
                    for (int g = 0; g < ng; ++g) {
                        if (fetch) prefetch_block(tile[g] + (kb + kPrefetchBlocks) * kI2TileBlockBytes);
                        i2_block16(tile[g] + kb * kI2TileBlockBytes, x + kb * kI2BlockK, s16[g]);
                    }
                for (int g = 0; g < ng; ++g)
                    for (int r = 0; r < 8; ++r) acc[g][r] = _mm256_add_epi32(acc[g][r], _mm256_madd_epi16(s16[g][r], ones));
            }
            for (int g = 0; g < ng; ++g) {
                const int rows = int(s.N - tid[g] * kTileN < kTileN ? s.N - tid[g] * kTileN : kTileN);
                store_rows(out + m * ldo + tid[g] * kTileN, _mm256_sub_epi32(hsum8(acc[g]), _mm256_set1_epi32(a.xsum[m])), rows);
            }
        }
    }
}

void gemv_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    if (t1 - t0 >= kGemvStreams * kGemvMinTilesPerStream)
        gemv_i2_streams<kGemvStreams>(a, w, s, out, ldo, t0, t1);
    else
        gemv_i2_streams<1>(a, w, s, out, ldo, t0, t1);
}

void gemv_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    alignas(32) uint8_t tailbuf[8 * 32];
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = int(s.N - t * kTileN < kTileN ? s.N - t * kTileN : kTileN);
        if (s.tail_bytes) b3_tail_copy(tile, s, tailbuf);
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = a.xp + m * a.ldxp;
            __m256i acc[8];
            for (auto& v : acc) v = _mm256_setzero_si256();
            for (int64_t kb = 0; kb < s.nfull; ++kb) {
                prefetch_block(tile + (kb + kPrefetchBlocks) * kB3TileBlockBytes);
                b3_block(tile + kb * kB3TileBlockBytes, x + kb * kB3BlockK, acc);
            }
            if (s.tail_bytes) b3_block(tailbuf, x + s.nfull * kB3BlockK, acc);
            const __m256i r = _mm256_sub_epi32(hsum8(acc), _mm256_set1_epi32(a.xsum[m]));
            store_rows(out + m * ldo + t * kTileN, r, rows);
        }
    }
}

// ---------------------------------------------------------------- GEMM (many activation rows)
// Unpack blocks [b0, b0 + nb) of one tile into ub[r * L + k] (codes u, natural k order).
inline void unpack_i2(const uint8_t* tile, int64_t b0, int64_t nb, uint8_t* ub, int64_t L) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = tile + (b0 + b) * kI2TileBlockBytes;
        for (int r = 0; r < 8; ++r) {
            const __m256i w = ld(wb + 32 * r);
            uint8_t* d = ub + r * L + b * kI2BlockK;
            _mm256_store_si256(reinterpret_cast<__m256i*>(d), _mm256_and_si256(w, m3));
            _mm256_store_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_and_si256(_mm256_srli_epi16(w, 2), m3));
            _mm256_store_si256(reinterpret_cast<__m256i*>(d + 64), _mm256_and_si256(_mm256_srli_epi16(w, 4), m3));
            _mm256_store_si256(reinterpret_cast<__m256i*>(d + 96), _mm256_and_si256(_mm256_srli_epi16(w, 6), m3));
        }
    }
}

inline void unpack_b3_block(const uint8_t* wb, uint8_t* d0, int64_t L) {
    const __m256i k80 = _mm256_set1_epi8(char(0x80));
    for (int r = 0; r < 8; ++r) {
        __m256i c = _mm256_xor_si256(ld(wb + 32 * r), k80);
        uint8_t* d = d0 + r * L;
        for (int n = 0; n < 5; ++n) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(d + 32 * n), b3_trit(c));
            c = times3(c);
        }
    }
}

// res[mi * 2 + ri] = sum_k u_ri[k] * x_mi[k] over nsteps × 32 values.
template <int MR>
inline void micro(const uint8_t* u0, const uint8_t* u1, const int8_t* x, int64_t ldx, int64_t nsteps,
                  __m256i res[8]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    int64_t st = 0;
    for (; st + 4 <= nsteps; st += 4) {
        const uint8_t* p0 = u0 + 32 * st;
        const uint8_t* p1 = u1 + 32 * st;
        const __m256i a0 = ld(p0), a1 = ld(p0 + 32), a2 = ld(p0 + 64), a3 = ld(p0 + 96);
        const __m256i b0 = ld(p1), b1 = ld(p1 + 32), b2 = ld(p1 + 64), b3 = ld(p1 + 96);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
            const int8_t* xm = x + i * ldx + 32 * st;
            const __m256i y0 = ld(xm), y1 = ld(xm + 32), y2 = ld(xm + 64), y3 = ld(xm + 96);
            __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(a0, y0), _mm256_maddubs_epi16(a1, y1));
            s = _mm256_add_epi16(s, _mm256_add_epi16(_mm256_maddubs_epi16(a2, y2), _mm256_maddubs_epi16(a3, y3)));
            acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(s, ones));
            __m256i q = _mm256_add_epi16(_mm256_maddubs_epi16(b0, y0), _mm256_maddubs_epi16(b1, y1));
            q = _mm256_add_epi16(q, _mm256_add_epi16(_mm256_maddubs_epi16(b2, y2), _mm256_maddubs_epi16(b3, y3)));
            acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(q, ones));
        }
    }
    for (; st < nsteps; ++st) {
        const __m256i a0 = ld(u0 + 32 * st), b0 = ld(u1 + 32 * st);
        for (int i = 0; i < MR; ++i) {
            const __m256i y0 = ld(x + i * ldx + 32 * st);
            acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, y0), ones));
            acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(b0, y0), ones));
        }
    }
    for (int i = 0; i < 4; ++i) {
        res[2 * i] = i < MR ? acc[i < MR ? i : 0][0] : _mm256_setzero_si256();
        res[2 * i + 1] = i < MR ? acc[i < MR ? i : 0][1] : _mm256_setzero_si256();
    }
}

// C[m, tile rows] (+)= u-buffer · x over one K-chunk, for all m.
void gemm_chunk(const Act& a, const uint8_t* ub, int64_t L, int64_t k0, bool first, int32_t* out,
                int64_t ldo, int64_t n0, int rows) {
    const int64_t nsteps = L / 32;
    alignas(32) int32_t sums[8];
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
        const int mr = int(a.M - m0 < 4 ? a.M - m0 : 4);
        const int8_t* x = a.xp + m0 * a.ldxp + k0;
        for (int rp = 0; rp < 4; ++rp) {
            if (2 * rp >= rows) break;
            __m256i res[8];
            const uint8_t* u0 = ub + (2 * rp) * L;
            const uint8_t* u1 = ub + (2 * rp + 1) * L;
            switch (mr) {
                case 4: micro<4>(u0, u1, x, a.ldxp, nsteps, res); break;
                case 3: micro<3>(u0, u1, x, a.ldxp, nsteps, res); break;
                case 2: micro<2>(u0, u1, x, a.ldxp, nsteps, res); break;
                default: micro<1>(u0, u1, x, a.ldxp, nsteps, res); break;
            }
            _mm256_store_si256(reinterpret_cast<__m256i*>(sums), hsum8(res));
            for (int i = 0; i < mr; ++i) {
                for (int ri = 0; ri < 2; ++ri) {
                    const int r = 2 * rp + ri;
                    if (r >= rows) continue;
                    int32_t* o = out + (m0 + i) * ldo + n0 + r;
                    *o = first ? sums[2 * i + ri] - a.xsum[m0 + i] : *o + sums[2 * i + ri];
                }
            }
        }
    }
}

void gemm_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    alignas(64) uint8_t ub[8 * kChunkK];
    constexpr int64_t cb = kChunkK / kI2BlockK;  // 15 blocks per chunk
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = int(s.N - t * kTileN < kTileN ? s.N - t * kTileN : kTileN);
        for (int64_t b0 = 0; b0 < s.nfull; b0 += cb) {
            const int64_t nb = s.nfull - b0 < cb ? s.nfull - b0 : cb;
            const int64_t L = nb * kI2BlockK;
            unpack_i2(tile, b0, nb, ub, L);
            gemm_chunk(a, ub, L, b0 * kI2BlockK, b0 == 0, out, ldo, t * kTileN, rows);
        }
    }
}

void gemm_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    alignas(64) uint8_t ub[8 * kChunkK];
    alignas(32) uint8_t tailbuf[8 * 32];
    constexpr int64_t cb = kChunkK / kB3BlockK;  // 12 blocks per chunk
    const int64_t nblocks = s.nfull + (s.tail_bytes ? 1 : 0);
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = int(s.N - t * kTileN < kTileN ? s.N - t * kTileN : kTileN);
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
            gemm_chunk(a, ub, L, b0 * kB3BlockK, b0 == 0, out, ldo, t * kTileN, rows);
        }
    }
}

void range_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
              int64_t t1) {
    (a.M >= kGemmMinM ? gemm_i2 : gemv_i2)(a, w, s, out, ldo, t0, t1);
}

void range_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
              int64_t t1) {
    (a.M >= kGemmMinM ? gemm_b3 : gemv_b3)(a, w, s, out, ldo, t0, t1);
}

}  // namespace

// Memory read bandwidth probe: the uint64 sum of n bytes (n a multiple of 128), read as `streams`
// contiguous parts visited 64 bytes at a time in turn. One stream leaves bandwidth unused here: the
// hardware prefetcher restarts at every 4 KiB page, and a single core on a 2-core AMD EPYC VM
// read 17 GB/s with one stream and 25 GB/s with four. The probe reports the better of both.
uint64_t read_sum_avx2(const uint8_t* p, int64_t n, int streams) {
    if (streams < 1) streams = 1;
    if (streams > 8) streams = 8;
    __m256i acc[8];
    for (auto& v : acc) v = _mm256_setzero_si256();
    const int64_t part = n / streams / 64 * 64;
    for (int64_t i = 0; i < part; i += 64)
        for (int st = 0; st < streams; ++st) {
            const uint8_t* q = p + st * part + i;
            acc[st] = _mm256_add_epi64(acc[st], _mm256_add_epi64(ld(q), ld(q + 32)));
        }
    for (int64_t i = part * streams; i < n; i += 32) acc[0] = _mm256_add_epi64(acc[0], ld(p + i));
    __m256i total = acc[0];
    for (int st = 1; st < 8; ++st) total = _mm256_add_epi64(total, acc[st]);
    alignas(32) uint64_t t[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), total);
    return t[0] + t[1] + t[2] + t[3];
}

}  // namespace bn158

#pragma GCC pop_options

namespace bn158 {
const KernelTable kAvx2Kernels = KernelTable{}
                                     .with(Format::I2, {range_i2})
                                     .with(Format::Base3, {range_b3})
                                     .with(Format::Lut2, {lut2_range_avx2});
}

#endif  // x86-64
