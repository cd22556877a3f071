#pragma once
#include <cstdint>

#include "cpu_features.h"

namespace bn158 {

// out[M, N] = x[M, K] · w[N, K]ᵀ in exact int32; w must lie in [-127, 127]. isa: the widest path
// to use (the caller checks the CPU supports it): AVX2 for M = 1 on both SIMD paths, AVX-512 VNNI
// for M > 1 where allowed; on arm64 the NEON kernel of that path. Blocks until done; threads from the shared pool.
void int8_matmul(Isa isa, const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out);

// int8_gemm_avx512.cpp: rows [n0, n1) of out with vpdpbusd; xsum[m] = Σ_k x[m, k].
void int8_rows_vnni(const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out, int64_t n0,
                    int64_t n1, const int32_t* xsum);

// int8_gemm_avx512.cpp, from kInt8PanelMinM rows when K % 4 == 0: x re-laid into 16-row panels
// (xv: ceil(M / 16) * 16 * K bytes, 64-byte aligned), then rows [n0, n1) of out from them (whole
// blocks of 8 rows; the rest as int8_rows_vnni does, from x and xsum).
constexpr int64_t kInt8PanelMinM = 6;  // 2B4T head, one core: M = 5 18 % faster on the blocks, M = 8 18 % here
void int8_prep_panels(const int8_t* x, int64_t M, int64_t K, uint8_t* xv);
void int8_panels_vnni(const uint8_t* xv, const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                      int32_t* out, int64_t n0, int64_t n1, const int32_t* xsum);

// int8_gemm_neon.cpp: rows [n0, n1) of out on an arm64 path (neon: smull/sadalp; dotprod: sdot;
// i8mm: smmla for M > 1, sdot for M = 1).
void int8_rows_neon(Isa isa, const int8_t* x, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* out,
                    int64_t n0, int64_t n1);

}  // namespace bn158
