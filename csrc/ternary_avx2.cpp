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
// M < kGemmMinM (i2; kGemmMinMBase3 for base3): GEMV, one pass over each 8-row tile per
// activation row (tile stays in L1).
// Larger M: each tile's K-chunk is unpacked once into an L1 buffer of codes (the next chunk's bytes
// prefetched meanwhile), then reused by every activation row of a 64-row block with a 4×2 (rows of
// x × rows of W) register-blocked micro-kernel that keeps its sums in int16 for the whole chunk;
// per-row vector sums are reduced once per tile. At M = 16 and 128 that is ~110–117 G
// multiply-adds/s on one Zen 3 core, ~0.55–0.6 of its two-vpmaddubsw-a-cycle peak (was ~90–97).
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
// base3's GEMV spends most of its time decoding trits (~30 ops per 160 codes), which the GEMM does
// once for all rows: at M = 2 and 3 it is 1.5x and 1.9x the GEMV on 6912×2560 (at M = 1, 0.91x).
// i2's GEMV decodes in 6 ops per 128 codes and stays ahead until M = 4.
constexpr int64_t kGemmMinMBase3 = 2;
// GEMM: codes per row unpacked at once, 8 rows × 1280 B = 10 KiB, beside 16 rows of x (20 KiB) in L1;
// a multiple of both block sizes (128, 160). 1920 was ~3 % slower at M = 16 and 128.
constexpr int64_t kChunkK = 1280;
// GEMM int16 sums: a vpmaddubsw lane is u0 x0 + u1 x1 with u <= 2, |x| <= 128, so |lane| <= 512, and
// 64 of them stay within [-32768, 32512]; a chunk is 1280 / 32 = 40 steps.
constexpr int64_t kGemmInt16Steps = 64;
static_assert(kChunkK / 32 <= kGemmInt16Steps, "a GEMM chunk must fit the int16 sums");
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

// res[mi * 2 + ri] = sum_k u_ri[k] * x_mi[k] over nsteps × 32 values, nsteps <= kGemmInt16Steps.
// The sums stay int16 for the whole chunk (one vpaddw per vpmaddubsw, no widening inside the loop),
// so the two multiply pipes do nothing but vpmaddubsw, and the 8 sums, the two code vectors and a
// temporary fit the 16 ymm registers; x comes straight from L1 as the memory operand. Not inlined:
// inside gemm_chunk the compiler spilled sums to the stack (~25 % slower).
template <int MR>
__attribute__((noinline)) void micro(const uint8_t* u0, const uint8_t* u1, const int8_t* x, int64_t ldx, int64_t nsteps,
                  __m256i res[8]) {
    __m256i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int64_t st = 0; st < nsteps; ++st) {
        const __m256i a = ld(u0 + 32 * st), b = ld(u1 + 32 * st);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
            const __m256i y = ld(x + i * ldx + 32 * st);
            acc[i][0] = _mm256_add_epi16(acc[i][0], _mm256_maddubs_epi16(a, y));
            acc[i][1] = _mm256_add_epi16(acc[i][1], _mm256_maddubs_epi16(b, y));
        }
    }
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 4; ++i) {
        res[2 * i] = i < MR ? _mm256_madd_epi16(acc[i < MR ? i : 0][0], ones) : _mm256_setzero_si256();
        res[2 * i + 1] = i < MR ? _mm256_madd_epi16(acc[i < MR ? i : 0][1], ones) : _mm256_setzero_si256();
    }
}

// acc[m * 8 + r] += the 8 int32 lane sums of code row r of the chunk · x row m, for m < mb. The
// sums stay vectors until the tile's last chunk: one horizontal sum per output, not per chunk.
void gemm_chunk(const int8_t* x, int64_t ldx, int64_t mb, const uint8_t* ub, int64_t L, int rows,
                __m256i* acc) {
    const int64_t nsteps = L / 32;
    for (int64_t m0 = 0; m0 < mb; m0 += 4) {
        const int mr = int(mb - m0 < 4 ? mb - m0 : 4);
        const int8_t* xm = x + m0 * ldx;
        for (int rp = 0; rp < 4 && 2 * rp < rows; ++rp) {
            __m256i res[8];
            const uint8_t* u0 = ub + (2 * rp) * L;
            const uint8_t* u1 = u0 + L;
            switch (mr) {
                case 4: micro<4>(u0, u1, xm, ldx, nsteps, res); break;
                case 3: micro<3>(u0, u1, xm, ldx, nsteps, res); break;
                case 2: micro<2>(u0, u1, xm, ldx, nsteps, res); break;
                default: micro<1>(u0, u1, xm, ldx, nsteps, res); break;
            }
            for (int i = 0; i < mr; ++i) {
                __m256i* am = acc + (m0 + i) * 8 + 2 * rp;
                am[0] = _mm256_add_epi32(am[0], res[2 * i]);
                am[1] = _mm256_add_epi32(am[1], res[2 * i + 1]);
            }
        }
    }
}

