"""The base class of packed ternary formats: shapes, padding, input validation.

A format turns int8 ternary codes ``[N, K]`` (values in {-1, 0, +1}, N output rows, K inputs)
into a flat ``uint8`` byte array and back, losslessly. The one fp32 scale per tensor travels
beside the bytes (the caller keeps it); it is never inside them.

Both formats share one outer structure, mirrored by ``csrc/formats.h``: rows are grouped in tiles
of ``TILE_N = 8`` consecutive output rows (N is zero-padded up to a multiple of 8), and inside a
tile the bytes run K-block by K-block, the 8 rows of one K-block adjacent. A GEMV kernel therefore
reads each tile as one sequential stream and keeps 8 row accumulators while loading each block of
activations once. Subclasses define what one K-block is.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError

TILE_N = 8  # output rows per tile (csrc/formats.h kTileN)


def _as_numpy(a) -> np.ndarray:
    """Accept numpy arrays, torch tensors (CPU) and nested lists."""
    if hasattr(a, "detach") and hasattr(a, "numpy"):  # torch.Tensor, without importing torch
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def aligned_copy(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A C-contiguous copy of `a` whose data starts on an `align`-byte boundary. The kernels read
    32-byte vectors: off a cache-line boundary half of them straddle two lines (numpy's own
    allocations start 16 bytes in). `pack` returns such arrays; saved checkpoints keep
    weights aligned on disk (checkpoint.WEIGHT_ALIGN)."""
    a = np.ascontiguousarray(a)
    raw = np.empty(a.nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class PackedFormat:
    """A registered ternary packing. Subclasses implement ``_pack_padded`` / ``_unpack_padded``."""

    name: str = ""
    block_k: int = 1            # weights of one row in one K-block
    block_bytes: int = 1        # bytes of one row in one K-block
    bits_per_weight: float = 0  # nominal, without padding

    # ---- shapes ---------------------------------------------------------------------------
    @staticmethod
    def padded_n(n: int) -> int:
        return -(-n // TILE_N) * TILE_N

    def row_bytes(self, k: int) -> int:
        """Bytes one (padded) row of K weights occupies."""
        raise NotImplementedError

    def packed_nbytes(self, n: int, k: int) -> int:
        """Size in bytes of the packed [n, k] matrix (N padded to TILE_N rows)."""
        self._check_shape(n, k)
        return self.padded_n(n) * self.row_bytes(k)

    def effective_bits_per_weight(self, n: int, k: int) -> float:
        return 8.0 * self.packed_nbytes(n, k) / (n * k)

    @staticmethod
    def _check_shape(n: int, k: int) -> None:
        if int(n) != n or int(k) != k or n < 1 or k < 1:
            raise FormatError(f"matrix shape must be two positive integers, got N={n}, K={k}")

    # ---- public pack / unpack --------------------------------------------------------------
    def pack(self, codes) -> np.ndarray:
        """int8 codes [N, K] in {-1, 0, 1} → flat uint8 bytes of ``packed_nbytes(N, K)``."""
        c = _as_numpy(codes)
        if c.ndim != 2:
            raise FormatError(f"{self.name}: codes must be 2-D [N, K], got shape {tuple(c.shape)}")
        if not (np.issubdtype(c.dtype, np.integer) or c.dtype == np.bool_):
            if np.issubdtype(c.dtype, np.floating) and np.all(np.isfinite(c)) and np.all(c == np.round(c)):
                pass  # integral floats (e.g. fake-quant codes kept in fp32) are accepted
            else:
                raise FormatError(f"{self.name}: codes must be integers in {{-1, 0, 1}}, got dtype {c.dtype}")
        n, k = c.shape
        self._check_shape(n, k)
        bad = (c < -1) | (c > 1)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise FormatError(f"{self.name}: code {c[i, j]!r} at [{i}, {j}] is not in {{-1, 0, 1}}")
        out = self._pack_padded(c.astype(np.int8), n, k)
        assert out.dtype == np.uint8 and out.size == self.packed_nbytes(n, k)
        return out if out.ctypes.data % 64 == 0 else aligned_copy(out)

    def unpack(self, packed, n: int, k: int) -> np.ndarray:
        """Flat uint8 bytes → int8 codes [N, K]; raises FormatError on any invalid byte."""
        p = _as_numpy(packed)
        self._check_shape(n, k)
        if p.dtype != np.uint8:
            raise FormatError(f"{self.name}: packed bytes must be uint8, got dtype {p.dtype}")
        p = p.reshape(-1)
        want = self.packed_nbytes(n, k)
        if p.size != want:
            raise FormatError(f"{self.name}: [{n}, {k}] needs {want} packed bytes, got {p.size}")
        return self._unpack_padded(p, n, k)

    def first_invalid_byte(self, packed: np.ndarray, n: int, k: int) -> str | None:
        """A description of the first problem in `packed` (size, invalid code), or None if valid.
        Formats override this with a check that scans the bytes without unpacking them."""
        try:
            self.unpack(packed, n, k)
        except FormatError as e:
            return str(e)
        return None

    def _check_size(self, packed: np.ndarray, n: int, k: int) -> str | None:
        want = self.packed_nbytes(n, k)
        if packed.dtype != np.uint8 or packed.size != want:
            return f"{self.name} [{n}, {k}] needs {want} uint8 bytes, got {packed.size} {packed.dtype}"
        return None

    def validate(self, packed, n: int, k: int) -> None:
        """Raise FormatError unless `packed` is a valid packing of an [n, k] ternary matrix."""
        self.unpack(packed, n, k)

    # ---- subclass hooks ------------------------------------------------------------------
    def _pack_padded(self, codes: np.ndarray, n: int, k: int) -> np.ndarray:
        raise NotImplementedError

    def _unpack_padded(self, packed: np.ndarray, n: int, k: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<PackedFormat {self.name}: {self.bits_per_weight} bits/weight, block {self.block_k}>"


def check_padding(name: str, full: np.ndarray, n: int, k: int) -> None:
    """The padded rows/columns of a decoded [Np, Kp] code matrix must hold zero weights."""
    if full[n:, :].any() or full[:, k:].any():
        raise FormatError(f"{name}: padding bytes hold non-zero weights (corrupt or foreign data)")
