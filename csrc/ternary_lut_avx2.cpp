// AVX2 lookup-table kernel for the lut2 format (T-MAC / bitnet.cpp TL1 style): no multiplies.
//
// For one activation row and one K-pair (x0, x1), the pair's contribution to any output row is
// one of 9 values v(idx) = (t0-1)*x0 + (t1-1)*x1, idx = 3*t0 + t1 (formats.h). v lies in
// [-256, 256], so it is split into two byte tables: lo = v & 0xFF (unsigned) and hi = v >> 8
// (in {-1, 0, 1}), v = lo + 256*hi. A lut2 record holds the nibbles of one pair for 64 rows, so
// per pair: one 32-byte load, two nibble masks, four vpshufb (lo/hi table × low/high nibbles).
//
// Accumulation without widening every step (per 32-row vector, bytes j = rows j):
//   aw += lo as 16-bit words  (= Σlo[2i] + 256·Σlo[2i+1], mod 2^16)
//   ao += lo >> 8 per word    (= Σlo[2i+1], exact: <= 255·127)
//   ah += hi as bytes         (= Σhi[j], exact in int8: |Σ| <= 127)
// After at most kBlockPairs = 127 pairs the row sums |Σv| <= 127·256 = 32512 still fit int16, so
//   even rows: aw - ((ao - ah) << 8)   odd rows: ao + (ah & 0xFF00)      (all mod 2^16)
// are exact; shifts widen them to int32. Inner loop: loads, and, shifts, vpshufb, adds.
// (Interleaving lo/hi into int16 with vpunpck{l,h}bw every pair is the textbook form; it puts 8
// instead of 4 shuffle-port ops on each pair and measured ~8% slower on Zen 3.)
//
// Tables for a chunk of kChunkPairs pairs (16 KiB) are built once per activation row and reused
// by every tile of the thread's range, so at M = 1 they stay in L1 beside the streamed weights.
// For M > 1, up to kRowGroup rows are handled per pass, each tile chunk read once for all of them.
//
// Compiled for AVX2 with `#pragma GCC target`; no standard-library templates (they could leak AVX2
// code into other paths through inline-function merging).
#if defined(__x86_64__) || defined(_M_X64)  // x86-64 builds only (an arm64 build holds the NEON files)
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2")

