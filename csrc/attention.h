// Causal attention of a native step's rows over their KV-cache slots (attention.cpp).
#pragma once
#include <cstdint>

#include "forward_step.h"

namespace bn158 {

// q [M, heads·hd] (roped), every row's keys/values [0, pos] already stored in its slot; out
// [M, heads·hd] = softmax(q·kᵀ/√hd)·v per row and head. Head h reads KV head h / (heads /
// kv_heads), as torch's enable_gqa does. A row's result never depends on the other rows, on the
// thread count or on the kernel path (the x86 SIMD paths run AVX2 register tiles, the others
// one query at a time, with the same arithmetic). Blocks until done; threads from the shared pool.
void attention(Isa isa, const StepModel& m, const KVSlots& kv, int64_t layer, const StepRows& rows, const float* q,
               float* out);

}  // namespace bn158
