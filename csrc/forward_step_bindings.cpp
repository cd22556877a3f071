// _C.StepModel and _C.StepCache: the native forward step (forward_step.h) over arrays that Python
// owns. A StepModel holds raw pointers into the model's buffers and a reference to each array, so
// they outlive it; every array is checked here (dtype, contiguity, exact size) once, when the plan
// is built, and every index of a step (tokens, slots, positions, rows) is checked before it runs.
#include "forward_step_bindings.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "forward_step.h"
#include "half.h"
#include "py_args.h"
#include "q4_gemm.h"

namespace py = pybind11;

namespace bn158 {
namespace {

// Reads a spec dict; every array it hands out is kept alive in `keep`.
struct SpecReader {
    std::vector<py::object>& keep;

    int64_t integer(const py::dict& d, const char* key, int64_t lo = 1) {
        if (!d.contains(key)) throw py::value_error(std::string("step spec: missing ") + key);
        const int64_t v = d[key].cast<int64_t>();
        if (v < lo) throw py::value_error(std::string("step spec: ") + key + " must be >= " + std::to_string(lo));
        return v;
    }

    template <class T>
    const T* array(const py::dict& d, const char* key, int64_t size, bool optional = false) {
        if (!d.contains(key) || d[key].is_none()) {
            if (optional) return nullptr;
            throw py::value_error(std::string("step spec: missing array ") + key);
        }
        py::array a = d[key].cast<py::array>();
        if (!a.dtype().is(py::dtype::of<T>()) || !(a.flags() & py::array::c_style) || a.size() != size)
            throw py::value_error(std::string("step spec: ") + key + " must be a C-contiguous array of " +
                                  std::to_string(size) + " " + std::string(py::str(py::dtype::of<T>())));
        keep.push_back(a);
        return static_cast<const T*>(a.data());
    }

    PackedLinear linear(const py::dict& block, const char* key, int64_t N, int64_t K) {
        if (!block.contains(key)) throw py::value_error(std::string("step spec: block has no ") + key);
        const py::dict d = block[key].cast<py::dict>();
        PackedLinear L;
        L.fmt = parse_format(d["fmt"].cast<std::string>());
        L.N = integer(d, "N");
        L.K = integer(d, "K");
        if (L.N != N || L.K != K)
            throw py::value_error(std::string("step spec: ") + key + " is [" + std::to_string(L.N) + ", " +
                                  std::to_string(L.K) + "], expected [" + std::to_string(N) + ", " + std::to_string(K) + "]");
        L.w = array<uint8_t>(d, "packed", packed_nbytes(L.fmt, N, K));
        L.scale = array<float>(d, "scale", 1);
        L.bias = array<float>(d, "bias", N, true);
        L.norm = array<float>(d, "norm", K, true);
        return L;
    }
};

class PyStepModel {
  public:
    explicit PyStepModel(const py::dict& spec) {
        SpecReader r{keep_};
        StepModel& m = m_;
        m.hidden = r.integer(spec, "hidden");
        m.heads = r.integer(spec, "heads");
        m.kv_heads = r.integer(spec, "kv_heads");
        m.head_dim = r.integer(spec, "head_dim");
        m.inter = r.integer(spec, "inter");
        m.vocab = r.integer(spec, "vocab");
        m.max_pos = r.integer(spec, "max_pos");
        if (m.heads % m.kv_heads || m.head_dim % 2) throw py::value_error("step spec: bad head geometry");
        m.relu2 = spec["relu2"].cast<bool>();
        m.eps = spec["eps"].cast<float>();
        m.norm_width = int(r.integer(spec, "norm_width"));
        if (m.norm_width != 8 && m.norm_width != 16) throw py::value_error("step spec: norm_width must be 8 or 16");
        const int64_t D = m.hidden, A = m.heads * m.head_dim, KV = m.kv_heads * m.head_dim, F = m.inter;
        const bool q4 = spec.contains("embed_q4") || spec.contains("head_q4");
        if (q4 && D % kQ4Block) throw py::value_error("step spec: a q4 table needs hidden % 64 == 0");
        m.embed_q = r.array<int8_t>(spec, "embed_q", m.vocab * D, true);
        m.embed_q4 = r.array<uint8_t>(spec, "embed_q4", m.vocab * D / 2, true);
        if (m.embed_q) {
            m.embed_row_scale = r.array<float>(spec, "embed_row_scale", m.vocab);
        } else if (m.embed_q4) {
            m.embed_q4_scale = r.array<uint16_t>(spec, "embed_q4_scale", m.vocab * D / kQ4Group);
        } else {
            m.embed_f32 = r.array<float>(spec, "embed_f32", m.vocab * D);
        }
        m.final_norm = r.array<float>(spec, "final_norm", D);
        m.head_q = r.array<int8_t>(spec, "head_q", m.vocab * D, true);
        if (m.head_q) m.head_row_scale = r.array<float>(spec, "head_row_scale", m.vocab);
        m.head_q4 = r.array<uint8_t>(spec, "head_q4", m.vocab * D / 2, true);
        if (m.head_q4) m.head_q4_scale = r.array<uint16_t>(spec, "head_q4_scale", m.vocab * D / kQ4Group);
        m.rope_cos = r.array<float>(spec, "rope_cos", m.max_pos * m.head_dim);
        m.rope_sin = r.array<float>(spec, "rope_sin", m.max_pos * m.head_dim);
        for (const py::handle h : spec["blocks"].cast<py::list>()) {
            const py::dict b = h.cast<py::dict>();
            BlockWeights w;
            w.input_norm = r.array<float>(b, "input_norm", D, true);
            w.q = r.linear(b, "q", A, D);
            w.k = r.linear(b, "k", KV, D);
            w.v = r.linear(b, "v", KV, D);
            w.attn_sub_norm = r.array<float>(b, "attn_sub_norm", A, true);
            w.o = r.linear(b, "o", D, A);
            w.post_attn_norm = r.array<float>(b, "post_attn_norm", D, true);
            w.gate = r.linear(b, "gate", F, D);
            w.up = r.linear(b, "up", F, D);
            w.ffn_sub_norm = r.array<float>(b, "ffn_sub_norm", F, true);
            w.down = r.linear(b, "down", D, F);
            m.blocks.push_back(w);
        }
        if (m.blocks.empty()) throw py::value_error("step spec: no blocks");
    }

