// The whole decoder forward of a packed model in one native call (forward_step.h).
//
// Why: a Python-driven 2B4T decode step makes ~300 calls around its ~210 kernel calls (norms,
// quantizers, RoPE, attention on a one-row query, reshapes, residuals, the head), a third of every
// step at one thread; and a batch of sequences at their own positions attended one row at a time.
// Here every op runs back to back on the same thread pool.
//
// Rounding follows the Python packed path wherever that is cheap to do exactly: RMSNorm sums in
// torch's order (decode_ops.h, at the width the caller found bit-exact), activations quantize as
// bitnet158.quant does, the integer products are exact, scales apply in the same order, RoPE and
// residuals are the same single roundings. Attention (torch's SDPA) and SiLU (torch's vectorized
// exp) differ by fp32 summation order and ulps only.
#include "forward_step.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention.h"
#include "decode_ops.h"
#include "half.h"
#include "int8_gemm.h"
#include "q4_gemm.h"
#include "quant.h"
#include "ternary_dispatch.h"
#include "threadpool.h"

#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)  // clang ignores the line above and contracts by default on arm64
#pragma STDC FP_CONTRACT OFF
#endif

namespace bn158 {
namespace {

constexpr float kActEps = 1e-5f;  // bitnet158.quant.EPS: the clamp on max|x|

// One row to int8 codes and its scale, as bitnet158.quant.absmax_int8_per_token: activations, and
// the rows of a q8 KV cache.
void quantize_q8(const float* x, int64_t n, int8_t* q, float* scale) {
    const float amax = std::max(absmax(x, n), kActEps);
    quantize_row(x, n, (1.0f / amax) * 127.0f, q);  // torch: reciprocal, then ×127
    *scale = amax / 127.0f;
}

// Runs f(r0, r1) over row ranges on the pool when the rows are many enough to pay for it.
template <class F>
void for_rows(int64_t M, int64_t work_per_row, F&& f) {
    const int64_t chunks = M * work_per_row >= (1 << 16) ? pool_chunks(M) : 1;
    if (chunks <= 1) {
        f(int64_t(0), M);
        return;
    }
    pool_run(chunks, [&](int64_t c) { f(M * c / chunks, M * (c + 1) / chunks); });
}

void norm_rows(const StepModel& m, const float* x, int64_t M, int64_t n, const float* w, float* out) {
    for_rows(M, n, [&](int64_t r0, int64_t r1) {
        thread_local std::vector<float> sq;
        sq.resize(size_t(n));
        rms_norm_rows(x + r0 * n, r1 - r0, n, w, m.eps, m.norm_width, sq.data(), out + r0 * n);
    });
}

// Per-token absmax int8, as bitnet158.quant.absmax_int8_per_token: sx[m] = max|x|/127 dequantizes.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* sx) {
    for_rows(M, K, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) quantize_q8(x + r * K, K, q + r * K, sx + r);
    });
}

struct Scratch {
    std::vector<float> x, h, t, q, k, v, attn, g, u, sx;
    std::vector<int8_t> q8;
    std::vector<int32_t> acc;
};

// y = acc · (sx · w_scale) (+ bias), acc = q8 · Wᵀ: the same two roundings as the fused Python call.
void scale_rows(const PackedLinear& L, const int32_t* acc, const float* sx, int64_t M, float* y) {
    for_rows(M, L.N, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float s = sx[r] * *L.scale;
            const int32_t* a = acc + r * L.N;
            float* o = y + r * L.N;
            for (int64_t n = 0; n < L.N; ++n) o[n] = float(a[n]) * s;
            if (L.bias)
                for (int64_t n = 0; n < L.N; ++n) o[n] = o[n] + L.bias[n];
        }
    });
}

// Several linears reading the same input x [M, K]: quantized once when none has its own norm, and
// then multiplied in one pool job when their products fit the scratch together (decode steps,
// where a job's dispatch and wait are a visible share of a 2-thread step; a long prefill's rows
// run one matrix at a time and keep the scratch at one product).
void project(Isa isa, const StepModel& m, Scratch& s, const float* x, int64_t M,
             std::initializer_list<std::pair<const PackedLinear*, float*>> outs) {
    const PackedLinear& L0 = *outs.begin()->first;
    const int64_t K = L0.K;
    bool shared = true, together = outs.size() > 1;
    int64_t total_n = 0;
    for (const auto& o : outs) {
        shared = shared && !o.first->norm;
        together = together && o.first->fmt == L0.fmt;
        total_n += o.first->N;
    }
    if (shared) {
        quantize_rows(x, M, K, s.q8.data(), s.sx.data());
        if (together && M * total_n <= int64_t(s.acc.size())) {
            MatmulTarget targets[4];
            int n = 0;
            int64_t off = 0;
            for (const auto& o : outs) {
                targets[n++] = {o.first->w, o.first->N, s.acc.data() + off};
                off += M * o.first->N;
            }
            matmul_many(isa, L0.fmt, s.q8.data(), M, K, targets, n);
            off = 0;
            for (const auto& o : outs) {
                scale_rows(*o.first, s.acc.data() + off, s.sx.data(), M, o.second);
                off += M * o.first->N;
            }
            return;
        }
    }
    for (const auto& o : outs) {
        const PackedLinear& L = *o.first;
        if (!shared) {
            norm_rows(m, x, M, K, L.norm, s.t.data());
            quantize_rows(s.t.data(), M, K, s.q8.data(), s.sx.data());
        }
        matmul(isa, L.fmt, s.q8.data(), M, L.K, L.w, L.N, s.acc.data());
        scale_rows(L, s.acc.data(), s.sx.data(), M, o.second);
    }
}

