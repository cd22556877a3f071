"""Build of the optional CPU kernel extension `bitnet158._C`.

The extension is plain C++17 over raw buffers (pybind11), compiled with the machine's g++ and
never against torch. Each ISA variant lives in its own translation unit and enables its
instructions with `#pragma GCC target`, so one build carries every path and the choice is made at
run time from cpuid. `optional=True`: if the compiler fails, the package installs without the
extension and runs its portable torch path (with one warning).
"""

import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup

# Compile the translation units on every core (part of Quickstart command 1's time budget).
ParallelCompile("BITNET158_BUILD_JOBS", default=0).install()

sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = []
if sources:
    ext_modules.append(
        Pybind11Extension(
            "bitnet158._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-fno-math-errno"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