    const StepModel& model() const { return m_; }

  private:
    StepModel m_;
    std::vector<py::object> keep_;
};

class PyStepCache {
  public:
    PyStepCache(const py::list& keys, const py::list& values, const py::object& key_scales,
                const py::object& value_scales) {
        if (keys.size() != values.size() || keys.empty())
            throw py::value_error("step cache: keys and values need one array per layer");
        std::vector<py::ssize_t> shape;
        const py::dtype f32 = py::dtype::of<float>(), f16("float16"), i8 = py::dtype::of<int8_t>();
        const py::dtype kind = keys[0].cast<py::array>().dtype();
        kv_.type = kind.is(f16) ? KVType::F16 : kind.is(i8) ? KVType::Q8 : KVType::F32;
        const py::dtype want = kv_.type == KVType::F16 ? f16 : kv_.type == KVType::Q8 ? i8 : f32;
        auto take = [&](const py::handle h, const py::dtype& dtype, int ndim) -> void* {
            py::array a = h.cast<py::array>();
            if (!a.dtype().is(dtype) || !(a.flags() & py::array::c_style) || !a.writeable() || a.ndim() != ndim)
                throw py::value_error("step cache: each layer must be a writable C-contiguous float32, float16 or "
                                      "int8 (all alike) [slots, kv_heads, len, head_dim], and an int8 cache's scales "
                                      "float32 [slots, kv_heads, len]");
            std::vector<py::ssize_t> s(a.shape(), a.shape() + ndim);
            if (shape.empty()) shape = s;
            if (!std::equal(s.begin(), s.end(), shape.begin())) throw py::value_error("step cache: layers differ in shape");
            keep_.push_back(a);
            return a.mutable_data();
        };
        for (size_t i = 0; i < keys.size(); ++i) {
            kv_.keys.push_back(take(keys[i], want, 4));
            kv_.values.push_back(take(values[i], want, 4));
        }
        if ((kv_.type == KVType::Q8) != !key_scales.is_none() || key_scales.is_none() != value_scales.is_none())
            throw py::value_error("step cache: an int8 cache needs key and value scales, and only it");
        if (kv_.type == KVType::Q8) {
            const py::list ks = key_scales.cast<py::list>(), vs = value_scales.cast<py::list>();
            if (ks.size() != keys.size() || vs.size() != keys.size())
                throw py::value_error("step cache: one key and one value scale array per layer");
            for (size_t i = 0; i < keys.size(); ++i) {
                kv_.key_scales.push_back(static_cast<float*>(take(ks[i], f32, 3)));
                kv_.value_scales.push_back(static_cast<float*>(take(vs[i], f32, 3)));
            }
        }
        kv_.slots = shape[0];
        kv_heads_ = shape[1];
        kv_.max_len = shape[2];
        head_dim_ = shape[3];
    }

