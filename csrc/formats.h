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
#pragma once
#include <cstddef>
#include <cstdint>

namespace bn158 {

constexpr int kTileN = 8;  // output rows per tile

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

enum class Format : int { I2 = 0, Base3 = 1, Lut2 = 2 };

// Geometry of one packed matrix; filled by make_shape() (ternary_dispatch.cpp).
struct WShape {
    Format fmt;
    int64_t N, K;
    int64_t ntiles;      // ceil(N / tile_rows)
    int64_t tile_rows;   // kTileN (8), or kLut2TileN (64) for lut2
    int64_t nfull;       // full K-blocks per row; lut2: K-pairs, ceil(K / 2)
    int64_t rem;         // base3: weights in the tail (K % 160); i2, lut2: 0 (K padded instead)
    int64_t tail_bytes;  // base3: bytes per row in the tail; i2, lut2: 0
    int64_t tile_bytes;  // bytes of one tile
    int64_t kp;          // length of a prepared activation row (see Act)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline WShape make_shape(Format fmt, int64_t N, int64_t K) {
    WShape s{};
    s.fmt = fmt;
    s.N = N;
    s.K = K;
    s.tile_rows = fmt == Format::Lut2 ? kLut2TileN : kTileN;
    s.ntiles = ceil_div(N, s.tile_rows);
    if (fmt == Format::Lut2) {
        s.nfull = ceil_div(K, 2);
        s.rem = 0;
        s.tail_bytes = 0;
        s.tile_bytes = s.nfull * int64_t(sizeof(Lut2Pair));
        s.kp = 2 * s.nfull;
    } else if (fmt == Format::I2) {
        s.nfull = ceil_div(K, kI2BlockK);
        s.rem = 0;
        s.tail_bytes = 0;
        s.tile_bytes = s.nfull * kI2TileBlockBytes;
        s.kp = s.nfull * kI2BlockK;
    } else {
        s.nfull = K / kB3BlockK;
        s.rem = K % kB3BlockK;
        s.tail_bytes = ceil_div(s.rem, 5);
        s.tile_bytes = s.nfull * kB3TileBlockBytes + kTileN * s.tail_bytes;
        s.kp = (s.nfull + (s.rem ? 1 : 0)) * kB3BlockK;
    }
    return s;
}

inline int64_t packed_nbytes(Format fmt, int64_t N, int64_t K) {
    const WShape s = make_shape(fmt, N, K);
    return s.ntiles * s.tile_bytes;
}

constexpr int kActPanelRows = 16;  // activation rows per Act::xv panel (one zmm of int32 lanes)

// Activations as the SIMD kernels want them. x: the caller's int8 [M, K] rows (stride ldx).
// xp: rows of length kp (stride ldxp) — x zero-padded to whole K-blocks; for a base3 tail, the
// tail's activations are permuted so xp[nfull*160 + 32n + j] = x[nfull*160 + tb*n + j]; the tail
// then reads like a full block. xsum[m] = sum_k x[m, k] (undoes the +1 offset of the codes).
struct Act {
    const int8_t* x;
    int64_t ldx;
    const int8_t* xp;
    int64_t ldxp;
    const int32_t* xsum;
    int64_t M;
    // Set only for a table with a `prep` step (the AVX-512 VNNI GEMM) and M >= its prep_min_m: x
    // re-laid for vpdpbusd, ceil(M/kActPanelRows) panels of [kp/4][kActPanelRows rows][4 bytes],
    // each byte x ^ 0x80 (x + 128, unsigned), panel p at xv + p * kActPanelRows * kp; rows past M
    // read as x = 0.
    const uint8_t* xv = nullptr;
};

// One kernel variant computes out[m, n] = sum_k x[m, k] * W[n, k] for the tiles [t0, t1).
using RangeFn = void (*)(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo,
                         int64_t t0, int64_t t1);

struct KernelTable {
    const char* name;
    RangeFn i2;
    RangeFn base3;
    RangeFn i2_lut;  // optional lookup-table variant (nullptr when absent)
    RangeFn lut2;    // lut2 format; nullptr: the dispatcher uses the AVX2 one (every SIMD path has AVX2)
    // Optional once-per-call activation step for i2/base3 with M >= prep_min_m: fills Act::xv
    // (ceil(M/kActPanelRows) * kActPanelRows * kp bytes, 64-byte aligned) before the tile ranges are split over threads.
    void (*prep)(const Act& a, const WShape& s, uint8_t* xv) = nullptr;
    int64_t prep_min_m = 0;
};

extern const KernelTable kScalarTable;
extern const KernelTable kAvx2Table;
extern const KernelTable kAvx512Table;

// ternary_lut_avx2.cpp: the lut2 lookup-table kernel (needs AVX2).
void lut2_range_avx2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                     int64_t t1);

// cpu_features.cpp
struct CpuFeatures {
    bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false;
    bool os_avx = false, os_avx512 = false;
};
const CpuFeatures& cpu_features();
bool path_supported(const char* name);  // "scalar" | "avx2" | "avx512vnni"
const char* best_path();

}  // namespace bn158
