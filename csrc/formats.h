// Packed ternary weight layouts shared by every kernel. Mirrors src/bitnet158/formats/*.py.
//
// A weight matrix W is [N, K] (N output rows, K inputs), values in {-1, 0, +1}; its one fp32
// scale per tensor travels beside the bytes, never inside them. i2 and base3 group rows in tiles
// of kTileN = 8 consecutive output rows (N zero-padded to a multiple of 8); inside a tile the
// bytes run K-block by K-block with the 8 rows of one block adjacent, so a GEMV reads each tile
// as one forward stream and loads each block of activations once for 8 rows. lut2 uses tiles of
// 64 rows (see below); WShape::tile_rows says which.
//
//   i2    : file = [N/8 tiles][K/128 blocks][8 rows] I2Block          (K zero-padded to 128)
//   base3 : file = [N/8 tiles]{ [K/160 blocks][8 rows] B3Block, [8 rows][tb bytes] tail }
//   lut2  : file = [N/64 tiles][K/2 pairs] Lut2Pair                     (N padded to 64, K to 2)
//
// Everything one format is lives in its section below: the block struct, its geometry
// (<fmt>_shape) and, where the kernels read activations in another order than x, how one row of
// x is laid out for them. kFormats (the end of this file) is the one table, indexed by Format,
// that the dispatcher and the bindings read; a new format is an enum value, a section, a row
// there, and a kernel row in each ISA table that implements it (kernels.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace bn158 {

constexpr int kTileN = 8;  // output rows per tile (i2, base3)

enum class Format : int { I2 = 0, Base3 = 1, Lut2 = 2 };
constexpr int kNumFormats = 3;

