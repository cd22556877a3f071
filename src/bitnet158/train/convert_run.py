"""`bitnet158 convert` as a library call: an FP source model and its tokenizer, text, settings →
the ternary model and held-out perplexities of it and of its source, on the same windows."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import ConvertConfig
from ..errors import ConfigError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .data import eval_windows
from .prepare import PreparedData, prepare_data
from .ternarize import ternarize
from .trainer import evaluate


@dataclass
class ConvertResult:
    model: Transformer                 # the b158 model, plain (λ = p = 1), in eval mode
    perplexity: float                  # its held-out perplexity
    source_perplexity: float           # the FP source's, on the same windows
    prepared: PreparedData             # the corpus, tokenizer and token streams used
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per fine-tuning step
    seconds: float = 0.0


def run_convert(source: Transformer, tokenizer: Tokenizer | None, config: ConvertConfig | None = None,
                data: Sequence[str] | None = None, *, name: str = "the source", log=print) -> ConvertResult:
    """Ternarize `source` (a full-precision model) with `config` on `data` (files, or the embedded
    corpus capped at `config.max_bytes`) encoded with the source's own `tokenizer`, then measure
    held-out perplexity of the result and of the source on `config.heldout_windows` windows of
    `config.seq_len` tokens. `name` names the source in error messages (e.g. its path)."""
    config = (config or ConvertConfig()).validate()
    if source.config.mode != "fp":
        raise ConfigError(f"{name} is a {source.config.mode} model; convert takes a full-precision (fp) one")
    if tokenizer is None:
        raise ConfigError(f"{name} has no tokenizer.json to encode the fine-tuning text with")
    t0 = time.perf_counter()
    prepared = prepare_data(data, tokenizer.vocab_size, config.max_bytes, tokenizer=tokenizer, log=log)
    history: list[dict[str, Any]] = []
    model = ternarize(source, prepared.tokens.train, config, history=history)
    x, y = eval_windows(prepared.tokens.heldout, config.seq_len, config.heldout_windows)
    return ConvertResult(model=model, perplexity=math.exp(evaluate(model, x, y)),
                         source_perplexity=math.exp(evaluate(source, x, y)), prepared=prepared,
                         history=history, seconds=time.perf_counter() - t0)
