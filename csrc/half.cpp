// IEEE binary16 conversions (half.h).
#include "half.h"

#include <cstring>

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace bn158 {

float half_to_float(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);  // inf / nan
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: renormalize
        int e = -1;
        uint32_t m = man;
        do {
            ++e;
            m <<= 1;
        } while (!(m & 0x400));
        bits = sign | (uint32_t(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t float_to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u)  // inf, or nan kept quiet with its top payload bits
        return uint16_t(sign | 0x7C00 | (ax > 0x7F800000u ? 0x200 | ((ax >> 13) & 0x3FF) : 0));
    if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00);  // >= 65520 rounds past the largest half
    if (ax >= 0x38800000u) {                                 // a normal half (>= 2^-14)
        uint32_t h = (ax - 0x38000000u) >> 13;               // rebias 127 → 15, keep 10 mantissa bits
        const uint32_t rem = ax & 0x1FFF;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;  // a carry moves into the exponent, as it should
        return uint16_t(sign | h);
    }
    if (ax <= 0x33000000u) return uint16_t(sign);  // <= 2^-25: rounds to zero (the tie goes to even 0)
    // a subnormal half: the value in units of 2^-24 is m · 2^(e - 126), e in [102, 112]
    const uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000, shift = 126 - e;
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), tie = 1u << (shift - 1);
    if (rem > tie || (rem == tie && (h & 1))) ++h;  // 0x400 is the smallest normal: still right
    return uint16_t(sign | h);
}

// Rows: on arm64 the base instruction set converts 4 at a time (fcvtl / fcvtn, exact one way and
// round-to-nearest-even the other, as the functions above): the portable attention loop there
// converts every cache row it reads. Elsewhere the loops below (x86's tiles convert with F16C
// themselves; the step's stores are a few rows a layer).
void half_to_float_row(const uint16_t* h, float* out, int64_t n) {
    int64_t i = 0;
#if defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1q_f32(out + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + i))));
#endif
    for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

void float_to_half_row(const float* f, uint16_t* out, int64_t n) {
    int64_t i = 0;
#if defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1_u16(out + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(f + i))));
#endif
    for (; i < n; ++i) out[i] = float_to_half(f[i]);
}

}  // namespace bn158
