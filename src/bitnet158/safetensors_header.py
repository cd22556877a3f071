"""A safetensors file's header, read and checked without torch: where each tensor's bytes lie.

`safetensors_io.SafetensorsReader` (torch tensors, plain reads) and the torch-free runtime (numpy
views of a memory map) both start from `read_header`, so a truncated or forged file is refused the
same way by both: one-line ValueError naming the problem.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import first_line, short_repr

MAX_HEADER_BYTES = 100_000_000  # what the safetensors library itself accepts: no header of ours comes close
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


@dataclass(frozen=True)
class Entry:
    dtype: str                 # the safetensors name: "F32", "U8", ...
    shape: tuple[int, ...]
    begin: int                 # byte offsets in the data area (after the header)
    end: int


@dataclass(frozen=True)
class Header:
    metadata: dict
    data_start: int            # file offset of the data area: 8 + the header's length
    entries: dict[str, Entry]


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of `path`: every entry's dtype known, its offsets matching its shape and
    inside the file. ValueError with one line otherwise."""
    path = Path(path)
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would wait for a writer forever
        raise ValueError("not a regular file")
    size = info.st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header length {n} runs past the end of the file")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"header length {n} is over {MAX_HEADER_BYTES} bytes (the safetensors limit)")
        try:
            header = json.loads(f.read(n))
        # ValueError: not JSON, not UTF-8, an integer of thousands of digits; RecursionError: nested too deeply
        except (ValueError, RecursionError) as e:
            raise ValueError(f"header is not JSON ({first_line(e, 120)})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries: dict[str, Entry] = {}
    for name, item in header.items():
        try:
            dtype = str(item["dtype"])
            itemsize = ITEM_BYTES[dtype]
            shape = tuple(int(d) for d in item["shape"])
            begin, end = (int(o) for o in item["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a shape of [Infinity]
            raise ValueError(f"tensor {short_repr(name)}: bad header entry {short_repr(item, 80)}") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * itemsize or begin < 0:
            raise ValueError(f"tensor {name}: data_offsets {[begin, end]} disagree with shape {list(shape)}")
        if start + end > size:
            raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
        entries[name] = Entry(dtype, shape, begin, end)
    return Header(metadata if isinstance(metadata, dict) else {}, start, entries)
