"""lut2 (pair-index nibbles for the lookup-table kernel): layout by hand, lossless round trips,
corrupt bytes, and exact int32 products of every kernel path against numpy int64."""

import numpy as np
import pytest
import torch

from bitnet158 import kernels
from bitnet158.errors import FormatError
from bitnet158.formats import get_format
from bitnet158.formats.lut2 import PAIR_BYTES, TILE_N

FMT = get_format("lut2")
EDGE_N = [1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 130]
EDGE_K = [1, 2, 3, 4, 5, 253, 254, 255, 256, 257, 1023, 1024, 1025]


def random_codes(rng, n, k):
    return rng.integers(-1, 2, size=(n, k), dtype=np.int8)


# ---- layout ------------------------------------------------------------------------------------

def test_layout_by_hand():
    # idx = 3(w0+1) + (w1+1); K = 3 is padded to 4 with a zero weight; rows 34..63 are padding (4).
    codes = np.zeros((34, 3), dtype=np.int8)
    codes[0] = [1, -1, 0]    # pairs (1,-1) -> 6, (0,pad) -> 4
    codes[1] = [0, 1, -1]    # (0,1) -> 5, (-1,pad) -> 1
    codes[33] = [-1, -1, 1]  # (-1,-1) -> 0, (1,pad) -> 7; row 33 = high nibble of byte 1
    packed = FMT.pack(codes)
    assert packed.size == FMT.packed_nbytes(34, 3) == 2 * PAIR_BYTES
    pair0, pair1 = packed[:32], packed[32:]
    assert pair0[:2].tolist() == [0x46, 0x05] and (pair0[2:] == 0x44).all()
    assert pair1[:2].tolist() == [0x44, 0x71] and (pair1[2:] == 0x44).all()
    assert np.array_equal(FMT.unpack(packed, 34, 3), codes)


def test_sizes_are_two_bits_per_weight():
    assert FMT.packed_nbytes(2560, 6912) * 8 == 2 * 2560 * 6912
    assert FMT.packed_nbytes(1, 1) == PAIR_BYTES                       # one tile, one pair
    assert FMT.packed_nbytes(65, 3) == 2 * 2 * PAIR_BYTES              # two tiles, two pairs
    assert (FMT.pack(np.zeros((5, 7), np.int8)) == 0x44).all()         # zero weight = idx 4


@pytest.mark.parametrize("n", EDGE_N)
def test_round_trip_edge_shapes(n):
    rng = np.random.default_rng(n)
    for k in EDGE_K:
        codes = random_codes(rng, n, k)
        packed = FMT.pack(codes)
        assert packed.dtype == np.uint8 and packed.size == FMT.packed_nbytes(n, k)
        assert np.array_equal(FMT.unpack(packed, n, k), codes), (n, k)
        assert FMT.first_invalid_byte(packed, n, k) is None


def test_round_trip_random_and_extreme_codes():
    rng = np.random.default_rng(7)
    for _ in range(100):
        n, k = int(rng.integers(1, 300)), int(rng.integers(1, 700))
        codes = random_codes(rng, n, k)
        assert np.array_equal(FMT.unpack(FMT.pack(codes), n, k), codes), (n, k)
    for v in (-1, 0, 1):
        codes = np.full((70, 9), v, dtype=np.int8)
        assert np.array_equal(FMT.unpack(FMT.pack(codes), 70, 9), codes)
    # torch input and integral floats are accepted like the other formats
    t = torch.tensor([[1.0, -1.0, 0.0]])
    assert FMT.unpack(FMT.pack(t), 1, 3).tolist() == [[1, -1, 0]]


@pytest.mark.parametrize("nibble", range(9, 16))
@pytest.mark.parametrize("high", [False, True])
def test_invalid_nibble_raises(nibble, high):
    packed = FMT.pack(random_codes(np.random.default_rng(0), 64, 6))
    pos = 37
    packed[pos] = (packed[pos] & 0x0F) | (nibble << 4) if high else (packed[pos] & 0xF0) | nibble
    with pytest.raises(FormatError, match="invalid pair index"):
        FMT.unpack(packed, 64, 6)
    assert f"byte {pos}" in FMT.first_invalid_byte(packed, 64, 6)


def test_nonzero_padding_raises():
    codes = random_codes(np.random.default_rng(1), 40, 5)   # rows 40..63 and k = 5 are padding
    packed = FMT.pack(codes)
    bad_row = packed.copy()
    bad_row[45 - 32] = (bad_row[45 - 32] & 0x0F) | (5 << 4)  # row 45 (high nibble), pair 0 -> (0, 1)
    bad_col = packed.copy()
    p = 2 * PAIR_BYTES + 3                                   # pair 2 = (k 4, k 5 pad) of row 3
    bad_col[p] = (bad_col[p] & 0xF0) | (3 * (codes[3, 4] + 1) + 2)
    for bad in (bad_row, bad_col):
        with pytest.raises(FormatError, match="padding"):
            FMT.unpack(bad, 40, 5)


