// AVX-512 VNNI kernels: the structure of ternary_avx2.cpp with vpdpbusd (u8 × s8, 4 products
// summed straight into int32, no int16 stage, no saturation). GEMV: one 64-byte load covers two
// adjacent rows of a tile block (rows 2p, 2p+1), the 32 activations are broadcast to both halves,
// so 4 zmm accumulators hold 8 rows (i2 at M = 1). i2 at M >= 2 and base3 below kPanelMinM rows:
// the same blocks, unpacked or decoded once for 4 activation rows at a time (rows_by_four); i2
// runs at vpdpbusd's rate from M = 8 on. base3 from kPanelMinM rows (its trits cost more to
// decode, so once per tile for all rows pays there): an L1 unpack, then the panel kernel
// (panel_avx512.h).
// Selected only when cpuid + xgetbv report AVX512F/BW/VL/VNNI.
#if defined(__x86_64__) || defined(_M_X64)  // x86-64 builds only (an arm64 build holds the NEON files)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")
#include "panel_avx512.h"  // after the target: its inline functions are AVX-512 code

namespace bn158 {
namespace {

constexpr int64_t kChunkK = 1920;

inline __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m512i ld512(const void* p) { return _mm512_loadu_si512(p); }

inline __m256i hsum8(const __m256i v[8]) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// 4 zmm accumulators (row pairs) → the 8 row sums.
inline __m256i hsum_pairs(const __m512i acc[4]) {
    __m256i v[8];
    for (int p = 0; p < 4; ++p) {
        v[2 * p] = _mm512_extracti64x4_epi64(acc[p], 0);
        v[2 * p + 1] = _mm512_extracti64x4_epi64(acc[p], 1);
    }
    return hsum8(v);
}

inline void store_rows(int32_t* dst, __m256i v, int rows) {
    alignas(32) int32_t tmp[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), v);
    for (int r = 0; r < rows; ++r) dst[r] = tmp[r];
}

// GEMV software prefetch, as in ternary_avx2.cpp: all 4 lines of the tile block 8 blocks ahead.
inline void prefetch_block(const uint8_t* p) {
    const char* c = reinterpret_cast<const char*>(p) + 8 * 256;
    _mm_prefetch(c, _MM_HINT_T0);
    _mm_prefetch(c + 64, _MM_HINT_T0);
    _mm_prefetch(c + 128, _MM_HINT_T0);
    _mm_prefetch(c + 192, _MM_HINT_T0);
}

inline __m512i bcast(const int8_t* p) { return _mm512_broadcast_i64x4(ld(p)); }

// base3 trit of each byte (bytes XORed with 0x80): (c > -43) + (c > 42), via mask registers: 1
// where the first holds, then 2 where the second does too (it implies the first): 4 ops, not 5.
inline __m512i b3_trit512(__m512i c) {
    const __mmask64 k1 = _mm512_cmpgt_epi8_mask(c, _mm512_set1_epi8(-43));
    const __mmask64 k2 = _mm512_cmpgt_epi8_mask(c, _mm512_set1_epi8(42));
    return _mm512_mask_mov_epi8(_mm512_maskz_mov_epi8(k1, _mm512_set1_epi8(1)), k2, _mm512_set1_epi8(2));
}
inline __m512i times3_512(__m512i c) { return _mm512_add_epi8(c, _mm512_add_epi8(c, c)); }
inline __m256i b3_trit(__m256i c) {
    const __m256i c1 = _mm256_cmpgt_epi8(c, _mm256_set1_epi8(-43));
    const __m256i c2 = _mm256_cmpgt_epi8(c, _mm256_set1_epi8(42));
    return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), c1), c2);
}
inline __m256i times3(__m256i c) { return _mm256_add_epi8(c, _mm256_add_epi8(c, c)); }

inline void i2_block(const uint8_t* wb, const int8_t* xb, __m512i acc[4]) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i x0 = bcast(xb), x1 = bcast(xb + 32), x2 = bcast(xb + 64), x3 = bcast(xb + 96);
    for (int p = 0; p < 4; ++p) {
        const __m512i w = ld512(wb + 64 * p);
        acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_and_si512(w, m3), x0);
        acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_and_si512(_mm512_srli_epi16(w, 2), m3), x1);
        acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_and_si512(_mm512_srli_epi16(w, 4), m3), x2);
        acc[p] = _mm512_dpbusd_epi32(acc[p], _mm512_and_si512(_mm512_srli_epi16(w, 6), m3), x3);
    }
}

