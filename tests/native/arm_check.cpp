// Native check of the kernel paths against the scalar oracle, without Python: built by
// scripts/check_arm.sh with the kernel translation units (cross-compiled for arm64 and run under
// qemu-aarch64 there; it builds and runs on any architecture).
//
// For every format (i2, base3, lut2), every path this CPU runs (or only BITNET158_KERNEL's), and
// --shapes random shapes (ragged K and N, M from 1 to 40, 1 and 3 threads), the exact int32
// products must equal the scalar path's bit for bit; the scalar path itself is checked against a
// plain triple loop over the unpacked codes (which also checks this file's packers); every tenth
// shape also runs on random bytes (invalid codes included) against the oracle. Then extreme
// values on long rows (activations pinned at 127 / -128, all +1 / all -1 weights, K up to 6912),
// the int8 head (int8_matmul), the q4 head (q4_matmul, fp32 out, bit for bit), the activation
// quantizer (absmax, quantize_row) against plain loops, the fp16 row conversions (the KV cache's)
// against the one-value functions; on arm64 the read-bandwidth probe.
//
//   arm_check [--shapes N] [--seed S] [--expect-best PATH] [--vectors FILE]
// --vectors: cases packed and multiplied on another machine (see foreign_vectors) must come out the same.
// Exit status: 0 all equal, 1 a mismatch (the first one is printed), 2 a usage or path error.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "formats.h"
#include "half.h"
#include "int8_gemm.h"
#include "q4_gemm.h"
#include "quant.h"
#include "ternary_dispatch.h"
#include "threadpool.h"

using namespace bn158;

