"""`bitnet158 demo`: the main job — b1.58 and its FP twin on the embedded corpus, one table."""

from __future__ import annotations

import argparse

from ..demo import run_demo
from .common import default_of, set_threads

NAME = "demo"
HELP = "train BitNet b1.58 and its FP twin on the embedded corpus and compare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(default_of(run_demo, "out")))
    p.add_argument("--steps", type=int, help="training steps per model (default: sized for ~10 min)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    run_demo(out=args.out, steps=args.steps, progress=not args.quiet)
    return 0
