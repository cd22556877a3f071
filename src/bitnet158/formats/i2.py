"""``i2``: 2 bits per weight, laid out for the AVX2 / AVX-512 multiply-add kernels.

Field value ``u = w + 1`` ∈ {0, 1, 2} (-1 → 0, 0 → 1, +1 → 2); 3 is invalid.

Layout (csrc/formats.h ``I2Block``): K is cut into blocks of 128 weights, zero-padded at the end.
One row's block is 32 bytes; **byte j holds the weights at k = 32·n + j of the block in bits
2n..2n+1, n = 0..3 (lowest bits first)**. Rows are grouped in tiles of 8 (N zero-padded); within a
tile the order is [K-block][row][32 bytes], so the file is ``[N/8][K/128][8][32]``.

Why this layout:
- ``(bytes >> 2n) & 3`` on a 32-byte vector gives, in one shift and one AND, 32 *consecutive*
  unsigned codes aligned with 32 consecutive int8 activations. ``vpmaddubsw(u, x)`` (unsigned ×
  signed) then multiplies them directly — no shuffles, no sign handling; the kernel subtracts Σx
  (computed once per activation row) to undo the +1 offset. u ≤ 2 and |x| ≤ 128 keep the int16
  pair sums ≤ 512, far from saturation. AVX-512 VNNI uses the same bytes with ``vpdpbusd``.
- Interleaving 8 rows per K-block makes one tile a single forward stream (256 bytes per K-block =
  4 cache lines), so at M = 1 the hardware prefetcher sees one sequential read per thread and the
  kernel loads each 128-activation block once for 8 output rows.
- 128 divides every BitNet-b1.58-2B-4T dimension (2560, 6912), so real models carry no padding:
  exactly 2.0 bits per weight.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .base import TILE_N, PackedFormat, check_padding

BLOCK_K = 128
BLOCK_BYTES = 32


class I2Format(PackedFormat):
    name = "i2"
    block_k = BLOCK_K
    block_bytes = BLOCK_BYTES
    bits_per_weight = 2.0

    def row_bytes(self, k: int) -> int:
        return -(-k // BLOCK_K) * BLOCK_BYTES

    def _pack_padded(self, codes: np.ndarray, n: int, k: int) -> np.ndarray:
        np_, kb = self.padded_n(n), -(-k // BLOCK_K)
        u = np.ones((np_, kb * BLOCK_K), dtype=np.uint8)         # padding = weight 0 = field 1
        u[:n, :k] = (codes + 1).astype(np.uint8)
        u = u.reshape(np_ // TILE_N, TILE_N, kb, 4, BLOCK_BYTES)  # [tile, row, kblock, n, j]
        u = u.transpose(0, 2, 1, 4, 3)                            # [tile, kblock, row, j, n]
        b = u[..., 0] | (u[..., 1] << 2) | (u[..., 2] << 4) | (u[..., 3] << 6)
        return np.ascontiguousarray(b).reshape(-1)

    def _unpack_padded(self, packed: np.ndarray, n: int, k: int) -> np.ndarray:
        np_, kb = self.padded_n(n), -(-k // BLOCK_K)
        b = packed.reshape(np_ // TILE_N, kb, TILE_N, BLOCK_BYTES, 1)
        u = (b >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3    # [tile, kblock, row, j, n]
        if (u == 3).any():
            pos = int(np.argwhere((u == 3).any(axis=-1).reshape(-1))[0, 0])
            raise FormatError(f"i2: byte {pos} holds the invalid 2-bit code 3")
        u = u.transpose(0, 2, 1, 4, 3).reshape(np_, kb * BLOCK_K)  # [tile, row, kblock, n, j]
        full = u.astype(np.int8) - 1
        check_padding(self.name, full, n, k)
        return np.ascontiguousarray(full[:n, :k])

    def first_invalid_byte(self, packed: np.ndarray, n: int, k: int) -> str | None:
        """Scan for the invalid field value 3 (both bits set) in chunks, without unpacking."""
        problem = self._check_size(packed, n, k)
        if problem:
            return problem
        flat = packed.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            chunk = flat[start:start + (1 << 24)]
            bad = np.flatnonzero(chunk & (chunk >> 1) & 0x55)
            if bad.size:
                return f"byte {start + int(bad[0])} holds the invalid 2-bit code 3"
        return None
