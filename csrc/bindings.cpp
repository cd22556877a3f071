// pybind11 bindings of bitnet158._C over raw numpy buffers (no torch headers: the extension builds
// with plain g++ and is usable from numpy). torch tensors reach here zero-copy via .numpy().
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "decode_ops.h"
#include "formats.h"
#include "forward_step_bindings.h"
#include "int8_gemm.h"
#include "py_args.h"
#include "q4_gemm.h"
#include "quant.h"
#include "ternary_dispatch.h"
#include "threadpool.h"

namespace py = pybind11;
using namespace bn158;

namespace {

py::array_t<int32_t> py_matmul(py::array x, py::array w, const std::string& fmt, int64_t N, int64_t K,
                               py::object out_obj, const std::string& path) {
    const Format f = parse_format(fmt);
    if (N < 1 || K < 1) throw py::value_error("N and K must be positive");
    if (!x.dtype().is(py::dtype::of<int8_t>())) throw py::value_error("x must be an int8 array");
    if (x.ndim() != 2 || x.shape(1) != K) throw py::value_error("x must have shape [M, K] with K = " + std::to_string(K));
    if (!(x.flags() & py::array::c_style)) throw py::value_error("x must be C-contiguous");
    if (!w.dtype().is(py::dtype::of<uint8_t>())) throw py::value_error("packed weights must be a uint8 array");
    if (!(w.flags() & py::array::c_style)) throw py::value_error("packed weights must be contiguous");
    const int64_t want = packed_nbytes(f, N, K);
    if (w.size() != want)
        throw py::value_error(fmt + " [" + std::to_string(N) + ", " + std::to_string(K) + "] needs " +
                              std::to_string(want) + " packed bytes, got " + std::to_string(w.size()));
    const int64_t M = x.shape(0);
    py::array_t<int32_t> out;
    if (out_obj.is_none()) {
        out = py::array_t<int32_t>({M, N});
    } else {
        out = py::array_t<int32_t>::ensure(out_obj);
        if (!out || !out_obj.cast<py::array>().dtype().is(py::dtype::of<int32_t>()) || out.ndim() != 2 ||
            out.shape(0) != M || out.shape(1) != N || !(out.flags() & py::array::c_style) || !out.writeable())
            throw py::value_error("out must be a writable C-contiguous int32 array of shape [M, N]");
    }
    const Isa isa = parse_path(path);
    if (M == 0) return out;
    const int8_t* xp = static_cast<const int8_t*>(x.data());
    const uint8_t* wp = static_cast<const uint8_t*>(w.data());
    int32_t* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        matmul(isa, f, xp, M, K, wp, N, op);
    }
    return out;
}

py::array_t<int32_t> py_int8_matmul(py::array x, py::array w, const std::string& path) {
    if (!x.dtype().is(py::dtype::of<int8_t>()) || !w.dtype().is(py::dtype::of<int8_t>()))
        throw py::value_error("int8_matmul needs int8 x and w");
    if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1))
        throw py::value_error("int8_matmul needs x [M, K] and w [N, K]");
    if (!(x.flags() & py::array::c_style) || !(w.flags() & py::array::c_style))
        throw py::value_error("int8_matmul needs C-contiguous arrays");
    const Isa isa = parse_path(path);
    const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
    py::array_t<int32_t> out({M, N});
    const int8_t* xp = static_cast<const int8_t*>(x.data());
    const int8_t* wp = static_cast<const int8_t*>(w.data());
    int32_t* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (M > 0) int8_matmul(isa, xp, M, K, wp, N, op);
    }
    return out;
}

// A whole BitLinear after its norm, in one call: per-token (or per-tensor) absmax int8
// quantization of fp32 x, the exact integer product, both scales applied after. The arithmetic is
// written to round exactly like bitnet158.quant (fp32: inv = 127 / absmax, nearbyint = half to
// even, clamp; scale = absmax / 127 · w_scale), so this path and the torch one agree bit for bit.
py::array_t<float> py_bitlinear(py::array_t<float, py::array::c_style | py::array::forcecast> x, py::array w,
                                const std::string& fmt, int64_t N, int64_t K, float w_scale, bool per_token,
                                const std::string& path) {
    const Format f = parse_format(fmt);
    if (x.ndim() != 2 || x.shape(1) != K) throw py::value_error("x must have shape [M, K] with K = " + std::to_string(K));
    if (!w.dtype().is(py::dtype::of<uint8_t>()) || !(w.flags() & py::array::c_style) || w.size() != packed_nbytes(f, N, K))
        throw py::value_error("packed weights do not match the format and shape");
    const Isa isa = parse_path(path);
    const int64_t M = x.shape(0);
    py::array_t<float> out({M, N});
    const float* xp = x.data();
    const uint8_t* wp = static_cast<const uint8_t*>(w.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        std::vector<int8_t> q(size_t(M * K));
        std::vector<float> scale(static_cast<size_t>(M));
        auto absmax_of = [&](int64_t m0, int64_t m1) { return std::max(absmax(xp + m0 * K, (m1 - m0) * K), 1e-5f); };
        const float tensor_max = per_token ? 0.0f : absmax_of(0, M);
        for (int64_t m = 0; m < M; ++m) {
            const float amax = per_token ? absmax_of(m, m + 1) : tensor_max;
            const float inv = (1.0f / amax) * 127.0f;  // torch computes 127 / t as t.reciprocal() * 127
            quantize_row(xp + m * K, K, inv, q.data() + m * K);
            scale[size_t(m)] = (amax / 127.0f) * w_scale;
        }
        std::vector<int32_t> acc(size_t(M * N));
        matmul(isa, f, q.data(), M, K, wp, N, acc.data());
        for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) op[m * N + n] = float(acc[size_t(m * N + n)]) * scale[size_t(m)];
    }
    return out;
}

