"""``lut2``: 2 bits per weight, laid out for the multiplication-free lookup-table kernel
(the T-MAC / bitnet.cpp TL1 idea).

Weights go in **pairs along K**: ``(w0, w1) = (W[n, 2p], W[n, 2p+1])`` becomes the 4-bit index
``idx = 3·(w0+1) + (w1+1)`` ∈ 0..8 (zero weights → 4; nibbles 9..15 are invalid and raise
FormatError on unpack).

Layout (csrc/formats.h ``Lut2Pair``): rows are grouped in tiles of **64** (N zero-padded to a
multiple of 64, K zero-padded to even). Inside a tile, one 32-byte record per K-pair, in K order;
**byte j of pair p's record holds idx(row j, p) in the low nibble and idx(row 32 + j, p) in the
high nibble**. The file is ``[N/64 tiles][K/2 pairs][32 bytes]``.

Why this layout:
- The 9 possible contributions of a pair, ``(t0-1)·x0 + (t1-1)·x1``, depend only on the two
  activations, not on the row. With one record holding the same pair for 64 rows, the kernel
  builds one 16-entry table per pair (low and high byte, since the values span [-256, 256]) and a
  single ``vpshufb`` per table and nibble looks up all 32 lanes at once: per pair and 64 rows,
  one load, two nibble masks and four shuffles — no multiply at all.
- Each tile is one forward stream of 32·K/2 bytes, so the M = 1 read is sequential per thread,
  and tiles are the unit the dispatcher splits across threads.
- 64 divides every BitNet-b1.58-2B-4T dimension and K is even there, so real models carry no
  padding: exactly 2.0 bits per weight.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .base import PackedFormat, check_padding

TILE_N = 64        # rows per tile (csrc/formats.h kLut2TileN)
PAIR_BYTES = 32    # one K-pair of one tile
ZERO_IDX = 4       # idx of (0, 0), the padding nibble


def _pairs(k: int) -> int:
    return -(-k // 2)


class Lut2Format(PackedFormat):
    name = "lut2"
    block_k = 2
    block_bytes = PAIR_BYTES
    bits_per_weight = 2.0

    @staticmethod
    def padded_n(n: int) -> int:
        return -(-n // TILE_N) * TILE_N

    def row_bytes(self, k: int) -> int:
        raise NotImplementedError("lut2 stores two rows per byte; use packed_nbytes(n, k)")

    def packed_nbytes(self, n: int, k: int) -> int:
        self._check_shape(n, k)
        return self.padded_n(n) // TILE_N * _pairs(k) * PAIR_BYTES

    def _pack_padded(self, codes: np.ndarray, n: int, k: int) -> np.ndarray:
        np_, kp = self.padded_n(n), _pairs(k)
        t = np.ones((np_, 2 * kp), dtype=np.uint8)                # padding = weight 0 = t 1
        t[:n, :k] = (codes + 1).astype(np.uint8)
        idx = 3 * t[:, 0::2] + t[:, 1::2]                         # [Np, KP] in 0..8
        idx = idx.reshape(np_ // TILE_N, 2, PAIR_BYTES, kp)       # [tile, nibble, j, pair]
        b = idx[:, 0] | (idx[:, 1] << 4)                          # [tile, j, pair]
        return np.ascontiguousarray(b.transpose(0, 2, 1)).reshape(-1)  # [tile, pair, j]

    def _unpack_padded(self, packed: np.ndarray, n: int, k: int) -> np.ndarray:
        np_, kp = self.padded_n(n), _pairs(k)
        b = packed.reshape(np_ // TILE_N, kp, PAIR_BYTES)         # [tile, pair, j]
        idx = np.stack([b & 15, b >> 4], axis=1)                  # [tile, nibble, pair, j]
        if (idx > 8).any():
            pos = int(np.flatnonzero(((b & 15) > 8) | ((b >> 4) > 8))[0])
            raise FormatError(f"lut2: byte {pos} (value {packed[pos]}) holds an invalid pair index (> 8)")
        idx = idx.transpose(0, 1, 3, 2).reshape(np_, kp)          # [tile, nibble, j, pair] = rows
        full = np.empty((np_, 2 * kp), dtype=np.int8)
        full[:, 0::2] = idx // 3
        full[:, 1::2] = idx % 3
        full -= 1
        check_padding(self.name, full, n, k)
        return np.ascontiguousarray(full[:n, :k])

    def first_invalid_byte(self, packed: np.ndarray, n: int, k: int) -> str | None:
        """Scan for nibbles 9..15 in chunks, without unpacking (padding is not checked here)."""
        problem = self._check_size(packed, n, k)
        if problem:
            return problem
        flat = packed.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            chunk = flat[start:start + (1 << 24)]
            bad = np.flatnonzero(((chunk & 15) > 8) | ((chunk >> 4) > 8))
            if bad.size:
                return f"byte {start + int(bad[0])} (value {chunk[bad[0]]}) holds an invalid pair index (> 8)"
        return None
