"""Write safetensors files one tensor at a time, so a conversion never holds every tensor at once.

The format is small enough to stream by hand: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range in the data section, then the raw bytes in that
order. Every shape and dtype is known before any tensor exists (a conversion plan), so the header
is written first and each tensor is produced, written and dropped in turn: peak memory is the
largest tensor (plus its source), not the file.

    entries = [PlannedTensor("w", torch.float32, (2, 3), lambda: torch.zeros(2, 3))]
    write_safetensors(path, entries, metadata={"format": "pt"})

A producer may also return an iterable of row blocks (`RowBlocks`) that concatenate along
dim 0 to the planned tensor: a large tensor converted block by block (an fp16 embedding widened
to fp32, say) then never exists whole in memory.

Files are written to a temporary sibling, fsynced and renamed (atomic, as fileio.py does).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import atomic_output_path, atomic_write_json
from .safetensors_header import MAX_HEADER_BYTES, read_header  # noqa: F401 (MAX_HEADER_BYTES: public here)

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                torch.bool: "BOOL"}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a file to be written: what it will be, and how to make it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], "torch.Tensor | RowBlocks"]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class RowBlocks:
    """A tensor delivered as consecutive blocks of rows (each a tensor of the planned dtype whose
    trailing dimensions are the planned ones), made one at a time by `blocks`."""

    def __init__(self, blocks: Iterable[torch.Tensor]):
        self.blocks = blocks

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.blocks)


ROW_BLOCK_BYTES = 64 << 20  # a block of a streamed tensor: small beside the 2B4T embedding (1.3 GB fp32)


def row_ranges(rows: int, row_bytes: int, block_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering `rows` rows, each about `block_bytes` (default
    ROW_BLOCK_BYTES; at least one row)."""
    step = max(1, (block_bytes or ROW_BLOCK_BYTES) // max(1, row_bytes))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def header_bytes(entries: Sequence[PlannedTensor], metadata: dict[str, str] | None = None,
                 align: int = 8) -> bytes:
    """The length prefix and JSON header for `entries` laid out back to back in order, padded with
    spaces (as the format allows) so the data section starts at a multiple of `align` bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in entries:
        if e.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{e.name}: dtype {e.dtype} has no safetensors name")
        header[e.name] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % align)  # the data section starts aligned (mmap-friendly)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | os.PathLike, entries: Sequence[PlannedTensor],
                      metadata: dict[str, str] | None = None, align: int = 8,
                      progress: Callable[[PlannedTensor, int], None] | None = None) -> int:
    """Write `entries` as one safetensors file, producing each tensor only when it is written; the
    data section starts at a multiple of `align` bytes (see `aligned_order`).
    Returns the number of data bytes. A produced tensor whose dtype or shape disagrees with its
    plan is a bug in the plan: ValueError, and the target is left untouched. `progress(entry,
    bytes so far)` is called after each tensor."""
    path = Path(path)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in a safetensors plan")
    total = 0
    with atomic_output_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header_bytes(entries, metadata, align))
        for e in entries:
            total += _write_entry(f, e)
            if progress is not None:
                progress(e, total)
    return total


def _write_entry(f, e: PlannedTensor) -> int:
    """Produce one planned tensor (whole or in row blocks), check it against the plan, write it;
    returns the bytes written."""
    made = e.produce()
    by_rows = isinstance(made, RowBlocks)
    want = tuple(e.shape[1:]) if by_rows else tuple(e.shape)  # what each block's shape must end with
    written = 0
    for t in (made if by_rows else (made,)):
        got = tuple(t.shape[1:]) if by_rows else tuple(t.shape)
        if t.dtype != e.dtype or got != want:
            raise ValueError(f"{e.name}: produced {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
        # a byte view of the contiguous tensor: no second copy for the write
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        written += data.nbytes
        del t, data
    if written != e.nbytes:
        raise ValueError(f"{e.name}: produced {written} bytes, planned {e.nbytes} ({list(e.shape)})")
    return written


def aligned_order(entries: Sequence[PlannedTensor], align: int = 64) -> list[PlannedTensor]:
    """`entries` reordered so that, in a file whose data section starts `align`-aligned, every
    tensor whose size is a multiple of `align` starts on such a boundary (they come first), and
    the rest stay aligned to their element size (larger elements first). A memory-mapped load then
    hands the kernels 64-byte-aligned weights: at 16 bytes off, half of the 32-byte loads of the
    i2 GEMV straddle two cache lines, and it ran ~10 % slower."""
    def elem(e: PlannedTensor) -> int:
        return torch.empty((), dtype=e.dtype).element_size()
    whole = [e for e in entries if e.nbytes % align == 0]
    rest = sorted((e for e in entries if e.nbytes % align), key=lambda e: -elem(e))
    return whole + rest


def shard_plan(entries: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_shard_bytes` each (a larger tensor gets a shard alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_sharded(directory: str | os.PathLike, entries: Sequence[PlannedTensor], max_shard_bytes: int,
                  metadata: dict[str, str] | None = None, stem: str = "model") -> list[str]:
    """`stem.safetensors`, or Hugging Face style shards `stem-0000i-of-0000n.safetensors` plus
    `stem.safetensors.index.json` when the tensors exceed `max_shard_bytes`. Returns the file names."""
    directory = Path(directory)
    groups = shard_plan(entries, max_shard_bytes)
    if len(groups) == 1:
        write_safetensors(directory / f"{stem}.safetensors", entries, metadata)
        return [f"{stem}.safetensors"]
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        file = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(directory / file, group, metadata)
        files.append(file)
        weight_map.update({e.name: file for e in group})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    atomic_write_json(directory / f"{stem}.safetensors.index.json", index)
    return files


_NAMES_TO_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


class SafetensorsReader:
    """Read one tensor at a time with plain file reads (no mmap): a memory-mapped file's touched
    pages count as the process's resident memory until it is closed, so a streamed conversion
    over `safe_open` would look (and be accounted) as large as the whole file. Raises ValueError
    with one line for a truncated or malformed file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header = read_header(self.path)
        self.metadata = header.metadata
        self._start = header.data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: (_NAMES_TO_DTYPE[e.dtype], e.shape, e.begin, e.end) for name, e in header.entries.items()}

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        return self._read(name, begin, end - begin, dtype, shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor of at least one dimension, read alone."""
        dtype, shape, begin, _ = self._entries[name]
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"tensor {name}: rows [{start}, {stop}) outside its shape {list(shape)}")
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        return self._read(name, begin + start * row, (stop - start) * row, dtype, (stop - start, *shape[1:]))

    def _read(self, name: str, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        buf = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(self._start + offset)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"tensor {name}: file ended early (truncated?)")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite(t).all() in slices: on a whole tensor it allocates about twice the tensor
    (|t| and two masks), which would double a streamed conversion's peak on the embedding."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))
