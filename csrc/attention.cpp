// Causal attention of a native step's rows (attention.h).
//
// The arithmetic of one query against its keys is fixed, whatever runs it: each score is 8 lanes
// of products summed along the head dimension in order, then the lanes by a fixed tree (tree8),
// times 1/√hd; the softmax takes the max, e^(s − max) by one polynomial (exp_poly), and sums those
// in 8 lanes (key j in lane j mod 8) reduced by the same tree; each output element sums p·v in key
// order from zero, then is multiplied by 1 / sum. Both the portable loop (one query at a time) and
// the AVX2 tiles (the query heads that share a KV head, together) do exactly that, so every row
// gives the same bits alone, batched, in a prefill, at any thread count, on either path. The tree
// and the lane sums are what horizontal adds and 8-wide vectors compute without a serial chain.
//
// Why tiles: one query at a time, each score is a chain of hd / 8 dependent adds and each output
// update re-reads and re-writes the head's whole output row; at a 1,024-token context attention
// was ~12 of ~40 ms a 2B4T prefill token and ~25 of ~67 ms a 1-thread decode step. The GQA heads of one KV
// head (4 at 2B4T) read each key and value row once for all of them, with 8 independent sums in
// registers.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "half.h"
#include "threadpool.h"

#if defined(BN158_X86)
#include <immintrin.h>
#endif

