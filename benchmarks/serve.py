"""Continuous batching: aggregate and per-stream decode speed and time to first token with 1, 4,
16 and 32 concurrent streams through the serving engine, each against one stream measured in the
same run.

No training is needed: the packed model gets random ternary codes at the exact 2B4T shapes
(`--preset` for others) and a small trained tokenizer decodes its ids; speed does not depend on
the values. The requests go straight to the engine (`bitnet158.serve.engine`), the same object the
HTTP server drives, so the figures are the engine's, without HTTP and JSON on top.

    python benchmarks/serve.py                          # 2B4T shapes, 1/4/16/32 streams
    python benchmarks/serve.py --preset tiny --streams 1,4,8 --tokens 16

Goal (serving issue): aggregate decode tokens/s at 16 streams ≥ 6× one stream (the weights are
read once per step for every stream). Aggregate decode = tokens generated after each stream's first
token ÷ the time from the first stream's first token to the last stream's last token, so it counts
the prefills that interleave with decoding against us; "decode step tok/s" is the batched decode
forward alone (rows ÷ seconds of the forwards that carried every stream).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time

from bitnet158 import kernels
from bitnet158.bench import random_served_model, use_kernel_threads
from bitnet158.config import KV_DTYPES, preset
from bitnet158.generate import GenerationRequest
from bitnet158.sampling import SamplingConfig
from bitnet158.serve.engine import Engine

GREEDY = SamplingConfig(temperature=0.0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


_runs = itertools.count()


def run_streams(engine: Engine, streams: int, prompt: int, tokens: int, vocab: int) -> dict:
    """Submit `streams` requests at once; time every response as it arrives. Each run's prompts
    differ from every earlier run's, so the engine's prompt cache has nothing to reuse: TTFT
    includes each whole prefill."""
    salt = next(_runs)
    records: list[dict] = [{} for _ in range(streams)]
    engine.batch_sizes.clear()
    engine.decode_seconds.clear()

    def consume(i: int, stream, submitted: float) -> None:
        times = [time.perf_counter() for _ in stream]
        records[i] = {"submitted": submitted, "first": times[0], "last": times[-1], "n": len(times)}

    threads = []
    for i in range(streams):
        ids = tuple((7919 * (i + 1) * (j + 3) + 104729 * salt) % vocab for j in range(prompt))  # distinct prompts
        request = GenerationRequest(prompt=ids, max_tokens=tokens, sampling=GREEDY)
        t = threading.Thread(target=consume, args=(i, engine.submit(request), time.perf_counter()))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    ttft = [r["first"] - r["submitted"] for r in records]
    per_stream = [(r["n"] - 1) / (r["last"] - r["first"]) for r in records if r["n"] > 1 and r["last"] > r["first"]]
    decoded = sum(r["n"] - 1 for r in records)
    span = max(r["last"] for r in records) - min(r["first"] for r in records)
    # the decode forward alone, with all `streams` rows in it: the weights are read once for all
    full = engine.batch_sizes.get(streams, 0)
    step_tok_s = streams * full / engine.decode_seconds[streams] if full else 0.0
    return {"streams": streams, "aggregate_tok_s": decoded / span if span > 0 else 0.0, "step_tok_s": step_tok_s,
            "per_stream_tok_s": statistics.median(per_stream) if per_stream else 0.0,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "tokens": sum(r["n"] for r in records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--format", default="i2")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--threads", type=int, help="kernel threads (default: torch's count)")
    ap.add_argument("--kv-cache", choices=KV_DTYPES, default="fp32", help="the slots' KV cache dtype (default fp32)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    counts = sorted({int(s) for s in args.streams.split(",")} | {1})

    cfg = preset(args.preset)
    threads = use_kernel_threads(args.threads)
    print(f"preset {args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; packed "
          f"{args.format}, int8 head; kernel path {kernels.current_path()}, {threads} thread(s); prompt {args.prompt}, "
          f"{args.tokens} tokens per stream; {args.kv_cache} KV cache")
    model, tokenizer = random_served_model(args.preset, args.format, args.kv_cache)
    engine = Engine(model, tokenizer, max_concurrency=max(counts), max_queue=0,
                    max_len=args.prompt + args.tokens + 1).start()
    try:
        run_streams(engine, 1, args.prompt, 4, cfg.vocab_size)  # warm-up: pool, caches, allocator
        rows = [run_streams(engine, n, args.prompt, args.tokens, cfg.vocab_size) for n in counts]
    finally:
        engine.shutdown(drain=False, timeout=60)
    one = rows[0]
    print(f"{'streams':>7} {'aggregate tok/s':>16} {'× 1 stream':>10} {'decode step tok/s':>18} {'× 1 stream':>10} "
          f"{'per stream tok/s':>17} {'× 1 stream':>10} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    for r in rows:
        r["aggregate_x"] = r["aggregate_tok_s"] / one["aggregate_tok_s"]
        r["step_x"] = r["step_tok_s"] / one["step_tok_s"] if one["step_tok_s"] else 0.0
        r["per_stream_x"] = r["per_stream_tok_s"] / one["per_stream_tok_s"]
        print(f"{r['streams']:>7} {r['aggregate_tok_s']:>16.1f} {r['aggregate_x']:>9.2f}× {r['step_tok_s']:>18.1f} "
              f"{r['step_x']:>9.2f}× {r['per_stream_tok_s']:>17.2f} {r['per_stream_x']:>9.2f}× "
              f"{r['ttft_p50_s']:>11.3f} {r['ttft_p95_s']:>11.3f}")
    at16 = next((r for r in rows if r["streams"] == 16), None)
    if at16 is not None:
        met = at16["aggregate_x"] >= 6
        print(f"goal: aggregate decode at 16 streams ≥ 6× one stream: {at16['aggregate_x']:.2f}× "
              f"({'met' if met else 'not met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "format": args.format, "kernel": kernels.current_path(),
                       "threads": threads, "kv_cache": args.kv_cache, "prompt": args.prompt, "tokens": args.tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
