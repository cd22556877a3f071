// The instruction sets a kernel path may use, and whether this machine runs them (cpu_features.cpp).
#pragma once

// One build carries the paths of the architecture it is compiled for (and the portable one).
#if defined(__x86_64__) || defined(_M_X64)
#define BN158_X86 1
#elif defined(__aarch64__)
#define BN158_ARM64 1
#endif

// Which optional arm64 kernels this compiler builds. GCC compiles them under `#pragma GCC target`
// whatever the build's own -march (dotprod intrinsics since GCC 8, i8mm since GCC 10); clang has
// no such pragma, so there only what its own target already has (Apple's default: dotprod). A path
// whose kernels are not built is not offered (isa_supported), so a path's name says what runs.
#if defined(BN158_ARM64)
#if defined(__clang__)
#if defined(__ARM_FEATURE_DOTPROD)
#define BN158_BUILD_DOTPROD 1
#endif
#if defined(__ARM_FEATURE_DOTPROD) && defined(__ARM_FEATURE_MATMUL_INT8)
#define BN158_BUILD_I8MM 1
#endif
#elif defined(__GNUC__)
#if __GNUC__ >= 8
#define BN158_BUILD_DOTPROD 1
#endif
#if __GNUC__ >= 10
#define BN158_BUILD_I8MM 1
#endif
#endif
#endif

namespace bn158 {

// Kernel paths. Within one architecture each path's requirements include those of the narrower
// paths before it (kIsaNarrower), which the dispatcher relies on to borrow a kernel for a format:
//   x86-64 : scalar < avx2 < avx512vnni
//   arm64  : scalar < neon (every ARMv8-A) < dotprod (ARMv8.2 sdot/udot) < i8mm (+ smmla for M > 1)
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2, Neon = 3, NeonDot = 4, NeonI8mm = 5 };
constexpr int kNumIsas = 6;

// The names users write (BITNET158_KERNEL, path=...), indexed by Isa. A build knows only the names
// of its own architecture's paths (isa_index).
inline constexpr const char* kIsaNames[kNumIsas] = {"scalar", "avx2", "avx512vnni", "neon", "dotprod", "i8mm"};

// The next narrower path of the same architecture, -1 for scalar (the end of every chain).
inline constexpr int kIsaNarrower[kNumIsas] = {-1, 0, 1, 0, 3, 4};

enum class Arch : int { Any = 0, X86 = 1, Arm64 = 2 };
inline constexpr Arch kIsaArch[kNumIsas] = {Arch::Any, Arch::X86, Arch::X86, Arch::Arm64, Arch::Arm64, Arch::Arm64};
#if defined(BN158_X86)
inline constexpr Arch kBuildArch = Arch::X86;
#elif defined(BN158_ARM64)
inline constexpr Arch kBuildArch = Arch::Arm64;
#else
inline constexpr Arch kBuildArch = Arch::Any;
#endif
// Whether this build holds the path at all (a path of another architecture is not even a name here).
constexpr bool isa_in_build(Isa isa) { return kIsaArch[int(isa)] == Arch::Any || kIsaArch[int(isa)] == kBuildArch; }

// Every chain steps down to a path of the same architecture (or scalar) and ends at scalar.
constexpr bool narrower_chains_ok() {
    for (int i = 1; i < kNumIsas; ++i) {
        const int n = kIsaNarrower[i];
        if (n < 0 || n >= i || (kIsaArch[n] != Arch::Any && kIsaArch[n] != kIsaArch[i])) return false;
    }
    return kIsaNarrower[0] == -1 && kIsaArch[0] == Arch::Any;
}
static_assert(narrower_chains_ok(), "kIsaNarrower must step down within one architecture to scalar");

struct CpuFeatures {
    // x86-64 (cpuid + xgetbv)
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false;
    bool os_avx = false, os_avx512 = false;
    // arm64 (getauxval on Linux, sysctl on Apple): Advanced SIMD, ARMv8.2 dot product, int8 matrix multiply
    bool asimd = false, dotprod = false, i8mm = false;
};
const CpuFeatures& cpu_features();

bool isa_supported(Isa isa);  // in this build, and the CPU and OS both run it
Isa best_isa();               // the widest supported
int isa_index(const char* name);  // position in kIsaNames of a path in this build, or -1

}  // namespace bn158
