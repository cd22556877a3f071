"""The fp16 and q8 KV caches against fp32, in one run: decode speed and cache memory at long
contexts on a random packed model at the 2B4T shapes, and the quality cost on a trained checkpoint
(held-out perplexity and top-1 agreement, every position's logits computed through the cache).

    python benchmarks/kv_cache.py                         # 2B4T shapes; contexts 128, 1024, 4000; 1 and 2 threads
    python benchmarks/kv_cache.py --contexts 512,2048 --threads 2 --head int8
    python benchmarks/kv_cache.py --no-speed              # only the quality part (run `bitnet158 demo` first)

Speed: the cache is filled with random keys and values up to the context length and decoding
starts there, so no prefill is timed (the values do not change the work); each figure is the
best of `--repeats` runs of `--tokens` greedy steps, the cache dtypes alternating.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from bitnet158 import checkpoint, kernels
from bitnet158.bench import use_kernel_threads
from bitnet158.cache import KVCache, kv_torch_dtype
from bitnet158.config import KV_DTYPES, preset
from bitnet158.errors import BitNetError
from bitnet158.pack import pack_, random_packed
from bitnet158.packed_layers import PackConfig
from bitnet158.train.data import default_corpus, encode_documents, eval_windows


@torch.no_grad()
def decode_ms(model, cache: KVCache, context: int, tokens: int, repeats: int) -> float:
    """Best time of one greedy decode step (ms) at `context` cached positions."""
    best = math.inf
    for _ in range(repeats):
        cache.offset = context
        token = torch.randint(0, model.config.vocab_size, (1, 1))
        model(token, cache)  # warm-up: the first step after a refill touches everything once
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
        best = min(best, (time.perf_counter() - t0) / tokens)
        cache.offset = context
    return best * 1e3


def speed(args: argparse.Namespace) -> None:
    cfg = preset(args.preset)
    contexts = [int(c) for c in args.contexts.split(",")]
    too_long = [c for c in contexts if c + args.tokens + 1 > cfg.max_seq_len]
    if too_long:
        raise SystemExit(f"contexts {too_long} leave no room for {args.tokens + 1} steps in "
                         f"max_seq_len {cfg.max_seq_len}")
    threads = [int(t) for t in args.threads.split(",")]
    print(f"random packed model, preset {args.preset} ({cfg.num_layers} layers, {cfg.num_kv_heads} KV heads × "
          f"{cfg.head_dim}), {args.format} + {args.head} head; kernel path {kernels.current_path()}")
    torch.manual_seed(0)
    model = random_packed(cfg, PackConfig(format=args.format, head=args.head)).eval()
    header = f"{'context':>8} {'cache':>6} {'MB':>8}" + "".join(f" {f'{t} thr tok/s':>13}" for t in threads)
    print(header)
    for context in contexts:
        rates: dict[str, list[float]] = {}
        for kv in KV_DTYPES:
            cache = KVCache(cfg, max_len=context + args.tokens + 1, dtype=kv_torch_dtype(kv))
            fill(cache)
            rates[kv] = []
            for t in threads:
                use_kernel_threads(t)
                rates[kv].append(1e3 / decode_ms(model, cache, context, args.tokens, args.repeats))
            print(f"{context:>8} {kv:>6} {cache.nbytes / 1e6:8.0f}" + "".join(f" {r:13.2f}" for r in rates[kv]))
            del cache
        for kv in KV_DTYPES[1:]:
            print(f"{'':>8} {f'{kv} ÷ fp32':>15}" + "".join(f" {a / b:12.2f}×" for a, b in zip(rates[kv], rates['fp32'])))


def fill(cache: KVCache) -> None:
    """Random keys and values (the work does not depend on them): normal floats, or q8 codes and scales."""
    for table in cache.keys + cache.values:
        if table.dtype == torch.int8:
            table.copy_(torch.randint(-127, 128, table.shape, dtype=torch.int8))
        else:
            table.normal_()
    for scales in (cache.key_scales or []) + (cache.value_scales or []):
        scales.fill_(0.02)


@torch.no_grad()
def logits_through_cache(model, inputs: torch.Tensor, kv: str, batch: int = 8) -> torch.Tensor:
    """Every position's logits from one prefill per window through a KV cache of dtype `kv` (the
    queries attend to keys and values read back from the cache)."""
    outs = []
    for i in range(0, inputs.shape[0], batch):
        rows = inputs[i:i + batch]
        cache = KVCache(model.config, rows.shape[0], max_len=rows.shape[1], dtype=kv_torch_dtype(kv))
        outs.append(model(rows, cache))
    return torch.cat(outs)


def quality(args: argparse.Namespace) -> None:
    try:
        model, tokenizer = checkpoint.load(args.checkpoint)
    except BitNetError as e:
        print(f"quality: skipped ({e}; run `bitnet158 demo` first, or pass --checkpoint)")
        return
    if tokenizer is None:
        print(f"quality: skipped ({args.checkpoint} has no tokenizer.json)")
        return
    if model.packing is None:
        model = pack_(copy.deepcopy(model), PackConfig(format=args.format, head=args.head))
    model.eval()
    inputs, targets = eval_windows(encode_documents(tokenizer, default_corpus().heldout), args.seq_len, args.windows)
    print(f"{args.checkpoint}, packed {model.packing.describe()}, head {model.packing.head}: held-out "
          f"{inputs.shape[0]} windows × {args.seq_len} = {targets.numel():,} positions")
    logits = {kv: logits_through_cache(model, inputs, kv) for kv in KV_DTYPES}
    ppl = {kv: math.exp(F.cross_entropy(out.flatten(0, 1), targets.flatten().long()).item())
           for kv, out in logits.items()}
    print(f"perplexity: fp32 cache {ppl['fp32']:.3f}")
    for kv in KV_DTYPES[1:]:
        agree = (logits[kv].argmax(-1) == logits["fp32"].argmax(-1)).float().mean().item()
        print(f"            {kv} cache {ppl[kv]:.3f} ({(ppl[kv] / ppl['fp32'] - 1) * 100:+.3f} %); same top-1 token at "
              f"{agree:.2%} of positions; largest logit difference "
              f"{(logits[kv] - logits['fp32']).abs().max().item():.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--format", default="i2")
    ap.add_argument("--head", default="q4", help="output head of the packed model (q4: the one-stream choice)")
    ap.add_argument("--contexts", default="128,1024,4000", help="cached positions decoding starts from")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint", default="runs/demo/b158", help="a trained checkpoint for the quality part")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=160, help="held-out windows for the quality part")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed part")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality part")
    args = ap.parse_args()
    if not args.no_quality:
        quality(args)
    if not args.no_speed:
        speed(args)


if __name__ == "__main__":
    main()