namespace bn158 {
namespace {

constexpr int64_t kBlockPairs = 127;  // int8 Σhi and int16 row sums stay exact up to here
constexpr int64_t kChunkPairs = 512;  // 512 pairs × 32 B of tables = 16 KiB (L1)
constexpr int64_t kRowGroup = 4;      // activation rows sharing one pass over the weights (M > 1)
constexpr int kPairBytes = int(sizeof(Lut2Pair));

inline __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i bcast16(const uint8_t* p) {  // one 16-byte table in both 128-bit lanes (vpshufb is per lane)
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
}

// tab[32p .. 32p+15] = lo bytes, tab[32p+16 .. 32p+31] = hi bytes of v(idx), idx 0..15 (9..15: 0),
// for pairs [0, np) of x (x zero-padded to even length by the dispatcher).
void build_tables(const int8_t* x, int64_t np, uint8_t* tab) {
    // (t0-1) and (t1-1) for idx = 0..15; vpsignw by 0 gives 0, so invalid idx read as (0, 0).
    const __m256i s0 = _mm256_setr_epi16(-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0);
    const __m256i s1 = _mm256_setr_epi16(-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0);
    // Per lane: even bytes (low halves of the int16 v) first, then odd bytes (high halves).
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t p = 0; p < np; ++p) {
        int16_t pair;
        __builtin_memcpy(&pair, x + 2 * p, 2);
        const __m256i xw = _mm256_set1_epi16(pair);                         // x0 | x1 << 8
        const __m256i x0 = _mm256_srai_epi16(_mm256_slli_epi16(xw, 8), 8);  // sign-extended x0
        const __m256i x1 = _mm256_srai_epi16(xw, 8);
        // vpsignw negates / keeps / zeroes: the 9 sums of ±x0 ±x1 without a multiply.
        __m256i v = _mm256_add_epi16(_mm256_sign_epi16(x0, s0), _mm256_sign_epi16(x1, s1));
        v = _mm256_shuffle_epi8(v, split);   // [lo 0-7, hi 0-7 | lo 8-15, hi 8-15]
        v = _mm256_permute4x64_epi64(v, 0xD8);  // [lo 0-15 | hi 0-15]
        _mm256_store_si256(reinterpret_cast<__m256i*>(tab + 32 * p), v);
    }
}

// The tile row held by res[i] = lane d = i % 8 of acc[i / 8]: acc[4g + q] lane d is row
// 32g + 4d + q (q: 0 = even low word, 1 = odd low word, 2 = even high word, 3 = odd high word).
inline int row_of(int i) { return 32 * (i / 32) + 4 * (i % 8) + (i / 8) % 4; }

// even/odd int16 sums of one 32-row vector → 4 int32 accumulators.
inline void flush(__m256i aw, __m256i ao, __m256i ah, __m256i* acc) {
    const __m256i e = _mm256_sub_epi16(aw, _mm256_slli_epi16(_mm256_sub_epi16(ao, ah), 8));
    const __m256i o = _mm256_add_epi16(ao, _mm256_and_si256(ah, _mm256_set1_epi16(int16_t(0xFF00))));
    acc[0] = _mm256_add_epi32(acc[0], _mm256_srai_epi32(_mm256_slli_epi32(e, 16), 16));
    acc[1] = _mm256_add_epi32(acc[1], _mm256_srai_epi32(_mm256_slli_epi32(o, 16), 16));
    acc[2] = _mm256_add_epi32(acc[2], _mm256_srai_epi32(e, 16));
    acc[3] = _mm256_add_epi32(acc[3], _mm256_srai_epi32(o, 16));
}

#ifndef BN158_LUT_PF
#define BN158_LUT_PF 1024
#endif
constexpr int64_t kPrefetchBytes = BN158_LUT_PF;

// acc[8] (+)= the sums over np pairs of one tile's records `wp` with tables `tab`.
inline void tile_pairs(const uint8_t* wp, const uint8_t* tab, int64_t np, __m256i acc[8]) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b0 = 0; b0 < np; b0 += kBlockPairs) {
        const int64_t nb = np - b0 < kBlockPairs ? np - b0 : kBlockPairs;
        __m256i aw0 = _mm256_setzero_si256(), ao0 = aw0, ah0 = aw0, aw1 = aw0, ao1 = aw0, ah1 = aw0;
        const uint8_t* w = wp + b0 * kPairBytes;
        const uint8_t* t = tab + b0 * 32;
#pragma GCC unroll 4
        for (int64_t i = 0; i < nb; ++i, w += kPairBytes, t += 32) {
            _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);  // out-run DRAM latency
            const __m256i q = ld(w);
            const __m256i tl = bcast16(t), th = bcast16(t + 16);
            const __m256i i0 = _mm256_and_si256(q, m4);                         // rows 0..31
            const __m256i i1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);   // rows 32..63
            const __m256i l0 = _mm256_shuffle_epi8(tl, i0), h0 = _mm256_shuffle_epi8(th, i0);
            const __m256i l1 = _mm256_shuffle_epi8(tl, i1), h1 = _mm256_shuffle_epi8(th, i1);
            aw0 = _mm256_add_epi16(aw0, l0);
            ao0 = _mm256_add_epi16(ao0, _mm256_srli_epi16(l0, 8));
            ah0 = _mm256_add_epi8(ah0, h0);
            aw1 = _mm256_add_epi16(aw1, l1);
            ao1 = _mm256_add_epi16(ao1, _mm256_srli_epi16(l1, 8));
            ah1 = _mm256_add_epi8(ah1, h1);
        }
        flush(aw0, ao0, ah0, acc);
        flush(aw1, ao1, ah1, acc + 4);
    }
}

}  // namespace

void lut2_range_avx2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                     int64_t t1) {
    alignas(32) uint8_t tab[kRowGroup][kChunkPairs * 32];
    alignas(32) int32_t res[kLut2TileN];
    const int64_t npairs = s.nfull, nch = (npairs + kChunkPairs - 1) / kChunkPairs;
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowGroup) {
        const int64_t mg = a.M - m0 < kRowGroup ? a.M - m0 : kRowGroup;
        for (int64_t c = 0; c < nch; ++c) {  // balanced chunks of <= kChunkPairs pairs
            const int64_t p0 = npairs * c / nch, np = npairs * (c + 1) / nch - p0;
            for (int64_t g = 0; g < mg; ++g) build_tables(a.xp + (m0 + g) * a.ldxp + 2 * p0, np, tab[g]);
            for (int64_t t = t0; t < t1; ++t) {
                const uint8_t* wt = w + t * s.tile_bytes + p0 * kPairBytes;
                const int64_t n0 = t * kLut2TileN;
                const int rows = int(s.N - n0 < kLut2TileN ? s.N - n0 : kLut2TileN);
                for (int64_t g = 0; g < mg; ++g) {  // the tile's chunk stays in L1 across the group
                    __m256i acc[8];
                    for (auto& v : acc) v = _mm256_setzero_si256();
                    tile_pairs(wt, tab[g], np, acc);
                    for (int i = 0; i < 8; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(res + 8 * i), acc[i]);
                    int32_t* o = out + (m0 + g) * ldo + n0;
                    for (int i = 0; i < kLut2TileN; ++i) {
                        const int r = row_of(i);
                        if (r < rows) o[r] = c == 0 ? res[i] : o[r] + res[i];
                    }
                }
            }
        }
    }
}

}  // namespace bn158

#pragma GCC pop_options

#endif  // x86-64