#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace bn158 {
namespace {

constexpr int kHeadsTogether = 4;  // the most query heads one tile holds (attend_heads_avx2 has a case each)

// --- the arithmetic every path shares ----------------------------------------------------------
// 8 partial sums reduced in a fixed tree, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)): the
// order the AVX2 tiles' horizontal adds take, so they reduce 8 scores at once and still give these bits.
inline float tree8(const float l[8]) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// e^x for the softmax, the same float operations on every path: Cephes' single-precision
// polynomial (~1 ulp) after x = n·ln2 + r, scaled by 2^n through the exponent bits. libm's expf
// was one call per score (register spills around each), ~1/5 of attention at long contexts.
constexpr float kExpLo = -87.3365478515625f;  // ln(2^-126): below, 0 (a softmax term under 1e-38)
constexpr float kExpHi = 88.0f;                // above, clamped (a softmax never gets there: x <= 0)
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

inline float exp_poly(float x) {
    if (x != x) return x;
    if (x < kExpLo) return 0.0f;
    if (x > kExpHi) x = kExpHi;
    const float fx = std::nearbyint(x * kLog2e);
    float r = x - fx * kLn2Hi;
    r = r - fx * kLn2Lo;
    float y = kP0;
    y = y * r + kP1;
    y = y * r + kP2;
    y = y * r + kP3;
    y = y * r + kP4;
    y = y * r + kP5;
    y = y * (r * r) + r;
    y = y + 1.0f;
    const uint32_t bits = uint32_t(int32_t(fx) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

// --- portable: one query row of one head --------------------------------------------------------
float dot_lanes(const float* a, const float* b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent lanes: vectorized, never reassociated
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
    float s = tree8(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// softmax in place over p[0, n): max, e^(p − max) summed in 8 lanes (key j in lane j mod 8, in key
// order) and the lanes by tree8; returns 1 / sum.
float softmax_in_place(float* p, int64_t n) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, p[j]);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < n; ++j) acc[j & 7] += (p[j] = exp_poly(p[j] - mx));
    return 1.0f / tree8(acc);
}

// One KV head's cached rows (row j at element j·hd) as attention reads them: fp32 as they are,
// fp16 widened exactly, q8 as its codes in fp32 with the row's scale s_j applied once, not per
// value: a score is (q · codes) · s_j · 1/√hd and p·v adds (p_j · s_j) · codes. Two multiplies a
// row instead of one a value (the dequantized row × the query would be another rounding of the
// same sum; the Python path dequantizes and agrees within fp32 rounding, as it does in fp32).
struct F32Rows {
    using T = float;
    static constexpr bool kScaled = false;
    const float* p;
};
struct F16Rows {
    using T = uint16_t;
    static constexpr bool kScaled = false;
    const uint16_t* p;
};
struct Q8Rows {
    using T = int8_t;
    static constexpr bool kScaled = true;
    const int8_t* p;
    const float* s;  // one scale a row
};
template <class R>
inline float row_scale(const R& r, int64_t j) {
    if constexpr (R::kScaled) return r.s[j];
    else return 1.0f;
}

// Row j as fp32 (q8: its codes, unscaled): the row itself, or its conversion into buf.
inline const float* row_f32(const F32Rows& r, int64_t j, int64_t hd, float*) { return r.p + j * hd; }
inline const float* row_f32(const F16Rows& r, int64_t j, int64_t hd, float* buf) {
    half_to_float_row(r.p + j * hd, buf, hd);
    return buf;
}
inline const float* row_f32(const Q8Rows& r, int64_t j, int64_t hd, float* buf) {
    const int8_t* q = r.p + j * hd;
    for (int64_t e = 0; e < hd; ++e) buf[e] = float(q[e]);
    return buf;
}

// One query row of one head over keys/values [0, n) of its KV head: softmax(q·kᵀ/√hd) · v.
template <class R>
void attend_one(const float* q, const R& keys, const R& values, int64_t n, int64_t hd, float scale, float* out) {
    thread_local std::vector<float> p, buf;
    p.resize(size_t(n));
    buf.resize(size_t(hd));
    for (int64_t j = 0; j < n; ++j) {
        float d = dot_lanes(q, row_f32(keys, j, hd, buf.data()), hd);
        if constexpr (R::kScaled) d = d * row_scale(keys, j);
        p[size_t(j)] = d * scale;
    }
    const float inv = softmax_in_place(p.data(), n);
    std::fill(out, out + hd, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
        const float* v = row_f32(values, j, hd, buf.data());
        float w = p[size_t(j)];
        if constexpr (R::kScaled) w = w * row_scale(values, j);
        for (int64_t e = 0; e < hd; ++e) out[e] += w * v[e];
    }
    for (int64_t e = 0; e < hd; ++e) out[e] *= inv;
}

#if defined(BN158_X86)
#pragma GCC push_options
#pragma GCC target("avx2,f16c")

// The cache rows of one KV head are read once a step, from memory, in 4 KiB pages the hardware
// prefetcher starts over on: software prefetch asks for keys and values this many rows ahead
// (2B4T, 1,024-token context, one thread: 66.8 → 56-57 ms a decode step).
constexpr int64_t kRowsAhead = 16;

// Row j's values i .. i + 7 as fp32, exactly as row_f32 gives them.
inline __m256 load8(const F32Rows& r, int64_t j, int64_t hd, int64_t i) { return _mm256_loadu_ps(r.p + j * hd + i); }
inline __m256 load8(const F16Rows& r, int64_t j, int64_t hd, int64_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.p + j * hd + i)));
}
inline __m256 load8(const Q8Rows& r, int64_t j, int64_t hd, int64_t i) {  // the codes; the scale comes later
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.p + j * hd + i))));
}
template <class R>
inline const char* at(const R& r, int64_t j, int64_t hd, int64_t i) {
    return reinterpret_cast<const char*>(r.p + j * hd + i);
}
// The tiles unroll every loop over their register arrays (#pragma GCC unroll): left rolled, GCC
// kept a copy of p·v's sums on the stack, eight dead stores an iteration.

// tree8 of each vector's lanes: 8 vectors → their 8 sums, 4 → 4, 1 → 1 (hadd pairs neighbours,
// the second hadd the pairs, the halves come last: tree8's order).
inline __m256 tree8_x8(const __m256* v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
inline __m128 tree8_x4(const __m256* v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}
inline float tree8_x1(__m256 v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v, v), v);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1)));
}

