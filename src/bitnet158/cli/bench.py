"""`bitnet158 bench CKPT`: prefill and decode speed of a checkpoint, with the kernel path used."""

from __future__ import annotations

import argparse

from ..bench import run_bench
from ..config import KV_DTYPES
from .common import default_of, set_threads

NAME = "bench"
HELP = "prefill and decode speed of a checkpoint (packed or not)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=default_of(run_bench, "prompt_tokens"))
    p.add_argument("--decode-tokens", type=int, default=default_of(run_bench, "decode_tokens"))
    p.add_argument("--threads", type=int)
    p.add_argument("--kv-cache", choices=KV_DTYPES, default="fp32",
                   help="KV cache dtype (fp16: half the memory and attention's reads at long prompts); default fp32")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    run_bench(args.checkpoint, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
              threads=args.threads, kv_dtype=args.kv_cache)
    return 0
