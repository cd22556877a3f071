"""Token shards: corpora larger than memory, tokenized once, read by training through np.memmap.

A shard directory (`bitnet158 prepare-data INPUTS... --tokenizer T --out DIR`):

    manifest.json    {"format": "bitnet158-shards", "version": 1, "tokenizer_sha256", "vocab_size",
                      "eos_id", "dtype": "uint16" | "uint32", "splits": {"train": {"tokens",
                      "documents"...}, "heldout": {...}}, "heldout_rule", "inputs": [...]}; written last
    index.json       the shards in order: [{"file", "split", "tokens"}], the streams are their concatenation
    tokenizer.json   the tokenizer the ids come from (its sha256 is the manifest's)
    train-00000.bin  raw ids (little-endian uint16 when the vocabulary fits, else uint32), EOS after
    heldout-00000.bin  each document

prepare-data streams: the parent plans units (~1 MB pieces of the inputs, shard_units.py), worker
processes encode them (at most 2 per worker in flight), and the parent appends each unit's ids, in
order, to its split's open shard, then records the progress (units done, each shard's length) in
progress.json atomically. Memory holds a few units, never the corpus. After a kill, the same
command truncates the shards to the recorded lengths and goes on from the next unit; the result is
the file an uninterrupted run writes.

`ShardedTokens` is one split as a flat stream: `numel()` and `tokens[index_tensor]` (what
batch_for_step and eval_windows use), reading only the windows asked for.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..fileio import atomic_write_json
from ..jsonio import get_int, get_list, get_str, read_json_object
from ..tokenizer import Tokenizer
from .shard_units import Unit, describe_inputs, encode_unit, plan_units

FORMAT = "bitnet158-shards"
VERSION = 1
MANIFEST, INDEX, PROGRESS, TOKENIZER = "manifest.json", "index.json", "progress.json", "tokenizer.json"
SPLITS = ("train", "heldout")
SHARD_TOKENS = 1 << 28  # 256 Mi ids per shard file (512 MB as uint16)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """The identity of a tokenizer: sha256 of its serialized tokenizer.json."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardedTokens:
    """One split of a shard directory as a flat 1-D token stream over memory-mapped files."""

    def __init__(self, directory: Path, files: Sequence[tuple[str, int]], dtype: np.dtype):
        self.maps = [np.memmap(directory / f, dtype=dtype, mode="r", shape=(n,)) for f, n in files if n > 0]
        self.offsets = np.cumsum([0, *(len(m) for m in self.maps)])

    def numel(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        """Ids at `index` (any shape of int64 positions) as an int64 tensor of that shape."""
        flat = np.asarray(index, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.numel()):
            raise IndexError(f"token position out of range [0, {self.numel()})")
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=np.int64)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.maps[s][flat[mask] - self.offsets[s]]
        return torch.from_numpy(out.reshape(tuple(index.shape)))

    def tensor(self) -> torch.Tensor:
        """The whole split in memory (int32), for small data and tests."""
        return self[torch.arange(self.numel())].to(torch.int32)


class ShardDir:
    """A finished shard directory, validated: its manifest, tokenizer and splits."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            hint = " (an unfinished prepare-data: run it again to finish)" if (self.path / PROGRESS).exists() else ""
            raise DataError(f"{self.path}: not a prepared shard directory (no {MANIFEST}){hint}")
        self.manifest = read_json_object(file, error=DataError)
        if self.manifest.get("format") != FORMAT or get_int(self.manifest, "version", file, error=DataError) > VERSION:
            raise DataError(f"{file}: not a bitnet158 shard manifest of version ≤ {VERSION}")
        dtype = get_str(self.manifest, "dtype", file, choices=("uint16", "uint32"), error=DataError)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        index = read_json_object(self.path / INDEX, error=DataError)
        self.files = get_list(index, "shards", self.path / INDEX, items=dict, error=DataError)
        for row in self.files:
            name, split = str(row.get("file")), row.get("split")
            if split not in SPLITS or "/" in name or name.startswith("."):
                raise DataError(f"{self.path / INDEX}: bad shard entry {name!r}")
            size = (self.path / name).stat().st_size if (self.path / name).is_file() else -1
            if size != get_int(row, "tokens", self.path / INDEX, lo=0, error=DataError) * self.dtype.itemsize:
                raise DataError(f"{self.path / name}: missing or truncated ({size} bytes; the index says "
                                f"{row['tokens']} ids)")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / TOKENIZER, section=self.manifest.get("tokenizer"))

    def split(self, name: str) -> ShardedTokens:
        return ShardedTokens(self.path, [(r["file"], r["tokens"]) for r in self.files if r["split"] == name],
                             self.dtype)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse shards another tokenizer made: their ids would mean other text."""
        if self.manifest.get("tokenizer_sha256") != tokenizer_sha256(tokenizer):
            raise DataError(f"{self.path}: these shards were made with another tokenizer (sha256 "
                            f"{str(self.manifest.get('tokenizer_sha256'))[:12]}…, the run's is "
                            f"{tokenizer_sha256(tokenizer)[:12]}…); prepare them again with the run's tokenizer")