// exp_poly on 8 lanes, operation for operation.
inline __m256 exp_poly8(__m256 x) {
    const __m256 below = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(kExpHi), x);  // a NaN x stays NaN (min returns its second operand)
    const __m256 fx =
        _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(kLn2Hi)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(kLn2Lo)));
    __m256 y = _mm256_set1_ps(kP0);
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP1));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP2));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP3));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP4));
    y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(kP5));
    y = _mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(below, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

// softmax_in_place, 8 keys at a time: the same max, the same exps, the same lane sums.
float softmax_avx2(float* p, int64_t n) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(p + j));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m8);
    float mx = -INFINITY;
    for (float v : lanes) mx = std::max(mx, v);
    for (; j < n; ++j) mx = std::max(mx, p[j]);
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        const __m256 e = exp_poly8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mxv));
        _mm256_storeu_ps(p + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    _mm256_store_ps(lanes, acc);
    for (; j < n; ++j) lanes[j & 7] += (p[j] = exp_poly(p[j] - mx));
    return 1.0f / tree8(lanes);
}

// Whether 8 values from element i start a cache line (prefetch once a line).
template <class R>
inline bool line_start(int64_t i) { return (i * int64_t(sizeof(typename R::T))) % 64 == 0; }

// Scores of NQ queries (rows of q, stride hd) against keys j0 .. j0 + KT − 1: p[qi · n + j].
// hd a multiple of 8. Registers: NQ·KT sums, NQ query vectors, one key vector.
template <int NQ, int KT, class R>
inline void score_tile(const float* q, const R& keys, int64_t hd, float scale, int64_t j0, float* p, int64_t n) {
    __m256 acc[NQ][KT];
#pragma GCC unroll 8
    for (int a = 0; a < NQ; ++a)
#pragma GCC unroll 8
        for (int b = 0; b < KT; ++b) acc[a][b] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hd; i += 8) {
        __m256 qv[NQ];
#pragma GCC unroll 8
        for (int a = 0; a < NQ; ++a) qv[a] = _mm256_loadu_ps(q + a * hd + i);
#pragma GCC unroll 8
        for (int b = 0; b < KT; ++b) {
            if (line_start<R>(i)) _mm_prefetch(at(keys, j0 + b + kRowsAhead, hd, i), _MM_HINT_T0);
            const __m256 kv = load8(keys, j0 + b, hd, i);
#pragma GCC unroll 8
            for (int a = 0; a < NQ; ++a) acc[a][b] = _mm256_add_ps(acc[a][b], _mm256_mul_ps(qv[a], kv));
        }
    }
    constexpr int S = NQ * KT;
    const __m256* v = &acc[0][0];
    alignas(32) float sums[S + 8];
    int t = 0;
    for (; t + 8 <= S; t += 8) _mm256_store_ps(sums + t, tree8_x8(v + t));
    for (; t + 4 <= S; t += 4) _mm_storeu_ps(sums + t, tree8_x4(v + t));
    for (; t < S; ++t) sums[t] = tree8_x1(v[t]);
#pragma GCC unroll 8
    for (int a = 0; a < NQ; ++a)
#pragma GCC unroll 8
        for (int b = 0; b < KT; ++b) {
            float d = sums[a * KT + b];
            if constexpr (R::kScaled) d = d * row_scale(keys, j0 + b);
            p[a * n + j0 + b] = d * scale;
        }
}

