"""Quality: b1.58, b1 and FP twins at a few sizes, trained on the same tokens with the same seed
(the batch of a step is a pure function of (seed, step)), then held-out perplexity, loss curves
and the b1.58 / FP perplexity ratio per size."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

from ..config import ModelConfig
from ..errors import BitNetError, ConfigError
from ..fileio import atomic_write_json
from ..jsonio import read_json
from ..train.data import eval_windows, unigram_perplexity
from ..train.prepare import prepare_data
from ..train.trainer import train
from .settings import EvidenceSettings, QualitySize

LABELS = {"b158": "b1.58", "b1": "b1", "fp": "FP"}


def size_config(size: QualitySize, vocab_size: int, seq_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, hidden_size=size.hidden, num_layers=size.layers,
                       num_heads=size.heads, num_kv_heads=size.kv_heads, intermediate_size=size.ffn,
                       max_seq_len=max(128, seq_len)).validate()


def _fingerprint(settings: EvidenceSettings, data: Sequence[str] | None) -> dict:
    return {"mode": settings.name, "vocab_size": settings.vocab_size, "max_bytes": settings.max_bytes,
            "sizes": [vars(s) for s in settings.sizes], "modes": list(settings.modes),
            "train": settings.train.to_dict(), "data": [str(d) for d in data] if data else None}


def _prepare_run_root(run_root: Path, fingerprint: dict, resume: bool, force: bool) -> None:
    """Training runs live under run_root, one per (size, mode), so a long --full run that was
    stopped continues with --resume where it left off instead of starting over."""
    stamp = run_root / "fingerprint.json"
    if run_root.exists() and any(run_root.iterdir()):
        if resume:
            try:
                old = read_json(stamp, error=ConfigError)
            except BitNetError:  # unreadable in any way: not the stamp of these settings
                old = None
            if old != fingerprint:
                raise ConfigError(f"{run_root} holds training runs made with other settings or data; "
                                  "drop --resume or choose another --out")
            return
        if not force:
            raise ConfigError(f"{run_root} holds an unfinished evidence run; pass --resume to continue it "
                              "or --force to start over")
        shutil.rmtree(run_root)
    run_root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, fingerprint)


def run_quality(settings: EvidenceSettings, data: Sequence[str] | None = None, progress: bool = True,
                log=print, run_root: str | Path | None = None, resume: bool = False,
                force: bool = False) -> dict:
    """Train every (size, mode) pair; returns the figures for results.json. With `run_root`, each
    training run checkpoints into its own directory there and `resume` continues them."""
    if run_root is not None:
        run_root = Path(run_root)
        _prepare_run_root(run_root, _fingerprint(settings, data), resume, force)
    prepared = prepare_data(data, settings.vocab_size, max_bytes=None if data else settings.max_bytes, log=log)
    tok, streams = prepared.tokenizer, prepared.tokens
    tc = settings.train
    _, eval_y = eval_windows(streams.heldout, tc.seq_len, tc.eval_batches * tc.batch_size)
    sizes = []
    for size in settings.sizes:
        base = size_config(size, tok.vocab_size, tc.seq_len)
        models = {}
        for mode in settings.modes:
            run_dir = None if run_root is None else run_root / f"{size.name}-{mode}"
            continuing = run_dir is not None and (run_dir / "latest").exists()
            if continuing:
                log(f"  {size.name} {LABELS[mode]}: continuing the run in {run_dir}")
            result = train(base.twin(mode), tc, streams.train, streams.heldout, progress=progress,
                           desc=f"{size.name:>3} {LABELS[mode]:>5}", run_dir=run_dir, resume=continuing)
            stats = result.model.stats()
            models[mode] = {
                "perplexity": result.final_perplexity,
                "heldout_loss": result.evals[-1]["loss"],
                "final_train_loss": result.history[-1]["loss"],
                "seconds": result.seconds,
                "linear_weight_bits": stats["linear_weight_bits"],
                "train_loss": [h["loss"] for h in result.history],  # index i = step i + 1
                "evals": result.evals,
            }
            del result
        row = {"name": size.name, "hidden_size": size.hidden, "layers": size.layers, "heads": size.heads,
               "kv_heads": size.kv_heads, "intermediate_size": size.ffn,
               "parameters": int(stats["parameters"]), "linear_parameters": int(stats["linear_parameters"]),
               "models": models, "train_seconds": sum(m["seconds"] for m in models.values())}
        if "fp" in models:
            for mode in ("b158", "b1"):
                if mode in models:
                    row[f"ppl_ratio_{mode}_fp"] = models[mode]["perplexity"] / models["fp"]["perplexity"]
        sizes.append(row)
        log(f"  size {size.name}: " + ", ".join(f"{LABELS[m]} ppl {v['perplexity']:.2f}" for m, v in models.items()))
    ratios = [s.get("ppl_ratio_b158_fp") for s in sizes]
    shrinks = None
    if len(ratios) >= 2 and all(r is not None and math.isfinite(r) for r in ratios):
        # "shrinks" means every larger size sits closer to FP (ratio nearer 1) than the one before.
        gaps = [abs(r - 1) for r in ratios]
        shrinks = all(b < a for a, b in zip(gaps, gaps[1:]))
    return {
        "data": {"description": prepared.corpus.description, "train_tokens": int(streams.train.numel()),
                 "heldout_tokens": int(streams.heldout.numel()), "vocab_size": tok.vocab_size,
                 "eval_tokens": int(eval_y.numel()), "prepare_s": prepared.seconds},
        "train": {"steps": tc.steps, "batch_size": tc.batch_size, "seq_len": tc.seq_len, "warmup": tc.warmup,
                  "seed": tc.seed, "tokens_per_model": tc.steps * tc.batch_size * tc.seq_len * tc.grad_accum},
        "unigram_perplexity": unigram_perplexity(streams.train, eval_y, tok.vocab_size),
        "sizes": sizes,
        "gap_shrinks_with_size": shrinks,
    }
