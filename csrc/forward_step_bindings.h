// Python bindings of the native forward step (forward_step_bindings.cpp): _C.StepModel, _C.StepCache.
#pragma once
#include <pybind11/pybind11.h>

namespace bn158 {
void bind_forward_step(pybind11::module_& m);
}  // namespace bn158