// out[a, i0 .. i0 + 8·VS) (+)= Σ_j p[a · n + j] · v[j, same] for keys j in [j0, j1) in key order, for
// NQ queries: from zero when j0 is 0, else on from the sums already in out (the same additions in
// the same order as one pass over all keys).
template <int NQ, int VS, class R>
inline void weigh_tile(const float* p, int64_t n, const R& values, int64_t hd, int64_t i0, int64_t j0, int64_t j1,
                       float* out) {
    __m256 acc[NQ][VS];
#pragma GCC unroll 8
    for (int a = 0; a < NQ; ++a)
#pragma GCC unroll 8
        for (int s = 0; s < VS; ++s)
            acc[a][s] = j0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out + a * hd + i0 + 8 * s);
    for (int64_t j = j0; j < j1; ++j) {
        __m256 vv[VS];
#pragma GCC unroll 8
        for (int s = 0; s < VS; ++s) {
            if (line_start<R>(8 * s))  // to L2: this slice of a later row
                _mm_prefetch(at(values, j + kRowsAhead, hd, i0 + 8 * s), _MM_HINT_T1);
            vv[s] = load8(values, j, hd, i0 + 8 * s);
        }
#pragma GCC unroll 8
        for (int a = 0; a < NQ; ++a) {
            float w = p[a * n + j];
            if constexpr (R::kScaled) w = w * row_scale(values, j);
            const __m256 pb = _mm256_set1_ps(w);
#pragma GCC unroll 8
            for (int s = 0; s < VS; ++s) acc[a][s] = _mm256_add_ps(acc[a][s], _mm256_mul_ps(pb, vv[s]));
        }
    }
#pragma GCC unroll 8
    for (int a = 0; a < NQ; ++a)
#pragma GCC unroll 8
        for (int s = 0; s < VS; ++s) _mm256_storeu_ps(out + a * hd + i0 + 8 * s, acc[a][s]);
}

// p·v visits each value row once per output slice (hd / 8·VS times: 8 at 2B4T); blocks of this
// many bytes of rows are visited by every slice before the next block, so the later visits hit L1.
// One 2B4T layer, one decoding row, 4,000 fp32 positions: 3.7-4.6 ms a layer unblocked, 1.5-1.8
// with 8 KiB blocks (the rows stream from memory once instead of four times); 4 KiB was no better,
// 32 KiB and more (past L1) lost most of the gain.
constexpr int64_t kValueBlockBytes = 8192;

// NQ query rows of consecutive heads sharing one KV head (q and out: stride hd), over keys/values
// [0, n). Tile shapes keep at most ~13 of the 16 ymm registers live.
template <int NQ, class R>
void attend_heads_avx2(const float* q, const R& keys, const R& values, int64_t n, int64_t hd, float scale,
                       float* out) {
    constexpr int KT = NQ == 1 ? 8 : NQ == 2 ? 4 : NQ == 3 ? 3 : 2, VS = NQ <= 2 ? 4 : 2;
    thread_local std::vector<float> pbuf;
    pbuf.resize(size_t(NQ * n));
    float* p = pbuf.data();
    int64_t j = 0;
    for (; j + KT <= n; j += KT) score_tile<NQ, KT, R>(q, keys, hd, scale, j, p, n);
    for (; j < n; ++j) score_tile<NQ, 1, R>(q, keys, hd, scale, j, p, n);
    float inv[NQ];
    for (int a = 0; a < NQ; ++a) inv[a] = softmax_avx2(p + a * n, n);
    const int64_t block = std::max<int64_t>(8, kValueBlockBytes / (hd * int64_t(sizeof(typename R::T))));
    for (int64_t j0 = 0; j0 < n; j0 += block) {
        const int64_t j1 = std::min(n, j0 + block);
        int64_t i = 0;
        for (; i + 8 * VS <= hd; i += 8 * VS) weigh_tile<NQ, VS, R>(p, n, values, hd, i, j0, j1, out);
        for (; i < hd; i += 8) weigh_tile<NQ, 1, R>(p, n, values, hd, i, j0, j1, out);
    }
    for (int a = 0; a < NQ; ++a)
        for (int64_t e = 0; e < hd; ++e) out[a * hd + e] *= inv[a];
}

#pragma GCC pop_options
#endif  // BN158_X86

