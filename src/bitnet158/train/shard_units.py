"""prepare-data's units of work: pieces of input files (~1 MB of text each) that worker processes
encode independently, in an order fixed by the inputs alone (so a killed preparation resumes).

A .txt file is one document cut into pieces only after a newline whose neighbours are printable
ASCII ("x\\nY"): the byte-level pre-tokenizer always splits there (the newline is a pre-token of
its own, the next word starts without a space), so encoding the pieces one by one gives exactly
the ids of the whole file. A .jsonl file is cut between rows (each row a document), a .parquet
file by row group. The EOS id follows each document.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, first_line
from ..jsonio import parse_json_line
from .data.corpus import is_heldout
from .data.files import SUPPORTED_SUFFIXES, expand_paths

PIECE_BYTES = 1 << 18   # text per unit (256 KiB): a worker holds it, its Encoding (~50 bytes per id) and ids
MAX_PIECE_BYTES = 16 << 20  # a file with no clean cut point for this long is cut at any newline
_SAFE = frozenset(range(0x21, 0x7F))  # printable ASCII, no whitespace


@dataclass(frozen=True)
class Unit:
    """One piece of work: bytes [start, end) of a text/JSONL file (first line number `line`), or a
    parquet row group (start = its index); `last` marks the end of a .txt document (EOS after it)."""

    path: str
    name: str   # the file's name for the held-out rule
    kind: str   # txt | jsonl | parquet
    start: int
    end: int
    line: int
    last: bool
    heldout: bool = False


def expand_inputs(inputs: Sequence[str]) -> list[tuple[str, Path]]:
    """Files, folders and globs → (split name, path), sorted within each input, no duplicates."""
    paths: list[str] = []
    for raw in inputs:
        if any(c in raw for c in "*?["):
            found = sorted(glob.glob(raw, recursive=True))
            found = [f for f in found if Path(f).suffix.lower() in SUPPORTED_SUFFIXES or Path(f).is_dir()]
            if not found:
                raise DataError(f"{raw}: the pattern matches no {', '.join(SUPPORTED_SUFFIXES)} files")
            paths.extend(found)
        else:
            paths.append(raw)
    return expand_paths(paths)


def plan_units(inputs: Sequence[str]) -> list[Unit]:
    """Every unit of every input file, with its train / held-out side: whole files by the name rule
    (corpus.is_heldout) when there are ≥ 2 files and both sides get one, else units by the same rule
    on "name@index", else the last unit (when there are ≥ 2)."""
    files = expand_inputs(inputs)
    units = [u for name, path in files for u in _file_units(name, path)]
    if not units:
        raise DataError(f"no text found in {', '.join(inputs)}")
    held_files = {name for name, _ in files if is_heldout(name)}
    if len(files) >= 2 and 0 < len(held_files) < len(files):
        return [_with(u, u.name in held_files) for u in units]
    flags = [is_heldout(f"{u.name}@{i}") for i, u in enumerate(units)]
    if len(units) >= 2 and not (0 < sum(flags) < len(units)):
        flags = [False] * (len(units) - 1) + [True]
    return [_with(u, f) for u, f in zip(units, flags)]


def _with(unit: Unit, heldout: bool) -> Unit:
    return Unit(unit.path, unit.name, unit.kind, unit.start, unit.end, unit.line, unit.last, heldout)


def _file_units(name: str, path: Path) -> list[Unit]:
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    kind = path.suffix.lower().lstrip(".")
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq  # pyarrow: optional (the parquet extra)
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'bitnet158[parquet]')") from None
        try:
            groups = pq.ParquetFile(path).num_row_groups
        except Exception as exc:  # pyarrow.ArrowInvalid and friends
            raise DataError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
        return [Unit(str(path), name, kind, g, g + 1, 0, True) for g in range(groups)]
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file")
    cuts = _cut_points(path, size, jsonl=kind == "jsonl")
    units, line = [], 1
    with open(path, "rb") as f:
        for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, size])):
            units.append(Unit(str(path), name, kind, a, b, line, i == len(cuts)))
            if kind == "jsonl":
                f.seek(a)
                line += f.read(b - a).count(b"\n")
    return units


def _cut_points(path: Path, size: int, jsonl: bool) -> list[int]:
    """Offsets just after a newline, ~PIECE_BYTES apart, read block by block (memory stays flat)."""
    cuts: list[int] = []
    with open(path, "rb") as f:
        pos = PIECE_BYTES
        while pos < size:
            f.seek(pos - 1)
            block = f.read(MAX_PIECE_BYTES + 1)
            cut = _find_cut(block, jsonl)
            if cut is None:
                loose = block.find(b"\n")
                if loose < 0:
                    break
                cut = loose + 1  # no clean cut within MAX_PIECE_BYTES: any newline (ids may differ there)
            at = pos - 1 + cut
            if at >= size:
                break
            cuts.append(at)
            pos = at + PIECE_BYTES
    return cuts


def _find_cut(block: bytes, jsonl: bool) -> int | None:
    i = block.find(b"\n", 1)
    while 0 < i < len(block) - 1:
        if jsonl or (block[i - 1] in _SAFE and block[i + 1] in _SAFE):
            return i + 1
        i = block.find(b"\n", i + 1)
    return None


def unit_texts(unit: Unit) -> list[tuple[str, bool]]:
    """The unit's text pieces, each with whether EOS follows it."""
    if unit.kind == "parquet":
        return [(t, True) for t in _parquet_rows(unit)]
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        data = f.read(unit.end - unit.start)
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{unit.path}: looks binary (NUL byte at offset {unit.start + nul}); expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig" if unit.start == 0 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{unit.path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                        f"{unit.start + exc.start}); re-encode it as UTF-8") from None
    if unit.kind == "txt":
        return [(text, unit.last)] if text else []
    rows = []
    for k, line in enumerate(text.split("\n")):  # JSONL rows end at "\n" only (see data/files.py)
        if not line.strip():
            continue
        row = parse_json_line(line, f"{unit.path}:{unit.line + k}", error=DataError)
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'{unit.path}:{unit.line + k}: expected a JSON object with a "text" string')
        if row["text"]:
            rows.append((row["text"], True))
    return rows


def _parquet_rows(unit: Unit) -> list[str]:
    import pyarrow.parquet as pq  # checked by _file_units
    try:
        table = pq.ParquetFile(unit.path).read_row_group(unit.start, columns=["text"])
        values = table.column("text").to_pylist()
    except Exception as exc:
        raise DataError(f"{unit.path}: row group {unit.start}: unreadable ({first_line(exc)}); "
                        'expected a "text" column') from None
    return [v for v in values if isinstance(v, str) and v]


def encode_unit(tokenizer, unit: Unit, dtype: np.dtype) -> np.ndarray:
    """The unit's ids (EOS after each finished document) as a 1-D array of `dtype`."""
    pieces = unit_texts(unit)
    ids: list[int] = []
    encoded = tokenizer.encode_batch([t for t, _ in pieces]) if pieces else []
    for (_, eos), row in zip(pieces, encoded):
        ids.extend(row)
        if eos:
            ids.append(tokenizer.eos_id)
    if unit.kind == "txt" and unit.last and not pieces:
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=dtype)


def describe_inputs(inputs: Sequence[str]) -> list[dict]:
    """What the inputs are, for the manifest and for noticing a resume over changed inputs."""
    return [{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for _, p in expand_inputs(inputs)]

