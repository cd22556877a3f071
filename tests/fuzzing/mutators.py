"""Mutations of a seed folder: each takes (rng, case folder, target file) and returns a short
description. `mutate` picks 1-3 of them, the target file and the mutation kind by the file's
format, and returns the path the reader is to be handed (a data file may be renamed).

Kinds: bytes (flip, truncate, insert, append, empty, not UTF-8), the file system (delete, a
directory / FIFO / symlink loop / dangling symlink in its place), JSON (a node set to a hostile
value or raw token: huge or non-finite numbers, deep nesting, lone surrogates, wrong types; keys
deleted), safetensors headers (shapes, dtypes, offsets, entries, the length field), GGUF headers
(every count, length, type, dimension and offset field; strings), JSONL rows, parquet columns, and
folder layouts (a run's `latest` and steps, an HF index, a pickle, a non-UTF-8 data file name).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .seeds import main_path

PLACEHOLDER = "\u0000FUZZ\u0000"  # stands for a raw JSON token spliced into the dumped text
RAW_TOKENS = ("1" + "0" * 5000, "-" + "9" * 4400, "1e400", "-1e400", "NaN", "Infinity", "-Infinity",
              '"\\ud800"', '"x\\udfffy"', '"\\ud83d"', "[Infinity]", "1e-400", "-0", "123456789012345678901234567890")
STRINGS = ("", "x", "\n\x1b[31mred\x1b[0m", "a\u2028b", "\ufeff", "é" * 3, "../../etc/passwd", "a" * 5000,
           "step-000001\n", "<|endoftext|>", "Sequence", "ByteLevel", "BPE", "bitnet158", "packed", "i2",
           "float32", "F16", "\x00", "/", "\\", "\udcff")

Mutation = Callable[[random.Random, Path, Path], str]


def _hostile_value(rng: random.Random, old: Any) -> Any:
    """A value of the wrong type, out of range, or near the old one."""
    near: list[Any] = [[old], {"content": old}, str(old)[:100]]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        near += [old * 2, old + 1, old - 1, -old, old * 1000, old // 2 if isinstance(old, int) else old / 3]
    if isinstance(old, list) and old:
        near += [old[:-1], old + old[-1:], old[::-1], old * 50]
    if isinstance(old, str) and old:
        near += [old + "x", old[:-1], old.upper(), old * 3]
    pool: list[Any] = [None, True, False, 0, -1, 1, 2, 3, 7, 255, 2**31, 2**32, 2**63, -(2**63), 10**30,
                       1e308, -1e308, 5e-324, 0.5, -0.0, 1.5, [], [1], [None], {}, {"a": 1}, ["x"] * 3,
                       *STRINGS, *near]
    return rng.choice(pool)


# --- JSON -----------------------------------------------------------------------------------

def _json_paths(doc: Any, limit: int = 5000) -> list[tuple]:
    """Paths (tuples of keys / indexes) to nodes, breadth first, at most `limit`."""
    paths: list[tuple] = []
    queue = [((), doc)]
    while queue and len(paths) < limit:
        path, node = queue.pop(0)
        paths.append(path)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        queue.extend((path + (k,), v) for k, v in items)
    return paths


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _dump(doc: Any, raw: str | None) -> bytes:
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    if raw is not None:
        text = text.replace(json.dumps(PLACEHOLDER, ensure_ascii=False), raw, 1)
    return text.encode("utf-8", "surrogatepass")


def mutate_json_doc(rng: random.Random, doc: Any) -> tuple[bytes, str]:
    """The document with one node changed, as bytes, and a description."""
    paths = _json_paths(doc)
    # deeper nodes are far more numerous (vocabulary entries); give every depth a fair chance
    depth = rng.choice(sorted({len(p) for p in paths}))
    path = rng.choice([p for p in paths if len(p) == depth])
    op = rng.choices(("value", "raw", "nest", "delete", "rename"), (6, 3, 1, 2, 1))[0]
    if op == "delete" and path:
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return _dump(doc, None), f"json delete {path}"
    if op == "rename" and path and isinstance(path[-1], str):
        parent = _get(doc, path[:-1])
        parent[path[-1] + rng.choice(("_", "x", " ", "\u2028"))] = parent.pop(path[-1])
        return _dump(doc, None), f"json rename {path}"
    if op == "raw":
        token = rng.choice(RAW_TOKENS)
        return _dump(_set(doc, path, PLACEHOLDER), token), f"json raw {path} = {token[:20]}"
    if op == "nest":
        n = rng.choice((50, 500, 1000, 5000, 100_000))
        return _dump(_set(doc, path, PLACEHOLDER), "[" * n + "]" * n), f"json nest {path} × {n}"
    value = _hostile_value(rng, _get(doc, path) if path else doc)
    return _dump(_set(doc, path, value), None), f"json {path} = {repr(value)[:40]}"


def json_edit(rng: random.Random, case: Path, target: Path) -> str:
    try:
        doc = json.loads(target.read_bytes())
    except (ValueError, RecursionError, OSError):
        return byte_flip(rng, case, target)
    data, what = mutate_json_doc(rng, doc)
    target.write_bytes(data)
    return what


# --- bytes and the file system ----------------------------------------------------------------

def byte_flip(rng: random.Random, case: Path, target: Path) -> str:
    data = bytearray(target.read_bytes())
    if not data:
        return append(rng, case, target)
    # most format errors live in the first kilobytes (headers); flip there more often
    span = len(data) if rng.random() < 0.4 else min(len(data), 4096)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        i = rng.randrange(span)
        data[i] = rng.choice((0, 0xFF, 0x80, ord('"'), ord("\n"), rng.randrange(256), data[i] ^ (1 << rng.randrange(8))))
    target.write_bytes(bytes(data))
    return "byte flip"


def truncate(rng: random.Random, case: Path, target: Path) -> str:
    size = target.stat().st_size
    cut = rng.choice((0, 1, 7, 8, 9, size // 2, size - 1, rng.randrange(size + 1))) if size else 0
    os.truncate(target, max(0, min(cut, size)))
    return f"truncate at {cut}"


def insert(rng: random.Random, case: Path, target: Path) -> str:
    data = target.read_bytes()
    i = rng.randrange(len(data) + 1)
    junk = rng.choice((b"\0", b"\xff\xfe", b"{", b"]", b"\n", os.urandom(rng.randrange(1, 64)), b"\xe2\x80\xa8"))
    target.write_bytes(data[:i] + junk + data[i:])
    return f"insert {junk[:8]!r} at {i}"


def append(rng: random.Random, case: Path, target: Path) -> str:
    with open(target, "ab") as f:
        f.write(rng.choice((b"\0" * 64, os.urandom(100), b"garbage", b"\n{}\n", b"\xff" * 3)))
    return "append"


def empty(rng: random.Random, case: Path, target: Path) -> str:
    target.write_bytes(b"")
    return "empty"


def not_utf8(rng: random.Random, case: Path, target: Path) -> str:
    data = bytearray(target.read_bytes())
    i = rng.randrange(len(data) + 1) if data else 0
    data[i:i] = rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"))
    target.write_bytes(bytes(data))
    return "not utf-8"


def delete(rng: random.Random, case: Path, target: Path) -> str:
    target.unlink()
    return "delete"


def to_directory(rng: random.Random, case: Path, target: Path) -> str:
    target.unlink()
    target.mkdir()
    (target / "inner").write_bytes(b"{}")
    return "a directory in its place"


def to_fifo(rng: random.Random, case: Path, target: Path) -> str:
    target.unlink()
    os.mkfifo(target)
    return "a FIFO in its place"


def to_symlink(rng: random.Random, case: Path, target: Path) -> str:
    target.unlink()
    if rng.random() < 0.5:
        target.symlink_to(target.name)  # a loop: ELOOP on open
        return "a symlink loop in its place"
    target.symlink_to(case / "nowhere")
    return "a dangling symlink in its place"


# --- safetensors headers -----------------------------------------------------------------------

def _st_value(rng: random.Random, key: str, old: Any) -> Any:
    if key == "shape":
        if not (isinstance(old, list) and all(isinstance(d, int) for d in old)):
            old = [4]  # an earlier mutation of the same header left no list of ints to derive from
        return rng.choice(([], [0], [-1], [2**40], [2**63], [1.5], ["4"], [None], old[::-1], old + [1],
                           old[:-1], [d * 2 for d in old], [d + 1 for d in old], [0] + old[1:], PLACEHOLDER))
    if key == "dtype":
        return rng.choice(("F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "X", "", 5, None))
    return rng.choice(([0, 0], old[::-1], [old[0], old[1] + 1], [old[0] - 1, old[1]], [old[0], 2**62],
                       [-8, old[1]], [old[0]], [0.5, old[1]], None, PLACEHOLDER))


def st_header(rng: random.Random, case: Path, target: Path) -> str:
    data = target.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        body = data[8 + n:]
        # entries an earlier mutation left without a shape/dtype/offsets list are not edited
        names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                 and all(isinstance(v.get(f), list) and len(v[f]) == 2 for f in ("data_offsets",))
                 and isinstance(v.get("shape"), list)]
    except (ValueError, struct.error, RecursionError, AttributeError):  # AttributeError: not an object
        return byte_flip(rng, case, target)
    op = rng.choices(("field", "delete", "add", "metadata", "length", "json"), (8, 1, 1, 1, 1, 2))[0]
    raw, what = None, op
    if op == "field" and names:
        name, key = rng.choice(names), rng.choice(("shape", "shape", "dtype", "data_offsets"))
        value = _st_value(rng, key, header[name][key])
        header[name][key] = value
        raw = rng.choice(("[Infinity]", "[1e400]", "[" + "9" * 5000 + "]", "[-1]")) if value == PLACEHOLDER else None
        what = f"safetensors {name}.{key} = {raw or repr(value)[:30]}"
    elif op == "delete" and names:
        del header[rng.choice(names)]
    elif op == "add":
        header[rng.choice(("extra.weight", "\n", names[0] if names else "x"))] = {
            "dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    elif op == "metadata":
        header["__metadata__"] = rng.choice(({"format": "np"}, {"kind": "packed"}, None, [], {"format": 5}))
    elif op == "json":
        doc_bytes, what = mutate_json_doc(rng, header)
        return _write_st(target, doc_bytes, body, rng)
    text = _dump(header, raw) if op != "length" else json.dumps(header).encode()
    if op == "length":
        bad = rng.choice((0, 1, len(text) - 1, len(text) + 1, 2**63, len(data)))
        target.write_bytes(struct.pack("<Q", bad) + text + body)
        return f"safetensors header length {bad}"
    _write_st(target, text, body, rng)
    return what


def _write_st(target: Path, header: bytes, body: bytes, rng: random.Random) -> str:
    header += b" " * (-len(header) % 8)  # the writer's padding: keeps the data aligned
    target.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return "safetensors header json edit"


# --- GGUF headers ------------------------------------------------------------------------------

_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}


def gguf_fields(data: bytes) -> tuple[list[tuple[int, str, str]], list[tuple[int, int]]]:
    """(numeric fields as (offset, struct code, role), strings as (offset of the length, length))
    of a well-formed GGUF header; ValueError when it is not one."""
    fields, strings = [(4, "I", "version"), (8, "Q", "n_tensors"), (16, "Q", "n_kv")]
    pos = 24

    def num(code: str, role: str) -> int | float:
        nonlocal pos
        (v,) = struct.unpack_from("<" + code, data, pos)
        fields.append((pos, code, role))
        pos += struct.calcsize(code)
        return v

    def string(role: str) -> None:
        nonlocal pos
        n = num("Q", role + " length")
        strings.append((pos - 8, n))
        if pos + n > len(data):
            raise ValueError("string past the end")
        pos += n

    try:
        _, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        for _ in range(n_kv):
            string("key")
            vtype = num("I", "value type")
            if vtype == 8:
                string("value")
            elif vtype == 9:
                etype, count = num("I", "array type"), num("Q", "array length")
                for _ in range(count):
                    if etype == 8:
                        string("element")
                    else:
                        pos += struct.calcsize(_GGUF_SCALAR[etype])
            else:
                num(_GGUF_SCALAR[vtype], "value")
        for _ in range(n_tensors):
            string("tensor name")
            for _ in range(num("I", "n_dims")):
                num("Q", "dim")
            num("I", "ggml type")
            num("Q", "tensor offset")
    except (struct.error, KeyError) as e:
        raise ValueError(str(e)) from None
    return fields, strings


def _gguf_number(rng: random.Random, code: str, old: int | float) -> int | float:
    if code in "fd":
        return rng.choice((float("nan"), float("inf"), -1.0, 0.0, 1e38, -old, old * 1e6, 1e-30))
    bits = struct.calcsize(code) * 8
    top = 2 ** (bits - 1) - 1 if code.islower() else 2**bits - 1
    low = -(2 ** (bits - 1)) if code.islower() else 0
    value = rng.choice((0, 1, 2, 3, 4, 13, 31, 32, 64, 255, 256, 4096, top, top // 2, low, old + 1, old - 1,
                        old * 2, old // 2, old * 1000, rng.randrange(low, top + 1)))
    return min(max(value, low), top)


def gguf_edit(rng: random.Random, case: Path, target: Path) -> str:
    data = bytearray(target.read_bytes())
    try:
        fields, strings = gguf_fields(bytes(data))
    except ValueError:
        return byte_flip(rng, case, target)
    if strings and rng.random() < 0.25:  # a string: forged bytes, same length or not
        at, n = rng.choice(strings)
        new = rng.choice(STRINGS).encode("utf-8", "surrogatepass")
        if rng.random() < 0.5:
            new = (new * (n // max(1, len(new)) + 1))[:n]
        data[at:at + 8 + n] = struct.pack("<Q", len(new)) + new
        target.write_bytes(bytes(data))
        return f"gguf string at {at} = {new[:20]!r}"
    at, code, role = rng.choice(fields)
    (old,) = struct.unpack_from("<" + code, data, at)
    value = _gguf_number(rng, code, old)
    struct.pack_into("<" + code, data, at, value)
    target.write_bytes(bytes(data))
    return f"gguf {role} at {at}: {old} -> {value}"


# --- data files ----------------------------------------------------------------------------------

JSONL_ROWS = ('{"text": "\\ud800"}', '{"text": "a\u2028b\u2029c\x85d"}', '{"text": 5}', "[1]", "{}",
              '{"text": null}', '{"text": ""}', '{"text": "' + "x" * 200_000 + '"}', "[" * 100_000,
              '{"text": ' + "1" * 5000 + "}", '{"text": NaN}', "\x00", '{"text": "ok"}\r', "\ufeff{}",
              '{"text": "\\u0000"}', '{"text": "a", "text": 1}', '{"text": ["a"]}')


def jsonl_row(rng: random.Random, case: Path, target: Path) -> str:
    try:
        lines = target.read_text(encoding="utf-8").split("\n")
    except (UnicodeDecodeError, OSError):
        return byte_flip(rng, case, target)
    i = rng.randrange(len(lines))
    if rng.random() < 0.5:
        row = rng.choice(JSONL_ROWS)
        lines[i] = row
        what = row[:30]
    else:
        try:
            data, what = mutate_json_doc(rng, json.loads(lines[i]))
            lines[i] = data.decode("utf-8", "surrogatepass").replace("\n", " ")
        except (ValueError, RecursionError):
            lines[i], what = "{", "{"
    target.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    return f"jsonl row {i}: {what!r}"


def text_edit(rng: random.Random, case: Path, target: Path) -> str:
    data = target.read_bytes()
    new = rng.choice((b"\0", b" \n\t" * 10, b"\xef\xbb\xbf", b"x" * 300_000, b"\r\n" * 100, b"\xe2\x80\xa8" * 50))
    target.write_bytes(rng.choice((new, data + new, new + data)))
    return f"text {new[:10]!r}"


def parquet_column(rng: random.Random, case: Path, target: Path) -> str:
    import pyarrow as pa  # only reached for parquet seeds, which exist only with pyarrow
    import pyarrow.parquet as pq

    columns = {
        "ints": pa.array([1, 2, 3]), "nulls": pa.array([None, None], type=pa.string()),
        "binary": pa.array([b"\xff\xfe", b"ok"], type=pa.binary()), "lists": pa.array([["a"], ["b", "c"]]),
        "large": pa.array(["a", "b"], type=pa.large_string()),
        "dict": pa.array(["a", "b", "a"]).dictionary_encode(), "structs": pa.array([{"a": 1}]),
        "floats": pa.array([float("nan"), 1.0]), "empty": pa.array([], type=pa.string()),
        "surrogate_bytes": pa.array([b"\xed\xa0\x80"], type=pa.binary()),
    }
    kind = rng.choice(sorted(columns) + ["no text column"])
    table = pa.table({"body": ["x"]}) if kind == "no text column" else pa.table({"text": columns[kind]})
    tmp = case / "rewritten.parquet.tmp"  # pyarrow takes str paths only: the target may not be UTF-8
    pq.write_table(table, str(tmp))
    os.replace(tmp, target)
    return f"parquet text column: {kind}"


def non_utf8_name(rng: random.Random, case: Path, target: Path) -> str:
    new = os.fsencode(target.parent) + b"/" + rng.choice((b"\xff", b"\xe9t\xe9", b"a\nb.")) + os.fsencode(target.name)
    os.rename(target, new)
    return f"renamed to {new[-20:]!r}"


# --- folder layouts --------------------------------------------------------------------------------

def run_layout(rng: random.Random, case: Path, target: Path) -> str:
    steps = sorted(p for p in case.iterdir() if p.name.startswith("step-"))
    op = rng.choice(("latest", "latest", "no config", "empty step", "fake step"))
    if op == "latest":
        value = rng.choice((b"step-999999", b"../", b"step-000001\n", b"step-", b"\xff", b"step-000001/..",
                            b"/etc", b"step-" + b"9" * 5000))
        latest = case / "latest"
        if latest.is_dir():
            return op
        latest.write_bytes(value)
        return f"latest = {value[:20]!r}"
    if op == "no config" and steps:
        (rng.choice(steps) / "config.json").unlink(missing_ok=True)
    elif op == "empty step":
        (case / "step-000009").mkdir(exist_ok=True)
    elif op == "fake step":
        d = case / "step-000010"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text('{"format": "bitnet158", "model": {}}')
    return op


def hf_layout(rng: random.Random, case: Path, target: Path) -> str:
    op = rng.choice(("index", "pickle", "tokenizer_config dir", "jinja", "jinja dir", "no weights"))
    if op == "index":
        names = ["model.norm.weight", "model.embed_tokens.weight"]
        weight_map = rng.choice(({names[0]: None}, {names[0]: "../x"}, {}, [], {names[0]: "missing.safetensors"},
                                 {names[0]: "a" * 300}, {names[0]: "model.safetensors"}, {names[0]: "\n"}))
        (case / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return f"index {repr(weight_map)[:40]}"
    if op == "pickle":
        (case / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
        return op
    if op == "tokenizer_config dir":
        tc = case / "tokenizer_config.json"
        if tc.exists() and not tc.is_dir():
            tc.unlink()
        tc.mkdir(exist_ok=True)
        return op
    if op in ("jinja", "jinja dir"):
        jinja = case / "chat_template.jinja"
        if jinja.is_dir() and not jinja.is_symlink():  # an earlier mutation of the same case made it
            shutil.rmtree(jinja)
        elif jinja.exists() or jinja.is_symlink():
            jinja.unlink()
        if op == "jinja":
            jinja.write_bytes(rng.choice((b"\xff{{", b"{% for %}", b"{{ x.__class__ }}", b"")))
        else:
            jinja.mkdir()
        return op
    for p in case.glob("*.safetensors"):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return op


# --- choosing --------------------------------------------------------------------------------------

GENERIC: list[tuple[Mutation, float]] = [(byte_flip, 3), (truncate, 2), (insert, 1), (append, 1), (empty, 0.5),
                                         (not_utf8, 0.5), (delete, 1), (to_directory, 0.5), (to_fifo, 0.3),
                                         (to_symlink, 0.3)]
BY_SUFFIX: dict[str, list[tuple[Mutation, float]]] = {
    ".json": [(json_edit, 10)], ".safetensors": [(st_header, 8)], ".gguf": [(gguf_edit, 14)],
    ".jsonl": [(jsonl_row, 8)], ".txt": [(text_edit, 3)], ".parquet": [(parquet_column, 4)],
}
LAYOUT: dict[str, list[tuple[Mutation, float]]] = {
    "run": [(run_layout, 3)], "hf": [(hf_layout, 2)], "data": [(non_utf8_name, 1)],
}


def _files(case: Path) -> list[Path]:
    return sorted(p for p in case.rglob("*") if p.is_file() and not p.is_symlink())


def mutate(rng: random.Random, reader: str, variant: str, case: Path) -> tuple[Path, list[str]]:
    """Apply 1-3 mutations to the seed copied into `case`; (the path to read, descriptions)."""
    target_path = main_path(reader, variant, case)
    done = []
    for _ in range(rng.choices((1, 2, 3), (7, 2, 1))[0]):
        files = _files(case)
        if not files:
            break
        target = rng.choice(files)
        menu = GENERIC + BY_SUFFIX.get(target.suffix, []) + LAYOUT.get(reader, [])
        mutation = rng.choices([m for m, _ in menu], [w for _, w in menu])[0]
        done.append(f"{target.relative_to(case)}: {mutation(rng, case, target)}")
        if mutation is non_utf8_name and target == target_path:
            target_path = next((p for p in case.iterdir() if p.name.endswith(target.name)), target_path)
    return target_path, done