// Geometry of one packed matrix, from its format's <fmt>_shape(N, K).
struct WShape {
    int64_t N, K;
    int64_t ntiles;      // ceil(N / tile_rows)
    int64_t tile_rows;   // kTileN (8), or kLut2TileN (64) for lut2
    int64_t nfull;       // full K-blocks per row; lut2: K-pairs, ceil(K / 2)
    int64_t rem;         // base3: weights in the tail (K % 160); i2, lut2: 0 (K padded instead)
    int64_t tail_bytes;  // base3: bytes per row in the tail; i2, lut2: 0
    int64_t tile_bytes;  // bytes of one tile
    int64_t kp;          // length of a prepared activation row (see Act, kernels.h)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The fields every format fills the same way; the format's shape function sets the rest.
inline WShape tiled_shape(int64_t N, int64_t K, int64_t tile_rows) {
    WShape s{};
    s.N = N;
    s.K = K;
    s.tile_rows = tile_rows;
    s.ntiles = ceil_div(N, tile_rows);
    return s;
}

// One activation row for the kernels: xp (kp bytes, zero on entry) gets x in natural order, so
// K padded to whole blocks reads zeros. Every format whose kernels read x as it is uses this.
inline void x_row_natural(const int8_t* x, const WShape& s, int8_t* xp) { std::memcpy(xp, x, size_t(s.K)); }

// ---- i2: 2 bits per weight --------------------------------------------------------------------
// 128 weights of one row. Byte j holds weight k = 32*n + j of the block in bits 2n..2n+1
// (n = 0..3, lowest bits first) as the field u = w + 1 in {0, 1, 2}; 3 is invalid.
// (bytes >> 2n) & 3 yields 32 consecutive unsigned codes aligned with 32 consecutive activations.
constexpr int kI2BlockK = 128;
struct I2Block {
    uint8_t qs[32];
};
static_assert(sizeof(I2Block) == 32, "i2 block is 32 bytes");
static_assert(sizeof(I2Block) * 8 == 2 * kI2BlockK, "i2 is exactly 2 bits per weight");
constexpr int64_t kI2TileBlockBytes = kTileN * sizeof(I2Block);  // 256: one K-block of a tile
static_assert(kI2TileBlockBytes == 256, "4 cache lines per tile block");

inline WShape i2_shape(int64_t N, int64_t K) {
    WShape s = tiled_shape(N, K, kTileN);
    s.nfull = ceil_div(K, kI2BlockK);
    s.tile_bytes = s.nfull * kI2TileBlockBytes;
    s.kp = s.nfull * kI2BlockK;
    return s;
}

// ---- base3: 5 trits per byte, 1.6 bits per weight ----------------------------------------------
// 160 weights of one row. Byte j holds weights k = 32*n + j (n = 0..4) as trits t = w + 1:
// q = t0*81 + t1*27 + t2*9 + t3*3 + t4 (t0 most significant), byte = ceil(q*256/243) (TQ1_0
// values). Decode: trit n = (3 * (byte * 3^n mod 256)) >> 8. The last K % 160 weights form a tail of
// tb = ceil((K % 160) / 5) bytes per row, byte j holding k = tb*n + j, stored after the full blocks.
constexpr int kB3BlockK = 160;
struct B3Block {
    uint8_t qs[32];
};
static_assert(sizeof(B3Block) == 32, "base3 block is 32 bytes");
static_assert(sizeof(B3Block) * 8 * 5 == 8 * kB3BlockK, "base3 is exactly 1.6 bits per weight (8/5)");
constexpr int64_t kB3TileBlockBytes = kTileN * sizeof(B3Block);  // 256

inline WShape base3_shape(int64_t N, int64_t K) {
    WShape s = tiled_shape(N, K, kTileN);
    s.nfull = K / kB3BlockK;
    s.rem = K % kB3BlockK;
    s.tail_bytes = ceil_div(s.rem, 5);
    s.tile_bytes = s.nfull * kB3TileBlockBytes + kTileN * s.tail_bytes;
    s.kp = (s.nfull + (s.rem ? 1 : 0)) * kB3BlockK;
    return s;
}

// The tail's activations are permuted to the tail's byte order, xp[k0 + 32n + j] = x[k0 + tb*n + j]
// (k0 = nfull*160), so the kernels read the tail like one more full block (zeros past K).
inline void base3_x_row(const int8_t* x, const WShape& s, int8_t* xp) {
    const int64_t k0 = s.nfull * kB3BlockK, tb = s.tail_bytes;
    std::memcpy(xp, x, size_t(k0));
    for (int64_t n = 0; n < 5; ++n)
        for (int64_t j = 0; j < tb; ++j)
            if (tb * n + j < s.rem) xp[k0 + 32 * n + j] = x[k0 + tb * n + j];
}

// ---- lut2: 2 bits per weight, for the multiplication-free lookup-table kernel (T-MAC / TL1) ----
// Weights go in pairs along K: (w0, w1) = (W[n, 2p], W[n, 2p+1]) becomes the nibble
// idx = 3*(w0+1) + (w1+1) in 0..8 (zero weights = 4; 9..15 are invalid: Python's unpack rejects
// them and every kernel reads them as (0, 0), so all paths agree even on corrupt bytes). A tile is
// 64 rows (N zero-padded to 64, K to even) and one 32-byte Lut2Pair holds ONE K-pair of all 64
// rows: byte j = idx(row j) | idx(row 32 + j) << 4. File = [N/64 tiles][K/2 pairs][32 bytes].
// Why: vpshufb looks up 32 lanes in one 16-entry table, and the table depends only on the two
// activations of the pair; so the kernel builds the 9 sums (t0-1)*x0 + (t1-1)*x1 once per pair
// and one load + two nibble masks + four vpshufb (low/high byte tables) give that pair's
// contribution to 64 output rows, with no multiply. Each tile is one forward stream of
// 32 * K/2 bytes.
constexpr int kLut2TileN = 64;  // output rows per lut2 tile
struct Lut2Pair {
    uint8_t idx[32];  // low nibble: row j, high nibble: row 32 + j
};
static_assert(sizeof(Lut2Pair) == 32, "lut2 pair record is one 32-byte vector");
static_assert(sizeof(Lut2Pair) * 8 == 2 * 2 * kLut2TileN, "lut2 is exactly 2 bits per weight");
constexpr uint8_t kLut2Zero = 4;  // idx of (0, 0): the padding nibble

inline WShape lut2_shape(int64_t N, int64_t K) {
    WShape s = tiled_shape(N, K, kLut2TileN);
    s.nfull = ceil_div(K, 2);
    s.tile_bytes = s.nfull * int64_t(sizeof(Lut2Pair));
    s.kp = 2 * s.nfull;
    return s;
}

// ---- the format table ---------------------------------------------------------------------------
struct FormatSpec {
    Format id;         // its index in kFormats (checked below)
    const char* name;  // as registered in bitnet158.formats.FORMATS
    WShape (*shape)(int64_t N, int64_t K);
    // Lays out one activation row as the kernels read it (Act::xp): kp bytes, zero on entry.
    void (*x_row)(const int8_t* x, const WShape& s, int8_t* xp);
};

inline constexpr FormatSpec kFormats[kNumFormats] = {
    {Format::I2, "i2", i2_shape, x_row_natural},
    {Format::Base3, "base3", base3_shape, base3_x_row},
    {Format::Lut2, "lut2", lut2_shape, x_row_natural},
};

constexpr bool formats_in_enum_order() {
    for (int i = 0; i < kNumFormats; ++i)
        if (int(kFormats[i].id) != i || !kFormats[i].name) return false;
    return true;
}
static_assert(formats_in_enum_order(), "kFormats has one row per Format, in enum order");

inline const FormatSpec& format_spec(Format f) { return kFormats[int(f)]; }
inline WShape make_shape(Format f, int64_t N, int64_t K) { return format_spec(f).shape(N, K); }
inline int64_t packed_nbytes(Format f, int64_t N, int64_t K) {
    const WShape s = make_shape(f, N, K);
    return s.ntiles * s.tile_bytes;
}

inline int format_index(const char* name) {  // position in kFormats, or -1
    for (int i = 0; i < kNumFormats; ++i)
        if (!std::strcmp(name, kFormats[i].name)) return i;
    return -1;
}

}  // namespace bn158
