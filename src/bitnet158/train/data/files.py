"""User files (`--data`): .txt, .jsonl and .parquet files or folders of them → a Corpus.

Whole files are held out by the name rule of `corpus.is_heldout` when that gives both sides a
file; otherwise the tail of the text is. Every user mistake raises DataError naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import DataError, first_line
from ...jsonio import parse_json_line
from .corpus import Corpus, Document, is_heldout

HELDOUT_FRACTION = 0.05  # the tail fraction held out when whole files cannot be
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")

def load_corpus(paths: Sequence[str | os.PathLike]) -> Corpus:
    """Load .txt / .jsonl ("text" per line) / .parquet ("text" column) files or folders of them.

    Held-out: whole files by `is_heldout` when there are ≥ 2 files and both sides get one; the
    file's name for the rule is its path relative to the folder passed (or its base name when a
    file is passed directly), so the split does not depend on where the data lives. Otherwise
    the last ~5 % of the text is held out (whole rows where possible). Every user mistake raises
    DataError naming the file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given")
    files = expand_paths(paths)
    per_file = [(name, _read_file(path)) for name, path in files]
    if not any(d.text for _, docs in per_file for d in docs):
        raise DataError(f"no text found in {', '.join(map(str, paths))}")
    description = f"{len(files)} file(s) from {', '.join(map(str, paths))}"
    held_names = {name for name, _ in per_file if is_heldout(name)}
    if len(per_file) >= 2 and 0 < len(held_names) < len(per_file):
        train = [d for name, docs in per_file if name not in held_names for d in docs]
        heldout = [d for name, docs in per_file if name in held_names for d in docs]
        return Corpus(train, heldout, description + ", whole files held out")
    train, heldout = _tail_split([d for _, docs in per_file for d in docs], HELDOUT_FRACTION)
    return Corpus(train, heldout, description + f", last ~{HELDOUT_FRACTION:.0%} held out")


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """(split name, path) for each file; folders are walked recursively in sorted order (shared
    with prepare-data, train/shard_units.py)."""
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if _is_data_file(p, path))
            if not found:
                raise DataError(f"{path}: folder has no {', '.join(SUPPORTED_SUFFIXES)} files")
            entries = [(p.relative_to(path).as_posix(), p) for p in found]
        else:
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise DataError(f"{path}: unknown file type {path.suffix or '(none)'!r}; "
                                f"use {', '.join(SUPPORTED_SUFFIXES)}")
            entries = [(path.name, path)]
        for name, p in entries:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append((name, p))
    return out


def _is_data_file(path: Path, root: Path) -> bool:
    """A supported file that is not hidden (skips .git/, editor backups like .foo.txt)."""
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES and not hidden


def _read_file(path: Path) -> list[Document]:
    if not path.is_file():  # a FIFO would block the read forever; a socket or device is no data file
        raise DataError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return [Document(str(path), text)]


def _read_text(path: Path) -> str:
    """UTF-8 text or a DataError saying exactly why not (binary, other encoding, empty)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data.strip():
        raise DataError(f"{path}: empty file")
    nul = data.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return data.decode("utf-8-sig")  # -sig: drop a BOM rather than train on it
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                        "re-encode it as UTF-8") from None


def _read_jsonl(path: Path, text: str) -> list[Document]:
    docs = []
    # JSONL rows end at "\n" only: str.splitlines also splits at U+2028/U+2029, \x85, \x0b, \x0c and
    # \x1c-\x1e, which JSON allows raw inside strings, so a valid row would be cut in two
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        row = parse_json_line(line, f"{path}:{lineno}", error=DataError)
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f'{path}:{lineno}: expected a JSON object with a "text" field')
        if not isinstance(row["text"], str):
            raise DataError(f'{path}:{lineno}: "text" must be a string, got {type(row["text"]).__name__}')
        if row["text"]:
            docs.append(Document(f"{path}:{lineno}", row["text"]))
    if not docs:
        raise DataError(f'{path}: no non-empty "text" values')
    return docs


def _read_parquet(path: Path) -> list[Document]:
    try:
        import pyarrow.parquet as pq  # pyarrow: optional (the parquet extra)
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'bitnet158[parquet]')") from None
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file")
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise DataError(f'{path}: parquet file has no "text" column (columns: {", ".join(schema.names)})')
        # to_pylist decodes the strings: a corrupted page is invalid UTF-8 only here
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except DataError:
        raise
    except Exception as exc:  # pyarrow.ArrowInvalid and friends: not a parquet file
        raise DataError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    docs = []
    for row, value in enumerate(values):
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise DataError(f'{path}: "text" column must hold strings, got {type(value).__name__}')
        docs.append(Document(f"{path}#{row}", value))
    if not docs:
        raise DataError(f'{path}: no non-empty "text" values')
    return docs


def _tail_split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out the last ~`fraction` of the text: whole documents from the end when that lands
    near the target, else the last document is cut at a blank line (or a line end)."""
    total = sum(len(d.text) for d in docs)
    target = max(1, round(total * fraction))
    held, held_chars = 0, 0
    while held < len(docs) - 1 and held_chars < target:
        held += 1
        held_chars += len(docs[-held].text)
    if held and held_chars <= 2 * target:
        return docs[:-held], docs[-held:]
    # The boundary document is too big to hold out whole: split it so the tail is ~target chars.
    b = len(docs) - max(held, 1)
    last, whole_tail = docs[b], docs[b + 1:]
    need = max(1, target - sum(len(d.text) for d in whole_tail))
    cut = _cut_point(last.text, len(last.text) - need)
    if not 0 < cut < len(last.text):
        raise DataError(f"{last.name}: too little text to hold out a validation part "
                        f"({total} characters in all)")
    head, tail = Document(last.name, last.text[:cut]), Document(last.name + "#tail", last.text[cut:])
    return docs[:b] + [head], [tail] + whole_tail


def _cut_point(text: str, pos: int) -> int:
    """A split position near `pos`: the nearest paragraph break, else line break, else `pos`."""
    pos = min(max(pos, 1), len(text) - 1)
    window = max(256, len(text) // 20)
    for sep in ("\n\n", "\n"):
        candidates = [i + len(sep) for i in (text.rfind(sep, 0, pos), text.find(sep, pos))
                      if i >= 0 and 0 < i + len(sep) < len(text) and abs(i + len(sep) - pos) <= window]
        if candidates:
            return min(candidates, key=lambda i: abs(i - pos))
    return pos

