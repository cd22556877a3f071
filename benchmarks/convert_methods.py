"""FP → 1.58 bits, every conversion method under one token budget, measured in one run.

Takes the demo's FP twin (runs/demo/fp) and converts it with each method — rtn, adaround,
lambda, quant-noise, plain qat, distill and combinations — each fine-tuning method getting the
same steps × batch × seq_len tokens (the same batches, same seed), then prints held-out perplexity
beside the FP source and the b1.58 model trained from scratch on the FP model's tokens
(runs/demo/b158). If the demo's models are absent they are trained here with the demo's settings.
Two control rows fine-tune the FP twin and the from-scratch b1.58 model on the same tokens: the
demo's models are under-trained, so extra tokens alone lower perplexity, and only the comparison
at equal tokens says what a conversion is worth.

    python benchmarks/convert_methods.py                       # after `bitnet158 demo`
    python benchmarks/convert_methods.py --steps 60 --threads 1
    python benchmarks/convert_methods.py --methods rtn,adaround,adaround+lambda+distill

The default budget (150 steps of 8 × 128 tokens per method) finishes in roughly 15–20 minutes on
two otherwise idle CPU cores, after the demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from bitnet158 import checkpoint
from bitnet158.demo import DEMO_MAX_BYTES, DEMO_PRESET, DEMO_TRAIN, DEMO_VOCAB
from bitnet158.config import ConvertConfig, preset
from bitnet158.errors import BitNetError
from bitnet158.model import Transformer
from bitnet158.train import ternarize
from bitnet158.train.data import eval_windows
from bitnet158.train.prepare import prepare_data
from bitnet158.train.trainer import evaluate, train

# label → the methods ternarize combines ("quant-noise" is its "noise")
DEFAULT_METHODS = ("rtn", "adaround", "qat", "lambda", "quant-noise", "distill", "lambda+distill",
                   "adaround+lambda+distill")


def _load_or_train(directory: Path, mode: str, prepared, log) -> tuple[Transformer, float | None]:
    """The demo's model of `mode` from `directory`, or one trained here with the demo's settings
    (saved there, so the next run reuses it). Returns (model, training seconds if trained here)."""
    if directory.exists():
        try:
            model, _ = checkpoint.load(directory)
            if model.config.mode != mode:
                raise SystemExit(f"{directory} holds a {model.config.mode} model, expected {mode}")
            return model.eval(), None
        except BitNetError as e:
            raise SystemExit(f"{directory}: {e}")
    log(f"{directory} is absent: training the {mode} model with the demo's settings "
        f"({DEMO_TRAIN.steps} steps of {DEMO_TRAIN.batch_size}×{DEMO_TRAIN.seq_len} tokens)")
    cfg = preset(DEMO_PRESET, vocab_size=prepared.tokenizer.vocab_size,
                 max_seq_len=max(512, DEMO_TRAIN.seq_len), mode=mode)
    result = train(cfg, DEMO_TRAIN, prepared.tokens.train, prepared.tokens.heldout,
                   tokenizer=prepared.tokenizer, run_dir=directory, progress=False)
    return result.model.eval(), result.seconds


def _pretraining_tokens(directory: Path) -> str:
    """Tokens the checkpoint in `directory` was trained on, from its trainer.json."""
    try:
        state = json.loads((checkpoint.resolve(directory) / "trainer.json").read_text())
        tc = state["train_config"]
        return f"{state['step'] * tc['batch_size'] * tc['seq_len'] * tc.get('grad_accum', 1):,}"
    except (BitNetError, OSError, ValueError, KeyError, TypeError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", default="runs/demo", help="holds fp/ and b158/ (trained here if absent)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated labels; '+' joins methods into one conversion")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps of every fine-tuning method")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=DEMO_TRAIN.seq_len)
    ap.add_argument("--lr", type=float, default=5e-4, help="constant AdamW learning rate of the fine-tuning")
    ap.add_argument("--calib-batches", type=int, default=2, help="AdaRound calibration windows (× batch)")
    ap.add_argument("--adaround-iters", type=int, default=200)
    ap.add_argument("--windows", type=int, default=DEMO_TRAIN.eval_batches * DEMO_TRAIN.batch_size,
                    help="held-out windows of --seq-len tokens (default: the demo's evaluation set)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-controls", action="store_true",
                    help="skip the two control rows (FP and from-scratch b1.58 fine-tuned on the same tokens)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    log = print

    demo = Path(args.demo_dir)
    tokenizer = None
    if (demo / "fp").exists():
        try:
            _, tokenizer = checkpoint.load(demo / "fp", with_tokenizer=True)
        except BitNetError as e:
            raise SystemExit(f"{demo / 'fp'}: {e}")
    # the demo's corpus and split; with the demo's tokenizer when its models exist
    prepared = prepare_data(None, DEMO_VOCAB, max_bytes=DEMO_MAX_BYTES, tokenizer=tokenizer, log=log)
    fp, fp_secs = _load_or_train(demo / "fp", "fp", prepared, log)
    scratch, scratch_secs = _load_or_train(demo / "b158", "b158", prepared, log)
    train_tokens, heldout = prepared.tokens.train, prepared.tokens.heldout
    x, y = eval_windows(heldout, args.seq_len, args.windows)

    def ppl(model: Transformer) -> float:
        return math.exp(evaluate(model, x, y))

    budget = args.steps * args.batch_size * args.seq_len
    calib = args.calib_batches * args.batch_size * args.seq_len
    fp_tokens, scratch_tokens = _pretraining_tokens(demo / "fp"), _pretraining_tokens(demo / "b158")
    log(f"held-out: {x.shape[0]} windows × {args.seq_len} tokens; fine-tuning budget per method: "
        f"{args.steps} steps × {args.batch_size} × {args.seq_len} = {budget:,} tokens (lr {args.lr:g}); "
        f"threads {torch.get_num_threads()}")

    # every method's settings but the method; the fine-tuning seeds torch from `seed` (Quant-Noise masks)
    settings = ConvertConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                             calib_batches=args.calib_batches, adaround_iters=args.adaround_iters,
                             seed=args.seed)
    rows: list[tuple[str, float, str, float]] = []  # label, ppl, tokens used, seconds
    rows.append(("FP twin (source)", ppl(fp), f"{fp_tokens} pretraining", fp_secs or 0.0))
    rows.append(("b1.58 from scratch", ppl(scratch), f"{scratch_tokens} pretraining", scratch_secs or 0.0))
    converted: dict[str, float] = {}
    for label in [m.strip() for m in args.methods.split(",") if m.strip()]:
        methods = label.split("+")
        t0 = time.perf_counter()
        try:
            config = dataclasses.replace(settings, method=tuple(methods))
            model = ternarize.ternarize(fp, train_tokens, config)
        except BitNetError as e:
            raise SystemExit(f"{label}: {e}")
        secs = time.perf_counter() - t0
        names = ternarize.parse_methods(methods)
        used = []
        if "adaround" in names:
            used.append(f"{calib:,} calib")
        if set(names) & set(ternarize.FINETUNE_METHODS):
            used.append(f"{budget:,} fine-tune")
        converted[label] = ppl(model)
        rows.append((label, converted[label], " + ".join(used) or "none", secs))
        log(f"  {label:<26} ppl {converted[label]:9.2f}   ({secs:.0f}s)")
        del model

    # Controls: the fine-tuning tokens are new data for these under-trained models, so the same
    # steps on the FP twin and on the from-scratch b1.58 model say how much of a conversion's
    # result is the conversion and how much is simply more training.
    controls: dict[str, float] = {}
    if not args.no_controls:
        for label, source in (("control: FP + fine-tune", fp), ("control: scratch + fine-tune", scratch)):
            t0 = time.perf_counter()
            model = Transformer(source.config)
            model.load_state_dict(source.state_dict())
            ternarize.finetune(model, train_tokens, settings)
            secs = time.perf_counter() - t0
            controls[label] = ppl(model)
            rows.append((label, controls[label], f"{budget:,} fine-tune", secs))
            log(f"  {label:<26} ppl {controls[label]:9.2f}   ({secs:.0f}s)")
            del model

    log("")
    log(f"Held-out perplexity, FP → b1.58 conversion of the demo's FP twin (one run; every fine-tuning "
        f"method saw the same {budget:,} tokens)")
    head = f"{'model / method':<28}{'held-out ppl':>14}{'vs FP':>9}  {'tokens':<32}{'time':>7}"
    log(head)
    log("-" * len(head))
    fp_ppl = rows[0][1]
    for label, p, used, secs in rows:
        log(f"{label:<28}{p:>14.2f}{p / fp_ppl:>8.2f}x  {used:<32}{secs:>6.0f}s")
    if converted:
        ranked = sorted(converted.items(), key=lambda kv: kv[1])
        best, best_ppl = ranked[0]
        line = f"winner: {best} at {best_ppl:.2f}"
        if len(ranked) > 1:
            second, second_ppl = ranked[1]
            line += f", {100 * (1 - best_ppl / second_ppl):.1f}% lower perplexity than the runner-up {second} ({second_ppl:.2f})"
        if "rtn" in converted and best != "rtn":
            line += f"; {converted['rtn'] / best_ppl:.1f}x lower than round-to-nearest"
        log(line)
        scratch_ppl = rows[1][1]
        log(f"best conversion vs b1.58 from scratch: {best_ppl:.2f} vs {scratch_ppl:.2f} "
            f"({'better' if best_ppl < scratch_ppl else 'worse'} by {abs(1 - best_ppl / scratch_ppl) * 100:.1f}%; "
            f"the conversion used {fp_tokens} FP pretraining + {budget:,} fine-tuning tokens)")
        if controls:
            same = controls["control: scratch + fine-tune"]
            fp_more = controls["control: FP + fine-tune"]
            log(f"at equal tokens (pretraining + the same fine-tuning): best conversion {best_ppl:.2f} vs "
                f"from-scratch b1.58 {same:.2f} ({'better' if best_ppl < same else 'worse'} by "
                f"{abs(1 - best_ppl / same) * 100:.1f}%); the FP twin with the same fine-tuning reaches "
                f"{fp_more:.2f} (b1.58/FP ratio {best_ppl / fp_more:.3f})")
    log(f"total wall time {(time.perf_counter() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
