"""The one JSON reader: every JSON file bitnet158 reads (config.json, trainer.json, Hugging Face
configs, indexes and tokenizer files) and every JSONL row goes through here, so a hostile file
fails the same way everywhere — one line naming the file, never a traceback:

    missing, a directory or FIFO, an unreadable or over-long name, larger than `max_bytes`,
    not UTF-8, not JSON, nested past the parser's recursion limit, an integer past Python's
    int-from-string digit limit, NaN / Infinity (not JSON; Python accepts them), a lone UTF-16
    surrogate escape (no character, and no UTF-8 encoding), and (read_json_object) not an object.

The typed accessors (`get_int`, `get_float`, `get_str`, `get_bool`, `get_dict`, `get_list`) read
one field of a parsed document and name the file, the key and a short repr of a bad value. A key
that is absent or null takes the default (Hugging Face writes null for "not set").
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from .errors import BitNetError, CheckpointError, DataError, first_line, short_repr

# tokenizer.json of a large-vocabulary model is tens of MB, config files are KB: this only stops
# a file that is no JSON we know from being read whole into memory
MAX_JSON_BYTES = 256 * 2**20
REQUIRED: Any = object()  # the default of an accessor whose key must be present

_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a surrogate escape in the raw text (pair or lone)
_SURROGATE = re.compile("[\ud800-\udfff]")  # after parsing, pairs are one character: any left is lone


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _first_lone_surrogate(doc: Any) -> str | None:
    """The first string (value or key) holding a lone surrogate, walked without recursion."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _parse(text: str, nonfinite: bool = False) -> Any:
    """The document in `text`, or ValueError with a short reason for a one-line message."""
    try:
        doc = json.loads(text, parse_constant=float if nonfinite else _refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:  # the C scanner counts its own depth against the recursion limit
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as e:
        if "integer string conversion" in str(e):  # Python's guard against quadratic int parsing
            raise ValueError(f"an integer with more than {sys.get_int_max_str_digits()} digits") from None
        raise ValueError(first_line(e)) from None
    if _MAYBE_SURROGATE.search(text):
        lone = _first_lone_surrogate(doc)
        if lone is not None:
            char = _SURROGATE.search(lone).group()
            raise ValueError(f"a lone surrogate escape \\u{ord(char):04x} (not a Unicode character) "
                             f"in {short_repr(lone.encode('utf-8', 'backslashreplace').decode())}")
    return doc


def _read_at_most(f: Any, limit: int, size: int) -> bytes:
    """Up to `limit` bytes of `f`, whose size on disk was `size`. read(limit) would reserve all of
    `limit` up front (256 MB for a 100-byte config: a MemoryError under an address-space limit);
    the loop catches a file that grew while it was read."""
    data = f.read(min(size, limit) + 1)
    while len(data) < limit and (more := f.read(min(1 << 20, limit - len(data)))):
        data += more
    return data


def _read_bytes(path: Path, label: str, max_bytes: int, error: type[BitNetError]) -> bytes:
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; regular
    # files ignore the flag
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, ValueError) as e:  # ENAMETOOLONG, EACCES, ELOOP; ValueError: a NUL in the name
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise error(f"{path}: not a readable {label} ({reason})") from None
    try:
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise error(f"{path}: not a readable {label} (a directory)")
            if not stat.S_ISREG(info.st_mode):
                raise error(f"{path}: not a readable {label} (not a regular file)")
            data = _read_at_most(f, max_bytes + 1, info.st_size)
    except OSError as e:
        raise error(f"{path}: not a readable {label} ({e.strerror or first_line(e)})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: not a readable {label} (larger than {max_bytes:,} bytes)")
    return data


def read_json(path: str | os.PathLike, *, what: str | None = None, max_bytes: int = MAX_JSON_BYTES,
              error: type[BitNetError] = CheckpointError, nonfinite: bool = False) -> Any:
    """The JSON document in `path`; every problem is one `error` line naming the file. `what`
    names the kind of file in messages ("JSON file" when not given). `nonfinite` accepts NaN and
    Infinity, which Python's json.dumps writes (for files of our own that may hold them)."""
    path = Path(path)
    label = what or "JSON file"
    data = _read_bytes(path, label, max_bytes, error)
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM some editors add is no reason to refuse a file
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a readable {label} (not UTF-8: byte 0x{data[e.start]:02x} "
                    f"at offset {e.start})") from None
    try:
        return _parse(text, nonfinite)
    except ValueError as e:
        raise error(f"{path}: not a readable {label}: {e}") from None


