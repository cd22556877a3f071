"""The compiled extension (``bitnet158._C``) and the kernel path in use: loading, choosing the path
from the CPU's features, checking each SIMD path against the scalar oracle, thread count.

numpy only, no torch: the torch-free runtime (`bitnet158.runtime`) and the torch wrappers in
`kernels` both start here, so they agree on one extension, one path and one thread pool.

Environment overrides (read when first asked; ``set_path`` changes the path later):

- ``BITNET158_KERNEL=scalar|avx2|avx512vnni|neon|dotprod|i8mm|torch`` forces a path (an unsupported one
  is an error; ``torch`` is the torch package's portable path);
- ``BITNET158_DISABLE_EXT=1`` behaves as if the extension had failed to build.
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from typing import Any

import numpy as np

from .errors import ConfigError
from .formats import FORMATS

ENV_PATH = "BITNET158_KERNEL"
ENV_DISABLE = "BITNET158_DISABLE_EXT"
TORCH_PATH = "torch"
# The compiled paths a build for this machine's architecture can hold (csrc/cpu_features.h), best first.
_X86_PATHS, _ARM64_PATHS = ("avx512vnni", "avx2"), ("i8mm", "dotprod", "neon")
_ARCH_PATHS = {"x86_64": _X86_PATHS, "amd64": _X86_PATHS, "aarch64": _ARM64_PATHS, "arm64": _ARM64_PATHS}

_ext: Any = None
_ext_error: str | None = None
_loaded = False
_verified: dict[str, bool] = {}
_path: str | None = None


def _default_threads() -> int:
    """torch's own count when torch is loaded (one per physical core), else the CPUs this process
    may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def extension() -> Any:
    """The loaded extension module, or None (see `extension_error`)."""
    return _load_extension()


def extension_error() -> str | None:
    """Why the extension is unavailable (None when it is loaded)."""
    _load_extension()
    return _ext_error


def _load_extension() -> Any:
    global _ext, _ext_error, _loaded
    if _loaded:
        return _ext
    _loaded = True
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        _ext_error = f"disabled by {ENV_DISABLE}"
    else:
        try:
            from . import _C  # type: ignore[attr-defined]
            _ext = _C
        except ImportError as exc:  # not built (no compiler at install time) or wrong platform
            _ext_error = str(exc).splitlines()[0]
    if _ext is not None:
        _ext.set_num_threads(_default_threads())
    if _ext is None:
        warnings.warn(f"bitnet158: the compiled CPU kernels are unavailable ({_ext_error}); using the "
                      f"portable torch path, which is much slower. Reinstall with a working g++ to build them.",
                      RuntimeWarning, stacklevel=3)
    return _ext


def extension_available() -> bool:
    return _load_extension() is not None


def available_paths() -> list[str]:
    """Kernel paths this machine can run, fastest first (``torch`` always last)."""
    ext = _load_extension()
    paths = [p for p in ext.available_paths() if _self_check(p)] if ext is not None else []
    return paths + [TORCH_PATH]


def cpu_features() -> dict[str, bool]:
    ext = _load_extension()
    return dict(ext.cpu_features()) if ext is not None else {}


def _self_check(path: str) -> bool:
    """Compare a SIMD path with the scalar oracle once, on shapes that touch every code branch, in
    every registered format (one the extension does not know raises here, at the first path choice),
    and its int8 head kernels."""
    if path in _verified:
        return _verified[path]
    ok = True
    if path != "scalar":
        rng = np.random.default_rng(1234)
        for fmt_name, fmt in FORMATS.items():
            for m, n, k in ((1, 13, 300), (5, 24, 517), (17, 9, 160)):
                codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
                x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
                w = fmt.pack(codes)
                got = _ext.matmul(x, w, fmt_name, n, k, path=path)
                ok &= bool(np.array_equal(got, _ext.matmul(x, w, fmt_name, n, k, path="scalar")))
        # the int8 head: GEMV, the M > 1 blocks, and (AVX-512) the panels: two 8-row blocks and a row
        # left over, K past a 64-byte step
        for m, n, k in ((1, 9, 200), (5, 9, 200), (6, 4, 64), (7, 17, 200)):
            x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
            w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
            ok &= bool(np.array_equal(_ext.int8_matmul(x, w, path=path), _ext.int8_matmul(x, w, path="scalar")))
        if not ok:
            warnings.warn(f"bitnet158: kernel path {path!r} disagrees with the scalar reference on this "
                          f"machine and is disabled; please report this.", RuntimeWarning, stacklevel=3)
    _verified[path] = ok
    return ok


def current_path() -> str:
    global _path
    if _path is None:
        requested = os.environ.get(ENV_PATH, "").strip()
        _path = _validate_path(requested) if requested else available_paths()[0]
    return _path


def _validate_path(name: str) -> str:
    paths = available_paths()
    if name not in paths:
        ext = _load_extension()
        known = [*_ARCH_PATHS.get(platform.machine().lower(), ()), "scalar", TORCH_PATH]
        if name not in known:
            raise ConfigError(f"unknown kernel path {name!r}; expected one of {', '.join(known)}")
        why = "the compiled extension is unavailable" if ext is None else "this CPU does not support it"
        raise ConfigError(f"kernel path {name!r} cannot run here ({why}); available: {', '.join(paths)}")
    return name


def set_path(name: str | None) -> str:
    """Select the kernel path (None: the best one); returns the path now in use."""
    global _path
    _path = None if name is None else _validate_path(name)
    return current_path()


def set_num_threads(n: int) -> None:
    """Threads of the extension's pool (the torch path follows ``torch.set_num_threads``)."""
    if n < 1:
        raise ConfigError(f"thread count must be at least 1, got {n}")
    ext = _load_extension()
    if ext is not None:
        ext.set_num_threads(int(n))


def get_num_threads() -> int:
    ext = _load_extension()
    if ext is not None:
        return ext.get_num_threads()
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else _default_threads()
