// The driver shared by every path: prepares activations once (row sums, zero-padded / permuted
// copy when K is not whole blocks), splits the row tiles (8 rows; 64 for lut2) across the thread
// pool, and calls the selected kernel table. Compiled for the baseline ISA.
#include "ternary_dispatch.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "threadpool.h"

namespace bn158 {

static const KernelTable* g_table = nullptr;

const KernelTable* table_by_name(const std::string& name) {
    if (name == "scalar") return &kScalarTable;
    if (name == "avx2") return &kAvx2Table;
    if (name == "avx512vnni") return &kAvx512Table;
    return nullptr;
}

const KernelTable& current_table() {
    if (!g_table) g_table = table_by_name(best_path());
    return *g_table;
}

void set_path(const std::string& name) {
    const KernelTable* t = table_by_name(name);
    if (!t) throw std::invalid_argument("unknown kernel path '" + name + "' (expected scalar, avx2 or avx512vnni)");
    if (!path_supported(name.c_str()))
        throw std::invalid_argument("kernel path '" + name + "' needs CPU features this machine lacks (best here: " +
                                    best_path() + ")");
    g_table = t;
}

void matmul(const KernelTable& kt, Format fmt, const int8_t* x, int64_t M, int64_t K, const uint8_t* w,
            int64_t N, int32_t* out, bool lut) {
    const WShape s = make_shape(fmt, N, K);
    thread_local std::vector<int32_t> xsum;
    thread_local std::vector<int8_t> xp;
    xsum.resize(size_t(M));
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* r = x + m * K;
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += r[k];
        xsum[size_t(m)] = acc;
    }
    Act a{x, K, x, K, xsum.data(), M};
    // K not whole blocks: zero-pad (and permute a base3 tail) into xp. The copy is also made when x
    // is off a cache-line boundary (numpy's arrays start 16 bytes in): the kernels' 32-byte loads
    // of x would straddle lines; a few KB per call.
    if (s.kp != K || (reinterpret_cast<uintptr_t>(x) & 63) != 0) {
        xp.assign(size_t(M * s.kp + 64), 0);
        int8_t* base = xp.data() + (-reinterpret_cast<uintptr_t>(xp.data()) & 63);
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* src = x + m * K;
            int8_t* dst = base + m * s.kp;
            if (fmt != Format::Base3) {  // i2, lut2: zeros after K
                std::memcpy(dst, src, size_t(K));
            } else {
                const int64_t k0 = s.nfull * kB3BlockK, tb = s.tail_bytes;
                std::memcpy(dst, src, size_t(k0));
                for (int64_t n = 0; n < 5; ++n)
                    for (int64_t j = 0; j < tb; ++j)
                        if (tb * n + j < s.rem) dst[k0 + 32 * n + j] = src[k0 + tb * n + j];
            }
        }
        a.xp = base;
        a.ldxp = s.kp;
    }
    // A table that wants x in its own GEMM layout gets it once here, not once per tile range.
    thread_local std::vector<uint8_t> xv;
    if (kt.prep && M >= kt.prep_min_m && fmt != Format::Lut2) {
        xv.resize(size_t(ceil_div(M, kActPanelRows) * kActPanelRows * s.kp + 64));
        uint8_t* base = xv.data() + (-reinterpret_cast<uintptr_t>(xv.data()) & 63);
        kt.prep(a, s, base);
        a.xv = base;
    }
    RangeFn fn = nullptr;
    switch (fmt) {
        case Format::I2: fn = lut && kt.i2_lut ? kt.i2_lut : kt.i2; break;
        case Format::Base3: fn = kt.base3; break;
        // A table without its own lut2 kernel is a SIMD one (avx2, avx512vnni): both imply AVX2.
        case Format::Lut2: fn = kt.lut2 ? kt.lut2 : lut2_range_avx2; break;
    }
    const int64_t chunks = pool_chunks(s.ntiles);
    if (chunks <= 1) {
        fn(a, w, s, out, N, 0, s.ntiles);
        return;
    }
    // Contiguous tile ranges, claimed in order and shrinking linearly (chunk c gets a share
    // proportional to chunks - c): the last ones are small, so threads finish together instead
    // of one waiting out the other's last equal share (+2.5-3.4 points of the read probe on the
    // 2B4T GEMVs at 2 threads, paired standalone runs).
    const int64_t total = chunks * (chunks + 1) / 2;
    auto start = [&](int64_t c) { return s.ntiles * (c * chunks - c * (c - 1) / 2) / total; };
    pool_run(chunks, [&](int64_t c) {
        const int64_t t0 = start(c), t1 = start(c + 1);
        if (t1 > t0) fn(a, w, s, out, N, t0, t1);
    });
}

}  // namespace bn158