inline void b3_tail_copy(const uint8_t* tile, const WShape& s, uint8_t* dst) {
    std::memset(dst, 0, 8 * 32);
    const uint8_t* tail = tile + s.nfull * kB3TileBlockBytes;
    for (int r = 0; r < 8; ++r) std::memcpy(dst + 32 * r, tail + r * s.tail_bytes, size_t(s.tail_bytes));
}

// The GEMV reads a range's tiles as G contiguous parts in lockstep, one block of each in turn, as
// the AVX2 GEMV does (one stream leaves DRAM bandwidth unused: the prefetchers restart at every
// 4 KiB page). With vpdpbusd a tile needs only 4 zmm accumulators, so 4 streams keep all 16 in
// registers. Tiles left over when the range does not split evenly run as a single stream.
constexpr int kGemvStreams = 4;
constexpr int64_t kGemvMinTilesPerStream = 2;

template <int G>
void gemv_i2_lockstep(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo,
                      int64_t t0, int64_t per) {
    for (int64_t j = 0; j < per; ++j) {
        const uint8_t* tile[G];
        int64_t tid[G];
        for (int g = 0; g < G; ++g) {
            tid[g] = t0 + g * per + j;
            tile[g] = w + tid[g] * s.tile_bytes;
        }
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = a.xp + m * a.ldxp;
            const bool fetch = m == 0;  // later rows find the tiles in cache
            __m512i acc[G][4];
#pragma GCC unroll 4
            for (int g = 0; g < G; ++g)
                for (auto& v : acc[g]) v = _mm512_setzero_si512();
            for (int64_t kb = 0; kb < s.nfull; ++kb) {
#pragma GCC unroll 4
                for (int g = 0; g < G; ++g) {
                    if (fetch) prefetch_block(tile[g] + kb * kI2TileBlockBytes);
                    i2_block(tile[g] + kb * kI2TileBlockBytes, x + kb * kI2BlockK, acc[g]);
                }
            }
            for (int g = 0; g < G; ++g) {
                const int rows = int(s.N - tid[g] * kTileN < kTileN ? s.N - tid[g] * kTileN : kTileN);
                store_rows(out + m * ldo + tid[g] * kTileN,
                           _mm256_sub_epi32(hsum_pairs(acc[g]), _mm256_set1_epi32(a.xsum[m])), rows);
            }
        }
    }
}

void gemv_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    int64_t done = t0;
    if (t1 - t0 >= kGemvStreams * kGemvMinTilesPerStream) {
        const int64_t per = (t1 - t0) / kGemvStreams;
        gemv_i2_lockstep<kGemvStreams>(a, w, s, out, ldo, t0, per);
        done = t0 + kGemvStreams * per;
    }
    for (int64_t t = done; t < t1; ++t) gemv_i2_lockstep<1>(a, w, s, out, ldo, t, 1);
}

// i2 for M >= 2, base3 below kPanelMinM rows (a speculative verify, sequences decoding together, a
// prefill chunk; base3 at M = 1 too): each tile block is loaded and unpacked (i2) or decoded
// (base3) once for up to 4 activation rows, where a GEMV runs the whole tile again per row. On one
// core the i2 GEMV is bound by vector ops (11 per 64 bytes, 7 of them the unpacking), base3's by
// its trits (7 ops a trit per 64 bytes, 5 trits); the 4×2 ymm micro-kernel this replaced spent as
// much on horizontal sums. A format's block loop adds one tile's products into acc[m][row pair].
struct I2Tile {
    static void prepare(const uint8_t*, const WShape&, uint8_t*) {}

    template <int MR>
    static void accumulate(const Act& a, int64_t m0, const uint8_t* tile, const uint8_t*, const WShape& s,
                           bool fetch, __m512i acc[MR][4]) {
        const __m512i m3 = _mm512_set1_epi8(3);
        for (int64_t kb = 0; kb < s.nfull; ++kb) {
            const uint8_t* wb = tile + kb * kI2TileBlockBytes;
            if (fetch) prefetch_block(wb);
#pragma GCC unroll 4
            for (int f = 0; f < 4; ++f) {  // field f of every byte: k = 32 f + byte
                __m512i xf[MR];
#pragma GCC unroll 4
                for (int m = 0; m < MR; ++m) xf[m] = bcast(a.xp + (m0 + m) * a.ldxp + kb * kI2BlockK + 32 * f);
#pragma GCC unroll 4
                for (int p = 0; p < 4; ++p) {
                    const __m512i code = _mm512_and_si512(_mm512_srli_epi16(ld512(wb + 64 * p), 2 * f), m3);
#pragma GCC unroll 4
                    for (int m = 0; m < MR; ++m) acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], code, xf[m]);
                }
            }
        }
    }
};

