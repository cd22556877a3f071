"""Int8-activation × packed-ternary-weight matmul: the compiled extension, or a portable torch path.

``ternary_matmul(x, packed, fmt, n, k)`` returns the exact int32 products ``x @ W.T`` for int8
``x [M, K]`` and a ternary ``W [N, K]`` packed by :mod:`bitnet158.formats`. The scales are the
caller's business (applied after the integer product, see :mod:`bitnet158.pack`).

Paths, chosen once at import from the CPU's features (best first):

- ``avx512vnni`` / ``avx2`` / ``scalar`` on x86-64, ``i8mm`` / ``dotprod`` / ``neon`` / ``scalar`` on arm64:
  the C++ extension ``bitnet158._C`` (``csrc/``; a build holds its own architecture's paths);
- ``torch``: unpack to int8 codes and multiply in fp32 — exact while K·127 < 2²⁴ — used when the
  extension is missing (one warning) and as an independent cross-check in tests.

Environment overrides (read at import; ``set_path`` changes the path later):

- ``BITNET158_KERNEL=scalar|avx2|avx512vnni|neon|dotprod|i8mm|torch`` forces a path (an unsupported one
  is an error);
- ``BITNET158_DISABLE_EXT=1`` behaves as if the extension had failed to build.

Before a SIMD path is first used it is checked against the scalar oracle on a few small random
matrices; a path that disagrees is dropped with a warning (a miscompiled or untested ISA must
never give wrong answers silently).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from . import native
from .errors import ConfigError, FormatError
from .formats import get_format
from .formats.q4_table import dequantize_rows_q4
from .formats.base import aligned_copy  # noqa: F401  (public here: the kernels are why it exists)
# the extension and the path choice live in `native` (torch-free); public here as they always were
from .native import (ENV_DISABLE, ENV_PATH, TORCH_PATH, _load_extension, available_paths,  # noqa: F401
                     cpu_features, current_path, extension_available, get_num_threads, set_num_threads, set_path)

def unpack_codes(packed: torch.Tensor, fmt: str, n: int, k: int) -> torch.Tensor:
    """int8 codes [N, K] of a packed matrix (the torch path's weights)."""
    return torch.from_numpy(get_format(fmt).unpack(packed.numpy(), n, k))


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, fmt: str, n: int, k: int, *,
                   path: str | None = None, codes: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 ``x @ W.T`` for int8 ``x [M, K]`` and W packed in ``fmt`` as ``[n, k]``.

    ``codes`` (int8 [N, K] or fp32) may carry the unpacked weights for the torch path so they are
    not decoded on every call.
    """
    if x.dtype != torch.int8 or x.dim() != 2 or x.shape[1] != k:
        raise FormatError(f"activations must be int8 [M, {k}], got {x.dtype} {tuple(x.shape)}")
    path = path or current_path()
    if path == TORCH_PATH:
        if codes is None:
            codes = unpack_codes(packed, fmt, n, k)
        # int8 × ternary sums stay below 2**24 for K < 132,104, so fp32 is exact here.
        y = x.to(torch.float32) @ codes.to(torch.float32).T
        result = y.to(torch.int32)
        if out is not None:
            out.copy_(result)
            return out
        return result
    xs, ws = x.contiguous().numpy(), packed.numpy()
    if out is None:
        return torch.from_numpy(ternary_matmul_numpy(xs, ws, fmt, n, k, path=path))
    _load_extension().matmul(xs, ws, fmt, n, k, out=out.numpy(), path=path)
    return out


def ternary_matmul_numpy(x: np.ndarray, packed: np.ndarray, fmt: str, n: int, k: int, *,
                         path: str | None = None) -> np.ndarray:
    """The compiled kernel on numpy arrays: int8 ``x [M, K]`` and the packed bytes → int32 ``[M, N]``.
    For callers that hold numpy arrays (a packed layer, the benchmarks): it skips the torch ↔ numpy
    conversions of :func:`ternary_matmul`, ~5–10 µs a call. Needs the extension (see
    :func:`extension_available`); shapes and dtypes are checked in C++."""
    ext = _load_extension()
    if ext is None:
        raise ConfigError(f"the compiled kernels are unavailable ({native.extension_error()}); use ternary_matmul")
    path = path or current_path()
    if path == TORCH_PATH:
        raise ConfigError("ternary_matmul_numpy runs compiled paths only; use ternary_matmul for 'torch'")
    if path == ext.path():  # the extension's own default: skip the keywords (~1.5 µs)
        return ext.matmul(x, packed, fmt, n, k)
    return ext.matmul(x, packed, fmt, n, k, path=path)


def bitlinear(x: np.ndarray, packed: np.ndarray, fmt: str, n: int, k: int, w_scale: float, per_token: bool,
              path: str) -> np.ndarray:
    """A packed BitLinear after its norm in one native call, on numpy arrays: fp32 ``x [M, K]`` →
    int8 (absmax per token, or per tensor) → exact integer product → fp32 ``[M, N]`` with both
    scales applied. Rounds exactly as :mod:`bitnet158.quant` does. For callers that have checked
    that `path` is a compiled one: a decode step makes ~200 of these calls."""
    return native._ext.bitlinear(x, packed, fmt, n, k, w_scale, per_token, path=path)


def native_small_ops(x: torch.Tensor) -> bool:
    """Whether `rope` can serve x natively: inference (no autograd), fp32 on the CPU, and a
    compiled path selected (the ``torch`` path means torch for everything)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and current_path() != TORCH_PATH)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """fp32 rotary embedding (rotate_half layout), x [..., T, hd], cos/sin [T, hd], in one native
    call that rounds exactly like the torch formula (check `native_small_ops` first)."""
    return torch.from_numpy(native._ext.rope(x.detach().numpy(), cos.numpy(), sin.numpy()))


