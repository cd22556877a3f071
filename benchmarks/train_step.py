"""Time per training step of BitNet b1.58 (and b1) against its FP twin, measured in one run.

A step is what the trainer does: forward, cross-entropy, backward, AdamW update. The models are
built from the same preset and see the same batch; the variants are interleaved round by round so
that machine noise hits all of them alike, and the median step time of each is compared.

    python benchmarks/train_step.py                 # tiny preset, batch 16 × 256 (the demo's step)
    python benchmarks/train_step.py --preset small --batch-size 8 --rounds 5

Goal (Core issue): b1.58 / FP ≤ 1.25×.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bitnet158.config import preset
from bitnet158.model import Transformer


def one_step(model: Transformer, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--modes", default="b158,fp,b1")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = args.modes.split(",")
    cfg = preset(args.preset, max_seq_len=max(args.seq_len, preset(args.preset).max_seq_len))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        model = Transformer(cfg.twin(mode)).train()
        runs[mode] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95)))
    for _ in range(args.warmup):
        for mode in modes:
            one_step(*runs[mode], tokens)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode in modes:
            times[mode].append(one_step(*runs[mode], tokens))

    params = sum(p.numel() for p in runs[modes[0]][0].parameters())
    print(f"preset {args.preset} ({params / 1e6:.1f}M parameters), batch {args.batch_size} × {args.seq_len}, "
          f"{torch.get_num_threads()} threads, {args.rounds} timed steps each (median)")
    base = statistics.median(times["fp"]) if "fp" in times else None
    print(f"{'mode':<6} {'s/step':>8} {'tokens/s':>10} {'vs fp':>7}")
    for mode in modes:
        med = statistics.median(times[mode])
        ratio = f"{med / base:.2f}×" if base else "-"
        print(f"{mode:<6} {med:8.3f} {args.batch_size * args.seq_len / med:10,.0f} {ratio:>7}")
    if base and "b158" in times:
        r = statistics.median(times["b158"]) / base
        print(f"b1.58 / FP step time: {r:.2f}× (goal ≤ 1.25×: {'met' if r <= 1.25 else 'not met'})")


if __name__ == "__main__":
    main()