namespace {

std::mt19937_64 rng;

int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// ---- packers, written from formats.h's layout comments (independent of the kernels' decoders) ----
using Codes = std::vector<int8_t>;  // [N, K] in {-1, 0, 1}

int8_t code_at(const Codes& w, int64_t N, int64_t K, int64_t n, int64_t k) {
    return n < N && k < K ? w[size_t(n * K + k)] : 0;  // padding packs as zero weights
}

std::vector<uint8_t> pack_i2(const Codes& w, int64_t N, int64_t K) {
    const WShape s = make_shape(Format::I2, N, K);
    std::vector<uint8_t> out(size_t(packed_nbytes(Format::I2, N, K)), 0);
    for (int64_t t = 0; t < s.ntiles; ++t)
        for (int64_t kb = 0; kb < s.nfull; ++kb)
            for (int r = 0; r < kTileN; ++r)
                for (int j = 0; j < 32; ++j) {
                    unsigned byte = 0;
                    for (int f = 0; f < 4; ++f)
                        byte |= unsigned(code_at(w, N, K, t * kTileN + r, kb * kI2BlockK + 32 * f + j) + 1) << (2 * f);
                    out[size_t(t * s.tile_bytes + kb * kI2TileBlockBytes + r * 32 + j)] = uint8_t(byte);
                }
    return out;
}

uint8_t b3_byte(const int t[5]) {  // q = t0·81 + t1·27 + t2·9 + t3·3 + t4, byte = ceil(q·256 / 243)
    const int q = t[0] * 81 + t[1] * 27 + t[2] * 9 + t[3] * 3 + t[4];
    return uint8_t((q * 256 + 242) / 243);
}

std::vector<uint8_t> pack_base3(const Codes& w, int64_t N, int64_t K) {
    const WShape s = make_shape(Format::Base3, N, K);
    std::vector<uint8_t> out(size_t(packed_nbytes(Format::Base3, N, K)), 0);
    for (int64_t t = 0; t < s.ntiles; ++t) {
        for (int64_t kb = 0; kb < s.nfull; ++kb)
            for (int r = 0; r < kTileN; ++r)
                for (int j = 0; j < 32; ++j) {
                    int tr[5];
                    for (int n = 0; n < 5; ++n)
                        tr[n] = code_at(w, N, K, t * kTileN + r, kb * kB3BlockK + 32 * n + j) + 1;
                    out[size_t(t * s.tile_bytes + kb * kB3TileBlockBytes + r * 32 + j)] = b3_byte(tr);
                }
        const int64_t k0 = s.nfull * kB3BlockK, tb = s.tail_bytes;
        for (int r = 0; r < kTileN; ++r)
            for (int64_t j = 0; j < tb; ++j) {
                int tr[5];
                for (int n = 0; n < 5; ++n)
                    tr[n] = (tb * n + j < s.rem ? code_at(w, N, K, t * kTileN + r, k0 + tb * n + j) : 0) + 1;
                out[size_t(t * s.tile_bytes + s.nfull * kB3TileBlockBytes + r * tb + j)] = b3_byte(tr);
            }
    }
    return out;
}

std::vector<uint8_t> pack_lut2(const Codes& w, int64_t N, int64_t K) {
    const WShape s = make_shape(Format::Lut2, N, K);
    std::vector<uint8_t> out(size_t(packed_nbytes(Format::Lut2, N, K)), 0);
    auto idx = [&](int64_t n, int64_t p) {
        return unsigned(3 * (code_at(w, N, K, n, 2 * p) + 1) + (code_at(w, N, K, n, 2 * p + 1) + 1));
    };
    for (int64_t t = 0; t < s.ntiles; ++t)
        for (int64_t p = 0; p < s.nfull; ++p)
            for (int j = 0; j < 32; ++j)
                out[size_t(t * s.tile_bytes + p * 32 + j)] =
                    uint8_t(idx(t * kLut2TileN + j, p) | idx(t * kLut2TileN + 32 + j, p) << 4);
    return out;
}

std::vector<uint8_t> pack(Format f, const Codes& w, int64_t N, int64_t K) {
    switch (f) {
        case Format::I2: return pack_i2(w, N, K);
        case Format::Base3: return pack_base3(w, N, K);
        case Format::Lut2: return pack_lut2(w, N, K);
    }
    return {};
}

// ---- the checks -----------------------------------------------------------------------------------
struct Failure {
    std::string what;
};

std::vector<int> g_paths;  // the non-scalar paths under test
int64_t g_cases = 0;

std::vector<int32_t> run_ternary(Isa isa, Format f, const std::vector<int8_t>& x, int64_t M, int64_t K,
                                 const std::vector<uint8_t>& w, int64_t N) {
    std::vector<int32_t> out(size_t(M * N), 0x5A5A5A5A);  // a kernel that skips an element shows
    matmul(isa, f, x.data(), M, K, w.data(), N, out.data());
    return out;
}

std::string describe(const char* what, const char* path, int64_t M, int64_t N, int64_t K, int threads) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s on path %s at M=%lld N=%lld K=%lld, %d thread(s)", what, path, (long long)M,
                  (long long)N, (long long)K, threads);
    return buf;
}

template <class T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, int64_t N, const std::string& where) {
    for (size_t i = 0; i < want.size(); ++i)
        if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
            char buf[160];
            std::snprintf(buf, sizeof buf, ": out[%lld, %lld] = %.9g, scalar %.9g", (long long)(int64_t(i) / N),
                          (long long)(int64_t(i) % N), double(got[i]), double(want[i]));
            throw Failure{where + buf};
        }
}

void check_ternary(Format f, const std::vector<int8_t>& x, int64_t M, int64_t K, const Codes& w, int64_t N,
                   int threads) {
    pool_set_threads(threads);
    const std::vector<uint8_t> packed = pack(f, w, N, K);
    const std::vector<int32_t> want = run_ternary(Isa::Scalar, f, x, M, K, packed, N);
    std::vector<int32_t> plain(size_t(M * N));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            int32_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += int32_t(x[size_t(m * K + k)]) * w[size_t(n * K + k)];
            plain[size_t(m * N + n)] = s;
        }
    const char* fmt = format_spec(f).name;
    const std::string oracle = std::string(fmt) + ": the scalar path vs a plain loop";
    expect_equal(want, plain, N, describe(oracle.c_str(), "scalar", M, N, K, threads));
    for (int p : g_paths) {
        const std::vector<int32_t> got = run_ternary(Isa(p), f, x, M, K, packed, N);
        expect_equal(got, want, N, describe(fmt, kIsaNames[p], M, N, K, threads));
        ++g_cases;
    }
}

