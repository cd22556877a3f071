"""The main job: train a BitNet b1.58 model and its FP twin (same architecture, same tokens, same
seed) on the embedded corpus, then print one comparison table and a sample from each.

Everything it prints is measured in this run; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig, preset
from .generate import generate
from .sampling import SamplingConfig
from .train.data import eval_windows, unigram_perplexity
from .train.prepare import prepare_data
from .train.trainer import TrainResult, train

# Sized to finish in well under 10 minutes on 2 CPU cores (tokenizer + two trainings + samples).
# Short windows and more steps: at this budget 260 steps of 16×128 tokens reached held-out
# perplexity 158 (b1.58) where 160 steps of 16×256 reached 235, in less time.
DEMO_PRESET = "tiny"
DEMO_VOCAB = 4096
DEMO_MAX_BYTES = 6_000_000       # of the ~11 MB default corpus: plenty for the steps below
DEMO_TRAIN = TrainConfig(steps=260, batch_size=16, seq_len=128, warmup=26, eval_every=65, save_every=65)
DEMO_PROMPT = "def "
DEMO_MODES = ("b158", "fp")


@dataclass
class DemoRow:
    name: str
    mode: str
    perplexity: float
    parameters: int
    linear_parameters: int
    weight_bits: float
    seconds: float
    sample: str


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, data: list[str] | None = None,
             progress: bool = True, sample_tokens: int = 60, log=print) -> dict:
    """Train both models and return the table's figures (also printed)."""
    t_start = time.perf_counter()
    out = Path(out)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prepared = prepare_data(data, DEMO_VOCAB, max_bytes=None if data else DEMO_MAX_BYTES, log=log)
    tok = prepared.tokenizer
    tc = DEMO_TRAIN if steps is None else dataclasses.replace(
        DEMO_TRAIN, steps=steps, warmup=max(1, steps // 10), eval_every=max(1, steps // 3),
        save_every=max(1, steps // 3))
    base = preset(DEMO_PRESET, vocab_size=tok.vocab_size, max_seq_len=max(512, tc.seq_len))
    _, eval_y = eval_windows(prepared.tokens.heldout, tc.seq_len, tc.eval_batches * tc.batch_size)
    unigram = unigram_perplexity(prepared.tokens.train, eval_y, tok.vocab_size)

    rows: list[DemoRow] = []
    for mode in DEMO_MODES:
        cfg = base.twin(mode)
        if (out / mode).exists():
            log(f"replacing the previous demo run in {out / mode}")
            shutil.rmtree(out / mode)
        label = {"b158": "BitNet b1.58", "b1": "BitNet b1", "fp": "FP twin"}[mode]
        result: TrainResult = train(cfg, tc, prepared.tokens.train, prepared.tokens.heldout, tokenizer=tok,
                                    run_dir=out / mode, progress=progress, desc=f"{label:>12}")
        ppl = result.final_perplexity  # measured on the same held-out windows as the unigram floor
        stats = result.model.stats()
        sample = generate(result.model, tok, DEMO_PROMPT, max_tokens=sample_tokens,
                          sampling=SamplingConfig(temperature=0.7, top_k=40, repetition_penalty=1.3), seed=0)
        rows.append(DemoRow(label, mode, ppl, stats["parameters"], stats["linear_parameters"],
                            stats["linear_weight_bits"], result.seconds, DEMO_PROMPT + sample))

    total = time.perf_counter() - t_start
    log("")
    log(format_table(rows, unigram, tc, prepared.tokens.train.numel()))
    for row in rows:
        log(f"\n--- sample from {row.name} (temperature 0.7, top-k 40, seed 0, prompt {DEMO_PROMPT!r}) ---\n{row.sample}")
    log(f"\ncheckpoints: {', '.join(str(out / r.mode) for r in rows)}   total time {total / 60:.1f} min")
    return {"unigram_perplexity": unigram, "rows": [dataclasses.asdict(r) for r in rows], "seconds": total}


def format_table(rows: list[DemoRow], unigram: float, tc: TrainConfig, corpus_tokens: int) -> str:
    tokens = tc.steps * tc.batch_size * tc.seq_len * tc.grad_accum
    head = f"{'model':<14}{'held-out ppl':>14}{'params':>12}{'linear params':>15}{'weight bits':>13}{'train time':>12}"
    lines = [f"Held-out perplexity after {tc.steps} steps / {tokens:,} tokens each "
             f"(corpus: {corpus_tokens:,} training tokens)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<14}{r.perplexity:>14.2f}{r.parameters:>12,}{r.linear_parameters:>15,}"
                     f"{r.weight_bits:>13.2f}{r.seconds:>11.0f}s")
    lines.append(f"{'unigram floor':<14}{unigram:>14.2f}")
    by_mode = {r.mode: r for r in rows}
    if "b158" in by_mode and "fp" in by_mode:
        lines.append(f"b1.58 / FP perplexity ratio: {by_mode['b158'].perplexity / by_mode['fp'].perplexity:.3f}; "
                     f"both beat the unigram floor by {unigram / max(r.perplexity for r in rows):.1f}x or more")
    return "\n".join(lines)
