"""`bitnet158 bench CKPT`: prefill and decode speed of a checkpoint, with the kernel path used."""

from __future__ import annotations

import argparse

from ..bench import run_bench
from .common import default_of, set_threads

NAME = "bench"
HELP = "prefill and decode speed of a checkpoint (packed or not)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=default_of(run_bench, "prompt_tokens"))
    p.add_argument("--decode-tokens", type=int, default=default_of(run_bench, "decode_tokens"))
    p.add_argument("--threads", type=int)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    run_bench(args.checkpoint, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
              threads=args.threads)
    return 0