// Arbitrary bytes, invalid codes included (i2 field 3, lut2 nibbles 9..15, base3 bytes past 242):
// every path must still decode them exactly as the oracle does.
void check_random_bytes(Format f, const std::vector<int8_t>& x, int64_t M, int64_t K, int64_t N, int threads) {
    pool_set_threads(threads);
    std::vector<uint8_t> packed(static_cast<size_t>(packed_nbytes(f, N, K)));
    for (auto& b : packed) b = uint8_t(uniform(0, 255));
    const std::vector<int32_t> want = run_ternary(Isa::Scalar, f, x, M, K, packed, N);
    const std::string what = std::string(format_spec(f).name) + " (random bytes)";
    for (int p : g_paths) {
        expect_equal(run_ternary(Isa(p), f, x, M, K, packed, N), want, N,
                     describe(what.c_str(), kIsaNames[p], M, N, K, threads));
        ++g_cases;
    }
}

std::vector<int8_t> random_x(int64_t n, int mode) {
    std::vector<int8_t> x(static_cast<size_t>(n));
    for (auto& v : x) {
        switch (mode) {
            case 1: v = int8_t(uniform(0, 1) ? 127 : -128); break;  // extremes only
            case 2: v = int8_t(uniform(0, 3) ? 0 : uniform(-128, 127)); break;  // mostly zero
            default: v = int8_t(uniform(-128, 127)); break;
        }
    }
    return x;
}

Codes random_codes(int64_t n, int mode) {
    Codes w(static_cast<size_t>(n));
    for (auto& v : w) {
        switch (mode) {
            case 1: v = int8_t(uniform(0, 1) ? 1 : -1); break;  // binary
            case 2: v = 1; break;
            case 3: v = -1; break;
            default: v = int8_t(uniform(-1, 1)); break;
        }
    }
    return w;
}

// K: whole blocks of every format (128, 160, 2·64), one off them, and anything up to ~3 blocks.
int64_t random_k() {
    const int64_t c = uniform(0, 9);
    if (c == 0) return 128 * uniform(1, 5);
    if (c == 1) return 160 * uniform(1, 4);
    if (c == 2) return 128 * uniform(1, 5) + uniform(-1, 1);
    if (c == 3) return 160 * uniform(1, 4) + uniform(-1, 1);
    if (c == 4) return uniform(1, 40);
    return uniform(1, 700);
}

int64_t random_m() {  // the GEMV (1..3), the GEMMs' odd and whole row groups, more than a chunk
    const int64_t c = uniform(0, 9);
    if (c < 4) return uniform(1, 3);
    if (c < 8) return uniform(4, 17);
    return uniform(18, 40);
}

void random_shapes(int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t M = random_m(), N = uniform(1, uniform(0, 3) ? 72 : 200), K = random_k();
        const int xmode = int(uniform(0, 9) == 0 ? 1 : uniform(0, 9) == 0 ? 2 : 0);
        const int wmode = int(uniform(0, 9) == 0 ? uniform(1, 3) : 0);
        const std::vector<int8_t> x = random_x(M * K, xmode);
        const Codes w = random_codes(N * K, wmode);
        for (int f = 0; f < kNumFormats; ++f) check_ternary(Format(f), x, M, K, w, N, i % 2 ? 1 : 3);
        if (i % 10 == 0)
            for (int f = 0; f < kNumFormats; ++f) check_random_bytes(Format(f), x, M, K, N, i % 4 ? 1 : 3);
    }
}

