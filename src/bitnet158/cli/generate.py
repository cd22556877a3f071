"""`bitnet158 generate CKPT --prompt ...`: stream text from a checkpoint to the terminal."""

from __future__ import annotations

import argparse
import sys

from ..generate import SpeculationStats, stream_generate
from ..sampling import SamplingConfig
from ..draft_length import check_draft_tokens
from ..speculative import DraftModel, PromptLookup
from ..structured import Grammar
from .common import default_of
from .inference import add_runtime_argument, load_model

NAME = "generate"
HELP = "generate text from a checkpoint (streams to the terminal)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=default_of(stream_generate, "max_tokens"))
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=SamplingConfig.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=SamplingConfig.top_p, help="1 disables")
    p.add_argument("--repetition-penalty", type=float, default=SamplingConfig.repetition_penalty)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--speculate", choices=["ngram"],
                   help="speculative decoding with prompt-lookup drafts (exact: same greedy output, same sampling "
                        "distribution; fastest where the output repeats the prompt, e.g. code)")
    p.add_argument("--draft", metavar="CKPT", help="speculative decoding with a smaller draft model (same tokenizer)")
    p.add_argument("--draft-tokens", default=default_of(stream_generate, "draft_tokens"),
                   help="tokens drafted per verifying forward: 'auto' (as many as pay, measured as it goes) or "
                        "a fixed K (seeded sampling repeats exactly only with a fixed K)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT layout, or a finetune run) applied unmerged")
    p.add_argument("--quiet", action="store_true", help="no statistics line")
    shape = p.add_mutually_exclusive_group()  # structured output: what the text must match
    shape.add_argument("--json", action="store_true", help="the output is one JSON object")
    shape.add_argument("--json-schema", metavar="FILE", help="the output is JSON matching this JSON schema")
    shape.add_argument("--regex", metavar="PATTERN", help="the whole output matches this regular expression")
    shape.add_argument("--grammar", metavar="FILE", help="the output matches this Lark grammar")
    add_runtime_argument(p)


def grammar_of(args: argparse.Namespace) -> Grammar | None:
    """The structured-output option given, if any (read and checked before the model loads)."""
    if args.json:
        return Grammar.json_object().validate()
    if args.json_schema is not None:
        return Grammar.json_schema(Grammar.read(args.json_schema, "JSON schema")).validate()
    if args.regex is not None:
        return Grammar.regex(args.regex).validate()
    if args.grammar is not None:
        return Grammar.lark(Grammar.read(args.grammar, "grammar")).validate()
    return None


def run(args: argparse.Namespace) -> int:
    draft_tokens = check_draft_tokens(args.draft_tokens)  # before the model loads
    grammar = grammar_of(args)
    model, tokenizer = load_model(args.checkpoint, runtime=args.runtime, threads=args.threads, adapter=args.adapter,
                                  kv_dtype=args.kv_cache)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty)
    drafter = None
    if args.draft is not None:
        draft_model, _ = load_model(args.draft, runtime=args.runtime, threads=args.threads, need_tokenizer=False,
                                    kv_dtype=args.kv_cache)
        drafter = DraftModel(draft_model, model.config.vocab_size)
    elif args.speculate == "ngram":
        drafter = PromptLookup()
    stats = SpeculationStats()
    last = None
    sys.stdout.write(args.prompt)
    for last in stream_generate(model, tokenizer, args.prompt, args.max_tokens, sampling, args.seed,
                                drafter=drafter, draft_tokens=draft_tokens, stats=stats, grammar=grammar):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None and not args.quiet:
        speculation = ""
        if drafter is not None:
            speculation = (f", drafts accepted {stats.accepted}/{stats.drafted} ({stats.acceptance:.0%}) "
                           f"in {stats.verify_forwards} verifying forwards")
        print(f"[{last.prompt_tokens} prompt tokens, {last.generated_tokens} generated, "
              f"{last.tokens_per_second:.1f} tok/s{speculation}, finish: {last.finish_reason}]", file=sys.stderr)
    return 0
