"""What each evidence mode runs: model sizes, training budget, paper shapes, timing lengths.

`quick` is sized for CI (a few minutes on 2 cores); `full` is the real comparison (hours, see
the README); `smoke` is an internal, drastically reduced setting that runs the same code path in
seconds for the test suite — its figures mean nothing and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class QualitySize:
    """One model size trained three times (b1.58, b1, FP) on the same tokens."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int


@dataclass(frozen=True)
class CostShape:
    """A paper shape (a preset) built with random weights; `layers` < the preset's only when the
    mode says so (the report states it)."""

    name: str
    preset: str
    layers: int | None = None      # None: the preset's full depth
    vocab_size: int | None = None  # None: the preset's vocabulary


@dataclass(frozen=True)
class EvidenceSettings:
    name: str
    note: str
    vocab_size: int
    max_bytes: int
    sizes: tuple[QualitySize, ...]
    train: TrainConfig
    shapes: tuple[CostShape, ...]
    prompt_tokens: int
    decode_tokens: int
    repeats: int
    energy_tokens: int = 16        # decode steps inside one RAPL window (when RAPL is readable)
    modes: tuple[str, ...] = ("b158", "b1", "fp")


PAPER_SHAPES = (CostShape("700M", "700m"), CostShape("1.3B", "1.3b"), CostShape("3B", "3b"),
                CostShape("2B4T", "2b4t"))
ENERGY_SHAPES = PAPER_SHAPES  # the op-count model, always at full depth

# The full run's sizes grow ~3x in linear parameters per step (1.2M, 2.9M, 9.4M): the widest
# range whose 9 models train in about an hour on 2 cores at 400 steps (819k tokens each; the demo's
# 260 steps already separate every model from the unigram floor); the cost part adds about 5
# minutes (75 min in all, measured).
FULL = EvidenceSettings(
    name="full",
    note="three sizes x three weight modes on the same tokens; the paper shapes at full depth",
    vocab_size=4096,
    max_bytes=6_000_000,
    sizes=(QualitySize("S", 192, 3, 3, 1, 512), QualitySize("M", 256, 4, 4, 2, 688),
           QualitySize("L", 384, 6, 6, 2, 1024)),
    train=TrainConfig(steps=400, batch_size=16, seq_len=128, warmup=40, eval_every=50, eval_batches=8,
                      save_every=50, keep_checkpoints=1),  # a stopped run loses at most 50 steps
    shapes=PAPER_SHAPES,
    prompt_tokens=64, decode_tokens=16, repeats=2,
)

QUICK = EvidenceSettings(
    name="quick",
    note="two small sizes x three weight modes, a few short steps each; only the 700M shape "
         "(full depth) for cost",
    vocab_size=1024,
    max_bytes=1_500_000,
    sizes=(QualitySize("XS", 64, 2, 2, 1, 172), QualitySize("S", 128, 2, 4, 2, 344)),
    train=TrainConfig(steps=100, batch_size=8, seq_len=64, warmup=10, eval_every=50, eval_batches=4,
                      save_every=100),
    shapes=(CostShape("700M", "700m"),),
    prompt_tokens=16, decode_tokens=4, repeats=2, energy_tokens=4,
)

# Internal (not offered by the CLI's help): the CI test's drastically reduced run.
SMOKE = EvidenceSettings(
    name="smoke",
    note="internal test setting: a handful of steps on micro models and a 2-layer cut of the 700M "
         "shape with a 1,000-token vocabulary; the figures are meaningless",
    vocab_size=300,
    max_bytes=60_000,
    sizes=(QualitySize("XXS", 32, 1, 2, 1, 64), QualitySize("XS", 64, 1, 2, 1, 128)),
    train=TrainConfig(steps=6, batch_size=2, seq_len=32, warmup=1, eval_every=3, eval_batches=2, save_every=6),
    shapes=(CostShape("700M", "700m", layers=2, vocab_size=1000),),
    prompt_tokens=4, decode_tokens=2, repeats=1, energy_tokens=2,
)

SETTINGS = {s.name: s for s in (QUICK, FULL, SMOKE)}


def get_settings(name: str) -> EvidenceSettings:
    if name not in SETTINGS:
        raise ConfigError(f"unknown evidence mode {name!r}; use quick or full")
    return SETTINGS[name]