// Largest-magnitude sums on rows long enough that narrow partial sums would overflow.
void extreme_rows() {
    for (int64_t K : {2048, 2049, 4224, 6912})
        for (int64_t M : {1, 2, 3, 5, 17}) {
            const int64_t N = 16;
            Codes w(size_t(N * K));
            for (int64_t n = 0; n < N; ++n)
                for (int64_t k = 0; k < K; ++k) w[size_t(n * K + k)] = int8_t(n % 2 ? -1 : 1);
            for (int64_t n = 4; n < 8; ++n)
                for (int64_t k = 0; k < K; ++k) w[size_t(n * K + k)] = int8_t(uniform(0, 1) ? 1 : -1);
            for (int fill : {127, -128, 0}) {
                std::vector<int8_t> x = fill ? std::vector<int8_t>(size_t(M * K), int8_t(fill)) : random_x(M * K, 1);
                for (int f = 0; f < kNumFormats; ++f) check_ternary(Format(f), x, M, K, w, N, 1);
            }
        }
}

void int8_head(int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t M = uniform(0, 2) ? uniform(1, 9) : 1, N = uniform(1, 40), K = uniform(1, 600);
        const int mode = int(uniform(0, 5));
        std::vector<int8_t> x(size_t(M * K)), w(size_t(N * K));
        for (auto& v : x) v = int8_t(mode == 0 ? -128 : mode == 1 ? 127 : uniform(-128, 127));
        for (auto& v : w) v = int8_t(mode == 0 ? (uniform(0, 1) ? -127 : 127) : mode == 1 ? 127 : uniform(-127, 127));
        pool_set_threads(i % 2 ? 1 : 3);
        std::vector<int32_t> want(size_t(M * N));
        int8_matmul(Isa::Scalar, x.data(), M, K, w.data(), N, want.data());
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
                int32_t s = 0;
                for (int64_t k = 0; k < K; ++k) s += int32_t(x[size_t(m * K + k)]) * w[size_t(n * K + k)];
                if (s != want[size_t(m * N + n)])
                    throw Failure{describe("int8 head: scalar vs a plain loop", "scalar", M, N, K, 1)};
            }
        for (int p : g_paths) {
            std::vector<int32_t> got(size_t(M * N), 0x5A5A5A5A);
            int8_matmul(Isa(p), x.data(), M, K, w.data(), N, got.data());
            expect_equal(got, want, N, describe("int8 head", kIsaNames[p], M, N, K, i % 2 ? 1 : 3));
            ++g_cases;
        }
    }
}

uint16_t random_half() {  // finite fp16 scales of either sign, subnormals included
    const uint16_t exp = uint16_t(uniform(0, 20)), man = uint16_t(uniform(0, 1023));
    return uint16_t((uniform(0, 1) << 15) | (exp << 10) | man);
}