// The packed bytes of the chunk unpacked next, fetched while this one is multiplied: unpacking is
// where the weights come in from memory, and it has no work to hide their latency behind.
// (A base3 tile's tail is not prefetched: a tile's last row bytes, 8 × up to 31.)
inline void prefetch_chunk(const uint8_t* first_block, int64_t nb, int64_t block_bytes) {
    const char* p = reinterpret_cast<const char*>(first_block);
    for (int64_t off = 0; off < nb * block_bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// Activation rows per pass over the weights: their vector sums, 64 × 8 × 32 B = 16 KiB, live on the
// stack, and each tile is unpacked once per pass (a 1/64 share of the work at most).
constexpr int64_t kGemmBlockM = 64;

// The GEMM over tiles [t0, t1): for each block of rows and each tile, unpack(tile, b0, nb, ub, L)
// fills the code buffer one K-chunk of `cb` blocks of `bk` codes (`block_bytes` packed) at a time.
template <class Unpack>
void gemm_tiles(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                int64_t t1, int64_t nblocks, int64_t bk, int64_t block_bytes, Unpack unpack) {
    alignas(64) uint8_t ub[8 * kChunkK];
    alignas(32) __m256i acc[kGemmBlockM * 8];
    const int64_t cb = kChunkK / bk;
    for (int64_t mb0 = 0; mb0 < a.M; mb0 += kGemmBlockM) {
        const int64_t mb = a.M - mb0 < kGemmBlockM ? a.M - mb0 : kGemmBlockM;
        const int8_t* x = a.xp + mb0 * a.ldxp;
        for (int64_t t = t0; t < t1; ++t) {
            const uint8_t* tile = w + t * s.tile_bytes;
            const int rows = int(s.N - t * kTileN < kTileN ? s.N - t * kTileN : kTileN);
            for (int64_t i = 0; i < mb * 8; ++i) acc[i] = _mm256_setzero_si256();
            for (int64_t b0 = 0; b0 < nblocks; b0 += cb) {
                const int64_t nb = nblocks - b0 < cb ? nblocks - b0 : cb;
                const int64_t L = nb * bk;
                unpack(tile, b0, nb, ub, L);
                if (b0 + nb < nblocks)
                    prefetch_chunk(tile + (b0 + nb) * block_bytes, cb < nblocks - b0 - nb ? cb : nblocks - b0 - nb, block_bytes);
                else if (t + 1 < t1)
                    prefetch_chunk(tile + s.tile_bytes, cb < nblocks ? cb : nblocks, block_bytes);
                gemm_chunk(x + b0 * bk, a.ldxp, mb, ub, L, rows, acc);
            }
            for (int64_t m = 0; m < mb; ++m)
                store_rows(out + (mb0 + m) * ldo + t * kTileN,
                           _mm256_sub_epi32(hsum8(acc + m * 8), _mm256_set1_epi32(a.xsum[mb0 + m])), rows);
        }
    }
}

void gemm_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    gemm_tiles(a, w, s, out, ldo, t0, t1, s.nfull, kI2BlockK, kI2TileBlockBytes, unpack_i2);
}

void gemm_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    const int64_t nblocks = s.nfull + (s.tail_bytes ? 1 : 0);
    gemm_tiles(a, w, s, out, ldo, t0, t1, nblocks, kB3BlockK, kB3TileBlockBytes,
               [&s](const uint8_t* tile, int64_t b0, int64_t nb, uint8_t* ub, int64_t L) {
                   alignas(32) uint8_t tailbuf[8 * 32];
                   for (int64_t b = 0; b < nb; ++b) {
                       const int64_t blk = b0 + b;
                       if (blk < s.nfull) {
                           unpack_b3_block(tile + blk * kB3TileBlockBytes, ub + b * kB3BlockK, L);
                       } else {
                           b3_tail_copy(tile, s, tailbuf);
                           unpack_b3_block(tailbuf, ub + b * kB3BlockK, L);
                       }
                   }
               });
}

void range_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
              int64_t t1) {
    (a.M >= kGemmMinM ? gemm_i2 : gemv_i2)(a, w, s, out, ldo, t0, t1);
}

void range_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
              int64_t t1) {
    (a.M >= kGemmMinMBase3 ? gemm_b3 : gemv_b3)(a, w, s, out, ldo, t0, t1);
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
