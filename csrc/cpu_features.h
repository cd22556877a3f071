// The instruction sets a kernel path may use, and whether this machine runs them (cpu_features.cpp).
#pragma once

namespace bn158 {

// Kernel paths, narrowest first: each one's requirements include those of every path before it
// (the dispatcher relies on this to borrow a narrower path's kernel for a format).
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512Vnni = 2 };
constexpr int kNumIsas = 3;

// The names users write (BITNET158_KERNEL, path=...), indexed by Isa.
inline constexpr const char* kIsaNames[kNumIsas] = {"scalar", "avx2", "avx512vnni"};

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false, avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false;
    bool os_avx = false, os_avx512 = false;
};
const CpuFeatures& cpu_features();

bool isa_supported(Isa isa);  // cpuid and the OS (xgetbv) both agree
Isa best_isa();               // the widest supported
int isa_index(const char* name);  // position in kIsaNames, or -1

}  // namespace bn158