void q4_head(int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t M = uniform(0, 2) ? uniform(1, 6) : 1, N = uniform(1, 30), K = kQ4Block * uniform(1, 8);
        std::vector<int8_t> x = random_x(M * K, int(uniform(0, 2)));
        std::vector<uint8_t> codes(size_t(N * K / 2));
        for (auto& c : codes) c = uint8_t(uniform(0, 255));
        std::vector<uint16_t> scales(size_t(N * K / kQ4Group));
        for (auto& s : scales) s = random_half();
        pool_set_threads(i % 2 ? 1 : 3);
        std::vector<float> want(size_t(M * N));
        q4_matmul(Isa::Scalar, x.data(), M, K, codes.data(), scales.data(), N, want.data());
        for (int p : g_paths) {
            std::vector<float> got(size_t(M * N), -1.0f);
            q4_matmul(Isa(p), x.data(), M, K, codes.data(), scales.data(), N, got.data());
            const std::string where = describe("q4 head", kIsaNames[p], M, N, K, i % 2 ? 1 : 3);
#if defined(__aarch64__)
            expect_equal(got, want, N, where);  // the arm64 kernel keeps the scalar loop's float order
#else
            // x86's AVX2 kernel sums in another order: within 1e-5 of the sum of the terms' magnitudes
            for (int64_t m = 0; m < M; ++m)
                for (int64_t n = 0; n < N; ++n) {
                    double bound = 0.0;
                    for (int64_t k = 0; k < K; ++k) {
                        const int c = (codes[size_t(n * K / 2 + k / 64 * 32 + k % 32)] >> (k % 64 < 32 ? 0 : 4)) & 15;
                        bound += std::fabs(double(half_to_float(scales[size_t(n * K / kQ4Group + k / kQ4Group)]))) *
                                 std::abs(c - 8) * std::abs(int(x[size_t(m * K + k)]));
                    }
                    const float g = got[size_t(m * N + n)], w = want[size_t(m * N + n)];
                    if (std::fabs(double(g) - w) > 1e-5 * bound + 1e-30)
                        throw Failure{where + ": out[" + std::to_string(m) + ", " + std::to_string(n) + "] = " +
                                      std::to_string(g) + ", scalar " + std::to_string(w)};
                }
#endif
            ++g_cases;
        }
    }
}

// absmax and quantize_row (the build's SIMD form) against plain loops of the same fp32 steps.
void quantizer(int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t n = uniform(1, 300);
        std::vector<float> x(static_cast<size_t>(n));
        std::normal_distribution<float> g(0.0f, float(uniform(1, 1000)) / 10.0f);
        for (auto& v : x) v = uniform(0, 5) ? g(rng) : float(uniform(-7, 7)) * 0.25f;  // × 2: exact .5 ties
        float want_max = 0.0f;
        for (float v : x) want_max = want_max > std::fabs(v) ? want_max : std::fabs(v);
        const float got_max = absmax(x.data(), n);
        if (std::memcmp(&got_max, &want_max, sizeof(float)) != 0)
            throw Failure{"absmax differs at n = " + std::to_string(n)};
        const float amax = want_max > 1e-5f ? want_max : 1e-5f;
        const float inv = uniform(0, 3) ? (1.0f / amax) * 127.0f : 2.0f;  // 2: exact ties, and clamps
        std::vector<int8_t> got(static_cast<size_t>(n));
        quantize_row(x.data(), n, inv, got.data());
        for (int64_t j = 0; j < n; ++j) {
            const float r = std::nearbyint(x[size_t(j)] * inv);
            const int8_t want = int8_t(r > 127.0f ? 127.0f : (r < -128.0f ? -128.0f : r));
            if (got[size_t(j)] != want)
                throw Failure{"quantize_row differs at n = " + std::to_string(n) + ", element " + std::to_string(j)};
        }
        ++g_cases;
    }
}

// The fp16 row conversions (NEON on arm64, the KV cache's) against the portable one-value functions:
// every half, and random float bit patterns (NaN: any NaN).
void half_rows(int64_t count) {
    std::vector<uint16_t> h(65536), back(65536);
    std::vector<float> f(65536);
    for (size_t i = 0; i < h.size(); ++i) h[i] = uint16_t(i);
    half_to_float_row(h.data(), f.data(), int64_t(h.size()));
    for (size_t i = 0; i < h.size(); ++i) {
        const float want = half_to_float(h[i]);
        if (!(std::isnan(want) && std::isnan(f[i])) && std::memcmp(&want, &f[i], sizeof(float)) != 0)
            throw Failure{"half_to_float_row differs at half " + std::to_string(i)};
    }
    std::vector<float> x(size_t(count) + 3);
    for (auto& v : x) {
        const uint32_t bits = uint32_t(uniform(0, 0xFFFFFFFFll));
        std::memcpy(&v, &bits, sizeof v);
        if (uniform(0, 1)) v = std::ldexp(float(uniform(-(1 << 20), 1 << 20)), int(uniform(-45, 0)));  // near halves' range
    }
    back.resize(x.size());
    float_to_half_row(x.data(), back.data(), int64_t(x.size()));
    for (size_t i = 0; i < x.size(); ++i) {
        const uint16_t want = float_to_half(x[i]);
        const bool nan = (want & 0x7C00) == 0x7C00 && (want & 0x3FF) && (back[i] & 0x7C00) == 0x7C00 && (back[i] & 0x3FF);
        if (back[i] != want && !nan)
            throw Failure{"float_to_half_row differs at element " + std::to_string(i) + ": " + std::to_string(back[i]) +
                          ", portable " + std::to_string(want)};
    }
    g_cases += 2;
}

