"""`bitnet158 train`: train a model from a preset on --data (or the embedded corpus), with
checkpoints in a run directory that --resume continues. Option defaults are TrainConfig's."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from .. import checkpoint
from ..config import ModelConfig, TrainConfig, preset
from ..errors import ConfigError
from ..train.prepare import prepare_data
from ..train.trainer import train
from .common import DEFAULT_RUNS, set_threads

NAME = "train"
HELP = "train a model"
DEFAULT_PRESET = "tiny"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, help="model size preset (tiny, small, 700m, 1.3b, 3b, 2b4t)")
    p.add_argument("--mode", default=ModelConfig.mode, help="b158 (ternary), b1 (binary) or fp (the twin)")
    p.add_argument("--activation", help="swiglu (default) or relu2 (2B4T)")
    p.add_argument("--norm-placement", help="subln (2B4T block norms, default) or inner (FAQ: RMSNorm in BitLinear)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=".txt/.jsonl/.parquet files or folders "
                   "(default: the embedded corpus: Python's own docs and standard library)")
    p.add_argument("--max-bytes", type=int, help="cap the default corpus's training text at this many bytes")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary to train (default: the preset's)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    p.add_argument("--grad-accum", type=int, default=TrainConfig.grad_accum)
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="stage-1 peak LR (default by mode: high for b1.58/b1)")
    p.add_argument("--lr-stage2", type=float, default=TrainConfig.lr_stage2,
                   help="stage-2 peak LR (default 2/3 of --lr)")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--schedule", default=TrainConfig.schedule,
                   help="auto (two-stage for b1.58/b1, cosine for fp), two-stage, cosine or constant")
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--device", default=TrainConfig.device, help="cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    p.add_argument("--out", help=f"run directory (default {DEFAULT_RUNS}/PRESET-MODE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest step")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:

    set_threads(args.threads)
    out = Path(args.out or f"{DEFAULT_RUNS}/{args.preset}-{args.mode}")
    overrides = {k: v for k, v in {"mode": args.mode, "activation": args.activation,
                                   "norm_placement": args.norm_placement}.items() if v is not None}
    cfg = preset(args.preset, **overrides)
    tc = TrainConfig.from_dict(vars(args))  # every TrainConfig field the flags set; the rest default
    tokenizer = None
    if args.resume:
        _, tokenizer = checkpoint.load(out)
        if tokenizer is None:
            raise ConfigError(f"{out}: the checkpoint has no tokenizer.json to resume with")
    elif out.exists() and any(out.iterdir()):
        if not args.force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to replace it")
        shutil.rmtree(out)
    prepared = prepare_data(args.data, args.vocab_size or cfg.vocab_size, args.max_bytes, tokenizer=tokenizer)
    cfg = dataclasses.replace(cfg, vocab_size=prepared.tokenizer.vocab_size,
                              max_seq_len=max(cfg.max_seq_len, tc.seq_len))
    result = train(cfg, tc, prepared.tokens.train, prepared.tokens.heldout, tokenizer=prepared.tokenizer,
                   run_dir=out, resume=args.resume, progress=not args.quiet, desc=f"train {cfg.mode}")
    print(f"held-out perplexity {result.final_perplexity:.2f} after {tc.steps} steps; checkpoint: {out}")
    return 0
