// IEEE binary16 ("fp16") conversions, portable (half.cpp): the q4 head's scales and the fp16 KV
// cache. Out of line on purpose: a header inline compiled inside a file's AVX2 target pragma could
// be the copy the linker keeps for every caller.
#pragma once
#include <cstdint>

namespace bn158 {

float half_to_float(uint16_t h);  // binary16 → binary32, exactly
uint16_t float_to_half(float f);  // binary32 → binary16, round to nearest even (as torch and numpy)
void half_to_float_row(const uint16_t* h, float* out, int64_t n);
void float_to_half_row(const float* f, uint16_t* out, int64_t n);

}  // namespace bn158