// Cases packed elsewhere (scripts/check_arm.sh writes them with the Python package on the build
// machine): the same bytes must give the same products here. File: "BN158VEC" then per case
// int64 format, M, N, K, packed bytes; x [M, K] int8; the packed bytes; the expected int32 [M, N]
// (little-endian, as both x86-64 and arm64 Linux are).
int64_t foreign_vectors(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) throw Failure{std::string("cannot open ") + path};
    char magic[8];
    if (std::fread(magic, 1, 8, f) != 8 || std::memcmp(magic, "BN158VEC", 8) != 0) {
        std::fclose(f);
        throw Failure{std::string(path) + " is not a vectors file"};
    }
    int64_t cases = 0;
    for (;;) {
        int64_t h[5];
        const size_t got = std::fread(h, sizeof(int64_t), 5, f);
        if (got == 0) break;
        if (got != 5 || h[0] < 0 || h[0] >= kNumFormats || h[1] < 1 || h[2] < 1 || h[3] < 1 ||
            h[4] != packed_nbytes(Format(h[0]), h[2], h[3])) {
            std::fclose(f);
            throw Failure{std::string(path) + ": a malformed case"};
        }
        const Format fmt = Format(h[0]);
        const int64_t M = h[1], N = h[2], K = h[3];
        std::vector<int8_t> x(static_cast<size_t>(M * K));
        std::vector<uint8_t> w(static_cast<size_t>(h[4]));
        std::vector<int32_t> want(static_cast<size_t>(M * N));
        if (std::fread(x.data(), 1, x.size(), f) != x.size() || std::fread(w.data(), 1, w.size(), f) != w.size() ||
            std::fread(want.data(), sizeof(int32_t), want.size(), f) != want.size()) {
            std::fclose(f);
            throw Failure{std::string(path) + ": a truncated case"};
        }
        const char* name = format_spec(fmt).name;
        const int threads = cases % 2 ? 1 : 3;
        pool_set_threads(threads);
        const std::string what = std::string(name) + " packed by the Python package";
        expect_equal(run_ternary(Isa::Scalar, fmt, x, M, K, w, N), want, N,
                     describe(what.c_str(), "scalar", M, N, K, threads));
        for (int p : g_paths)
            expect_equal(run_ternary(Isa(p), fmt, x, M, K, w, N), want, N,
                         describe(what.c_str(), kIsaNames[p], M, N, K, threads));
        g_cases += int64_t(g_paths.size());
        ++cases;
    }
    std::fclose(f);
    return cases;
}

#if defined(__aarch64__)
// The read-bandwidth probe: the uint64 sum of the buffer's words, whatever the stream count.
void read_probe() {
    for (int64_t n : {128, 384, 4096 + 128}) {
        std::vector<uint8_t> buf(static_cast<size_t>(n) + 8);
        for (auto& b : buf) b = uint8_t(uniform(0, 255));
        const uint8_t* p = buf.data() + 8 * uniform(0, 1);  // off 8 bytes as often as not
        uint64_t want = 0;
        for (int64_t i = 0; i < n; i += 8) {
            uint64_t v;
            std::memcpy(&v, p + i, 8);
            want += v;
        }
        for (int streams = 1; streams <= 8; ++streams)
            if (read_sum_neon(p, n, streams) != want)
                throw Failure{"read_sum_neon differs at n = " + std::to_string(n) + ", " + std::to_string(streams) +
                              " streams"};
    }
}
#endif

}  // namespace

