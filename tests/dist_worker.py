"""A torchrun worker for tests/test_distributed.py: trains the tiny preset on synthetic tokens as one
rank of a job (`python -m torch.distributed.run ... tests/dist_worker.py OUT.json MODE[,MODE] STEPS`)
and, on rank 0, writes each mode's per-step losses to OUT.json. MODE `absmean` checks instead that
every BitLinear inside an FSDP2-sharded model quantizes with the absmean of its whole weight."""

from __future__ import annotations

import json
import sys

import torch

from bitnet158 import quant
from bitnet158.config import TrainConfig, preset
from bitnet158.model import Transformer
from bitnet158.train.distributed import Dist, ParallelConfig
from bitnet158.train.trainer import train

torch.set_num_threads(1)


def tokens(n: int = 20_000, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    """Tokens with some structure (a noisy repeating pattern) so the loss moves."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % 97
    noise = torch.randint(0, vocab, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.8
    return torch.where(keep, base, noise).to(torch.int32)


def config(steps: int, batch_size: int = 8, grad_accum: int = 1):
    mc = preset("tiny", vocab_size=512, max_seq_len=64)
    tc = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=32, warmup=2,
                     eval_every=10, eval_batches=1,
                     save_every=steps, seed=3)
    return mc, tc


def absmean_check(d: Dist) -> dict:
    mc, _ = config(1)
    torch.manual_seed(0)
    model = Transformer(mc)
    full = {name: quant.absmean_ternary(p.detach())[1].item() for name, p in model.named_parameters()
            if p.ndim == 2 and name.startswith("layers.")}
    shapes = {tuple(p.shape) for name, p in model.named_parameters() if name in full}
    seen = []
    original = quant.WEIGHT_QUANTIZERS["b158"]

    def recording(w: torch.Tensor):
        codes, scale = original(w)
        seen.append((tuple(w.shape), scale.item(), type(w).__name__))
        return codes, scale

    quant.WEIGHT_QUANTIZERS["b158"] = recording
    try:
        net = d.wrap(model)
        sharded = type(next(model.layers[0].parameters())).__name__  # DTensor once fully_shard ran
        net(torch.randint(0, mc.vocab_size, (2, 16)))
    finally:
        quant.WEIGHT_QUANTIZERS["b158"] = original
    return {"seen": seen, "expected": sorted(full.values()), "shapes": sorted(shapes), "param_type": sharded}


def main() -> None:
    out, modes, steps = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    base = Dist.start(ParallelConfig(timeout=120), "cpu")
    results = {"world_size": base.world_size}
    for mode in modes:
        d = Dist(ParallelConfig(parallel="fsdp" if mode == "absmean" else mode), base.device, base.rank,
                 base.world_size, initialized=True)
        if mode == "absmean":
            results[mode] = absmean_check(d)
            continue
        mc, tc = config(steps)
        train_tokens = tokens()
        result = train(mc, tc, train_tokens, tokens(4_000, seed=1), progress=False, dist=d)
        results[mode] = {"losses": [row["loss"] for row in result.history],
                         "evals": [row["loss"] for row in result.evals]}
    if base.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    base.close()


if __name__ == "__main__":
    main()