def read_json_object(path: str | os.PathLike, *, what: str | None = None, max_bytes: int = MAX_JSON_BYTES,
                     error: type[BitNetError] = CheckpointError, nonfinite: bool = False) -> dict[str, Any]:
    """`read_json`, and the document must be a JSON object."""
    doc = read_json(path, what=what, max_bytes=max_bytes, error=error, nonfinite=nonfinite)
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def parse_json_line(text: str, where: str, *, error: type[BitNetError] = DataError) -> Any:
    """One JSONL row; `where` ("file:line") starts the one-line message."""
    try:
        return _parse(text)
    except ValueError as e:
        raise error(f"{where}: {e}") from None


# --- typed fields ---------------------------------------------------------------------------

def _value(doc: dict[str, Any], key: str, where: str | os.PathLike, default: Any,
           error: type[BitNetError]) -> Any:
    value = doc.get(key)
    if value is None and default is REQUIRED:
        raise error(f"{where}: {key} is missing")
    return value


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    return f" ≥ {lo}" if lo is not None else (f" ≤ {hi}" if hi is not None else "")


def get_int(doc: dict[str, Any], key: str, where: str | os.PathLike, *, default: Any = REQUIRED,
            lo: int | None = None, hi: int | None = None, error: type[BitNetError] = CheckpointError) -> Any:
    """doc[key] as an int in [lo, hi] (true/false and 2.0 are refused: JSON says what it means)."""
    value = _value(doc, key, where, default, error)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or \
            (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{where}: {key} must be an integer{_range(lo, hi)}, got {short_repr(value)}")
    return value


def as_number(value: Any) -> float:
    """`value` as a float when it is a real number (not a bool), else NaN; an integer past the
    float range (JSON's 1e400 arrives as inf, a 400-digit integer as an int) is NaN too."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.nan
    return math.nan


def get_float(doc: dict[str, Any], key: str, where: str | os.PathLike, *, default: Any = REQUIRED,
              lo: float | None = None, hi: float | None = None, positive: bool = False,
              error: type[BitNetError] = CheckpointError) -> Any:
    """doc[key] as a finite float in [lo, hi] (and > 0 with `positive`); an integer is accepted."""
    value = _value(doc, key, where, default, error)
    if value is None:
        return default
    number = as_number(value)
    ok = math.isfinite(number) and (lo is None or number >= lo) and (hi is None or number <= hi)
    if not ok or (positive and not number > 0):
        bounds = _range(lo, hi) + (" and > 0" if positive and lo is not None else " > 0" if positive else "")
        raise error(f"{where}: {key} must be a finite number{bounds}, got {short_repr(value)}")
    return number


def get_str(doc: dict[str, Any], key: str, where: str | os.PathLike, *, default: Any = REQUIRED,
            choices: tuple[str, ...] | None = None, error: type[BitNetError] = CheckpointError) -> Any:
    """doc[key] as a string (one of `choices` when given)."""
    value = _value(doc, key, where, default, error)
    if value is None:
        return default
    if not isinstance(value, str):
        raise error(f"{where}: {key} must be a string, got {short_repr(value)}")
    if choices is not None and value not in choices:
        raise error(f"{where}: {key} {short_repr(value)} is not supported; supported: {', '.join(choices)}")
    return value


def get_bool(doc: dict[str, Any], key: str, where: str | os.PathLike, *, default: Any = REQUIRED,
             error: type[BitNetError] = CheckpointError) -> Any:
    """doc[key] as true or false (not "yes", not 1)."""
    value = _value(doc, key, where, default, error)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise error(f"{where}: {key} must be true or false, got {short_repr(value)}")
    return value


def get_dict(doc: dict[str, Any], key: str, where: str | os.PathLike, *, default: Any = REQUIRED,
             error: type[BitNetError] = CheckpointError) -> Any:
    """doc[key] as a JSON object."""
    value = _value(doc, key, where, default, error)
    if value is None:
        return default
    if not isinstance(value, dict):
        raise error(f"{where}: {key} must be a JSON object, got {short_repr(value)}")
    return value


def get_list(doc: dict[str, Any], key: str, where: str | os.PathLike, *, default: Any = REQUIRED,
             items: type | tuple[type, ...] | None = None, error: type[BitNetError] = CheckpointError) -> Any:
    """doc[key] as a list, each entry of type `items` when given."""
    value = _value(doc, key, where, default, error)
    if value is None:
        return default
    if not isinstance(value, list):
        raise error(f"{where}: {key} must be a list, got {short_repr(value)}")
    if items is not None:
        for entry in value:
            if not isinstance(entry, items) or (isinstance(entry, bool) and bool not in _types(items)):
                names = " or ".join(t.__name__ for t in _types(items))
                raise error(f"{where}: {key} must be a list of {names}, got an entry {short_repr(entry)}")
    return value


def _types(items: type | tuple[type, ...]) -> tuple[type, ...]:
    return items if isinstance(items, tuple) else (items,)
