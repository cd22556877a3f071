"""A packed model directory read without torch: config, packing, tokenizer, and every tensor read
into its own 64-byte-aligned numpy array, checked before use.

The checks are the torch reader's (`checkpoint.ModelDir`), on numpy: each tensor the model needs is
present with exactly its shape and dtype, float tensors are finite, scales are positive and below
`MAX_SCALE`, norm weights below `MAX_NORM_WEIGHT`, packed bytes decode to valid codes, and nothing
else is in the file. The first problem is a one-line CheckpointError naming the file and tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint.layout import (MAX_NORM_WEIGHT, MAX_SCALE, WEIGHT_ALIGN, WEIGHTS, model_config, packing_config,
                                 read_config_document, read_tokenizer, resolve)
from ..config import ModelConfig
from ..errors import CheckpointError, first_line
from ..formats import get_format
from ..pack_config import PackConfig
from ..safetensors_header import Entry, read_header
from ..tokenizer import Tokenizer

_NUMPY = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8}
_CHUNK = 1 << 22  # elements per finiteness check: no temporary as large as the embedding


@dataclass
class PackedDir:
    """What a packed directory holds, opened once (`open_packed`)."""
    path: Path
    config: ModelConfig
    packing: PackConfig
    doc: dict[str, Any]
    tensors: "TensorFile"

    def tokenizer(self) -> Tokenizer | None:
        return read_tokenizer(self.path, self.doc, self.config.vocab_size)


class TensorFile:
    """The weights file as checked numpy arrays. `take` reads each tensor once; `finish` then
    refuses any tensor nobody asked for (the config has no such weight).

    Plain reads into anonymous memory, not views of a memory map: decoding streams every weight
    each token, and over file-backed pages the 2B4T-shaped decode ran at 0.81x the torch path's
    against 0.99x this way (benchmarks/torch_free.py, one busy-machine run each; anonymous memory
    may be backed by huge pages, a file's page cache is not)."""

    def __init__(self, file: Path):
        self.file = file
        if not file.exists():
            raise CheckpointError(f"{file}: missing")
        try:
            self._header = read_header(file)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first_line(e)})") from None
        self._left = dict(self._header.entries)

    def _read(self, name: str, entry: Entry) -> np.ndarray:
        raw = np.empty(entry.end - entry.begin + WEIGHT_ALIGN, dtype=np.uint8)
        skip = -raw.ctypes.data % WEIGHT_ALIGN
        data = raw[skip:skip + entry.end - entry.begin]
        try:
            with open(self.file, "rb") as f:
                f.seek(self._header.data_start + entry.begin)
                got = f.readinto(memoryview(data))
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {name} ({first_line(e)})") from None
        if got != data.size:
            raise CheckpointError(f"{self.file}: tensor {name}: file ended early (truncated?)")
        return data.view(_NUMPY[entry.dtype]).reshape(entry.shape)

    def take(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = ("F32",)) -> np.ndarray:
        """The tensor `name`, which must have exactly `shape` and one of `dtypes`; float16 comes
        back widened to float32 (the step computes in fp32)."""
        where = f"{self.file}: tensor {name}"
        entry: Entry | None = self._left.pop(name, None)
        if entry is None:
            raise CheckpointError(f"{where} is missing")
        if entry.shape != tuple(shape):
            raise CheckpointError(f"{where} has shape {list(entry.shape)}, the config expects {list(shape)}")
        if entry.dtype not in dtypes:
            raise CheckpointError(f"{where} has dtype {entry.dtype}, expected {' or '.join(dtypes)}")
        array = self._read(name, entry)
        if array.dtype.kind == "f":
            if not all(np.isfinite(part).all() for part in np.array_split(array.reshape(-1), max(1, array.size // _CHUNK))):
                raise CheckpointError(f"{where} holds NaN or infinite values")
            if name.endswith(("weight_scale", "row_scale", "group_scale")):
                if array.size and not (array > 0).all():
                    raise CheckpointError(f"{where} holds a non-positive scale; scales must be positive")
                if array.size and float(array.max()) > MAX_SCALE:
                    raise CheckpointError(f"{where} holds a scale of {float(array.max()):.3g}, above the bound "
                                          f"{MAX_SCALE:g} (it would overflow the logits)")
            if name.endswith("norm.weight") and array.size and float(np.abs(array).max()) > MAX_NORM_WEIGHT:
                raise CheckpointError(f"{where} holds a norm weight of magnitude {float(np.abs(array).max()):.3g}, "
                                      f"above the bound {MAX_NORM_WEIGHT:g}")
        if array.dtype == np.float16 and not name.endswith("group_scale"):
            array = array.astype(np.float32)
        return array

    def packed(self, name: str, fmt: str, n: int, k: int) -> np.ndarray:
        """A packed ternary matrix's bytes, checked to decode to valid codes."""
        array = self.take(name, (get_format(fmt).packed_nbytes(n, k),), ("U8",))
        bad = get_format(fmt).first_invalid_byte(array, n, k)
        if bad is not None:
            raise CheckpointError(f"{self.file}: tensor {name}: {bad}")
        return array

    def has(self, name: str) -> bool:
        return name in self._left

    def finish(self) -> None:
        if self._left:
            name = next(iter(self._left))
            raise CheckpointError(f"{self.file}: unexpected tensor {name} (the config has no such weight)")


def open_packed(path: str | os.PathLike) -> PackedDir:
    """A packed directory (or a training run's newest step, if packed), ready to be read."""
    directory = resolve(path)
    doc = read_config_document(directory)
    config = model_config(directory, doc)
    packing = packing_config(directory, doc)
    if packing is None:
        raise CheckpointError(f"{directory}: not a packed model; the torch-free runtime runs packed directories "
                              f"(`bitnet158 pack` makes one, with torch installed)")
    return PackedDir(directory, config, packing, doc, TensorFile(directory / WEIGHTS))
