// The driver shared by every path: prepares activations once (row sums, a copy laid out by the
// format when K is not whole blocks or x is unaligned, an ISA's own GEMM layout), splits the row
// tiles (8 rows; 64 for lut2) across the thread pool, and calls the kernel row of the selected
// ISA's table. Compiled for the baseline ISA.
#include "ternary_dispatch.h"

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "threadpool.h"

namespace bn158 {
namespace {

// By Isa; nullptr for the paths of another architecture (never selected: isa_supported is false).
#if defined(BN158_X86)
const KernelTable* const kTables[kNumIsas] = {&kScalarKernels, &kAvx2Kernels, &kAvx512VnniKernels, nullptr, nullptr,
                                              nullptr};
#elif defined(BN158_ARM64)
const KernelTable* const kTables[kNumIsas] = {&kScalarKernels, nullptr, nullptr, &kNeonKernels, &kNeonDotKernels,
                                              &kNeonI8mmKernels};
#else
const KernelTable* const kTables[kNumIsas] = {&kScalarKernels, nullptr, nullptr, nullptr, nullptr, nullptr};
#endif

int g_isa = -1;  // set_isa's choice; -1: not chosen yet, the best supported

// isa's kernel for fmt, or the nearest narrower ISA's of the same architecture: a wider ISA's
// requirements include the narrower ones' (cpu_features.h), and the scalar table is complete, so
// the walk always stops.
const KernelRow& kernel_row(Isa isa, Format fmt) {
    int i = int(isa);
    while (!kTables[i] || !kTables[i]->row[int(fmt)].range) i = kIsaNarrower[i];
    return kTables[i]->row[int(fmt)];
}

// xsum[m] = sum_k x[m, k]: the kernels multiply codes u = w + 1 and subtract it.
void row_sums(const int8_t* x, int64_t M, int64_t K, int32_t* xsum) {
    for (int64_t m = 0; m < M; ++m) {
        const int8_t* r = x + m * K;
        int32_t acc = 0;
        for (int64_t k = 0; k < K; ++k) acc += r[k];
        xsum[m] = acc;
    }
}

// K not whole blocks: each row is laid out by the format into a zeroed copy (padding, a base3
// tail permuted). The copy is also made when x is off a cache-line boundary (numpy's arrays start
// 16 bytes in): the kernels' 32-byte loads of x would straddle lines; a few KB per call.
void lay_out_x(const FormatSpec& f, const WShape& s, Act& a) {
    if (s.kp == a.ldx && (reinterpret_cast<uintptr_t>(a.x) & 63) == 0) return;
    thread_local std::vector<int8_t> xp;
    xp.assign(size_t(a.M * s.kp + 64), 0);
    int8_t* base = xp.data() + (-reinterpret_cast<uintptr_t>(xp.data()) & 63);
    for (int64_t m = 0; m < a.M; ++m) f.x_row(a.x + m * a.ldx, s, base + m * s.kp);
    a.xp = base;
    a.ldxp = s.kp;
}

// A kernel that wants x in its own GEMM layout gets it once here, not once per tile range.
void prep_x(const KernelRow& k, const WShape& s, Act& a) {
    if (!k.prep || a.M < k.prep_min_m) return;
    thread_local std::vector<uint8_t> xv;
    xv.resize(size_t(ceil_div(a.M, kActPanelRows) * kActPanelRows * s.kp + 64));
    uint8_t* base = xv.data() + (-reinterpret_cast<uintptr_t>(xv.data()) & 63);
    k.prep(a, s, base);
    a.xv = base;
}

constexpr int kMaxTargets = 4;

// The tiles of `count` matrices numbered one after another; fn runs on global ranges [g0, g1),
// which may span matrices.
void run_tiles(RangeFn fn, const Act& a, const MatmulTarget* ts, const WShape* shapes, int count) {
    int64_t first[kMaxTargets + 1] = {0};
    for (int i = 0; i < count; ++i) first[i + 1] = first[i] + shapes[i].ntiles;
    const int64_t ntiles = first[count];
    auto range = [&](int64_t g0, int64_t g1) {
        for (int i = 0; i < count; ++i) {
            const int64_t t0 = g0 > first[i] ? g0 - first[i] : 0;
            const int64_t t1 = (g1 < first[i + 1] ? g1 : first[i + 1]) - first[i];
            if (t1 > t0) fn(a, ts[i].w, shapes[i], ts[i].out, shapes[i].N, t0, t1);
        }
    };
    const int64_t chunks = pool_chunks(ntiles);
    if (chunks <= 1) return range(0, ntiles);
    // Contiguous tile ranges, claimed in order and shrinking linearly (chunk c gets a share
    // proportional to chunks - c): the last ones are small, so threads finish together instead
    // of one waiting out the other's last equal share (+2.5-3.4 points of the read probe on the
    // 2B4T GEMVs at 2 threads, paired standalone runs).
    const int64_t total = chunks * (chunks + 1) / 2;
    auto start = [&](int64_t c) { return ntiles * (c * chunks - c * (c - 1) / 2) / total; };
    pool_run(chunks, [&](int64_t c) { range(start(c), start(c + 1)); });
}

}  // namespace

Isa current_isa() {
    if (g_isa < 0) g_isa = int(best_isa());
    return Isa(g_isa);
}

void set_isa(Isa isa) { g_isa = int(isa); }

void matmul_many(Isa isa, Format fmt, const int8_t* x, int64_t M, int64_t K, const MatmulTarget* targets,
                 int count) {
    if (count < 1 || count > kMaxTargets) throw std::invalid_argument("matmul_many: 1 to 4 matrices");
    const FormatSpec& f = format_spec(fmt);
    WShape shapes[kMaxTargets];
    for (int i = 0; i < count; ++i) shapes[i] = f.shape(targets[i].N, K);
    const KernelRow& k = kernel_row(isa, fmt);
    thread_local std::vector<int32_t> xsum;
    xsum.resize(size_t(M));
    row_sums(x, M, K, xsum.data());
    Act a{x, K, x, K, xsum.data(), M};
    lay_out_x(f, shapes[0], a);  // the layout of x depends on K alone
    prep_x(k, shapes[0], a);
    run_tiles(k.range, a, targets, shapes, count);
}

void matmul(Isa isa, Format fmt, const int8_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
            int32_t* out) {
    const MatmulTarget t{w, N, out};
    matmul_many(isa, fmt, x, M, K, &t, 1);
}

}  // namespace bn158