struct B3Tile {
    // the tile's tail (K not whole blocks) as a whole zero-padded block
    static void prepare(const uint8_t* tile, const WShape& s, uint8_t* tailbuf) {
        if (s.tail_bytes) b3_tail_copy(tile, s, tailbuf);
    }

    template <int MR>
    static void block(const uint8_t* wb, const int8_t* const xr[MR], __m512i acc[MR][4]) {
        const __m512i k80 = _mm512_set1_epi8(char(0x80));
        __m512i c[4];
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) c[p] = _mm512_xor_si512(ld512(wb + 64 * p), k80);
#pragma GCC unroll 5
        for (int n = 0; n < 5; ++n) {
            __m512i xn[MR];
#pragma GCC unroll 4
            for (int m = 0; m < MR; ++m) xn[m] = bcast(xr[m] + 32 * n);
#pragma GCC unroll 4
            for (int p = 0; p < 4; ++p) {
                const __m512i trit = b3_trit512(c[p]);
#pragma GCC unroll 4
                for (int m = 0; m < MR; ++m) acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], trit, xn[m]);
                c[p] = times3_512(c[p]);
            }
        }
    }

    template <int MR>
    static void accumulate(const Act& a, int64_t m0, const uint8_t* tile, const uint8_t* tailbuf, const WShape& s,
                           bool fetch, __m512i acc[MR][4]) {
        const int8_t* xr[MR];
        for (int64_t kb = 0; kb < s.nfull; ++kb) {
            if (fetch) prefetch_block(tile + kb * kB3TileBlockBytes);
            for (int m = 0; m < MR; ++m) xr[m] = a.xp + (m0 + m) * a.ldxp + kb * kB3BlockK;
            block<MR>(tile + kb * kB3TileBlockBytes, xr, acc);
        }
        if (s.tail_bytes) {
            for (int m = 0; m < MR; ++m) xr[m] = a.xp + (m0 + m) * a.ldxp + s.nfull * kB3BlockK;
            block<MR>(tailbuf, xr, acc);
        }
    }
};

template <class Tile, int MR>
void tile_rows(const Act& a, int64_t m0, const uint8_t* tile, const uint8_t* tailbuf, const WShape& s, bool fetch,
               __m256i sums[MR]) {
    __m512i acc[MR][4];
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) acc[m][p] = _mm512_setzero_si512();
    Tile::template accumulate<MR>(a, m0, tile, tailbuf, s, fetch, acc);
    for (int m = 0; m < MR; ++m) sums[m] = _mm256_sub_epi32(hsum_pairs(acc[m]), _mm256_set1_epi32(a.xsum[m0 + m]));
}

template <class Tile>
void rows_by_four(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                  int64_t t1) {
    alignas(64) uint8_t tailbuf[8 * 32];
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = int(s.N - t * kTileN < kTileN ? s.N - t * kTileN : kTileN);
        Tile::prepare(tile, s, tailbuf);
        for (int64_t m0 = 0; m0 < a.M; m0 += 4) {  // later groups find the tile in L1
            __m256i sums[4];
            const bool fetch = m0 == 0;
            switch (a.M - m0 < 4 ? a.M - m0 : 4) {
                case 4: tile_rows<Tile, 4>(a, m0, tile, tailbuf, s, fetch, sums); break;
                case 3: tile_rows<Tile, 3>(a, m0, tile, tailbuf, s, fetch, sums); break;
                case 2: tile_rows<Tile, 2>(a, m0, tile, tailbuf, s, fetch, sums); break;
                default: tile_rows<Tile, 1>(a, m0, tile, tailbuf, s, fetch, sums); break;
            }
            for (int64_t m = m0; m < a.M && m < m0 + 4; ++m) store_rows(out + m * ldo + t * kTileN, sums[m - m0], rows);
        }
    }
}

inline void unpack_b3_block(const uint8_t* wb, uint8_t* d0, int64_t L) {
    const __m256i k80 = _mm256_set1_epi8(char(0x80));
    for (int r = 0; r < 8; ++r) {
        __m256i c = _mm256_xor_si256(ld(wb + 32 * r), k80);
        for (int n = 0; n < 5; ++n) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(d0 + r * L + 32 * n), b3_trit(c));
            c = times3(c);
        }
    }
}

// ---------------------------------------------------------------- GEMM in 16-row activation panels
// For M >= kPanelMinM the dispatcher first re-lays x (prep_panels) as panel_avx512.h describes and
// the unpacked codes u = w + 1 play the weights there, so
//   sum_k (x_k + 128) u_k = sum_k x_k w_k + sum_k x_k + 128 sum_k u_k
// and out = acc - xsum[m] - 128 usum[r], with usum over the same padded k the products ran over
// (padding meets x = 0, so it cancels exactly).
// Crossover with rows_by_four<B3Tile>, 2B4T shapes on one Zen 4 core: at M = 16 the panels 117-131 GMAC/s,
// the 4-row kernel 107-122; at M = 8 it makes 100-122, the panels (16 lanes, half idle) far less.
constexpr int64_t kPanelMinM = 16;
constexpr int kPanelRows = kActPanelRows;
static_assert(kPanelRows == panel::kRows, "Act::xv panels are the panel kernel's");

