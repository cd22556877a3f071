"""`bitnet158 train` as one rank of a torchrun job (or a sharded run in one process): the run
directory, the data as memory-mapped shards, the tokenizer, then the one training loop.

Data: `--data-dir` (shards from prepare-data) is read in place; otherwise rank 0 prepares the
embedded corpus or `--data` files as a one-process run does (tokenizer trained on the training
split) and writes them as shards into RUN/data, which every rank then maps, and which a resume
reuses. A resume checks that the shards' tokenizer is the run's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Sequence

from .. import checkpoint
from ..config import ModelConfig, TrainConfig
from ..errors import ConfigError
from .dcp_steps import latest_step
from .distributed import Dist, ParallelConfig, check_launch, env_world_size, launched
from .prepare import prepare_data
from .shards import MANIFEST, ShardDir, write_streams
from .trainer import TrainResult, train

RUN_DATA = "data"  # the run's own shards, when the data was prepared on the fly


def train_job(model_config: ModelConfig, tc: TrainConfig, pc: ParallelConfig, out: str | Path, *,
              data: Sequence[str] | None = None, data_dir: str | Path | None = None,
              vocab_size: int | None = None, max_bytes: int | None = None, resume: bool = False,
              force: bool = False, progress: bool = True, log=print) -> TrainResult:
    """Train as this process's rank (torchrun's environment) or as a job of one; every rank calls
    it with the same arguments. Returns the TrainResult (rank 0's is the one to report)."""
    out = Path(out)
    check_launch(pc, tc, env_world_size() if launched() else 1)
    d = Dist.start(pc, tc.device) if launched() else Dist.single(pc, tc.device)
    finished = False
    try:
        tokenizer = None
        if resume:
            tokenizer = d.agree(lambda: _run_tokenizer(out))
        else:
            d.agree(lambda: _fresh_run_dir(out, force) if d.is_main else None)
        d.barrier()
        say = log if d.is_main else (lambda *a, **k: None)
        if data_dir is not None:
            shards = d.agree(lambda: ShardDir(data_dir))
        else:
            own = out / RUN_DATA

            def prepare() -> None:
                if d.is_main and not (own / MANIFEST).exists():
                    prepared = prepare_data(data, vocab_size or model_config.vocab_size, max_bytes,
                                            tokenizer=tokenizer, log=say)
                    write_streams(own, prepared.tokenizer, prepared.tokens.train, prepared.tokens.heldout,
                                  prepared.corpus.description)
                elif d.is_main:
                    say(f"data: the run's prepared shards in {own}")
            d.agree(prepare)
            shards = d.agree(lambda: ShardDir(own))
        if tokenizer is not None:
            d.agree(lambda: shards.check_tokenizer(tokenizer))
        else:
            tokenizer = d.agree(shards.tokenizer)
        cfg = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size,
                                  max_seq_len=max(model_config.max_seq_len, tc.seq_len))
        train_tokens, heldout = shards.split("train"), shards.split("heldout")
        if d.world_size > 1 and d.is_main:
            say(f"job: {d.world_size} processes ({pc.parallel}, {d.device.type}), "
                f"{tc.batch_size // d.world_size} rows each × {d.world_size} × grad_accum {tc.grad_accum} = "
                f"global batch {tc.batch_size * tc.grad_accum}")
        result = train(cfg, tc, train_tokens, heldout if heldout.numel() > tc.seq_len + 1 else None,
                       tokenizer=tokenizer, run_dir=out, resume=resume, progress=progress,
                       desc=f"train {cfg.mode}", dist=d)
        finished = True
        return result
    finally:
        d.close(finished)


def _run_tokenizer(out: Path):
    tokenizer = checkpoint.ModelDir(latest_step(out)).tokenizer()
    if tokenizer is None:
        raise ConfigError(f"{out}: the checkpoint has no tokenizer.json to resume with")
    return tokenizer


def _fresh_run_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to replace it")
        shutil.rmtree(out)
