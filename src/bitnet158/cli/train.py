"""`bitnet158 train`: train a model from a preset on --data, --data-dir shards (or the embedded
corpus), with checkpoints in a run directory that --resume continues. Option defaults are
TrainConfig's and ParallelConfig's.

Under torchrun (`torchrun --nproc-per-node N -m bitnet158 train --parallel ddp|fsdp ...`), or with
a GPU option (--precision bf16, --compile, --activation-checkpointing), or resuming such a run, the
run is sharded (train/launch.py): steps are torch.distributed.checkpoint directories that
`bitnet158 export-run` turns into a model directory. Otherwise it is exactly the one-process run."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from .. import checkpoint
from ..config import ModelConfig, TrainConfig, preset
from ..errors import BitNetError, ConfigError
from ..train.dcp_steps import run_is_sharded
from ..train.distributed import PARALLEL, PRECISIONS, ParallelConfig, env_rank, launched
from ..train.launch import train_job
from ..train.prepare import prepare_data
from ..train.shards import ShardDir
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
    p.add_argument("--data-dir", metavar="DIR",
                   help="token shards made by `bitnet158 prepare-data` (read through np.memmap)")
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
    p.add_argument("--eval-batches", type=int, default=TrainConfig.eval_batches,
                   help="held-out windows evaluated: this many batches of --batch-size")
    p.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--device", default=TrainConfig.device, help="cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    p.add_argument("--out", help=f"run directory (default {DEFAULT_RUNS}/PRESET-MODE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest step")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("parallel and GPU training (sharded runs)")
    g.add_argument("--parallel", choices=PARALLEL, help=f"under torchrun: DDP (replicas) or FSDP2 (sharded "
                   f"parameters, gradients, optimizer state); default {ParallelConfig.parallel}")
    g.add_argument("--backend", default=ParallelConfig.backend,
                   help="auto (NCCL on CUDA, gloo on CPU), gloo or nccl")
    g.add_argument("--precision", choices=PRECISIONS, default=ParallelConfig.precision,
                   help="bf16: compute in bfloat16 (autocast / FSDP2 mixed precision); "
                   "fp32 master weights and AdamW state")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in backward (less memory, ~1/3 more compute)")
    g.add_argument("--dist-timeout", type=float, default=ParallelConfig.timeout,
                   help="seconds any collective may wait for a peer (data preparation on rank 0 included)")


def run(args: argparse.Namespace) -> int:

    set_threads(args.threads)
    out = Path(args.out or f"{DEFAULT_RUNS}/{args.preset}-{args.mode}")
    sharded = (launched() or args.parallel is not None or args.precision != "fp32" or args.compile
               or args.activation_checkpointing or (args.resume and run_is_sharded(out)))
    if not sharded:
        return _run_one(args, out)
    try:
        return _run_job(args, out)
    except BitNetError:
        if env_rank() != 0:  # every rank saw it (or PeerFailed): rank 0 prints the one line
            raise SystemExit(2) from None
        raise


def _configs(args: argparse.Namespace):
    overrides = {k: v for k, v in {"mode": args.mode, "activation": args.activation,
                                   "norm_placement": args.norm_placement}.items() if v is not None}
    return preset(args.preset, **overrides), TrainConfig.from_dict(vars(args))


def _run_job(args: argparse.Namespace, out: Path) -> int:
    cfg, tc = _configs(args)
    pc = ParallelConfig(parallel=args.parallel or ParallelConfig.parallel, backend=args.backend,
                        precision=args.precision, compile=args.compile,
                        activation_checkpointing=args.activation_checkpointing, timeout=args.dist_timeout)
    result = train_job(cfg, tc, pc, out, data=args.data, data_dir=args.data_dir,
                       vocab_size=args.vocab_size, max_bytes=args.max_bytes, resume=args.resume,
                       force=args.force, progress=not args.quiet)
    if env_rank() == 0:
        print(f"held-out perplexity {result.final_perplexity:.2f} after {tc.steps} steps; sharded checkpoint: "
              f"{out} (bitnet158 export-run {out} MODEL_DIR makes a model directory)")
    return 0


def _run_one(args: argparse.Namespace, out: Path) -> int:
    cfg, tc = _configs(args)  # every TrainConfig field the flags set; the rest default
    tokenizer = None
    if args.resume:
        _, tokenizer = checkpoint.load(out)
        if tokenizer is None:
            raise ConfigError(f"{out}: the checkpoint has no tokenizer.json to resume with")
    elif out.exists() and any(out.iterdir()):
        if not args.force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to replace it")
        shutil.rmtree(out)
    if args.data_dir is not None:  # prepared shards, memory-mapped
        shards = ShardDir(args.data_dir)
        if tokenizer is not None:
            shards.check_tokenizer(tokenizer)
        tokenizer = tokenizer or shards.tokenizer()
        train_tokens, heldout = shards.split("train"), shards.split("heldout")
        heldout = heldout if heldout.numel() > tc.seq_len + 1 else None
    else:
        prepared = prepare_data(args.data, args.vocab_size or cfg.vocab_size, args.max_bytes,
                                tokenizer=tokenizer)
        tokenizer, train_tokens, heldout = prepared.tokenizer, prepared.tokens.train, prepared.tokens.heldout
    cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size,
                              max_seq_len=max(cfg.max_seq_len, tc.seq_len))
    result = train(cfg, tc, train_tokens, heldout, tokenizer=tokenizer,
                   run_dir=out, resume=args.resume, progress=not args.quiet, desc=f"train {cfg.mode}")
    print(f"held-out perplexity {result.final_perplexity:.2f} after {tc.steps} steps; checkpoint: {out}")
    return 0
