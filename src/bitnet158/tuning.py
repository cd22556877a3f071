"""Per-shape choice of the fastest packed format on this machine (``PackConfig(format="auto")``).

Which kernel wins depends on the CPU and the shape: on AVX2 the multiply-accumulate i2 kernel
beats the multiplication-free lookup-table one (lut2) everywhere we measured; with VNNI, or on
bandwidth-starved machines where base-3's smaller reads pay, another may win. So ``auto`` times
every registered format on each distinct weight shape of the model, as a decode step uses them —
one activation row (M = 1), weights cycled through enough copies to leave the caches — and packs
each shape in the fastest. Every format computes the same integers, so the choice changes speed
and file size, never the outputs.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Iterable

import numpy as np
import torch

from . import kernels
from .formats import FORMATS, get_format
from .formats.base import aligned_copy
from .packed_layers import shape_key

Shape = tuple[int, int]  # (N, K): W is [N, K]
CACHE_BYTES = 64 << 20   # cycle at least this many weight bytes per timing (2× a 32 MiB L3)
ROUNDS = 5
MAX_COPIES = 1024


def time_format(fmt: str, n: int, k: int, rounds: int = ROUNDS, rng: np.random.Generator | None = None) -> float:
    """Median seconds of one M = 1 ternary_matmul on an [n, k] matrix in `fmt`, weights cold."""
    rng = rng or np.random.default_rng(0)
    packer = get_format(fmt)
    one = packer.pack(rng.integers(-1, 2, size=(n, k), dtype=np.int8))
    count = min(MAX_COPIES, max(2, math.ceil(CACHE_BYTES / one.nbytes)))  # tiny shapes: cache-resident is real
    copies = [aligned_copy(one) for _ in range(count)]  # as packed layers hold them: on cache lines
    x = rng.integers(-127, 128, size=(1, k), dtype=np.int8)
    if kernels.extension_available() and kernels.current_path() != kernels.TORCH_PATH:
        def call(w):  # the native call a packed layer makes, without torch's conversions
            return kernels.ternary_matmul_numpy(x, w, fmt, n, k)
    else:
        xt = torch.from_numpy(x)

        def call(w):
            return kernels.ternary_matmul(xt, torch.from_numpy(w), fmt, n, k)
    call(copies[0])  # warm up the path and the pool
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for w in copies:
            call(w)
        samples.append((time.perf_counter() - t0) / len(copies))
    return statistics.median(samples)


def choose_formats(shapes: Iterable[Shape], candidates: Iterable[str] | None = None,
                   timer: Callable[[str, int, int], float] | None = None) -> dict[str, str]:
    """{"NxK": fastest format} for each distinct shape; `timer(fmt, n, k)` gives seconds per call
    (`time_format` by default)."""
    timer = timer or time_format
    names = list(candidates or FORMATS)
    choice = {}
    for n, k in sorted(set(shapes)):
        times = {fmt: timer(fmt, n, k) for fmt in names}
        choice[shape_key(n, k)] = min(names, key=lambda f: times[f])
    return choice
