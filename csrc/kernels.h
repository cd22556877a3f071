// What a ternary kernel is, and the per-ISA tables of them, indexed by Format.
//
// Each ISA's translation unit defines one KernelTable: a row per format it has its own kernel
// for. A row left empty borrows the next narrower ISA's of the same architecture (kIsaNarrower in
// cpu_features.h: a wider one's requirements include the narrower one's); the scalar table fills
// every row, so the chain always ends in a kernel. A build holds the tables of its own
// architecture only. The dispatcher (ternary_dispatch.cpp) reads only these tables.
#pragma once
#include <cstdint>

#include "cpu_features.h"
#include "formats.h"

namespace bn158 {

constexpr int kActPanelRows = 16;  // activation rows per Act::xv panel (one zmm of int32 lanes)

// Activations as the SIMD kernels want them. x: the caller's int8 [M, K] rows (stride ldx).
// xp: rows of length kp (stride ldxp), each laid out by the format's x_row (formats.h): x
// zero-padded to whole K-blocks, a base3 tail permuted to read like a full block.
// xsum[m] = sum_k x[m, k] (undoes the +1 offset of the codes).
struct Act {
    const int8_t* x;
    int64_t ldx;
    const int8_t* xp;
    int64_t ldxp;
    const int32_t* xsum;
    int64_t M;
    // Set only for a kernel row with a `prep` step (the AVX-512 VNNI GEMM) and M >= its prep_min_m:
    // x re-laid for vpdpbusd, ceil(M/kActPanelRows) panels of [kp/4][kActPanelRows rows][4 bytes],
    // each byte x ^ 0x80 (x + 128, unsigned), panel p at xv + p * kActPanelRows * kp; rows past M
    // read as x = 0.
    const uint8_t* xv = nullptr;
};

// One kernel variant computes out[m, n] = sum_k x[m, k] * W[n, k] for the tiles [t0, t1).
using RangeFn = void (*)(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo,
                         int64_t t0, int64_t t1);
// A once-per-call activation step: fills Act::xv (ceil(M/kActPanelRows) * kActPanelRows * kp
// bytes, 64-byte aligned) before the tile ranges are split over threads, so every range reuses it.
using PrepFn = void (*)(const Act& a, const WShape& s, uint8_t* xv);

struct KernelRow {
    RangeFn range = nullptr;  // nullptr: no kernel of this ISA's own for the format
    PrepFn prep = nullptr;    // optional, run when M >= prep_min_m
    int64_t prep_min_m = 0;
};

struct KernelTable {
    KernelRow row[kNumFormats] = {};  // indexed by Format

    // Builds a table one format at a time, by name, so rows cannot land under the wrong format.
    constexpr KernelTable with(Format f, KernelRow r) const {
        KernelTable t = *this;
        t.row[int(f)] = r;
        return t;
    }
    constexpr bool complete() const {
        for (const KernelRow& r : row)
            if (!r.range) return false;
        return true;
    }
};

// One per ISA, each in its own translation unit (compiled with that ISA's `#pragma GCC target`).
extern const KernelTable kScalarKernels;      // ternary_scalar.cpp
#if defined(BN158_X86)
extern const KernelTable kAvx2Kernels;        // ternary_avx2.cpp
extern const KernelTable kAvx512VnniKernels;  // ternary_avx512.cpp

// ternary_lut_avx2.cpp: the lut2 lookup-table kernel (needs AVX2).
void lut2_range_avx2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0,
                     int64_t t1);
#endif
#if defined(BN158_ARM64)
extern const KernelTable kNeonKernels;      // ternary_neon.cpp (baseline Advanced SIMD)
extern const KernelTable kNeonDotKernels;   // ternary_neon_dot.cpp (sdot)
extern const KernelTable kNeonI8mmKernels;  // ternary_neon_i8mm.cpp (smmla for M > 1)
#endif

}  // namespace bn158
