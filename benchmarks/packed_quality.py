"""Packed vs training-form model on the held-out split: top-1 agreement, the largest logit
difference, and held-out perplexity for each packed format and head (int8 / q4 / fp16 / fp32) — the
cost of the int8 head in perplexity, measured.

    python benchmarks/packed_quality.py                    # uses runs/demo/b158 (run `bitnet158 demo` first)
    python benchmarks/packed_quality.py --checkpoint runs/x --windows 64

Acceptance (Packed-inference issue): same top-1 token on ≥ 99 % of held-out positions; logits
differ only by float summation order (with an fp32 head).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from bitnet158 import checkpoint, kernels
from bitnet158.errors import BitNetError
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158.train.data import default_corpus, encode_documents, eval_windows


@torch.no_grad()
def logits_over(model, inputs: torch.Tensor, batch: int = 8) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs[i:i + batch]) for i in range(0, inputs.shape[0], batch)])


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits.flatten(0, 1), targets.flatten().long()).item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/b158")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=160, help="held-out windows (all of the split by default)")
    ap.add_argument("--formats", default="i2,base3,lut2")
    args = ap.parse_args()

    try:
        model, tokenizer = checkpoint.load(args.checkpoint)
    except BitNetError as e:
        raise SystemExit(f"{e}\n(run `bitnet158 demo` first, or pass --checkpoint)")
    if tokenizer is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer.json")
    heldout = encode_documents(tokenizer, default_corpus().heldout)
    inputs, targets = eval_windows(heldout, args.seq_len, args.windows)
    print(f"{args.checkpoint}: {model.config.mode}, held-out {inputs.shape[0]} windows × {args.seq_len} "
          f"= {targets.numel():,} positions; kernel path {kernels.current_path()}")

    reference = logits_over(model, inputs)
    ref_top1 = reference.argmax(-1)
    print(f"{'model':<24} {'ppl':>8} {'top-1 agree':>12} {'max |Δlogit|':>13} {'max |logit|':>12}")
    print(f"{'training form (fp32)':<24} {perplexity(reference, targets):8.3f} {'-':>12} {'-':>13} "
          f"{reference.abs().max().item():12.3f}")
    for fmt in args.formats.split(","):
        for head in ("fp32", "fp16", "int8", "q4"):
            packed = pack_(copy.deepcopy(model), PackConfig(format=fmt, head=head))
            out = logits_over(packed, inputs)
            agree = (out.argmax(-1) == ref_top1).float().mean().item()
            print(f"{'packed ' + fmt + ', head ' + head:<24} {perplexity(out, targets):8.3f} {agree:12.4%} "
                  f"{(out - reference).abs().max().item():13.2e} {'':>12}")


if __name__ == "__main__":
    main()