def test_wrong_size_raises():
    with pytest.raises(FormatError, match="needs"):
        FMT.unpack(np.zeros(31, np.uint8), 1, 1)


# ---- kernels -----------------------------------------------------------------------------------

def _cases():
    """(m, n, k): edge shapes first, then random ones; >= 300 in all."""
    rng = np.random.default_rng(2024)
    cases = [(m, n, k) for m in (1, 2, 3, 17) for n, k in
             [(1, 1), (1, 2), (5, 3), (63, 255), (64, 256), (65, 257), (130, 1), (33, 1025), (70, 2049)]]
    while len(cases) < 320:
        m = int(rng.choice([1, 1, 2, 3, 4, 5, 17]))
        cases.append((m, int(rng.integers(1, 200)), int(rng.integers(1, 1300))))
    return cases


def _native_paths():
    if not kernels.extension_available():
        pytest.skip("the compiled extension is unavailable")
    return [p for p in kernels.available_paths() if p != kernels.TORCH_PATH]


@pytest.fixture
def threads():
    if not kernels.extension_available():
        pytest.skip("the compiled extension is unavailable")
    before = kernels.get_num_threads()
    yield kernels.set_num_threads
    kernels.set_num_threads(before)


def _check(m, n, k, rng, paths, extreme=False):
    if extreme:
        codes = np.full((n, k), -1, np.int8)
        x = np.full((m, k), -128, np.int8)   # every lookup is +256: the int16 / int8 bounds
    else:
        codes = random_codes(rng, n, k)
        x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
    packed = torch.from_numpy(FMT.pack(codes))
    ref = x.astype(np.int64) @ codes.astype(np.int64).T
    for path in paths:
        got = kernels.ternary_matmul(torch.from_numpy(x), packed, "lut2", n, k, path=path).numpy()
        if not np.array_equal(got, ref):
            i = tuple(int(v) for v in np.unravel_index(np.argmax(np.abs(got - ref)), ref.shape))
            pytest.fail(f"lut2 path {path} m={m} n={n} k={k}: out{list(i)} = {got[i]}, expected {ref[i]}")


@pytest.mark.parametrize("nthreads", [1, 2])
def test_kernels_exact_on_many_shapes(threads, nthreads):
    threads(nthreads)
    paths = _native_paths()
    rng = np.random.default_rng(nthreads)
    for m, n, k in _cases():
        _check(m, n, k, rng, paths)


@pytest.mark.parametrize("nthreads", [1, 2])
def test_kernels_exact_at_the_accumulator_bounds(threads, nthreads):
    threads(nthreads)
    paths = _native_paths()
    rng = np.random.default_rng(3)
    # 127-pair blocks, 512-pair table chunks and the 64-row tiles all end mid-way here.
    for m, n, k in [(1, 64, 254), (2, 65, 255), (3, 130, 1025), (1, 200, 2 * 1100 + 1), (17, 7, 4099)]:
        _check(m, n, k, rng, paths, extreme=True)
        codes = np.ones((n, k), np.int8)
        x = np.full((m, k), -128, np.int8)   # every lookup is -256
        got = kernels.ternary_matmul(torch.from_numpy(x), torch.from_numpy(FMT.pack(codes)), "lut2", n, k,
                                     path=paths[0]).numpy()
        assert (got == -128 * k).all()


def test_torch_path_and_native_agree():
    rng = np.random.default_rng(11)
    for m, n, k in [(1, 70, 301), (3, 5, 2), (17, 129, 64)]:
        _check(m, n, k, rng, [kernels.TORCH_PATH])


def test_native_size_matches_python():
    if not kernels.extension_available():
        pytest.skip("the compiled extension is unavailable")
    from bitnet158 import _C

    for n in EDGE_N:
        for k in EDGE_K:
            assert _C.packed_nbytes("lut2", n, k) == FMT.packed_nbytes(n, k)


def test_paths_agree_on_corrupt_nibbles():
    """Invalid nibbles read as (0, 0) in every kernel (Python's unpack is what rejects them)."""
    paths = _native_paths()
    rng = np.random.default_rng(5)
    n, k = 64, 40
    codes = random_codes(rng, n, k)
    packed = FMT.pack(codes)
    packed[3] = (packed[3] & 0xF0) | 12                      # row 3, pair 0 -> counts as (0, 0)
    codes[3, 0:2] = 0
    x = rng.integers(-128, 128, size=(2, k), dtype=np.int8)
    ref = x.astype(np.int64) @ codes.astype(np.int64).T
    for path in paths:
        got = kernels.ternary_matmul(torch.from_numpy(x), torch.from_numpy(packed), "lut2", n, k, path=path)
        assert np.array_equal(got.numpy(), ref), path


def test_tile_is_64_rows():
    assert TILE_N == 64 and FMT.padded_n(1) == 64 and FMT.padded_n(65) == 128
