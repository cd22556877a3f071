// Run-time CPU detection: cpuid says what the core implements, xgetbv says whether the OS saves
// the wider registers. Both must agree before a path is offered. Evaluated once.
#include <cpuid.h>
#include <cstdint>
#include <cstring>

#include "cpu_features.h"

namespace bn158 {

static uint64_t read_xcr0() {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t(hi) << 32) | lo;
}

static CpuFeatures detect() {
    CpuFeatures f;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    if (osxsave && avx) {
        const uint64_t xcr0 = read_xcr0();
        f.os_avx = (xcr0 & 0x6) == 0x6;        // XMM and YMM state
        f.os_avx512 = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
    }
    if (__get_cpuid_max(0, nullptr) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = f.os_avx && (b & (1u << 5));
        f.avx512f = f.os_avx512 && (b & (1u << 16));
        f.avx512bw = f.os_avx512 && (b & (1u << 30));
        f.avx512vl = f.os_avx512 && (b & (1u << 31));
        f.avx512vnni = f.os_avx512 && (c & (1u << 11));
    }
    return f;
}

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

bool isa_supported(Isa isa) {
    const CpuFeatures& f = cpu_features();
    switch (isa) {
        case Isa::Scalar: return true;
        case Isa::Avx2: return f.avx2 && f.f16c;  // every AVX2 CPU has F16C; the q4 head's scales need it
        case Isa::Avx512Vnni: return f.avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni;
    }
    return false;
}

Isa best_isa() {
    int i = kNumIsas - 1;
    while (!isa_supported(Isa(i))) --i;  // scalar always is
    return Isa(i);
}

int isa_index(const char* name) {
    for (int i = 0; i < kNumIsas; ++i)
        if (!std::strcmp(name, kIsaNames[i])) return i;
    return -1;
}

}  // namespace bn158