def write_streams(directory: str | os.PathLike, tokenizer: Tokenizer, train: torch.Tensor,
                  heldout: torch.Tensor, description: str = "") -> ShardDir:
    """A shard directory from token streams already in memory (the embedded corpus and --data
    files, prepared on the fly for a torchrun job), written atomically."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.shards.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    rows = []
    for split, stream in zip(SPLITS, (train, heldout)):
        name = f"{split}-00000.bin"
        stream.numpy().astype(dtype).tofile(tmp / name)
        rows.append({"file": name, "split": split, "tokens": int(stream.numel())})
    tokenizer.save(tmp / TOKENIZER)
    atomic_write_json(tmp / INDEX, {"shards": rows})
    atomic_write_json(tmp / MANIFEST, _manifest(tokenizer, dtype, rows, {"description": description}))
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return ShardDir(directory)


def _manifest(tokenizer: Tokenizer, dtype: np.dtype, rows: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    splits = {s: {"tokens": sum(r["tokens"] for r in rows if r["split"] == s),
                  "shards": sum(1 for r in rows if r["split"] == s)} for s in SPLITS}
    return {"format": FORMAT, "version": VERSION, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "tokenizer": tokenizer.section(),
            "dtype": "uint16" if dtype.itemsize == 2 else "uint32", "splits": splits, **extra}


# ----- prepare-data ---------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str, section: dict | None) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the pool is the parallelism
    torch.set_num_threads(1)
    _worker_tokenizer = Tokenizer.load(tokenizer_path, section=section)


def _encode(unit: Unit, dtype: str) -> np.ndarray:
    assert _worker_tokenizer is not None
    return encode_unit(_worker_tokenizer, unit, np.dtype(dtype))


def prepare_shards(inputs: Sequence[str], tokenizer: Tokenizer, out: str | os.PathLike, *, workers: int | None = None,
                   shard_tokens: int = SHARD_TOKENS, force: bool = False, progress: bool = True,
                   log=print) -> ShardDir:
    """Tokenize `inputs` (files, folders, globs) into a shard directory at `out`, in `workers`
    processes, resuming an unfinished preparation of the same inputs there."""
    out = Path(out)
    if (out / MANIFEST).exists() and not force:
        raise DataError(f"{out} already holds prepared shards; pass --force to prepare them again")
    units = plan_units(list(inputs))
    dtype = token_dtype(tokenizer.vocab_size)
    fingerprint = {"inputs": describe_inputs(list(inputs)), "tokenizer_sha256": tokenizer_sha256(tokenizer),
                   "units": len(units), "shard_tokens": shard_tokens}
    state = _resume_state(out, fingerprint, force)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / TOKENIZER)
    done = state["units_done"]
    if done:
        log(f"prepare-data: resuming at piece {done} of {len(units)}")
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(units), initial=done, desc="prepare-data", unit="piece", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, _init_worker, (str(out / TOKENIZER), tokenizer.section())) as pool:
        pending: deque = deque()
        ahead = done
        while ahead < len(units) or pending:
            while ahead < len(units) and len(pending) < 2 * workers:  # a few units in flight, never the corpus
                pending.append((ahead, pool.apply_async(_encode, (units[ahead], dtype.str))))
                ahead += 1
            j, result = pending.popleft()
            _append(out, state, units[j], result.get(), shard_tokens, dtype)
            state["units_done"] = j + 1
            atomic_write_json(out / PROGRESS, state)
            bar.update(1)
    bar.close()
    rows = state["shards"]
    atomic_write_json(out / INDEX, {"shards": rows})
    counts = {s: sum(1 for u in units if u.heldout == (s == "heldout")) for s in SPLITS}
    atomic_write_json(out / MANIFEST, _manifest(tokenizer, dtype, rows, {
        "pieces": counts, "inputs": fingerprint["inputs"],
        "heldout_rule": "whole files by name hash (corpus.is_heldout) when both sides get a file, else "
                        "~1 MB pieces by the same rule on name@index, else the last piece"}))
    (out / PROGRESS).unlink()
    shards = ShardDir(out)
    log(f"prepare-data: {shards.manifest['splits']['train']['tokens']:,} train and "
        f"{shards.manifest['splits']['heldout']['tokens']:,} held-out ids in {len(rows)} shard(s) at {out}")
    return shards


def _resume_state(out: Path, fingerprint: dict, force: bool) -> dict:
    """The progress of an unfinished preparation of the same inputs (shards truncated to what it
    recorded), or a fresh start (old shards removed)."""
    fresh = {"fingerprint": fingerprint, "units_done": 0, "shards": []}
    progress = out / PROGRESS
    if progress.is_file() and not force:
        state = read_json_object(progress, error=DataError)
        if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise DataError(f"{out}: holds an unfinished preparation of other inputs or another tokenizer; "
                            "pass --force to start over")
        for row in get_list(state, "shards", progress, items=dict, error=DataError):
            with open(out / row["file"], "r+b") as f:  # drop ids written after the last record
                f.truncate(int(row["tokens"]) * int(row["itemsize"]))
        for child in out.glob("*.bin"):  # a shard opened after the last record
            if child.name not in {row["file"] for row in state["shards"]}:
                child.unlink()
        return state
    if out.exists():
        for child in out.glob("*.bin"):
            child.unlink()
        for name in (MANIFEST, INDEX, PROGRESS):
            (out / name).unlink(missing_ok=True)
    return fresh


def _append(out: Path, state: dict, unit: Unit, ids: np.ndarray, shard_tokens: int, dtype: np.dtype) -> None:
    split = "heldout" if unit.heldout else "train"
    rows = [r for r in state["shards"] if r["split"] == split]
    if not rows or rows[-1]["tokens"] >= shard_tokens:
        rows.append({"file": f"{split}-{len(rows):05d}.bin", "split": split, "tokens": 0,
                     "itemsize": dtype.itemsize})
        state["shards"].append(rows[-1])
        (out / rows[-1]["file"]).write_bytes(b"")
    row = rows[-1]
    with open(out / row["file"], "ab") as f:
        f.write(ids.tobytes())
        f.flush()
        os.fsync(f.fileno())
    row["tokens"] += int(ids.size)