py::array_t<float> py_q4_matmul(py::array x, py::array codes, py::array scales, const std::string& path) {
    if (!x.dtype().is(py::dtype::of<int8_t>()) || x.ndim() != 2 || !(x.flags() & py::array::c_style))
        throw py::value_error("q4_matmul needs a C-contiguous int8 x [M, K]");
    const int64_t M = x.shape(0), K = x.shape(1);
    if (K % kQ4Block) throw py::value_error("q4_matmul needs K to be a multiple of " + std::to_string(kQ4Block));
    if (!codes.dtype().is(py::dtype::of<uint8_t>()) || codes.ndim() != 2 || codes.shape(1) != K / 2 ||
        !(codes.flags() & py::array::c_style))
        throw py::value_error("q4_matmul needs C-contiguous uint8 codes [N, K / 2]");
    const int64_t N = codes.shape(0);
    if (!scales.dtype().is(py::dtype::of<uint16_t>()) || scales.ndim() != 2 || scales.shape(0) != N ||
        scales.shape(1) != K / kQ4Group || !(scales.flags() & py::array::c_style))
        throw py::value_error("q4_matmul needs C-contiguous fp16 scales (as uint16) [N, K / 32]");
    const Isa isa = parse_path(path);
    py::array_t<float> out({M, N});
    const int8_t* xp = static_cast<const int8_t*>(x.data());
    const uint8_t* cp = static_cast<const uint8_t*>(codes.data());
    const uint16_t* sp = static_cast<const uint16_t*>(scales.data());
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        if (M > 0 && N > 0) q4_matmul(isa, xp, M, K, cp, sp, N, op);
    }
    return out;
}

uint64_t py_read_sum(py::array buf, int nthreads, int streams) {
    if (!buf.dtype().is(py::dtype::of<uint8_t>()) || !(buf.flags() & py::array::c_style))
        throw py::value_error("buffer must be a contiguous uint8 array");
    if (streams < 1 || streams > 8) throw py::value_error("streams must be 1..8");
    const uint8_t* p = static_cast<const uint8_t*>(buf.data());
    const int64_t n = buf.size() / 128 * 128;
    const int nth = std::max(1, std::min(nthreads, pool_threads()));
    std::vector<uint64_t> part(size_t(nth), 0);
#if defined(BN158_X86)
    const bool simd = isa_supported(Isa::Avx2);
#elif defined(BN158_ARM64)
    const bool simd = true;
#else
    const bool simd = false;
#endif
    {
        py::gil_scoped_release nogil;
        pool_run(nth, [&](int64_t i) {  // one share per thread: the probe measures nth streams at once
            const int64_t a = n / 128 * i / nth * 128, b = n / 128 * (i + 1) / nth * 128;
            if (simd) {
#if defined(BN158_X86)
                part[size_t(i)] = read_sum_avx2(p + a, b - a, streams);
#elif defined(BN158_ARM64)
                part[size_t(i)] = read_sum_neon(p + a, b - a, streams);
#endif
            } else {
                uint64_t s = 0;
                const uint64_t* q = reinterpret_cast<const uint64_t*>(p + a);
                for (int64_t k = 0; k < (b - a) / 8; ++k) s += q[k];
                part[size_t(i)] = s;
            }
        });
    }
    uint64_t s = 0;
    for (auto v : part) s += v;
    return s;
}

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

F32 py_rope(F32 x, F32 cos, F32 sin) {
    if (x.ndim() < 2 || cos.ndim() != 2 || sin.ndim() != 2) throw py::value_error("rope needs x [..., T, hd], cos/sin [T, hd]");
    const int64_t t = x.shape(x.ndim() - 2), hd = x.shape(x.ndim() - 1);
    if (hd % 2 || cos.shape(0) != t || cos.shape(1) != hd || sin.shape(0) != t || sin.shape(1) != hd)
        throw py::value_error("rope: cos/sin must be [T, hd] matching x, with hd even");
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    F32 out(shape);
    const int64_t rows = t * hd != 0 ? x.size() / (t * hd) : 0;
    const float *xp = x.data(), *cp = cos.data(), *sp = sin.data();
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        rope_rows(xp, rows, t, hd, cp, sp, op);
    }
    return out;
}

