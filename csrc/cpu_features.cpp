// Run-time CPU detection, evaluated once. x86-64: cpuid says what the core implements, xgetbv says
// whether the OS saves the wider registers; both must agree before a path is offered. arm64: the
// kernel's hardware capability bits (Linux getauxval) or the hw.optional.arm sysctls (Apple), which
// already mean "the OS enables it".
#include "cpu_features.h"

#include <cstdint>
#include <cstring>

#if defined(BN158_X86)
#include <cpuid.h>
#elif defined(BN158_ARM64) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(BN158_ARM64) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace bn158 {

#if defined(BN158_X86)
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
#elif defined(BN158_ARM64)
#if defined(__linux__)
// The bit numbers of the Linux arm64 ABI (asm/hwcap.h), spelled out for older C libraries' headers.
constexpr unsigned long kHwcapAsimd = 1ul << 1, kHwcapAsimdDp = 1ul << 20;  // AT_HWCAP
constexpr unsigned long kHwcap2I8mm = 1ul << 13;                             // AT_HWCAP2
static CpuFeatures detect() {
    CpuFeatures f;
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    f.asimd = hw & kHwcapAsimd;
    f.dotprod = f.asimd && (hw & kHwcapAsimdDp);
    f.i8mm = f.asimd && (hw2 & kHwcap2I8mm);
    return f;
}
#elif defined(__APPLE__)
static bool sysctl_flag(const char* name) {
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname(name, &v, &n, nullptr, 0) == 0 && v != 0;
}
static CpuFeatures detect() {
    CpuFeatures f;
    f.asimd = true;  // every Apple arm64 CPU
    f.dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
    f.i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
    return f;
}
#else
static CpuFeatures detect() {  // no way to ask: Advanced SIMD is part of every ARMv8-A profile
    CpuFeatures f;
    f.asimd = true;
    return f;
}
#endif
#else
static CpuFeatures detect() { return CpuFeatures{}; }
#endif

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

bool isa_supported(Isa isa) {
    if (!isa_in_build(isa)) return false;
    const CpuFeatures& f = cpu_features();
    switch (isa) {
        case Isa::Scalar: return true;
        case Isa::Avx2: return f.avx2 && f.f16c;  // every AVX2 CPU has F16C; the q4 head's scales need it
        case Isa::Avx512Vnni:  // F16C too: this path runs the AVX2 attention tiles (fp16 caches) and q4 head
            return f.avx2 && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni;
        case Isa::Neon: return f.asimd;
#if defined(BN158_BUILD_DOTPROD)
        case Isa::NeonDot: return f.asimd && f.dotprod;
#endif
#if defined(BN158_BUILD_I8MM) && defined(BN158_BUILD_DOTPROD)
        case Isa::NeonI8mm: return f.asimd && f.dotprod && f.i8mm;  // its M = 1 kernels are the sdot ones
#endif
        default: return false;  // a path whose kernels this compiler did not build
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
        if (isa_in_build(Isa(i)) && !std::strcmp(name, kIsaNames[i])) return i;
    return -1;
}

}  // namespace bn158
