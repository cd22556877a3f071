"""`bitnet158 export-run RUN OUT`: a sharded training run's newest step (torch.distributed.checkpoint
shards from a torchrun job) as an ordinary model directory that pack, generate and export-hf read."""

from __future__ import annotations

import argparse

from ..train.dcp_steps import export_run
from .common import directory_megabytes

NAME = "export-run"
HELP = "turn a sharded (torchrun) run's newest step into a model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run directory (or one of its step directories)")
    p.add_argument("out", help="the model directory to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    path = export_run(args.run, args.out, overwrite=args.force)
    print(f"wrote {path} ({directory_megabytes(path):.1f} MB)")
    return 0
