"""What structured output costs, in one run: greedy decode tokens/s of a random packed model with
no grammar, with a JSON schema, and with a regex, alternated; and the grammar's own time per token
(the mask, then accepting the token), replayed on the tokens each run generated. "keyed" is a
record whose long keys the schema forces: those tokens are checked several to a forward
(generate.py), so it can decode faster than no grammar at all.

The vocabulary matters more than the model here (a mask covers every entry), so the model gets a
real one: a byte-level BPE trained on the Python standard library's sources, which every Python
installation has.

    python benchmarks/structured.py                      # 2B4T shapes, a 65,536-entry vocabulary, 2 threads
    python benchmarks/structured.py --preset tiny --vocab 2000 --tokens 24 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

from bitnet158 import kernels
from bitnet158.bench import use_kernel_threads
from bitnet158.config import preset
from bitnet158.generate import stream_generate
from bitnet158.pack import random_packed
from bitnet158.packed_layers import PackConfig
from bitnet158.sampling import SamplingConfig
from bitnet158.structured import Grammar, GrammarMatcher
from bitnet158.tokenizer import Tokenizer

# outputs longer than --tokens: 32 strings of up to 12 characters and a bounded integer; 40 words
SCHEMA = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 32, "maxItems": 32},
    "count": {"type": "integer", "minimum": 0, "maximum": 100000}},
    "required": ["tags", "count"], "additionalProperties": False}
PATTERN = r"([a-z]{2,8} ){40}[0-9]{4}"
# a form-like record: long keys the schema forces (checked several to a forward), short free values
FIELDS = ("customer_account_identifier", "shipping_address_verified", "preferred_delivery_window",
          "gift_wrapping_requested", "loyalty_programme_member", "invoice_copy_by_post")
KEYED = {"type": "object", "properties": {name: {"type": "boolean"} for name in FIELDS},
         "required": list(FIELDS), "additionalProperties": False}


def stdlib_tokenizer(vocab: int, max_chars: int) -> Tokenizer:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or total >= max_chars:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
    return Tokenizer.train(texts, vocab_size=vocab)


def decode_rate(model, tok: Tokenizer, grammar: Grammar | None, tokens: int) -> tuple[float, list[int]]:
    """Greedy tokens/s after the first token, and the tokens generated."""
    out, start = [], None
    for response in stream_generate(model, tok, "def ", tokens, SamplingConfig(temperature=0.0), grammar=grammar):
        out.append(response.token)
        if start is None:
            start = time.perf_counter()
    elapsed = time.perf_counter() - start
    return (len(out) - 1) / elapsed if elapsed > 0 and len(out) > 1 else float("nan"), out


def grammar_ms(tok: Tokenizer, vocab: int, grammar: Grammar, generated: list[int]) -> float:
    """Median ms a token spends in the grammar (mask + accept), replaying `generated`."""
    matcher = GrammarMatcher(grammar, tok, vocab)
    logits = np.zeros(vocab, dtype=np.float32)
    times = []
    for token in generated:
        t0 = time.perf_counter()
        matcher.mask(logits)
        matcher.accept(token)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--vocab", type=int, default=65536, help="BPE vocabulary size to train")
    ap.add_argument("--corpus-chars", type=int, default=40_000_000, help="standard-library text to train it on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens a run (a grammar may end one sooner)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of each, for ranges")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    t0 = time.perf_counter()
    tok = stdlib_tokenizer(args.vocab, args.corpus_chars)
    print(f"tokenizer: {tok.vocab_size} entries trained on the standard library in {time.perf_counter() - t0:.0f}s")
    cfg = dataclasses.replace(preset(args.preset), vocab_size=tok.vocab_size)
    model = random_packed(cfg, PackConfig(format="i2", head="int8")).eval()
    use_kernel_threads(args.threads)
    grammars = {"none": None, "json_schema": Grammar.json_schema(SCHEMA), "regex": Grammar.regex(PATTERN),
                "keyed": Grammar.json_schema(KEYED)}
    t0 = time.perf_counter()
    GrammarMatcher(grammars["json_schema"], tok, cfg.vocab_size)  # the vocabulary table, built once per tokenizer
    print(f"random {args.preset}-shaped model (i2, int8 head), kernel path {kernels.current_path()}, "
          f"{args.threads} thread(s); first grammar (builds the vocabulary table) {time.perf_counter() - t0:.2f}s")
    rates: dict[str, list[float]] = {name: [] for name in grammars}
    masks: dict[str, list[float]] = {name: [] for name in grammars if name != "none"}
    lengths: dict[str, int] = {}
    for _ in range(args.runs):  # alternate, so drift hits all alike
        for name, grammar in grammars.items():
            rate, generated = decode_rate(model, tok, grammar, args.tokens)
            rates[name].append(rate)
            lengths[name] = len(generated)
            if grammar is not None:
                masks[name].append(grammar_ms(tok, cfg.vocab_size, grammar, generated))
    base = statistics.median(rates["none"])
    print(f"\n{'grammar':<12} {'tokens':>6} {'decode tok/s':>16} {'÷ none (median)':>16} {'grammar ms/token':>18}")
    for name in grammars:
        r = rates[name]
        mask = f"{min(masks[name]):.3f}-{max(masks[name]):.3f}" if name in masks else "-"
        print(f"{name:<12} {lengths[name]:>6} {min(r):>7.1f}-{max(r):<7.1f} {statistics.median(r) / base:>16.2f} "
              f"{mask:>18}")
    if args.json:
        Path(args.json).write_text(json.dumps({"vocab": tok.vocab_size, "preset": args.preset, "threads": args.threads,
                                               "tok_s": rates, "grammar_ms": masks, "tokens": lengths}, indent=2))


if __name__ == "__main__":
    main()
