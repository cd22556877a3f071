// Portable C++ kernels: the fallback on CPUs without AVX2 and the oracle every SIMD path must
// match exactly. Written straight from the layout in formats.h: each weight is decoded from its
// bytes by the documented formula into w in {-1, 0, 1} and multiplied with the caller's original
// activations x (not the padded/permuted copy, not the sum-offset trick the SIMD paths use).
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace bn158 {
namespace {

// Decode one tile (8 rows) to int8 weights wt[r * K + k], natural order, no padding.
void decode_tile_i2(const uint8_t* tile, const WShape& s, int8_t* wt) {
    for (int64_t kb = 0; kb < s.nfull; ++kb) {
        const uint8_t* blk = tile + kb * kI2TileBlockBytes;
        for (int r = 0; r < kTileN; ++r) {
            for (int j = 0; j < 32; ++j) {
                const unsigned byte = blk[r * 32 + j];
                for (int n = 0; n < 4; ++n) {
                    const int64_t k = kb * kI2BlockK + 32 * n + j;
                    if (k < s.K) wt[r * s.K + k] = int8_t(int((byte >> (2 * n)) & 3u) - 1);
                }
            }
        }
    }
}

inline int trit(unsigned byte, int n) {  // trit n (0 = most significant) of a base3 byte
    unsigned v = byte;
    for (int i = 0; i < n; ++i) v = (v * 3u) & 0xFFu;
    return int((v * 3u) >> 8);
}

void decode_tile_b3(const uint8_t* tile, const WShape& s, int8_t* wt) {
    for (int64_t kb = 0; kb < s.nfull; ++kb) {
        const uint8_t* blk = tile + kb * kB3TileBlockBytes;
        for (int r = 0; r < kTileN; ++r)
            for (int j = 0; j < 32; ++j)
                for (int n = 0; n < 5; ++n)
                    wt[r * s.K + kb * kB3BlockK + 32 * n + j] = int8_t(trit(blk[r * 32 + j], n) - 1);
    }
    if (s.tail_bytes) {
        const uint8_t* tail = tile + s.nfull * kB3TileBlockBytes;
        const int64_t tb = s.tail_bytes, k0 = s.nfull * kB3BlockK;
        for (int r = 0; r < kTileN; ++r)
            for (int64_t j = 0; j < tb; ++j)
                for (int n = 0; n < 5; ++n) {
                    const int64_t k = tb * n + j;
                    if (k < s.rem) wt[r * s.K + k0 + k] = int8_t(trit(tail[r * tb + j], n) - 1);
                }
    }
}

// lut2: pair p of tile row r is nibble (r / 32) of byte 32*p + r % 32; idx = 3*(w0+1) + (w1+1).
// Invalid nibbles 9..15 decode as (0, 0), like the zero entries of the SIMD lookup tables.
void decode_tile_lut2(const uint8_t* tile, const WShape& s, int8_t* wt) {
    for (int64_t p = 0; p < s.nfull; ++p) {
        const uint8_t* rec = tile + p * int64_t(sizeof(Lut2Pair));
        for (int r = 0; r < kLut2TileN; ++r) {
            const unsigned idx = (rec[r % 32] >> (4 * (r / 32))) & 15u;
            const int w0 = idx < 9 ? int(idx / 3) - 1 : 0, w1 = idx < 9 ? int(idx % 3) - 1 : 0;
            wt[r * s.K + 2 * p] = int8_t(w0);
            if (2 * p + 1 < s.K) wt[r * s.K + 2 * p + 1] = int8_t(w1);
        }
    }
}

template <void (*Decode)(const uint8_t*, const WShape&, int8_t*)>
void range_scalar(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                  int64_t t1) {
    const int64_t tn = s.tile_rows;
    std::vector<int8_t> wt(size_t(tn) * size_t(s.K));
    for (int64_t t = t0; t < t1; ++t) {
        Decode(w + t * s.tile_bytes, s, wt.data());
        const int rows = int(s.N - t * tn < tn ? s.N - t * tn : tn);
        for (int64_t m = 0; m < a.M; ++m) {
            const int8_t* x = a.x + m * a.ldx;
            for (int r = 0; r < rows; ++r) {
                const int8_t* wr = wt.data() + r * s.K;
                int32_t acc = 0;
                for (int64_t k = 0; k < s.K; ++k) acc += int32_t(x[k]) * int32_t(wr[k]);
                out[m * ldo + t * tn + r] = acc;
            }
        }
    }
}

}  // namespace

// The oracle decodes every format, so the walk down to narrower ISAs for a missing row (kernels.h)
// always ends in a kernel.
constexpr KernelTable kScalarRows = KernelTable{}
                                        .with(Format::I2, {range_scalar<decode_tile_i2>})
                                        .with(Format::Base3, {range_scalar<decode_tile_b3>})
                                        .with(Format::Lut2, {range_scalar<decode_tile_lut2>});
static_assert(kScalarRows.complete(), "the scalar path needs a kernel for every format");
const KernelTable kScalarKernels = kScalarRows;

}  // namespace bn158
