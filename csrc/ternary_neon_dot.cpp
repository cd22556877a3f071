// arm64 kernels with the ARMv8.2 dot product (sdot: 4 int8 products summed into each int32 lane,
// 16 per instruction, no int16 stage): the `dotprod` path for i2 and base3. lut2 borrows the
// `neon` path's lookup-table kernel (it has no multiplies to replace).
//
// Compiled for armv8.2-a+dotprod with `#pragma GCC target`, so one build holds every path; the
// dispatcher runs it only where the CPU reports the dot product (cpu_features.cpp). Clang has no
// `#pragma GCC target`: there the kernels are built only when the compiler's own target already
// has the dot product (Apple silicon's default does); otherwise (and with GCC before 8) the
// `dotprod` path is not offered (BN158_BUILD_DOTPROD, cpu_features.h).
#if defined(__aarch64__)  // arm64 builds only
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(BN158_BUILD_DOTPROD)  // cpu_features.h: this compiler builds the dotprod kernels
#if !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
#endif
#include "ternary_neon_impl.h"

namespace bn158 {
namespace {

struct MacDot {
    static inline int32x4_t mac(int32x4_t acc, int8x16_t u, int8x16_t x) { return vdotq_s32(acc, u, x); }
};

constexpr int64_t kGemmMinM = 4;

void range_i2(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    (a.M >= kGemmMinM ? gemm_i2<ChunkMac<MacDot>> : gemv_i2<MacDot>)(a, w, s, out, ldo, t0, t1);
}

void range_b3(const Act& a, const uint8_t* w, const WShape& s, int32_t* out, int64_t ldo, int64_t t0, int64_t t1) {
    (a.M >= kGemmMinM ? gemm_b3<ChunkMac<MacDot>> : gemv_b3<MacDot>)(a, w, s, out, ldo, t0, t1);
}

}  // namespace
}  // namespace bn158

#if !defined(__clang__)
#pragma GCC pop_options
#endif
#endif  // BN158_BUILD_DOTPROD

namespace bn158 {
#if defined(BN158_BUILD_DOTPROD)
const KernelTable kNeonDotKernels = KernelTable{}.with(Format::I2, {range_i2}).with(Format::Base3, {range_b3});
#else
const KernelTable kNeonDotKernels = KernelTable{};  // never used: the path is not offered
#endif
}  // namespace bn158

#endif  // arm64