    const KVSlots& kv() const { return kv_; }
    int64_t kv_heads() const { return kv_heads_; }
    int64_t head_dim() const { return head_dim_; }

  private:
    KVSlots kv_;
    int64_t kv_heads_ = 0, head_dim_ = 0;
    std::vector<py::object> keep_;
};

using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

py::array_t<float> forward(const PyStepModel& self, const PyStepCache& cache, I64 tokens, I32 slots, I32 pos,
                           I32 out_rows, const std::string& path) {
    const StepModel& m = self.model();
    const KVSlots& kv = cache.kv();
    if (int64_t(kv.keys.size()) != int64_t(m.blocks.size()) || cache.kv_heads() != m.kv_heads ||
        cache.head_dim() != m.head_dim)
        throw py::value_error("step: the cache does not match the model (layers, kv heads or head dim)");
    const int64_t M = tokens.size();
    if (M < 1 || slots.size() != M || pos.size() != M) throw py::value_error("step: tokens, slots and positions need one entry per row");
    const int64_t* t = tokens.data();
    const int32_t *s = slots.data(), *p = pos.data(), *o = out_rows.data();
    const int64_t limit = std::min(kv.max_len, m.max_pos);
    for (int64_t i = 0; i < M; ++i) {
        if (t[i] < 0 || t[i] >= m.vocab) throw py::value_error("step: token id " + std::to_string(t[i]) + " is outside the vocabulary");
        if (s[i] < 0 || s[i] >= kv.slots) throw py::value_error("step: slot " + std::to_string(s[i]) + " is outside the cache");
        if (p[i] < 0 || p[i] >= limit) throw py::value_error("step: position " + std::to_string(p[i]) + " is outside the cache and RoPE table");
    }
    const int64_t R = out_rows.size();
    for (int64_t i = 0; i < R; ++i)
        if (o[i] < 0 || o[i] >= M) throw py::value_error("step: output row " + std::to_string(o[i]) + " is not a row of the step");
    const Isa isa = parse_path(path);
    py::array_t<float> out({R, m.head_q || m.head_q4 ? m.vocab : m.hidden});
    StepRows rows{t, s, p, M, o, R};
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        forward_step(isa, m, kv, rows, op);
    }
    return out;
}

}  // namespace

void bind_forward_step(py::module_& m) {
    py::class_<PyStepModel>(m, "StepModel", "A packed model's weights as the native forward step reads them.")
        .def(py::init<const py::dict&>(), py::arg("spec"))
        .def("forward", &forward, py::arg("cache"), py::arg("tokens"), py::arg("slots"), py::arg("positions"),
             py::arg("out_rows"), py::arg("path") = "",
             "Run the whole model on M rows (token, slot, position); store their keys and values in the "
             "cache; return logits (int8 head) or final-normed hidden rows for out_rows.");
    py::class_<PyStepCache>(m, "StepCache", "A KV cache's per-layer key and value arrays.")
        .def(py::init<const py::list&, const py::list&, const py::object&, const py::object&>(), py::arg("keys"),
             py::arg("values"), py::arg("key_scales") = py::none(), py::arg("value_scales") = py::none());
    m.def(
        "float_to_half",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> x) {
            py::array_t<uint16_t> out(x.size());
            float_to_half_row(x.data(), out.mutable_data(), x.size());
            return out;
        },
        "fp16 bit patterns of x (flattened), rounded as the fp16 KV cache stores them.");
}

}  // namespace bn158
