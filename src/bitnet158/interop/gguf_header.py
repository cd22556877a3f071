"""A bounds-checked parse of a GGUF file's header, KV section and tensor infos.

gguf-py's GGUFReader memory-maps the file and trusts every count and length in it: a forged
array count or string length makes it build millions of numpy views or raise whatever numpy
raises. So every file is walked here first, each length compared with the bytes that remain,
each tensor's byte range checked against the file size, before GGUFReader sees it. Any problem
is one FormatError line naming the file, the field and its offset.

GGUF (v2 and v3, little-endian):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv × (string key | u32 value type | value)         string = u64 length + UTF-8 bytes
    n_tensors × (string name | u32 n_dims | n_dims × u64 ne (ggml order, ne0 first) | u32 type | u64 offset)
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError, shown

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
STRING, ARRAY = 8, 9
# value type → (struct code, size); 8 (string) and 9 (array) are handled apart
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}

# ggml type id → (elements per block, bytes per block) for the types we read or write. I2_S
# (bitnet.cpp) is special: 2 bits per weight plus one 32-byte tail per tensor (FORMATS §4.3).
F32, F16, BF16, TQ1_0, TQ2_0, I2_S = 0, 1, 30, 34, 35, 36
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", TQ1_0: "TQ1_0", TQ2_0: "TQ2_0", I2_S: "I2_S"}
_BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), TQ1_0: (256, 54), TQ2_0: (256, 66)}


def _known_blocks(ggml_type: int) -> tuple[int, int] | None:
    if ggml_type in _BLOCKS:
        return _BLOCKS[ggml_type]
    try:  # other ggml types gguf-py knows (e.g. Q8_0 embeddings written by llama-quantize)
        return GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


def type_name(ggml_type: int) -> str:
    if ggml_type in TYPE_NAMES:
        return TYPE_NAMES[ggml_type]
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of `shape` (torch order, last dim = ggml ne0); FormatError if the type
    is unknown or the row length is not a whole number of blocks."""
    n = 1
    for d in shape:
        n *= d
    if ggml_type == I2_S:
        if n % 128:
            raise FormatError(f"I2_S tensor of {n} values: not a multiple of 128")
        return n // 4 + 32
    blocks = _known_blocks(ggml_type)
    if blocks is None:
        raise FormatError(f"unknown ggml tensor type {ggml_type}")
    block, size = blocks
    if not shape or shape[-1] % block:
        raise FormatError(f"{type_name(ggml_type)} rows of {shape[-1] if shape else 0} values are not whole "
                          f"blocks of {block}")
    return n // block * size


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # torch order: (out, in) for a linear weight (ggml's ne reversed)
    ggml_type: int
    offset: int             # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0
    file_size: int = 0


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what} (at byte {self.pos}; the file has {self.size} bytes)")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or forged {what}: needs {n} bytes, {self.size - self.pos} remain")

    def unpack(self, code: str, size: int, what: str):
        self.need(size, what)
        value = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", 8, f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def _read_value(cur: _Cursor, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        code, size = _SCALARS[vtype]
        return cur.unpack(code, size, f"value of {shown(key)}")
    if vtype == STRING:
        return cur.string(f"string value of {shown(key)}")
    if vtype == ARRAY:
        etype = cur.unpack("I", 4, f"array type of {shown(key)}")
        count = cur.unpack("Q", 8, f"array length of {shown(key)}")
        if etype in _SCALARS:
            size = _SCALARS[etype][1]
            cur.need(count * size, f"array {shown(key)} ({count} values)")  # checked before any allocation
            arr = np.frombuffer(cur.buf, dtype=_NP[etype], count=count, offset=cur.pos).copy()
            cur.pos += count * size
            return arr
        if etype == STRING:
            cur.need(count * 8, f"array {shown(key)} ({count} strings)")  # each string has at least its length
            return [cur.string(f"element {i} of {shown(key)}") for i in range(count)]
        raise cur.fail(f"array {shown(key)} has element type {etype}, which is not a GGUF scalar or string "
                       "(nested arrays are not supported)")
    raise cur.fail(f"key {shown(key)} has unknown value type {vtype}")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and bounds-check everything before the tensor data; the tensors' byte ranges are
    checked against the file size, their types and shapes against their byte sizes."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise FormatError(f"{path}: {size} bytes is too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return _parse(memoryview(mm), path, size)


def _parse(buf, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    try:
        return _parse_sections(cur, path, size)
    finally:
        cur.buf = None
        buf.release()


def _parse_sections(cur: _Cursor, path: Path, size: int) -> GGUFHeader:
    if bytes(cur.buf[:4]) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.unpack("I", 4, "version")
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.unpack("Q", 8, "tensor count")
    n_kv = cur.unpack("Q", 8, "key-value count")
    # the smallest KV is 8 (key length) + 4 (type) + 1 bytes, the smallest tensor info 8 + 4 + 4 + 8
    if n_kv * 13 > size - cur.pos:
        raise cur.fail(f"forged key-value count {n_kv}")
    if n_tensors * 24 > size - cur.pos:
        raise cur.fail(f"forged tensor count {n_tensors}")
    header = GGUFHeader(path=path, version=version, file_size=size)
    for _ in range(n_kv):
        key = cur.string("key")
        if key in header.kv:
            raise cur.fail(f"duplicate key {shown(key)}")
        vtype = cur.unpack("I", 4, f"value type of {shown(key)}")
        header.kv[key] = _read_value(cur, vtype, key)
    alignment = header.kv.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise FormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    header.alignment = alignment
    infos = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        if name in header.tensors:
            raise cur.fail(f"duplicate tensor {shown(name)}")
        n_dims = cur.unpack("I", 4, f"dimension count of {shown(name)}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {shown(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [cur.unpack("Q", 8, f"dimension of {shown(name)}") for _ in range(n_dims)]
        if any(d < 1 or d > size * 8 for d in ne):  # no tensor holds more values than 8 per file byte
            raise cur.fail(f"tensor {shown(name)} has forged dimensions {ne}")
        ggml_type = cur.unpack("I", 4, f"type of {shown(name)}")
        offset = cur.unpack("Q", 8, f"data offset of {shown(name)}")
        shape = tuple(reversed(ne))
        try:
            nbytes = tensor_nbytes(ggml_type, shape)
        except FormatError as e:
            raise FormatError(f"{path}: tensor {shown(name)}: {e}") from None
        if offset % alignment:
            raise FormatError(f"{path}: tensor {shown(name)} data offset {offset} is not aligned to {alignment}")
        infos.append((name, shape, ggml_type, offset, nbytes))
        header.tensors[name] = None  # reserve the name for the duplicate check
    header.data_start = -(-cur.pos // alignment) * alignment
    for name, shape, ggml_type, offset, nbytes in infos:
        start = header.data_start + offset
        if start + nbytes > size:
            raise FormatError(f"{path}: tensor {shown(name)} ({type_name(ggml_type)} {list(shape)}, {nbytes} bytes at "
                              f"{start}) runs past the end of the file ({size} bytes): truncated or forged")
        header.tensors[name] = TensorEntry(name, shape, ggml_type, start, nbytes)
    return header
