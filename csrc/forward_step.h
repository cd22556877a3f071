// The whole transformer forward for a packed model in one native call (forward_step.cpp): M rows,
// each a token of some sequence at its own position with its own KV-cache slot — one sequence's
// prefill chunk, one new token for each of several sequences, or both at once.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu_features.h"
#include "formats.h"

namespace bn158 {

// A packed BitLinear: y = absmax_int8(norm?(x)) · Wᵀ · scales (+ bias).
struct PackedLinear {
    Format fmt = Format(0);
    const uint8_t* w = nullptr;
    int64_t N = 0, K = 0;
    const float* scale = nullptr;  // [1]: the weight scale, read at each step (a load may rewrite it in place)
    const float* bias = nullptr;  // [N] or nullptr
    const float* norm = nullptr;  // [K] gain of the layer's own RMSNorm ("inner" placement) or nullptr
};

// One decoder block; a nullptr norm is absent (nn.Identity in the Python model).
struct BlockWeights {
    const float* input_norm = nullptr;
    PackedLinear q, k, v, o;
    const float* attn_sub_norm = nullptr;
    const float* post_attn_norm = nullptr;
    PackedLinear gate, up, down;
    const float* ffn_sub_norm = nullptr;
};

struct StepModel {
    int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0, vocab = 0, max_pos = 0;
    bool relu2 = false;  // relu² (2B4T) instead of SiLU-gated (SwiGLU)
    float eps = 1e-5f;
    int norm_width = 8;  // torch's lane width for the RMSNorm sum (decode_ops.h)
    // Embedding: an int8 per-row table (codes · row scale), a q4 table (q4_gemm.h), or fp32 rows.
    const int8_t* embed_q = nullptr;
    const float* embed_row_scale = nullptr;
    const uint8_t* embed_q4 = nullptr;
    const uint16_t* embed_q4_scale = nullptr;  // fp16 bits [vocab, hidden / 32]
    const float* embed_f32 = nullptr;
    const float* final_norm = nullptr;
    // Head: an int8 per-row table or a q4 table; neither: the step returns the final-normed hidden rows and the
    // caller applies its own (float) head.
    const int8_t* head_q = nullptr;
    const float* head_row_scale = nullptr;
    const uint8_t* head_q4 = nullptr;  // or a q4 table
    const uint16_t* head_q4_scale = nullptr;
    const float* rope_cos = nullptr;  // [max_pos, head_dim], rotate_half layout
    const float* rope_sin = nullptr;
    std::vector<BlockWeights> blocks;
};

// A KV cache: per layer, keys and values [slots, kv_heads, max_len, head_dim], fp32 or (half) fp16
// bit patterns: half the memory and half the bytes attention reads a step at long contexts; each
// row is rounded to nearest even when stored, and attention computes in fp32 either way.
// fp32 rows, fp16 rows, or q8: int8 codes with one fp32 scale a row (position of a KV head), the
// activation quantizer's absmax arithmetic (quant.h), as cache.py stores them.
enum class KVType { F32, F16, Q8 };

struct KVSlots {
    std::vector<void*> keys, values;               // per layer [slots, kv_heads, max_len, head_dim]
    std::vector<float*> key_scales, value_scales;  // Q8: per layer [slots, kv_heads, max_len]
    KVType type = KVType::F32;
    int64_t slots = 0, max_len = 0;
};

// Row m: token tokens[m] of the sequence in slot slot[m] at position pos[m]. The caller has
// checked every index (token < vocab, slot < slots, pos < min(max_len, max_pos)) and that the
// rows of one slot continue where its cache ends. out_rows: which rows' outputs to return.
struct StepRows {
    const int64_t* tokens = nullptr;
    const int32_t* slot = nullptr;
    const int32_t* pos = nullptr;
    int64_t M = 0;
    const int32_t* out_rows = nullptr;
    int64_t R = 0;
};

// Writes every row's keys and values into the cache and returns, for the R chosen rows, logits
// [R, vocab] (model with an int8 head) or final-normed hidden rows [R, hidden]. Blocks until done;
// threads from the shared pool.
void forward_step(Isa isa, const StepModel& m, const KVSlots& kv, const StepRows& rows, float* out);

}  // namespace bn158
