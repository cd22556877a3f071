// Argument parsing shared by the binding translation units (bindings.cpp, forward_step_bindings.cpp).
#pragma once
#include <pybind11/pybind11.h>

#include <string>

#include "cpu_features.h"
#include "formats.h"
#include "ternary_dispatch.h"

namespace bn158 {

// Names come from the one table of each (formats.h, cpu_features.h), never spelled out here.
inline Format parse_format(const std::string& f) {
    const int i = format_index(f.c_str());
    if (i >= 0) return Format(i);
    std::string known;
    for (const FormatSpec& spec : kFormats) known += (known.empty() ? "" : ", ") + std::string(spec.name);
    throw pybind11::value_error("unknown packed format '" + f + "' (expected one of " + known + ")");
}

// "" is the path in use; any other must be known and runnable on this CPU.
inline Isa parse_path(const std::string& path) {
    if (path.empty()) return current_isa();
    const int i = isa_index(path.c_str());
    if (i < 0) {
        std::string known;
        for (int j = 0; j < kNumIsas; ++j)  // this build's architecture only
            if (isa_in_build(Isa(j))) known += (known.empty() ? "" : ", ") + std::string(kIsaNames[j]);
        throw pybind11::value_error("unknown kernel path '" + path + "' (expected one of " + known + ")");
    }
    if (!isa_supported(Isa(i))) throw pybind11::value_error("kernel path '" + path + "' is not supported by this CPU");
    return Isa(i);
}

}  // namespace bn158
