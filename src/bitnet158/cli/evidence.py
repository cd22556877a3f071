"""`bitnet158 evidence`: the papers' claims measured on our own models beside an FP twin."""

from __future__ import annotations

import argparse

from ..evidence import run_evidence
from .common import default_of

NAME = "evidence"
HELP = "the papers' claims measured on our models beside an FP twin: report.md, results.json, plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized (default): about 3 minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="the real comparison: about 75 minutes on 2 cores "
                      "(--resume continues a stopped run)")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # internal: the test suite's run
    p.add_argument("--data", nargs="+", metavar="PATH", help="training text for the quality part "
                   "(default: the embedded corpus)")
    p.add_argument("--out", default=str(default_of(run_evidence, "out")))
    p.add_argument("--threads", type=int, help="threads for training and timing (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace a report (and its training runs) already in --out")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --out (same mode and data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    run_evidence(mode, data=args.data, out=args.out, threads=args.threads, force=args.force,
                 progress=not args.quiet, resume=args.resume)
    return 0
