"""The ternary kernels: every path this CPU supports gives exactly the integers of an independent
numpy reference, on hundreds of random shapes; path selection, threads, and life without the
compiled extension."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet158 import kernels, native
from bitnet158.errors import ConfigError
from bitnet158.formats import FORMATS as REGISTRY
from bitnet158.formats import get_format
from bitnet158.formats.q4_table import dequantize_rows_q4, quantize_rows_q4

SRC = str(Path(__file__).resolve().parents[1] / "src")
PATHS = kernels.available_paths()  # e.g. ["avx2", "scalar", "torch"]
FORMATS = list(REGISTRY)  # every registered format must have kernels on every path
EDGE_M = [1, 2, 3, 17, 128]


def random_shapes(count: int, seed: int) -> list[tuple[int, int, int]]:
    """(M, N, K): the listed M values and random ones; K around and between block sizes (128, 160)."""
    rng = np.random.default_rng(seed)
    ks = [1, 5, 31, 127, 128, 129, 159, 160, 161, 255, 256, 300, 320, 321, 479, 640, 700]
    shapes = []
    for i in range(count):
        m = EDGE_M[i % len(EDGE_M)] if i % 2 == 0 else int(rng.integers(1, 40))
        n = int(rng.integers(1, 70))
        k = ks[i % len(ks)] if i % 3 else int(rng.integers(1, 900))
        shapes.append((m, n, k))
    return shapes


def reference(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return (x.astype(np.int64) @ codes.astype(np.int64).T).astype(np.int32)


def case(rng, m, n, k, binary=False):
    codes = (rng.choice([-1, 1], size=(n, k)) if binary else rng.integers(-1, 2, size=(n, k))).astype(np.int8)
    x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    x[0, 0] = -128  # the one int8 value that has no positive counterpart
    return x, codes


def test_the_extension_is_built_and_every_supported_path_passes_its_self_check():
    """A SIMD path that disagrees with the scalar oracle is dropped at import with a warning, so the
    tests below would quietly cover only the paths left: here it fails the suite instead. So does an
    extension that did not build (the dev install always has g++), unless disabled on purpose."""
    if os.environ.get(kernels.ENV_DISABLE, "").strip() not in ("", "0"):
        pytest.skip("extension disabled on purpose (BITNET158_DISABLE_EXT)")
    assert kernels.extension_available(), "the compiled extension did not load"
    from bitnet158 import _C
    assert set(_C.available_paths()) <= set(kernels.available_paths())


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_the_native_format_table_matches_the_registry():
    """csrc/formats.h's kFormats and bitnet158.formats name the same formats and sizes."""
    from bitnet158 import _C
    assert sorted(_C.formats()) == sorted(REGISTRY)
    for name, fmt in REGISTRY.items():
        for n, k in ((1, 1), (9, 161), (65, 300), (2560, 6912)):
            assert _C.packed_nbytes(name, n, k) == fmt.packed_nbytes(n, k), (name, n, k)
    with pytest.raises(ValueError, match="unknown packed format 'i3'"):
        _C.packed_nbytes("i3", 8, 8)


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_native_path_names_are_checked():
    from bitnet158 import _C
    x, w = np.zeros((1, 8), np.int8), get_format("i2").pack(np.zeros((8, 8), np.int8))
    with pytest.raises(ValueError, match="unknown kernel path 'sse9'"):
        _C.matmul(x, w, "i2", 8, 8, path="sse9")
    assert _C.best_path() == _C.available_paths()[0] and _C.available_paths()[-1] == "scalar"
    _C.set_path(_C.path())  # a no-op round trip through the name table
    with pytest.raises(ValueError, match="unknown kernel path 'sse9'"):
        _C.set_path("sse9")
    own = native._ARCH_PATHS.get(platform.machine().lower(), ())  # this build's architecture's paths
    for path in ("scalar", "avx2", "avx512vnni", "neon", "dotprod", "i8mm"):
        if path in _C.available_paths():
            assert _C.matmul(x, w, "i2", 8, 8, path=path).tolist() == [[0] * 8]
        else:  # another architecture's path is not even a name in this build
            with pytest.raises(ValueError, match="not supported by this CPU" if path in own else "unknown kernel path"):
                _C.matmul(x, w, "i2", 8, 8, path=path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_every_path_matches_the_reference_on_500_shapes(path, fmt):
    rng = np.random.default_rng(7)
    packer = get_format(fmt)
    before = kernels.get_num_threads()
    try:
        for i, (m, n, k) in enumerate(random_shapes(500, seed=hash((path, fmt)) % 2**32)):
            # 1 thread: a call's whole tile range is one kernel call (GEMV reads it as 4 streams);
            # 3 threads: ranges of a tile or two, split unevenly.
            threads = 1 if i % 2 else 3
            kernels.set_num_threads(threads)
            x, codes = case(rng, m, n, k, binary=rng.random() < 0.1)
            got = kernels.ternary_matmul(torch.from_numpy(x), torch.from_numpy(packer.pack(codes)), fmt, n, k,
                                         path=path)
            want = reference(x, codes)
            assert got.dtype == torch.int32
            assert np.array_equal(got.numpy(), want), f"{path}/{fmt} differs at M={m} N={n} K={k}, {threads} thr"
    finally:
        kernels.set_num_threads(before)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("path", PATHS)
def test_extreme_values_on_long_rows_are_exact(path, fmt):
    """Largest-magnitude sums over rows long enough that SIMD paths sum many blocks in narrow
    integers before widening (K up to the 2B4T FFN width): all +1 / all −1 weights against
    activations pinned at 127 or −128, and random signs against random extremes."""
    rng = np.random.default_rng(11)
    packer = get_format(fmt)
    for k in (2048, 2049, 4224, 6912):
        # the GEMV; the AVX2 4×2 GEMM and the AVX-512 4-row kernels (rows_i2, rows_b3); the AVX-512
        # 16-row panel GEMM (base3 from 16 rows); past one 64-row block of the AVX2 GEMM's int16
        # sums over a 1280-code chunk
        for m in (1, 5, 17, 70):
            n = 16
            codes = np.ones((n, k), dtype=np.int8)
            codes[1::2] = -1
            codes[4:8] = rng.choice(np.array([-1, 1], dtype=np.int8), size=(4, k))
            for fill in (127, -128, None):
                x = (np.full((m, k), fill, dtype=np.int8) if fill is not None
                     else rng.choice(np.array([-128, 127], dtype=np.int8), size=(m, k)))
                got = kernels.ternary_matmul(torch.from_numpy(x), torch.from_numpy(packer.pack(codes)), fmt, n, k,
                                             path=path)
                assert np.array_equal(got.numpy(), reference(x, codes)), f"{path}/{fmt} K={k} M={m} x={fill}"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_results(threads):
    rng = np.random.default_rng(threads)
    before = kernels.get_num_threads()
    try:
        kernels.set_num_threads(threads)
        for fmt in FORMATS:
            for m, n, k in [(1, 8 * 37 + 3, 2560 // 8), (17, 250, 700), (128, 64, 320)]:
                x, codes = case(rng, m, n, k)
                packed = torch.from_numpy(get_format(fmt).pack(codes))
                got = kernels.ternary_matmul(torch.from_numpy(x), packed, fmt, n, k)
                assert np.array_equal(got.numpy(), reference(x, codes))
    finally:
        kernels.set_num_threads(before)


@pytest.mark.parametrize("path", PATHS)
def test_int8_head_kernel_is_exact(path):
    rng = np.random.default_rng(3)
    before = kernels.get_num_threads()
    try:
        for threads in (1, 3):  # M = 1 splits each thread's rows into 4 far-apart cursors
            kernels.set_num_threads(threads)
            # M = 0: no rows, an empty product (the native step's head with no row wanting logits
            # once divided by zero: tests/test_engine.py's chunked prefill beside decoding caught it)
            # M >= 4 with K % 4 == 0: AVX-512 VNNI's panel kernel (16-row panels, 8 weight rows a
            # block, 3 panels a pass): rows left over, K past a 64-byte step, M past 3 panels
            for m, n, k in [(1, 1, 1), (1, 3, 40), (1, 517, 96), (1, 4 * 37 + 3, 2560 + 17), (3, 33, 257),
                            (17, 100, 64), (20, 7, 2560), (0, 9, 64), (4, 8, 4), (5, 13, 68), (16, 29, 2500),
                            (49, 37, 132), (33, 8 * 9 + 5, 260), (6, 11, 258)]:
                x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
                w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
                got = kernels.int8_matmul(torch.from_numpy(x), torch.from_numpy(w), path=path)
                assert np.array_equal(got.numpy(), reference(x, w)), (path, threads, m, n, k)
    finally:
        kernels.set_num_threads(before)


@pytest.mark.parametrize("path", PATHS)
def test_q4_head_kernel_matches_the_dequantized_product(path):
    rng = np.random.default_rng(4)
    before = kernels.get_num_threads()
    try:
        for threads in (1, 3):
            kernels.set_num_threads(threads)
            for m, n, k in [(1, 1, 64), (1, 37, 128), (3, 100, 2560), (17, 9, 192)]:
                x = torch.from_numpy(rng.integers(-128, 128, size=(m, k), dtype=np.int8))
                w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
                codes, scales = quantize_rows_q4(w)
                want = x.double() @ dequantize_rows_q4(codes, scales).double().T
                got = kernels.q4_matmul(x, codes, scales, path=path).double()
                # fp32 sums of up to 80 groups in another order: a few ulps of the largest partial sum
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-3 * float(want.abs().max())), (path, m, n, k)
    finally:
        kernels.set_num_threads(before)


def test_activation_shape_and_dtype_are_checked():
    packed = torch.from_numpy(get_format("i2").pack(np.zeros((4, 10), dtype=np.int8)))
    with pytest.raises(Exception, match="int8"):
        kernels.ternary_matmul(torch.zeros(1, 10), packed, "i2", 4, 10)
    with pytest.raises(Exception, match="10"):
        kernels.ternary_matmul(torch.zeros(1, 9, dtype=torch.int8), packed, "i2", 4, 10)


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_numpy_entry_matches_the_tensor_entry_and_refuses_the_torch_path():
    rng = np.random.default_rng(3)
    x, codes = case(rng, 2, 19, 300)
    packed = get_format("i2").pack(codes)
    got = kernels.ternary_matmul_numpy(x, packed, "i2", 19, 300)
    assert got.dtype == np.int32 and np.array_equal(got, reference(x, codes))
    with pytest.raises(ConfigError, match="compiled paths only"):
        kernels.ternary_matmul_numpy(x, packed, "i2", 19, 300, path="torch")
    with pytest.raises(ValueError):  # shapes are checked in C++: K disagrees with the activations
        kernels.ternary_matmul_numpy(x, packed, "i2", 19, 301)


def test_set_path_rejects_unknown_and_restores_best():
    with pytest.raises(ConfigError, match="unknown kernel path"):
        kernels.set_path("sse9")
    assert kernels.set_path("torch") == "torch"
    forced = os.environ.get(kernels.ENV_PATH, "").strip()  # BITNET158_KERNEL runs the suite on one path
    assert kernels.set_path(None) == (forced or PATHS[0])


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    full_env.pop(kernels.ENV_PATH, None) if kernels.ENV_PATH not in env else None
    return subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=300)


@pytest.mark.parametrize("path", PATHS)
def test_environment_variable_forces_a_path(path):
    done = run_python("from bitnet158 import kernels; print(kernels.current_path())", BITNET158_KERNEL=path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == path


def test_environment_variable_with_an_unknown_path_is_a_clear_error():
    done = run_python("from bitnet158 import kernels; kernels.current_path()", BITNET158_KERNEL="sse9")
    assert done.returncode != 0 and "unknown kernel path 'sse9'" in done.stderr


MISSING_EXTENSION_RUN = """
import warnings, torch
from bitnet158.config import preset
from bitnet158.model import Transformer
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158 import kernels
torch.manual_seed(0)
m = Transformer(preset("tiny", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=128, vocab_size=300)).eval()
tokens = torch.randint(0, 300, (1, 12))
with torch.no_grad():
    ref = m(tokens)
    pack_(m, PackConfig(head="fp32"))
    out1, out2 = m(tokens), m(tokens)
print(kernels.current_path(), float((out1 - ref).abs().max()), bool(torch.equal(out1, out2)))
"""


def test_without_the_extension_one_warning_then_the_torch_path():
    done = run_python(MISSING_EXTENSION_RUN, BITNET158_DISABLE_EXT="1")
    assert done.returncode == 0, done.stderr
    path, diff, same = done.stdout.split()
    assert path == "torch" and float(diff) < 1e-4 and same == "True"
    warnings = [line for line in done.stderr.splitlines() if "compiled CPU kernels are unavailable" in line]
    assert len(warnings) == 1, done.stderr


def test_pack_tests_pass_without_the_extension():
    """Issue acceptance: with the extension absent the tests still pass (the pack suite, re-run)."""
    env = {**os.environ, "BITNET158_DISABLE_EXT": "1",
           "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(kernels.ENV_PATH, None)
    tests = str(Path(__file__).with_name("test_pack.py"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_read_probe_sums_every_word_for_any_stream_count():
    """The bandwidth probe must read every byte it claims to: its sum equals numpy's."""
    ext = kernels._load_extension()
    rng = np.random.default_rng(3)
    for n in (128, 4096 + 384, (1 << 16) + 640):
        buf = rng.integers(0, 256, size=n, dtype=np.uint8)
        want = int(buf[: n // 128 * 128].view(np.uint64).sum(dtype=np.uint64))
        for streams in (1, 3, 4, 8):
            for threads in (1, 2):
                assert ext.read_sum(buf, threads, streams) == want


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_native_rope_is_bit_identical_to_the_torch_formula():
    """Inference rotates q and k natively; it must round exactly as the torch formula does (any
    difference can flip an int8 activation code downstream)."""
    from bitnet158.model import apply_rope

    gen = torch.Generator().manual_seed(5)
    for b, h, t, hd in [(1, 20, 1, 128), (2, 5, 7, 64), (1, 3, 33, 2)]:
        x = torch.randn(b, h, t, hd, generator=gen) * 10
        cos, sin = torch.randn(t, hd, generator=gen), torch.randn(t, hd, generator=gen)
        with torch.no_grad():
            assert kernels.native_small_ops(x)
            native = apply_rope(x, cos, sin)
            x1, x2 = x.chunk(2, dim=-1)
            reference = x * cos + torch.cat([-x2, x1], dim=-1) * sin
        assert torch.equal(native, reference), (b, h, t, hd)
        strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # the layout q/k arrive in
        with torch.no_grad():
            assert torch.equal(apply_rope(strided, cos, sin), reference)


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_native_rms_norm_rounds_bit_for_bit_as_torch():
    """Every norm feeds an int8 quantizer, so the native one must equal torch's F.rms_norm and the
    training formula (pow, mean, rsqrt, two products) exactly, across row lengths that exercise
    each part of torch's reduction order (lanes, the 4 accumulators, the cascade, the tails)."""
    from bitnet158.layers import RMSNorm

    gen = torch.Generator().manual_seed(11)
    sizes = [8, 9, 17, 31, 33, 100, 127, 129, 640, 1000, 2560, 4096, 4100, 6912, kernels.NATIVE_NORM_MAX]
    for i, n in enumerate(sizes):
        rows = (1, 3, 2)[i % 3]
        norm = RMSNorm(n, eps=(1e-5, 1e-6)[i % 2])
        with torch.no_grad():
            norm.weight.copy_(torch.rand(n, generator=gen) * 4 - 2)
            x = torch.randn(rows, 1, n, generator=gen) * float(torch.rand(1, generator=gen) * 30 + 1e-3)
            native = kernels.rms_norm(x, norm.weight, norm.eps)
            assert native is not None, n
            assert torch.equal(native, F.rms_norm(x, (n,), norm.weight, norm.eps)), n
            assert torch.equal(norm(x), native)
        with torch.enable_grad():  # training: the explicit formula
            assert torch.equal(norm(x).detach(), native), n
    with torch.no_grad():  # where exactness is not established: None, and the module uses torch
        for n in (7, kernels.NATIVE_NORM_MAX + 1):
            assert kernels.rms_norm(torch.randn(1, n), torch.ones(n), 1e-5) is None
        assert kernels.rms_norm(torch.randn(1, 64, dtype=torch.float64), torch.ones(64), 1e-5) is None
    assert kernels.rms_norm(torch.randn(1, 64), torch.ones(64), 1e-5) is None  # autograd on


@pytest.mark.skipif(not kernels.extension_available(), reason="needs the compiled extension")
def test_pool_runs_thousands_of_back_to_back_jobs_exactly():
    """The pool hands out chunks from a shared counter; workers that wake late must never run a
    finished job's chunk or miss one. Many tiny jobs (where late wake-ups are the rule), thread
    counts changing between them, every result checked."""
    rng = np.random.default_rng(9)
    before = kernels.get_num_threads()
    packer = get_format("i2")
    cases = []
    for _ in range(12):
        n, k = int(rng.integers(8, 300)), int(rng.integers(1, 400))
        x, codes = case(rng, 1, n, k)
        cases.append((torch.from_numpy(x), torch.from_numpy(packer.pack(codes)), n, k, reference(x, codes)))
    try:
        for threads in (2, 3, 4, 2):
            kernels.set_num_threads(threads)
            for i in range(600):
                x, w, n, k, want = cases[i % len(cases)]
                assert np.array_equal(kernels.ternary_matmul(x, w, "i2", n, k).numpy(), want), (threads, i)
    finally:
        kernels.set_num_threads(before)


def test_aligned_copy_keeps_values_and_starts_on_a_cache_line():
    for a in (np.arange(1000, dtype=np.uint8), np.ones((3, 7), dtype=np.float32)[:, 1:]):
        b = kernels.aligned_copy(a)
        assert b.ctypes.data % 64 == 0 and b.flags.c_contiguous and np.array_equal(a, b) and b.dtype == a.dtype