void prep_panels(const Act& a, const WShape& s, uint8_t* xv) {
    const int64_t groups = s.kp / 4, panels = ceil_div(a.M, kPanelRows);
    const __m512i k80 = _mm512_set1_epi8(char(0x80));
    const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(int32_t(a.ldxp)));
    for (int64_t p = 0; p < panels; ++p) {
        const int64_t live_rows = a.M - p * kPanelRows < kPanelRows ? a.M - p * kPanelRows : kPanelRows;
        const __mmask16 live = __mmask16((1u << live_rows) - 1);  // rows past M gather 0 → x = 0
        const int8_t* base = a.xp + p * kPanelRows * a.ldxp;
        uint8_t* dst = xv + p * kPanelRows * s.kp;
        for (int64_t g = 0; g < groups; ++g) {
            const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs, base + 4 * g, 1);
            _mm512_store_si512(dst + 64 * g, _mm512_xor_si512(v, k80));
        }
    }
}

// sub[r] = 128 × the sum of the L unpacked codes of tile row r.
inline void code_row_sums(const uint8_t* ub, int64_t L, int32_t sub[8]) {
    for (int r = 0; r < 8; ++r) {
        __m256i acc = _mm256_setzero_si256();
        for (int64_t k = 0; k < L; k += 32) acc = _mm256_add_epi64(acc, _mm256_sad_epu8(ld(ub + r * L + k), _mm256_setzero_si256()));
        const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        sub[r] = 128 * int32_t(_mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1));
    }
}

// C[m, tile rows] (+)= codes · x over one K-chunk [k0, k0 + L), every panel of x.
void panel_chunk(const Act& a, const uint8_t* ub, int64_t L, int64_t k0, bool first, int32_t* out, int64_t ldo,
                 int64_t n0, int rows) {
    int32_t sub[8];
    code_row_sums(ub, L, sub);
    const uint8_t* xv = a.xv + kPanelRows * k0;  // k-group k0 / 4, 64 bytes each
    panel::all_panels(xv, a.M, kPanelRows * a.ldxp, ub, L, sub, first ? a.xsum : nullptr, !first, out + n0, ldo, rows);
}

void gemm_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
             int64_t t1) {
    alignas(64) uint8_t ub[8 * kChunkK];
    alignas(64) uint8_t tailbuf[8 * 32];
    constexpr int64_t cb = kChunkK / kB3BlockK;
    const int64_t nblocks = s.nfull + (s.tail_bytes ? 1 : 0);
    for (int64_t t = t0; t < t1; ++t) {
        const uint8_t* tile = w + t * s.tile_bytes;
        const int rows = int(s.N - t * kTileN < kTileN ? s.N - t * kTileN : kTileN);
        for (int64_t b0 = 0; b0 < nblocks; b0 += cb) {
            const int64_t nb = nblocks - b0 < cb ? nblocks - b0 : cb;
            const int64_t L = nb * kB3BlockK;
            for (int64_t b = 0; b < nb; ++b) {
                if (b0 + b < s.nfull) {
                    unpack_b3_block(tile + (b0 + b) * kB3TileBlockBytes, ub + b * kB3BlockK, L);
                } else {
                    b3_tail_copy(tile, s, tailbuf);
                    unpack_b3_block(tailbuf, ub + b * kB3BlockK, L);
                }
            }
            panel_chunk(a, ub, L, b0 * kB3BlockK, b0 == 0, out, ldo, t * kTileN, rows);
        }
    }
}

void range_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
              int64_t t1) {
    (a.M == 1 ? gemv_i2 : rows_by_four<I2Tile>)(a, w, s, out, ldo, t0, t1);
}

void range_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
              int64_t t1) {
    (a.M < kPanelMinM ? rows_by_four<B3Tile> : gemm_b3)(a, w, s, out, ldo, t0, t1);
}

}  // namespace
}  // namespace bn158

#pragma GCC pop_options

namespace bn158 {
// No lut2 row: there is no AVX-512 lookup-table kernel, so the AVX2 one runs (this path implies AVX2).
const KernelTable kAvx512VnniKernels = KernelTable{}
                                           .with(Format::I2, {range_i2})
                                           .with(Format::Base3, {range_b3, prep_panels, kPanelMinM});
}

#endif  // x86-64
