"""Speculative decoding, measured in one run: greedy tokens/s with and without prompt-lookup drafts
(and with a draft model, if one is given) on a code prompt from the held-out corpus, the
acceptance rate, and a check that the tokens are the same. Then what a verifying forward costs on
this machine: the time of one forward over k + 1 positions against one position, at the model's
own shapes, which says how many drafted tokens must be accepted per forward to gain.

    python benchmarks/speculative.py                          # runs/demo/b158 (run `bitnet158 demo` first)
    python benchmarks/speculative.py --checkpoint runs/x --draft runs/small --tokens 200
"""

from __future__ import annotations

import argparse
import time

import torch

from bitnet158 import checkpoint
from bitnet158.bench import use_kernel_threads
from bitnet158.cache import KVCache
from bitnet158.draft_length import check_draft_tokens
from bitnet158.errors import BitNetError
from bitnet158.generate import GenerationRequest, SpeculationStats, stream_request
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158.sampling import SamplingConfig
from bitnet158.speculative import DraftModel, PromptLookup
from bitnet158.train.data import default_corpus


def code_prompt(tokenizer, tokens: int) -> list[int]:
    """The opening of the largest held-out Python source (what a code-completion prompt looks like)."""
    docs = default_corpus(max_bytes=2_000_000).heldout
    code = [d.text for d in docs if "def " in d.text and "import " in d.text]
    text = max(code or [d.text for d in docs], key=len)
    return tokenizer.encode(text)[:tokens]


def timed_generation(model, tokenizer, prompt, tokens, drafter, k) -> tuple[list[int], float, SpeculationStats]:
    stats = SpeculationStats()
    request = GenerationRequest(tuple(prompt), tokens, SamplingConfig(temperature=0.0)).validate()
    stream = stream_request(model, tokenizer, request, drafter=drafter, draft_tokens=k, stats=stats)
    first = next(stream)  # the prefill is the same either way: time the decoding only
    t0 = time.perf_counter()
    out = [first.token] + [r.token for r in stream]
    return out, (len(out) - 1) / (time.perf_counter() - t0), stats


@torch.no_grad()
def verify_cost(model, k: int, repeats: int = 5) -> float:
    """Seconds of one forward over k + 1 new positions ÷ seconds of one forward over 1."""
    cfg = model.config
    times = {}
    for rows in (1, k + 1):
        best = float("inf")
        for _ in range(repeats):
            cache = KVCache(cfg, max_len=64 + rows)
            model(torch.randint(0, cfg.vocab_size, (1, 64)), cache)
            t0 = time.perf_counter()
            model(torch.randint(0, cfg.vocab_size, (1, rows)), cache)
            best = min(best, time.perf_counter() - t0)
        times[rows] = best
    return times[k + 1] / times[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/b158")
    ap.add_argument("--draft", help="a smaller checkpoint with the same tokenizer, as a draft model")
    ap.add_argument("--prompt", type=int, default=400, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=160, help="tokens generated")
    ap.add_argument("--draft-tokens", default="auto,2,4,8", help="k values to try ('auto': chosen as it goes)")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()

    try:
        model, tokenizer = checkpoint.load(args.checkpoint)
    except BitNetError as e:
        raise SystemExit(f"{e} (run `bitnet158 demo` first, or pass --checkpoint)") from None
    if model.packing is None:
        model = pack_(model, PackConfig()).eval()  # the packed runtime is what speculation is for
    use_kernel_threads(args.threads)
    prompt = code_prompt(tokenizer, args.prompt)
    print(f"{args.checkpoint}: {model.config.num_layers} layers, hidden {model.config.hidden_size}; "
          f"a {len(prompt)}-token code prompt, {args.tokens} greedy tokens")
    plain, plain_rate, _ = timed_generation(model, tokenizer, prompt, args.tokens, None, 1)
    print(f"{'plain':<22} {plain_rate:7.1f} tok/s")
    drafters = [("prompt lookup", PromptLookup())]
    if args.draft:
        draft_model, _ = checkpoint.load(args.draft, with_tokenizer=False)
        drafters.append(("draft model", DraftModel(draft_model, model.config.vocab_size)))
    for k in [check_draft_tokens(v) for v in args.draft_tokens.split(",")]:
        for name, drafter in drafters:
            out, rate, stats = timed_generation(model, tokenizer, prompt, args.tokens, drafter, k)
            per_forward = (stats.accepted + stats.verify_forwards) / max(stats.verify_forwards, 1)
            print(f"{name + f', k = {k}':<22} {rate:7.1f} tok/s = {rate / plain_rate:.2f}× plain; accepted "
                  f"{stats.accepted}/{stats.drafted} ({stats.acceptance:.0%}), {per_forward:.2f} tokens per verifying "
                  f"forward; same tokens: {'yes' if out == plain else 'NO'}")
        if k == "auto":
            continue
        cost = verify_cost(model, k)
        print(f"{'':<22} a forward over {k + 1} positions costs {cost:.2f}× one position here: drafts gain "
              f"when more than {cost - 1:.2f} are accepted per forward")


if __name__ == "__main__":
    main()
