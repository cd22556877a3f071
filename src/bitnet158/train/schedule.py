"""Learning-rate and weight-decay schedules: pure functions of the step (so resuming is exact).

BitNet b1.58 (FORMATS §3.3) trains in two stages:
  * warm-up: linear from 0 to the stage-1 peak over `warmup` steps;
  * stage 1 (until the midpoint): a high LR decaying linearly from the stage-1 peak toward the
    stage-2 peak (reaching their mean at the midpoint), weight decay 0.1;
  * at the midpoint the LR drops to the lower stage-2 peak and decays linearly to 0, with weight
    decay 0 — "the big loss drop happens at the mid-training decay".
The FP twin uses the standard single stage: linear warm-up, cosine decay to min_lr_ratio·peak,
constant weight decay. Fine-tuning (FP → ternary conversion) runs at a constant LR after the
warm-up, if any.
"""

from __future__ import annotations

import math

from ..config import DEFAULT_LR, STAGE2_RATIO, TrainConfig


def peak_lrs(cfg: TrainConfig, mode: str) -> tuple[float, float]:
    lr1 = cfg.lr if cfg.lr is not None else DEFAULT_LR[mode]
    lr2 = cfg.lr_stage2 if cfg.lr_stage2 is not None else lr1 * STAGE2_RATIO
    return lr1, lr2


def resolved_schedule(cfg: TrainConfig, mode: str) -> str:
    if cfg.schedule != "auto":
        return cfg.schedule
    return "cosine" if mode == "fp" else "two-stage"


def two_stage(step: int, total: int, warmup: int, lr1: float, lr2: float, wd: float) -> tuple[float, float]:
    """(lr, weight_decay) at `step` (0-based) of the paper's two-stage schedule."""
    if step < warmup:
        return lr1 * (step + 1) / warmup, wd
    mid = total // 2
    if step < mid:
        frac = (step - warmup) / max(1, total - warmup)  # decays toward lr2 over the whole run
        return lr1 - (lr1 - lr2) * frac, wd
    frac = (step - mid) / max(1, total - mid)
    return lr2 * (1.0 - frac), 0.0


def cosine(step: int, total: int, warmup: int, lr: float, min_ratio: float, wd: float) -> tuple[float, float]:
    """(lr, weight_decay) of linear warm-up then cosine decay to min_ratio·lr."""
    if step < warmup:
        return lr * (step + 1) / warmup, wd
    frac = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))), wd


def constant(step: int, warmup: int, lr: float, wd: float) -> tuple[float, float]:
    """(lr, weight_decay) of linear warm-up then a constant LR."""
    if step < warmup:
        return lr * (step + 1) / warmup, wd
    return lr, wd


def lr_and_wd(cfg: TrainConfig, mode: str, step: int) -> tuple[float, float]:
    lr1, lr2 = peak_lrs(cfg, mode)
    schedule = resolved_schedule(cfg, mode)
    if schedule == "two-stage":
        return two_stage(step, cfg.steps, cfg.warmup, lr1, lr2, cfg.weight_decay)
    if schedule == "constant":
        return constant(step, cfg.warmup, lr1, cfg.weight_decay)
    return cosine(step, cfg.steps, cfg.warmup, lr1, cfg.min_lr_ratio, cfg.weight_decay)