int main(int argc, char** argv) {
    int64_t shapes = 500;
    uint64_t seed = 20240521;
    std::string expect_best;
    const char* vectors = nullptr;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--shapes" && i + 1 < argc) {
            shapes = std::atoll(argv[++i]);
        } else if (a == "--seed" && i + 1 < argc) {
            seed = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--expect-best" && i + 1 < argc) {
            expect_best = argv[++i];
        } else if (a == "--vectors" && i + 1 < argc) {
            vectors = argv[++i];
        } else {
            std::fprintf(stderr, "usage: %s [--shapes N] [--seed S] [--expect-best PATH] [--vectors FILE]\n", argv[0]);
            return 2;
        }
    }
    rng.seed(seed);
    const CpuFeatures& cf = cpu_features();
    std::printf("cpu: asimd=%d dotprod=%d i8mm=%d avx2=%d avx512vnni=%d; paths:", cf.asimd, cf.dotprod, cf.i8mm,
                cf.avx2, cf.avx512vnni);
    for (int i = kNumIsas - 1; i >= 0; --i)
        if (isa_supported(Isa(i))) std::printf(" %s", kIsaNames[i]);
    std::printf("; best %s\n", kIsaNames[int(best_isa())]);
    if (!expect_best.empty() && expect_best != kIsaNames[int(best_isa())]) {
        std::printf("FAIL: expected the best path to be %s\n", expect_best.c_str());
        return 1;
    }
    // BITNET158_KERNEL, as the Python package reads it: one path only, refused if it cannot run here.
    const char* forced = std::getenv("BITNET158_KERNEL");
    if (forced && *forced) {
        const int i = isa_index(forced);
        if (i < 0) {
            std::printf("unknown kernel path '%s' in this build\n", forced);
            return 2;
        }
        if (!isa_supported(Isa(i))) {
            std::printf("kernel path '%s' is not supported by this CPU\n", forced);
            return 2;
        }
        if (i != int(Isa::Scalar)) g_paths.push_back(i);
    } else {
        for (int i = kNumIsas - 1; i > 0; --i)
            if (isa_supported(Isa(i))) g_paths.push_back(i);
    }
    std::printf("checking against scalar:");
    for (int p : g_paths) std::printf(" %s", kIsaNames[p]);
    std::printf("\n");
    try {
        if (vectors) {
            const int64_t n = foreign_vectors(vectors);
            std::printf("packed by the Python package: %lld cases x %zu paths: equal\n", (long long)n, g_paths.size());
        }
        random_shapes(shapes);
        std::printf("ternary: %lld random shapes x %d formats x %zu paths: equal\n", (long long)shapes, kNumFormats,
                    g_paths.size());
        extreme_rows();
        std::printf("ternary: extreme values on long rows (K up to 6912): equal\n");
        int8_head(shapes / 2 + 1);
        std::printf("int8 head: %lld shapes x %zu paths: equal\n", (long long)(shapes / 2 + 1), g_paths.size());
        q4_head(shapes / 4 + 1);
        std::printf("q4 head: %lld shapes x %zu paths: equal\n", (long long)(shapes / 4 + 1), g_paths.size());
        quantizer(shapes / 4 + 1);
        std::printf("quantizer: %lld rows: equal\n", (long long)(shapes / 4 + 1));
        half_rows(shapes * 20);
        std::printf("fp16 rows: every half, %lld floats: equal\n", (long long)(shapes * 20));
#if defined(__aarch64__)
        read_probe();
        std::printf("read probe: equal\n");
#endif
    } catch (const Failure& e) {
        std::printf("FAIL: %s\n", e.what.c_str());
        return 1;
    }
    std::printf("OK: %lld comparisons\n", (long long)g_cases);
    return 0;
}
