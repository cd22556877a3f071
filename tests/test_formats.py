"""Packed formats i2 and base3: bytes worked by hand, lossless round trips on edge shapes, sizes at
the 2B4T shapes, and invalid bytes refused."""

from __future__ import annotations

import numpy as np
import pytest

from bitnet158.errors import FormatError
from bitnet158.formats import get_format

EDGE_N = [1, 7, 8, 9, 16, 33]
EDGE_K = [1, 4, 5, 127, 128, 129, 159, 160, 161, 255, 300, 321]


def test_i2_bytes_by_hand():
    # One row, K = 128: weight k = 32n + j sits in byte j, bits 2n..2n+1, stored as w + 1.
    codes = np.zeros((1, 128), dtype=np.int8)
    codes[0, 0] = 1      # byte 0, n = 0 → field 2
    codes[0, 32] = -1    # byte 0, n = 1 → field 0
    codes[0, 97] = 1     # byte 1, n = 3 → field 2
    packed = get_format("i2").pack(codes)
    assert packed.size == 8 * 32  # N padded to a tile of 8 rows
    assert packed[0] == 0b01_01_00_10  # fields n=3..0: 1, 1, 0, 2
    assert packed[1] == 0b10_01_01_01
    assert (packed[2:32] == 0b01010101).all()      # zero weights elsewhere in the row
    assert (packed[32:] == 0b01010101).all()       # padded rows are zero weights


def test_base3_bytes_by_hand():
    # Byte j holds k = 32n + j as trits t = w + 1, q = t0·81 + t1·27 + t2·9 + t3·3 + t4,
    # byte = ceil(q · 256 / 243).
    codes = np.zeros((1, 160), dtype=np.int8)
    codes[0, 0] = 1     # t0 = 2
    codes[0, 64] = -1   # t2 = 0
    q = 2 * 81 + 1 * 27 + 0 * 9 + 1 * 3 + 1
    packed = get_format("base3").pack(codes)
    assert packed[0] == -(-q * 256 // 243)
    all_zero = 1 * 81 + 27 + 9 + 3 + 1
    assert packed[1] == -(-all_zero * 256 // 243)


@pytest.mark.parametrize("name", ["i2", "base3"])
def test_round_trip_on_edge_shapes(name):
    fmt = get_format(name)
    rng = np.random.default_rng(0)
    for n in EDGE_N:
        for k in EDGE_K:
            codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
            packed = fmt.pack(codes)
            assert packed.dtype == np.uint8 and packed.size == fmt.packed_nbytes(n, k)
            assert np.array_equal(fmt.unpack(packed, n, k), codes)
            assert fmt.first_invalid_byte(packed, n, k) is None


@pytest.mark.parametrize("name,bits", [("i2", 2.0), ("base3", 1.61)])
def test_bits_per_weight_at_the_2b4t_shapes(name, bits):
    fmt = get_format(name)
    for n, k in [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]:
        assert fmt.effective_bits_per_weight(n, k) <= bits


def test_invalid_codes_are_refused():
    with pytest.raises(FormatError, match="not in"):
        get_format("i2").pack(np.array([[0, 2]]))
    with pytest.raises(FormatError, match="integers"):
        get_format("i2").pack(np.array([[0.5, 1.0]]))
    packed = get_format("i2").pack(np.zeros((8, 128), dtype=np.int8))
    packed[40] = 0xFF
    with pytest.raises(FormatError, match="code 3"):
        get_format("i2").unpack(packed, 8, 128)
    assert "byte 40" in get_format("i2").first_invalid_byte(packed, 8, 128)
    b3 = get_format("base3").pack(np.zeros((8, 160), dtype=np.int8))
    b3[3] = 20  # one of the 13 byte values no 5-trit group encodes to
    with pytest.raises(FormatError, match="5-trit"):
        get_format("base3").unpack(b3, 8, 160)
    assert "byte 3" in get_format("base3").first_invalid_byte(b3, 8, 160)


def test_padding_must_hold_zero_weights():
    fmt = get_format("i2")
    packed = fmt.pack(np.zeros((3, 100), dtype=np.int8))
    packed[-1] = 0b10101010  # a padded row with +1 weights
    with pytest.raises(FormatError, match="padding"):
        fmt.unpack(packed, 3, 100)


def test_unknown_format_and_wrong_sizes():
    with pytest.raises(FormatError, match="unknown packed format"):
        get_format("q4_0")
    fmt = get_format("base3")
    with pytest.raises(FormatError, match="needs"):
        fmt.unpack(np.zeros(5, dtype=np.uint8), 8, 160)
    assert "needs" in fmt.first_invalid_byte(np.zeros(5, dtype=np.uint8), 8, 160)