// x → optional norm → y; returns where the normed rows are (x itself when there is no norm).
const float* maybe_norm(const StepModel& m, const float* x, int64_t M, int64_t n, const float* w, float* y) {
    if (!w) return x;
    norm_rows(m, x, M, n, w, y);
    return y;
}

// RoPE on every head of each row at the row's own position, into out.
void rope_heads(const StepModel& m, const StepRows& rows, const float* x, int64_t heads, float* out) {
    const int64_t hd = m.head_dim;
    for (int64_t r = 0; r < rows.M; ++r) {
        const int64_t p = rows.pos[r];
        rope_rows(x + r * heads * hd, heads, 1, hd, m.rope_cos + p * hd, m.rope_sin + p * hd, out + r * heads * hd);
    }
}

void store_kv(const StepModel& m, const KVSlots& kv, int64_t layer, const StepRows& rows, const float* k,
              const float* v) {
    const int64_t hd = m.head_dim, G = m.kv_heads;
    for (int64_t r = 0; r < rows.M; ++r)
        for (int64_t g = 0; g < G; ++g) {
            const int64_t row = (int64_t(rows.slot[r]) * G + g) * kv.max_len + rows.pos[r], at = row * hd;
            const float *kr = k + (r * G + g) * hd, *vr = v + (r * G + g) * hd;
            if (kv.type == KVType::F16) {
                float_to_half_row(kr, static_cast<uint16_t*>(kv.keys[size_t(layer)]) + at, hd);
                float_to_half_row(vr, static_cast<uint16_t*>(kv.values[size_t(layer)]) + at, hd);
            } else if (kv.type == KVType::Q8) {
                quantize_q8(kr, hd, static_cast<int8_t*>(kv.keys[size_t(layer)]) + at, kv.key_scales[size_t(layer)] + row);
                quantize_q8(vr, hd, static_cast<int8_t*>(kv.values[size_t(layer)]) + at,
                            kv.value_scales[size_t(layer)] + row);
            } else {
                std::memcpy(static_cast<float*>(kv.keys[size_t(layer)]) + at, kr, size_t(hd) * sizeof(float));
                std::memcpy(static_cast<float*>(kv.values[size_t(layer)]) + at, vr, size_t(hd) * sizeof(float));
            }
        }
}

void add_into(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
}

void block(Isa isa, const StepModel& m, const KVSlots& kv, int64_t layer, const StepRows& rows, Scratch& s) {
    const BlockWeights& b = m.blocks[size_t(layer)];
    const int64_t M = rows.M, D = m.hidden, A = m.heads * m.head_dim, F = m.inter;
    // attention
    const float* n1 = maybe_norm(m, s.x.data(), M, D, b.input_norm, s.h.data());
    project(isa, m, s, n1, M, {{&b.q, s.attn.data()}, {&b.k, s.g.data()}, {&b.v, s.v.data()}});
    rope_heads(m, rows, s.attn.data(), m.heads, s.q.data());
    rope_heads(m, rows, s.g.data(), m.kv_heads, s.k.data());
    store_kv(m, kv, layer, rows, s.k.data(), s.v.data());
    attention(isa, m, kv, layer, rows, s.q.data(), s.attn.data());
    const float* a = maybe_norm(m, s.attn.data(), M, A, b.attn_sub_norm, s.q.data());
    project(isa, m, s, a, M, {{&b.o, s.h.data()}});
    add_into(s.x.data(), s.h.data(), M * D);
    // feed-forward
    const float* n2 = maybe_norm(m, s.x.data(), M, D, b.post_attn_norm, s.h.data());
    project(isa, m, s, n2, M, {{&b.gate, s.g.data()}, {&b.up, s.u.data()}});
    float* g = s.g.data();
    const float* u = s.u.data();
    for_rows(M, F, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0 * F; i < r1 * F; ++i) {
            float act;
            if (m.relu2) {
                const float r = g[i] > 0.0f ? g[i] : 0.0f;
                act = r * r;
            } else {
                act = g[i] / (1.0f + std::exp(-g[i]));
            }
            g[i] = act * u[i];
        }
    });
    const float* f = maybe_norm(m, g, M, F, b.ffn_sub_norm, s.u.data());
    project(isa, m, s, f, M, {{&b.down, s.h.data()}});
    add_into(s.x.data(), s.h.data(), M * D);
}

