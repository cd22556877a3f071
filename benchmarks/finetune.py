"""Full fine-tuning vs LoRA on the frozen ternary base: peak memory, seconds per step, held-out loss.

    python benchmarks/finetune.py --base runs/demo/b158 --steps 200        # quality: a trained base, the
                                                                          # embedded instruction set
    python benchmarks/finetune.py --preset 2b4t --layers 2 --steps 3      # 2B4T shapes, random weights:
                                                                          # memory and step time only

Each method runs in its own subprocess from the same start (a trained checkpoint, or random
weights: the full run from a random training-form model, the LoRA run from `random_packed`, so no
fp32 latent weight is ever allocated for it). Each child reports
  peak_train  the largest resident set sampled (every 5 ms) while its training steps ran: the model,
              gradients, optimizer state and activations;
  peak_proc   the process's own peak (ru_maxrss), which includes loading;
  s/step      the median over steps after the first;
  held-out    the loss on assistant tokens after the same number of tokens (with --base only).
`--layers N` keeps a preset's shapes with N blocks (a full fine-tune of all 30 2B4T blocks needs
~40 GB with AdamW); the embedding and head are kept whole. `--targets` names LoRA's modules
(default: the seven projections, embed_tokens and lm_head, i.e. the tied table's one update).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """The largest resident set seen by a background thread while the block runs."""

    def __enter__(self) -> "PeakSampler":
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def child(method: str, args: argparse.Namespace) -> dict:
    import torch

    from bitnet158 import checkpoint
    from bitnet158.config import preset
    from bitnet158.lora import LoRAConfig
    from bitnet158.model import Transformer
    from bitnet158.pack import random_packed
    from bitnet158.train.data.instructions import default_instructions
    from bitnet158.train.sft import chat_loss, prepare_model, sft, sft_train_config
    from bitnet158.train.trainer import train

    torch.set_num_threads(args.threads)
    baseline = _rss()
    tc = sft_train_config(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup=1,
                          eval_every=args.steps, save_every=args.steps, lr=args.lr)
    lora = LoRAConfig(r=args.rank, targets=_targets(args))  # alpha: LoRAConfig's default, 2 x rank
    step_times: list[float] = []

    def timed(step: int, model) -> None:  # on_step runs before each step: the gaps are step times
        step_times.append(time.perf_counter())

    if args.base:
        model, tok = checkpoint.load(args.base)
        conversations, groups = default_instructions()
        with PeakSampler() as peak:
            result = sft(model, tok, conversations, tc, method=method, lora=lora, groups=groups, progress=False,
                         on_step=timed)
        loss = result.heldout_loss_after
        before = result.heldout_loss_before
    else:
        cfg = preset(args.preset)
        if args.layers:
            cfg = dataclasses.replace(cfg, num_layers=args.layers).validate()
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, args.seq_len))
        torch.manual_seed(0)
        model = Transformer(cfg) if method == "full" else random_packed(cfg)
        prepare_model(model, method, lora)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=gen)
        y = torch.where(torch.rand(x.shape, generator=gen) < 0.5, torch.roll(x, -1, 1), -100)
        with PeakSampler() as peak:
            train(model, tc, None, batches=lambda i: (x, y), progress=False, on_step=timed,
                  loss_fn=chat_loss)  # finetune's loss, for both methods
        loss = before = None
    # gap i is step i's time (the last step has no gap: the final eval follows it); skip step 0's
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    gaps = gaps[1:] or gaps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "peak_train": peak.peak - baseline,
            "peak_proc": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline,
            "s_per_step": statistics.median(gaps) if gaps else float("nan"), "heldout_loss": loss,
            "heldout_before": before, "trainable": trainable}


def _targets(args: argparse.Namespace) -> tuple[str, ...]:
    from bitnet158.lora import LoRAConfig
    if not args.targets:
        return LoRAConfig.targets
    return tuple(t.strip() for t in args.targets.split(",") if t.strip())


def _alpha(rank: int) -> float:
    from bitnet158.lora import LoRAConfig
    return LoRAConfig(r=rank).alpha


def _describe(targets: tuple[str, ...]) -> str:
    from bitnet158.lora import PROJECTIONS
    rest = [t for t in targets if t not in PROJECTIONS]
    head = "all seven projections" if set(PROJECTIONS) <= set(targets) else ", ".join(t for t in targets
                                                                                      if t in PROJECTIONS)
    return ", ".join(([head] if head else []) + rest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="a trained training-form checkpoint (held-out loss on the embedded set)")
    p.add_argument("--preset", default="small", help="shapes for random weights (without --base)")
    p.add_argument("--layers", type=int, help="keep the preset's shapes with this many blocks")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, help="LoRA rank (default: LoRAConfig's)")
    p.add_argument("--targets", help="LoRA targets, comma-separated (default: LoRAConfig's: the projections, "
                   "embed_tokens, lm_head)")
    p.add_argument("--lr", type=float, help="peak LR (default: each method's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank is None:
        from bitnet158.lora import LoRAConfig
        args.rank = LoRAConfig.r
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for method in ("full", "lora"):
        argv = [sys.executable, __file__, "--child", method] + [a for a in sys.argv[1:]]
        res = subprocess.run(argv, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{method} run failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    what = f"base {args.base}" if args.base else f"preset {args.preset}" + (f", {args.layers} layers" if args.layers else "")
    print(f"fine-tuning {what}: {args.steps} steps of {args.batch_size}×{args.seq_len} tokens, "
          f"{args.threads} threads, LoRA rank {args.rank} (alpha {_alpha(args.rank):g}) on "
          f"{_describe(_targets(args))}")
    print(f"{'method':<6} {'trainable':>12} {'peak (train)':>13} {'peak (proc)':>12} {'s/step':>8} {'held-out':>9}")
    for r in rows:
        loss = f"{r['heldout_loss']:.4f}" if r["heldout_loss"] is not None else "-"
        print(f"{r['method']:<6} {r['trainable']:>12,} {r['peak_train'] / 2**20:>10.0f} MiB "
              f"{r['peak_proc'] / 2**20:>8.0f} MiB {r['s_per_step']:>8.3f} {loss:>9}")
    full, lora = rows
    print(f"LoRA / full: peak memory while training {lora['peak_train'] / full['peak_train']:.2f}× "
          f"(goal ≤ 0.25× at 2B4T shapes), step time {lora['s_per_step'] / full['s_per_step']:.2f}×")
    if full["heldout_loss"] is not None:
        gap = lora["heldout_loss"] / full["heldout_loss"] - 1
        print(f"held-out loss: before {full['heldout_before']:.4f}, full {full['heldout_loss']:.4f}, "
              f"LoRA {lora['heldout_loss']:.4f} ({gap:+.1%}; goal within 5 %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