F32 py_rms_norm(F32 x, F32 w, float eps, int vec_width) {
    if (x.ndim() < 1 || w.ndim() != 1 || x.shape(x.ndim() - 1) != w.shape(0))
        throw py::value_error("rms_norm needs x [..., n] and w [n]");
    if (vec_width != 8 && vec_width != 16) throw py::value_error("rms_norm: vec_width must be 8 or 16");
    const int64_t n = w.shape(0), rows = n ? x.size() / n : 0;
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    F32 out(shape);
    const float *xp = x.data(), *wp = w.data();
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        std::vector<float> sq(static_cast<size_t>(n));
        rms_norm_rows(xp, rows, n, wp, eps, vec_width, sq.data(), op);
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    bind_forward_step(m);
    m.doc() = "bitnet158 native ternary kernels (int8 activations x packed ternary weights -> int32)";
    m.def("matmul", &py_matmul, py::arg("x"), py::arg("w"), py::arg("fmt"), py::arg("N"), py::arg("K"),
          py::arg("out") = py::none(), py::arg("path") = "",
          "out[M, N] = x[M, K] (int8) @ W[N, K]^T with W packed; exact int32.");
    m.def("int8_matmul", &py_int8_matmul, py::arg("x"), py::arg("w"), py::arg("path") = "",
          "out[M, N] = x[M, K] (int8) @ w[N, K]^T (int8, in [-127, 127]); exact int32.");
    m.def("q4_matmul", &py_q4_matmul, py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("path") = "",
          "out[M, N] (fp32) = x[M, K] (int8) · the 4-bit grouped table [N, K] (codes, fp16 scales as uint16).");
    m.def("bitlinear", &py_bitlinear, py::arg("x"), py::arg("w"), py::arg("fmt"), py::arg("N"), py::arg("K"),
          py::arg("w_scale"), py::arg("per_token") = true, py::arg("path") = "",
          "y[M, N] = absmax_int8(x) @ W^T * scales: a packed BitLinear after its norm, fp32 in and out.");
    m.def("rope", &py_rope, py::arg("x"), py::arg("cos"), py::arg("sin"),
          "fp32 rotary embedding, rotate_half layout: x [..., T, hd] * cos + rotate_half(x) * sin.");
    m.def("rms_norm", &py_rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("vec_width"),
          "fp32 RMSNorm over the last dim, rounding as torch's CPU rms_norm with that vector width.");
    m.def("formats", [] {
        py::list l;
        for (const FormatSpec& spec : kFormats) l.append(spec.name);
        return l;
    }, "Names of the packed formats the kernels implement (the registry bitnet158.formats must match).");
    m.def("packed_nbytes", [](const std::string& f, int64_t N, int64_t K) { return packed_nbytes(parse_format(f), N, K); });
    m.def("cpu_features", [] {
        const CpuFeatures& f = cpu_features();
        py::dict d;  // this build's architecture's features
#if defined(BN158_X86)
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512vnni"] = f.avx512vnni;
        d["os_avx"] = f.os_avx;
        d["os_avx512"] = f.os_avx512;
#elif defined(BN158_ARM64)
        d["asimd"] = f.asimd;
        d["dotprod"] = f.dotprod;
        d["i8mm"] = f.i8mm;
#endif
        return d;
    });
    m.def("available_paths", [] {  // best first
        py::list l;
        for (int i = kNumIsas - 1; i >= 0; --i)
            if (isa_supported(Isa(i))) l.append(kIsaNames[i]);
        return l;
    });
    m.def("best_path", [] { return std::string(kIsaNames[int(best_isa())]); });
    m.def("path", [] { return std::string(kIsaNames[int(current_isa())]); });
    m.def("set_path", [](const std::string& p) {
        if (p.empty()) throw py::value_error("set_path needs a kernel path name");
        set_isa(parse_path(p));
    });
    m.def("set_num_threads", [](int n) {
        if (n < 1) throw py::value_error("thread count must be >= 1");
        py::gil_scoped_release nogil;
        pool_set_threads(n);
    });
    m.def("get_num_threads", [] { return pool_threads(); });
    m.def("read_sum", &py_read_sum, py::arg("buf"), py::arg("nthreads") = 1, py::arg("streams") = 1,
          "Sum of a uint8 buffer as uint64 words (memory read-bandwidth probe): each thread reads its "
          "share as `streams` interleaved parts.");
}