// nq (1 .. kHeadsTogether) query rows of consecutive heads sharing one KV head.
template <class R>
void attend_heads(int64_t nq, bool tiles, const float* q, const R& keys, const R& values, int64_t n, int64_t hd,
                  float scale, float* out) {
#if defined(BN158_X86)
    if (tiles) {
        switch (nq) {
            case 4: return attend_heads_avx2<4, R>(q, keys, values, n, hd, scale, out);
            case 3: return attend_heads_avx2<3, R>(q, keys, values, n, hd, scale, out);
            case 2: return attend_heads_avx2<2, R>(q, keys, values, n, hd, scale, out);
            default: return attend_heads_avx2<1, R>(q, keys, values, n, hd, scale, out);
        }
    }
#else
    (void)tiles;
#endif
    for (int64_t a = 0; a < nq; ++a) attend_one(q + a * hd, keys, values, n, hd, scale, out + a * hd);
}

}  // namespace

void attention(Isa isa, const StepModel& m, const KVSlots& kv, int64_t layer, const StepRows& rows, const float* q,
               float* out) {
    const int64_t H = m.heads, hd = m.head_dim, group = m.heads / m.kv_heads;
    const float scale = 1.0f / std::sqrt(float(hd));
    const bool tiles = hd % 8 == 0 && (isa == Isa::Avx2 || isa == Isa::Avx512Vnni);
    // A task: one row's query heads of one KV head, up to `together` of them. Fewer per task only
    // while there are fewer tasks than threads: every split reads the KV head's rows once more. (One
    // decoding row of 2B4T on 2 threads: 5 tasks of 4 heads, 3:2 between the threads, against 10 tasks
    // of 2 that kept both threads evenly busy: at 4,000 cached positions, alternated 3 times, fp32
    // 12.0-13.8 → 13.7-16.5 tok/s, fp16 16.6-18.2 → 19.0-21.1; at 1,024 within noise.)
    int64_t together = std::min<int64_t>(kHeadsTogether, group);
    const auto tasks_for = [&](int64_t t) { return rows.M * m.kv_heads * ((group + t - 1) / t); };
    while (together > 1 && tasks_for(together) < int64_t(pool_threads())) together = (together + 1) / 2;
    const int64_t per_kv = (group + together - 1) / together, per_row = m.kv_heads * per_kv;
    const int64_t tasks = rows.M * per_row;
    auto run = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t r = t / per_row, g = t % per_row / per_kv, h = g * group + t % per_kv * together;
            const int64_t nq = std::min(together, (g + 1) * group - h);
            const int64_t row0 = (int64_t(rows.slot[r]) * m.kv_heads + g) * kv.max_len, base = row0 * hd;
            const float* qr = q + (r * H + h) * hd;
            float* o = out + (r * H + h) * hd;
            const int64_t n = int64_t(rows.pos[r]) + 1;
            const void* ks = kv.keys[size_t(layer)];
            const void* vs = kv.values[size_t(layer)];
            switch (kv.type) {
                case KVType::F16:
                    attend_heads(nq, tiles, qr, F16Rows{static_cast<const uint16_t*>(ks) + base},
                                 F16Rows{static_cast<const uint16_t*>(vs) + base}, n, hd, scale, o);
                    break;
                case KVType::Q8:
                    attend_heads(nq, tiles, qr,
                                 Q8Rows{static_cast<const int8_t*>(ks) + base, kv.key_scales[size_t(layer)] + row0},
                                 Q8Rows{static_cast<const int8_t*>(vs) + base, kv.value_scales[size_t(layer)] + row0},
                                 n, hd, scale, o);
                    break;
                default:
                    attend_heads(nq, tiles, qr, F32Rows{static_cast<const float*>(ks) + base},
                                 F32Rows{static_cast<const float*>(vs) + base}, n, hd, scale, o);
            }
        }
    };
    const int64_t chunks = pool_chunks(tasks);
    if (chunks <= 1) {
        run(0, tasks);
    } else {
        pool_run(chunks, [&](int64_t c) { run(tasks * c / chunks, tasks * (c + 1) / chunks); });
    }
}

}  // namespace bn158
