"""`bitnet158 prepare-data INPUTS... --tokenizer T --out DIR`: tokenize .txt/.jsonl/.parquet files,
folders and globs in worker processes into memory-mapped token shards that `train --data-dir` reads."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import checkpoint
from ..errors import ConfigError
from ..tokenizer import Tokenizer
from ..train.shards import prepare_shards
from .common import default_of

NAME = "prepare-data"
HELP = "tokenize a corpus into memory-mapped token shards (streaming, parallel, resumable)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt/.jsonl/.parquet files, folders or globs")
    p.add_argument("--tokenizer", required=True,
                   help="a tokenizer.json, or a model / run directory holding one (its special tokens too)")
    p.add_argument("--out", required=True, help="the shard directory to write (an unfinished one is resumed)")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=default_of(prepare_shards, "shard_tokens"),
                   help="ids per shard file")
    p.add_argument("--force", action="store_true", help="start over, replacing finished or unfinished shards")
    p.add_argument("--quiet", action="store_true")


def load_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if p.is_dir() and ((p / checkpoint.CONFIG).exists() or any(p.glob("step-*"))):
        tokenizer = checkpoint.ModelDir(p).tokenizer()
        if tokenizer is None:
            raise ConfigError(f"{p}: the model directory has no tokenizer.json")
        return tokenizer
    return Tokenizer.load(p)


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens must be at least 1, got {args.shard_tokens}")
    prepare_shards(args.inputs, load_tokenizer(args.tokenizer), args.out, workers=args.workers,
                   shard_tokens=args.shard_tokens, force=args.force, progress=not args.quiet)
    return 0