void embed(const StepModel& m, const StepRows& rows, float* x) {
    const int64_t D = m.hidden;
    for (int64_t r = 0; r < rows.M; ++r) {
        const int64_t t = rows.tokens[r];
        float* o = x + r * D;
        if (m.embed_q) {
            const int8_t* q = m.embed_q + t * D;
            const float s = m.embed_row_scale[t];
            for (int64_t d = 0; d < D; ++d) o[d] = float(q[d]) * s;
        } else if (m.embed_q4) {  // (code − 8) · group scale, as packed_layers.dequantize_rows_q4
            const uint8_t* c = m.embed_q4 + t * (D / 2);
            const uint16_t* sc = m.embed_q4_scale + t * (D / kQ4Group);
            for (int64_t d = 0; d < D; ++d) {
                const int64_t b = d / kQ4Block, j = d % kQ4Block;
                const int code = j < 32 ? c[b * 32 + j] & 15 : c[b * 32 + j - 32] >> 4;
                o[d] = (float(code) - 8.0f) * half_to_float(sc[d / kQ4Group]);
            }
        } else {
            std::memcpy(o, m.embed_f32 + t * D, size_t(D) * sizeof(float));
        }
    }
}

}  // namespace

void forward_step(Isa isa, const StepModel& m, const KVSlots& kv, const StepRows& rows, float* out) {
    const int64_t M = rows.M, D = m.hidden, A = m.heads * m.head_dim, KV = m.kv_heads * m.head_dim;
    const int64_t widest = std::max({D, A, m.inter});
    // The caller's scratch: a reference, so the pool's workers see this thread's buffers, not their own.
    thread_local Scratch scratch;
    Scratch& s = scratch;
    s.x.resize(size_t(M * D));
    for (auto* v : {&s.h, &s.t, &s.attn, &s.g, &s.u}) v->resize(size_t(M * widest));
    s.q.resize(size_t(M * std::max(A, D)));
    s.k.resize(size_t(M * KV));
    s.v.resize(size_t(M * KV));
    s.sx.resize(size_t(M));
    s.q8.resize(size_t(M * widest));
    int64_t widest_n = 0;
    for (const BlockWeights& b : m.blocks)
        for (const PackedLinear* L : {&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down}) widest_n = std::max(widest_n, L->N);
    // the head's products are only for the R chosen rows: a 128-token prefill needs one row of
    // vocabulary-wide sums, not 128 (65 MB at 2B4T)
    s.acc.resize(size_t(std::max(M * widest_n, rows.R * m.vocab)));

    embed(m, rows, s.x.data());
    for (int64_t layer = 0; layer < int64_t(m.blocks.size()); ++layer) block(isa, m, kv, layer, rows, s);

    // final norm of the chosen rows, then the int8 head (or hand them back for a float head)
    const int64_t R = rows.R;
    std::vector<float> picked(size_t(R * D));
    for (int64_t i = 0; i < R; ++i)
        std::memcpy(picked.data() + i * D, s.x.data() + int64_t(rows.out_rows[i]) * D, size_t(D) * sizeof(float));
    const bool table_head = m.head_q || m.head_q4;
    float* normed = table_head ? s.h.data() : out;
    norm_rows(m, picked.data(), R, D, m.final_norm, normed);
    if (!table_head) return;
    quantize_rows(normed, R, D, s.q8.data(), s.sx.data());
    if (m.head_q4) {  // logits = (x_q · W) · s_x, as packed_layers.Q4Table.logits
        q4_matmul(isa, s.q8.data(), R, D, m.head_q4, m.head_q4_scale, m.vocab, out);
        for (int64_t r = 0; r < R; ++r)
            for (int64_t n = 0; n < m.vocab; ++n) out[r * m.vocab + n] *= s.sx[size_t(r)];
        return;
    }
    int8_matmul(isa, s.q8.data(), R, D, m.head_q, m.vocab, s.acc.data());
    for_rows(R, m.vocab, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t n = 0; n < m.vocab; ++n)
                out[r * m.vocab + n] = (float(s.acc[size_t(r * m.vocab + n)]) * s.sx[size_t(r)]) * m.head_row_scale[n];
    });
}

}  // namespace bn158
