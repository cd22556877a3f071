"""``base3``: 5 trits per byte, 1.6 bits per weight (≤ 1.601 on real shapes).

Trit ``t = w + 1`` ∈ {0, 1, 2}. Five trits t0..t4 form q = t0·81 + t1·27 + t2·9 + t3·3 + t4
(t0 most significant) and the byte is ``b = ceil(q · 256 / 243)`` — the byte values of llama.cpp's
TQ1_0. Decoding needs no division: trit n = ⌊3·(b·3ⁿ mod 256) / 256⌋, i.e. repeatedly multiply by
3 in 8-bit wrap-around arithmetic and take the carry. Only 243 of the 256 byte values are valid;
the others raise FormatError on unpack.

Layout (csrc/formats.h ``B3Block``): K is cut into full blocks of 160 weights; one row's block is
32 bytes and **byte j holds the weights at k = 32·n + j, n = 0..4 (trit n)**. The last K % 160
weights (if any) form a tail of ``tb = ceil((K % 160) / 5)`` bytes per row, byte j holding
k = tb·n + j (zero-padded). Rows are grouped in tiles of 8 (N zero-padded): each tile is
``[K/160 full blocks][8 rows][32 bytes]`` followed by ``[8 rows][tb bytes]``.

Why this layout:
- In SIMD, "×3 mod 256" is two byte additions and the carry ⌊3b/256⌋ is two signed byte compares
  (b ≥ 86, b ≥ 171, after one XOR with 0x80 per 32 bytes — the XOR commutes with ×3 mod 256), so
  32 trits aligned with 32 consecutive int8 activations cost ~6 byte ops and one ``vpmaddubsw``.
- 8 rows interleaved per block keep the M = 1 read a single sequential stream per thread.
- The short tail (instead of padding K up to 160) keeps real shapes at ≤ 1.61 bits per weight:
  K = 6912 → 43 blocks + 7 tail bytes = 1383 bytes per row = 1.6007 bits/weight.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .base import TILE_N, PackedFormat, check_padding

BLOCK_K = 160
BLOCK_BYTES = 32
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def _encode(t: np.ndarray) -> np.ndarray:
    """t [..., 5] trits (t0 most significant) → bytes [...]."""
    q = (t.astype(np.int32) * _POW3).sum(axis=-1)
    return ((q * 256 + 242) // 243).astype(np.uint8)


def _decode(b: np.ndarray) -> np.ndarray:
    """bytes [...] → trits [..., 5]; the ×3ⁿ mod 256 then carry trick."""
    b = b.astype(np.uint32)
    mult = np.array([1, 3, 9, 27, 81], dtype=np.uint32)
    return (((b[..., None] * mult) & 0xFF) * 3 >> 8).astype(np.uint8)


def _tail(k: int) -> tuple[int, int, int]:
    """(full blocks, tail weights, tail bytes per row)."""
    nfull, rem = divmod(k, BLOCK_K)
    return nfull, rem, -(-rem // 5)


class Base3Format(PackedFormat):
    name = "base3"
    block_k = BLOCK_K
    block_bytes = BLOCK_BYTES
    bits_per_weight = 1.6

    def row_bytes(self, k: int) -> int:
        nfull, _, tb = _tail(k)
        return nfull * BLOCK_BYTES + tb

    def _pack_padded(self, codes: np.ndarray, n: int, k: int) -> np.ndarray:
        np_, (nfull, rem, tb) = self.padded_n(n), _tail(k)
        nt = np_ // TILE_N
        t = np.ones((np_, k), dtype=np.uint8)                    # padded rows = weight 0 = trit 1
        t[:n] = (codes + 1).astype(np.uint8)
        parts = []
        if nfull:
            f = t[:, : nfull * BLOCK_K].reshape(nt, TILE_N, nfull, 5, BLOCK_BYTES)  # [tile,row,blk,n,j]
            f = f.transpose(0, 2, 1, 4, 3)                                          # [tile,blk,row,j,n]
            parts.append(_encode(f).reshape(nt, -1))
        if tb:
            tt = np.ones((np_, 5 * tb), dtype=np.uint8)
            tt[:, :rem] = t[:, nfull * BLOCK_K:]
            tt = tt.reshape(nt, TILE_N, 5, tb).transpose(0, 1, 3, 2)             # [tile,row,j,n]
            parts.append(_encode(tt).reshape(nt, -1))
        return np.ascontiguousarray(np.concatenate(parts, axis=1)).reshape(-1)

    def _unpack_padded(self, packed: np.ndarray, n: int, k: int) -> np.ndarray:
        np_, (nfull, rem, tb) = self.padded_n(n), _tail(k)
        nt = np_ // TILE_N
        t_all = _decode(packed)
        if not np.array_equal(_encode(t_all), packed):
            bad = int(np.argwhere(_encode(t_all) != packed)[0, 0])
            raise FormatError(f"base3: byte {bad} (value {packed[bad]}) is not a valid 5-trit code")
        rows = t_all.reshape(nt, -1, 5)
        full = np.empty((np_, nfull * BLOCK_K + 5 * tb), dtype=np.uint8)
        if nfull:
            f = rows[:, : nfull * TILE_N * BLOCK_BYTES].reshape(nt, nfull, TILE_N, BLOCK_BYTES, 5)
            full[:, : nfull * BLOCK_K] = f.transpose(0, 2, 1, 4, 3).reshape(np_, nfull * BLOCK_K)
        if tb:
            tt = rows[:, nfull * TILE_N * BLOCK_BYTES:].reshape(nt, TILE_N, tb, 5)
            full[:, nfull * BLOCK_K:] = tt.transpose(0, 1, 3, 2).reshape(np_, 5 * tb)
        codes = full.astype(np.int8) - 1
        check_padding(self.name, codes, n, k)
        return np.ascontiguousarray(codes[:n, :k])

    def first_invalid_byte(self, packed: np.ndarray, n: int, k: int) -> str | None:
        """Scan for byte values that are not a 5-trit code (13 of 256), without unpacking."""
        problem = self._check_size(packed, n, k)
        if problem:
            return problem
        bad = np.flatnonzero(~_VALID_BYTES[packed.reshape(-1)])
        if bad.size:
            return f"byte {int(bad[0])} (value {packed.reshape(-1)[bad[0]]}) is not a valid 5-trit code"
        return None


_VALID_BYTES = np.zeros(256, dtype=bool)
_VALID_BYTES[_encode(np.stack(np.meshgrid(*[np.arange(3)] * 5, indexing="ij"), -1).reshape(-1, 5))] = True