# torch's CPU sum of one row runs in vector lanes of 8 or 16 floats; the native norm must follow it.
# The capability torch reports is only a first guess: on an AVX-512 Xeon torch 2.13 reports
# "AVX512" yet sums rms_norm's row in 8-float lanes, so every candidate is checked, bit for bit.
_NORM_WIDTHS = {"AVX512": (16, 8), "AVX2": (8, 16)}
NATIVE_NORM_MAX = 16384  # longer rows: torch may split one row's sum across threads (another order)


def _norm_width_matches(width: int) -> bool:
    rng = np.random.default_rng(99)
    for n, rows in ((8, 1), (15, 2), (100, 3), (2560, 1), (2560, 5), (6912, 2), (NATIVE_NORM_MAX, 1)):
        x = (rng.standard_normal((rows, n)) * rng.uniform(1e-2, 20)).astype(np.float32)
        w = rng.uniform(-2, 2, n).astype(np.float32)
        want = torch.nn.functional.rms_norm(torch.from_numpy(x), (n,), torch.from_numpy(w), 1e-5)
        if not np.array_equal(native._ext.rms_norm(x, w, 1e-5, width), want.numpy()):
            return False
    return True


@functools.cache
def _norm_width() -> int | None:
    """The vector width at which the native RMSNorm reproduces torch's rounding on this machine
    (found once, bit for bit, on random rows); None means: use torch's own."""
    candidates = _NORM_WIDTHS.get(torch.backends.cpu.get_cpu_capability(), (8, 16))
    return next((w for w in candidates if _norm_width_matches(w)), None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """fp32 RMSNorm over the last dim in one native call, rounding bit for bit as torch's
    ``F.rms_norm`` does on this machine (its 10 small ops cost 40-350 µs at decode sizes; this
    costs ~3 µs). Returns None where that cannot be guaranteed — then use torch: not inference
    (see `native_small_ops`), weights not fp32, rows outside [8, NATIVE_NORM_MAX], or the one-time
    bitwise check against torch failed here."""
    n = x.shape[-1]
    if not (8 <= n <= NATIVE_NORM_MAX and native_small_ops(x) and weight.dtype == torch.float32):
        return None
    width = _norm_width()
    if width is None:
        return None
    return torch.from_numpy(native._ext.rms_norm(x.detach().numpy(), weight.detach().numpy(), eps, width))


def int8_matmul(x: torch.Tensor, w: torch.Tensor, *, path: str | None = None) -> torch.Tensor:
    """Exact int32 ``x @ w.T`` for int8 ``x [M, K]`` and int8 ``w [N, K]`` (values in [-127, 127]):
    the int8 output head."""
    path = path or current_path()
    if path == TORCH_PATH:
        # torch's own int8 GEMM where it has one; float64 is exact for these sums otherwise.
        if x.shape[0] > 16:
            try:
                return torch._int_mm(x, w.T)
            except RuntimeError:
                pass
        return (x.to(torch.float64) @ w.to(torch.float64).T).to(torch.int32)
    return torch.from_numpy(_load_extension().int8_matmul(x.contiguous().numpy(), w.contiguous().numpy(), path=path))


def q4_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *, path: str | None = None) -> torch.Tensor:
    """fp32 ``x @ W.T`` for int8 ``x [M, K]`` and a q4 table W (packed codes uint8 [N, K/2], fp16
    group scales [N, K/32]; bitnet158.packed_layers.quantize_rows_q4): the q4 output head."""
    path = path or current_path()
    if path == TORCH_PATH:
        xf = x.float()
        step = 8192  # rows of W dequantized at a time: a 128k-row head at once would be 1.3 GB of fp32
        return torch.cat([xf @ dequantize_rows_q4(codes[i:i + step], scales[i:i + step]).T
                          for i in range(0, codes.shape[0], step)], dim=1)
    return torch.from_numpy(_load_extension().q4_matmul(x.contiguous().numpy(), codes.contiguous().numpy(),
                                                         scales.contiguous().numpy().view(np.uint16), path=path))


def memory_read_bandwidth(nbytes: int = 1 << 29, threads: int = 1, repeats: int = 5, streams: int = 4) -> float:
    """Best-of-`repeats` bytes/s of a streaming read of a buffer far larger than the caches; each
    thread reads its share as `streams` interleaved parts (one stream alone leaves bandwidth unused
    on many CPUs: the hardware prefetcher stops at every page)."""
    ext = _load_extension()
    if ext is not None and ext.get_num_threads() < threads:
        ext.set_num_threads(threads)  # the probe runs on the pool: give it the threads asked for
    buf = np.ones(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if ext is not None:
            ext.read_sum(buf, threads, streams)
        else:
            int(buf.view(np.uint64).sum())
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
