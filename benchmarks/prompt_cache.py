"""A multi-turn chat, and requests sharing a system prompt, through the serving engine with and
without the prompt cache: time to first token, both measured in the same run.

A chat client sends the whole conversation every turn (earlier turns, their answers, the new
message). Without the cache the server prefills all of it again; with it (`serve`'s default) a
freed slot keeps its keys and the next turn prefills only what is new. The packed model gets random
ternary codes at the exact 2B4T shapes (`--preset` for others) and the conversation is random token
ids: speed does not depend on the values. Both engines answer each turn in turn (alternated, so
drift on a shared machine hits both), and their greedy answers must be the same tokens.

Then `--streams` requests arrive at once, each a shared `--system`-token prompt and its own
question (many users of one app): without the cache every request prefills the system prompt;
with it the first does and the others wait for it and copy its keys.

    python benchmarks/prompt_cache.py                     # 2B4T shapes, 6 turns; 4 × 256-token system prompt
    python benchmarks/prompt_cache.py --preset tiny --turns 3 --message 16 --answer 4 --system 32
"""

from __future__ import annotations

import argparse
import json
import random
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


def ask(engine: Engine, prompt: list[int], tokens: int) -> tuple[float, list[int], int]:
    """Time to first token, the answer's tokens, and the prompt tokens the engine had cached."""
    start = time.perf_counter()
    stream = engine.submit(GenerationRequest(prompt=tuple(prompt), max_tokens=tokens, sampling=GREEDY))
    first, answer, cached = None, [], 0
    for response in stream:
        first = first or time.perf_counter()
        answer.append(response.token)
        cached = response.cached_tokens
    return first - start, answer, cached


def side_by_side(engine: Engine, prompts: list[list[int]], tokens: int) -> dict:
    """Submit every prompt at once; each one's time to first token, its answer and cached count."""
    start = time.perf_counter()
    streams = [engine.submit(GenerationRequest(prompt=tuple(p), max_tokens=tokens, sampling=GREEDY))
               for p in prompts]
    got: list[tuple[float, list[int], int]] = [(0.0, [], 0)] * len(prompts)

    def consume(i: int) -> None:
        first, answer, cached = None, [], 0
        for response in streams[i]:
            first = first or time.perf_counter()
            answer.append(response.token)
            cached = response.cached_tokens
        got[i] = (first - start, answer, cached)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ttft = [g[0] for g in got]
    return {"ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft), "answers": [g[1] for g in got],
            "cached_tokens": sum(g[2] for g in got)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--format", default="i2")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--message", type=int, default=96, help="tokens in each new user message")
    ap.add_argument("--answer", type=int, default=16, help="tokens in each answer")
    ap.add_argument("--streams", type=int, default=4, help="requests sharing a system prompt, at once")
    ap.add_argument("--system", type=int, default=256, help="tokens in the shared system prompt")
    ap.add_argument("--question", type=int, default=32, help="tokens in each request's own part")
    ap.add_argument("--threads", type=int, help="kernel threads (default: torch's count)")
    ap.add_argument("--kv-cache", choices=KV_DTYPES, default="fp32")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    cfg = preset(args.preset)
    threads = use_kernel_threads(args.threads)
    print(f"preset {args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}; packed {args.format}, int8 head; "
          f"kernel path {kernels.current_path()}, {threads} thread(s); {args.turns} turns of {args.message}-token "
          f"messages and {args.answer}-token answers; {args.kv_cache} KV cache")
    model, tokenizer = random_served_model(args.preset, args.format, args.kv_cache)
    positions = max(args.turns * (args.message + args.answer), args.system + args.question + args.answer) + 1
    engines = {cached: Engine(model, tokenizer, max_concurrency=args.streams, max_queue=0, max_len=positions,
                              prompt_cache=cached).start() for cached in (False, True)}
    rng = random.Random(0)
    rows, history = [], []
    try:
        for engine in engines.values():  # warm-up: pool, caches, allocator (a prompt the chat never starts with)
            ask(engine, [cfg.vocab_size - 1] * 8, 2)
        for turn in range(1, args.turns + 1):
            prompt = history + [rng.randrange(cfg.vocab_size) for _ in range(args.message)]
            ttft_off, answer_off, _ = ask(engines[False], prompt, args.answer)
            ttft_on, answer_on, cached = ask(engines[True], prompt, args.answer)
            rows.append({"turn": turn, "prompt_tokens": len(prompt), "cached_tokens": cached, "ttft_off_s": ttft_off,
                         "ttft_on_s": ttft_on, "speedup": ttft_off / ttft_on, "same_tokens": answer_on == answer_off})
            history = prompt + answer_on
        system = [rng.randrange(cfg.vocab_size) for _ in range(args.system)]
        shared = [system + [rng.randrange(cfg.vocab_size) for _ in range(args.question)] for _ in range(args.streams)]
        together = {cached: side_by_side(engines[cached], shared, args.answer) for cached in (False, True)}
    finally:
        for engine in engines.values():
            engine.shutdown(drain=False, timeout=60)

    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT no cache s':>16} {'TTFT cache s':>13} {'speed-up':>9} "
          f"{'same tokens':>12}")
    for r in rows:
        print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['cached_tokens']:>7} {r['ttft_off_s']:>16.3f} "
              f"{r['ttft_on_s']:>13.3f} {r['speedup']:>8.2f}× {'yes' if r['same_tokens'] else 'NO':>12}")
    off, on = sum(r["ttft_off_s"] for r in rows), sum(r["ttft_on_s"] for r in rows)
    print(f"whole chat: {off:.2f} s to first tokens without the cache, {on:.2f} s with it ({off / on:.2f}×); "
          f"answers {'identical' if all(r['same_tokens'] for r in rows) else 'DIFFER'}")
    off, on = together[False], together[True]
    print(f"{args.streams} requests at once sharing a {args.system}-token system prompt (+{args.question} tokens "
          f"each): time to first token median {off['ttft_median_s']:.2f} s → {on['ttft_median_s']:.2f} s "
          f"({off['ttft_median_s'] / on['ttft_median_s']:.2f}×), last {off['ttft_max_s']:.2f} s → "
          f"{on['ttft_max_s']:.2f} s ({off['ttft_max_s'] / on['ttft_max_s']:.2f}×); {on['cached_tokens']} prompt "
          f"tokens copied; answers {'identical' if off['answers'] == on['answers'] else 'DIFFER'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "format": args.format, "kernel": kernels.current_path(),
                       "threads": threads, "kv_cache": args.kv_cache, "rows": rows,
                       "side_by_side": {"streams": args.streams, "system": args.system, "question": args.question,
                                        **{("cache" if k else "no_cache"): {n: v for n, v in r.items() if n != "answers"}
                                           for k, r in together.items()},
                                        "same_tokens": off["answers"] == on["answers"]}}, f, indent=1)


if __name__ == "__main__":
    main()
