"""Generation in three layers (as mlx-lm does): `generate_step` yields token ids from a KV-cached
model; `stream_generate` turns them into text pieces with speed statistics; `generate` returns the
whole string. The CLI (and chat and server) call only `stream_generate` or its request form.

The per-sequence decisions — sampling with the sequence's own seeded generator, penalties'
history, stream detokenizing, end tokens, stop strings, max_tokens, logprobs — live in one
object, `SequenceDecoder`, which takes next-token logits and answers a `GenerationResponse`.
`stream_generate` drives it with a model over a `PromptCache`; the batching engine drives one per
request from a batched forward. So a request gives the same tokens through either.

This module never imports torch. A model reaches it as a `runner.Runner` (forward over a KV cache,
numpy logits out): the torch-free runtime's `NativeModel` is one; a torch `Transformer` is wrapped
by `torch_runner.TorchRunner` the first time it is used (`runner.runner_for`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .config import ModelConfig
from .draft_length import DraftLength, DraftTokens, draft_length
from .errors import ConfigError, GenerationError
from .logprobs import MAX_LOGPROBS, TokenLogprob, token_logprobs
from .runner import runner_for
from .sampling import SamplingConfig, TokenSampler, as_logits
from .stops import StopMatcher
from .structured import Grammar, GrammarMatcher
from .tokenizer import Tokenizer

MAX_FORCED_TOKENS = 16  # grammar-forced tokens checked in one forward


def check_logits(logits: np.ndarray, position: int) -> None:
    """GenerationError unless next-token logits are all finite. Sampling would fail with a bare
    RuntimeError (multinomial) and greedy argmax would silently pick a NaN's index, so a model
    whose weights or scales overflow (set after loading, where no file check sees them) is
    stopped here with one line. `position`: 1 for the first generated token."""
    if not bool(np.isfinite(logits).all()):
        raise GenerationError(f"the model produced non-finite logits at token {position} "
                              f"(its weights or scales are out of range)")


@dataclass(frozen=True)
class GenerationRequest:
    """One completion request, as the API, chat and server take it. `prompt` holds token ids with
    bos already in place. logprobs: None for none, k >= 0 for the chosen token's logprob and k
    alternatives. echo: the first response also carries the prompt's own logprobs. grammar: the
    output must match it (`bitnet158.structured`)."""
    prompt: tuple[int, ...]
    max_tokens: int = 100
    sampling: SamplingConfig = SamplingConfig()  # frozen, so one shared default is safe
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        # accept lists (and one bare stop string) but keep the request hashable and immutable
        object.__setattr__(self, "prompt", tuple(self.prompt))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    def validate(self) -> "GenerationRequest":
        if not self.prompt:
            raise ConfigError("the prompt is empty: give at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prompt):
            raise ConfigError("the prompt must be token ids: integers >= 0")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.sampling, SamplingConfig):
            raise ConfigError(f"sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        self.sampling.validate()
        StopMatcher(self.stop)  # refuses empty or non-text stop strings
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        k = self.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
            raise ConfigError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.echo, bool):
            raise ConfigError(f"echo must be true or false, got {self.echo!r}")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise ConfigError(f"grammar must be a bitnet158.structured.Grammar, got {type(self.grammar).__name__}")
        return self


@dataclass
class GenerationResponse:
    text: str                   # the new text this step (may be empty while a character is incomplete)
    token: int
    generated_tokens: int
    prompt_tokens: int
    tokens_per_second: float    # decode speed so far (excluding the prompt's prefill)
    prefill_seconds: float
    finish_reason: str | None   # "stop" (an end token or a stop string), "length", or None while running
    logprob: TokenLogprob | None = None        # when the request asks for logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo, first response only; [0] is None
    cached_tokens: int = 0      # prompt tokens whose keys were already cached (the serving engine's prompt cache)


class SequenceDecoder:
    """One sequence's state machine: next-token logits in, one `GenerationResponse` out.

    Samples (own generator, seeded from request.seed) among the tokens the request's grammar
    allows, stream-detokenizes, holds back text that may start a stop string, and finishes on an
    end token (eos or end-of-turn; its text is not emitted), a stop string, a completed grammar,
    or max_tokens (clamped to what `context` leaves after the prompt). Logprobs are the model's,
    before the grammar's mask.
    Timing fields are 0: the caller measures them and fills them with dataclasses.replace. A
    driver (stream_request, the batching engine) runs it like this:

        decoder = SequenceDecoder(tokenizer, request, context=model.config.max_seq_len)
        logits = model(prompt, cache, last_only=not request.echo)[0]
        if request.echo:
            decoder.prompt_logprobs(logits)       # carried by the first response
        response = decoder.step(logits[-1])
        while not decoder.finished:
            response = decoder.step(model([[decoder.next_input]], cache)[0, -1])
    """

    def __init__(self, tokenizer: Tokenizer, request: GenerationRequest, *, context: int | None = None):
        self.tokenizer = tokenizer
        self.request = request.validate()
        self.max_tokens = request.max_tokens
        if context is not None:
            if len(request.prompt) >= context:
                raise ConfigError(f"the prompt has {len(request.prompt)} tokens; "
                                  f"the model's context is {context}")
            self.max_tokens = min(self.max_tokens, context - len(request.prompt))
        self._sampler = TokenSampler(request.sampling, request.prompt, request.seed)
        self._end_ids = frozenset(tokenizer.end_ids)
        self._detok = tokenizer.streaming_detokenizer()
        self._stops = StopMatcher(request.stop)
        self._prompt_logprobs: list[TokenLogprob | None] | None = None
        self._grammar: GrammarMatcher | None = None  # built at the first step, which knows the vocabulary
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def forced_tokens(self, positions_left: int) -> list[int]:
        """Tokens the request's grammar forces after those sampled so far (none without one), as
        many as a forward over the next input and them may check: at most MAX_FORCED_TOKENS, and
        within max_tokens and the `positions_left` in the sequence's cache."""
        if self._grammar is None or self.finished:
            return []
        room = min(self.max_tokens - len(self.tokens), positions_left) - 1
        return self._grammar.forced()[:max(0, min(room, MAX_FORCED_TOKENS))]

    @property
    def next_input(self) -> int:
        """The id to feed the model next: the token sampled last."""
        if not self.tokens or self.finished:
            raise RuntimeError("next_input exists only after a step that did not finish the sequence")
        return self.tokens[-1]

    def prompt_logprobs(self, logits: Any) -> list[TokenLogprob | None]:
        """From the prefill's logits [T, vocab] at every prompt position: entry i is the logprob of
        prompt token i given the tokens before it (entry 0, with nothing before it, is None).
        Also remembered for the next `step`'s response."""
        prompt = self.request.prompt
        logits = as_logits(logits)
        if logits.ndim != 2 or logits.shape[0] != len(prompt):
            raise ValueError(f"prompt_logprobs needs logits [{len(prompt)}, vocab], got {list(logits.shape)}")
        k = self.request.logprobs or 0
        entries: list[TokenLogprob | None] = [None]
        entries += token_logprobs(self.tokenizer, logits[:-1], prompt[1:], k) if len(prompt) > 1 else []
        self._prompt_logprobs = entries
        return entries

    def step(self, logits: Any, draft: int | None = None) -> GenerationResponse:
        """Sample the next token from next-token logits [vocab] and answer what it adds. `draft`:
        a speculative drafter's proposal for this position, accepted or replaced so the token
        keeps the distribution it would have had without one (`sampling.sample_with_draft`)."""
        if self.finished:
            raise RuntimeError("the sequence has already finished")
        logits = as_logits(logits)
        check_logits(logits, len(self.tokens) + 1)
        allowed = logits
        if self.request.grammar is not None:
            if self._grammar is None:
                self._grammar = GrammarMatcher(self.request.grammar, self.tokenizer, logits.shape[-1])
            allowed = self._grammar.mask(logits)
        token = self._sampler(allowed, draft)
        self.tokens.append(token)
        if self._grammar is not None:
            self._grammar.accept(token)
        logprob = None
        if self.request.logprobs is not None:
            logprob = token_logprobs(self.tokenizer, logits[None], [token], self.request.logprobs)[0]
        if token in self._end_ids:  # its text (e.g. "<|eot_id|>") is a signal, not output
            text = self._finish(self._detok.finalize(), "stop")
        else:
            complete = self._grammar is not None and self._grammar.complete
            at_length = len(self.tokens) >= self.max_tokens
            piece = self._detok.add(token) + (self._detok.finalize() if at_length or complete else "")
            text = self._finish(piece, "stop" if complete else "length" if at_length else None)
        response = GenerationResponse(text, token, len(self.tokens), len(self.request.prompt), 0.0, 0.0,
                                      self.finish_reason, logprob, self._prompt_logprobs)
        self._prompt_logprobs = None  # only the first response carries the prompt's logprobs
        return response

    def _finish(self, piece: str, reason: str | None) -> str:
        """Run `piece` through the stop matcher; set finish_reason if a stop string or `reason`
        ends the sequence (a stop string wins: it is why the text ends where it does)."""
        text, stopped = self._stops.feed(piece)
        if stopped:
            self.finish_reason = "stop"
        elif reason is not None:
            text += self._stops.flush()
            self.finish_reason = reason
        return text


class PromptCache:
    """A KV cache that remembers which tokens it holds, so the next prompt that starts the same
    way (a chat's next turn) prefills only what is new. Positions past `tokens` hold stale keys;
    they are overwritten before anything reads them, so truncating is just moving the offset."""

    def __init__(self, model: Any, max_len: int | None = None):
        runner = runner_for(model)
        self.config: ModelConfig = runner.config
        self.kv = runner.new_cache(max_len)
        self.tokens: list[int] = []
        self.last_prefill = 0  # tokens the last prefill ran through the model (the rest were reused)

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    def reset(self) -> None:
        self.kv.reset()
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Keep the first n cached tokens (a rejected speculative draft's keys become stale)."""
        self.kv.offset = n
        del self.tokens[n:]

    def prefill(self, model: Any, prompt: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Run the prompt's uncached tail through the model; logits [1, vocab] for the last position,
        or with all_logits [len(prompt), vocab] for every position (then nothing is reused: the
        cached positions have no logits)."""
        runner = runner_for(model)
        if runner.config != self.config:
            raise ConfigError("this PromptCache was made for a different model configuration")
        prompt = list(prompt)
        reuse = 0
        if not all_logits:
            limit = min(len(self.tokens), len(prompt) - 1)  # the last prompt token always runs: its logits
            while reuse < limit and self.tokens[reuse] == prompt[reuse]:
                reuse += 1
        self.truncate(reuse)  # before the forward, so a failed one leaves tokens and offset in step
        logits = runner.logits(prompt[reuse:], self.kv, all_logits=all_logits)
        self.tokens.extend(prompt[reuse:])
        self.last_prefill = len(prompt) - reuse
        return logits

    def feed(self, model: Any, token: int) -> np.ndarray:
        """Run one generated token through the model; the next-token logits [vocab]."""
        return self.feed_many(model, [token])[0]

    def feed_many(self, model: Any, tokens: Sequence[int]) -> np.ndarray:
        """Run several tokens through the model in one forward (a token and the draft after it);
        logits [len(tokens), vocab], row i predicting what follows tokens[i]. With the native step
        each row computes exactly what it would alone, so a verified draft changes no output."""
        logits = runner_for(model).logits(list(tokens), self.kv)
        self.tokens.extend(tokens)
        return logits


def _prepare(model: Any, cache: PromptCache | None, prompt: Sequence[int]) -> tuple[PromptCache, int]:
    """The cache to run on (a fresh one when none is given) and the context it leaves."""
    config = runner_for(model).config
    vocab = config.vocab_size
    if any(not 0 <= t < vocab for t in prompt):  # the embedding would fail with a bare IndexError
        raise ConfigError(f"the prompt has token ids outside the model's vocabulary [0, {vocab})")
    if cache is None:
        cache = PromptCache(model)
    return cache, min(config.max_seq_len, cache.max_len)


def generate_step(model: Any, prompt: list[int], sampling: SamplingConfig | None = None, max_tokens: int = 100,
                  seed: int | None = None, *, cache: PromptCache | None = None) -> Iterator[int]:
    """Yield up to max_tokens new token ids (end tokens included: ids carry no text, so end
    tokens, stop strings and logprobs belong to `stream_generate`). The prompt is prefilled in one
    forward; each new token then costs one single-position forward over the KV cache."""
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token")
    sampler = TokenSampler(sampling or SamplingConfig(), prompt, seed)
    cache, context = _prepare(model, cache, prompt)
    if len(prompt) >= context:
        raise ConfigError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
    max_tokens = min(max_tokens, context - len(prompt))
    logits = cache.prefill(model, prompt)[-1]
    for i in range(max_tokens):
        check_logits(logits, i + 1)
        token = sampler(logits)
        yield token
        if i + 1 < max_tokens:  # the last token needs no forward (a chat's next prefill runs it)
            logits = cache.feed(model, token)


def _prompt_ids(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    ids = tokenizer.encode_prompt(prompt)  # with bos in front when the model expects it
    if not ids:  # an empty prompt starts a new document: bos, or eos where it doubles as bos
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    return ids


class Drafter(Protocol):
    """Proposes up to k tokens to follow `tokens` (speculative decoding; bitnet158.speculative)."""

    def propose(self, tokens: Sequence[int], k: int) -> list[int]: ...


@dataclass
class SpeculationStats:
    """What speculation did over a generation: tokens drafted, drafted tokens accepted, and the
    verifying forwards run (each also yields one token of its own)."""
    drafted: int = 0
    accepted: int = 0
    verify_forwards: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _next_rows(model, cache: PromptCache, decoder: SequenceDecoder, context: int, drafter: Drafter | None,
               length: DraftLength, stats: SpeculationStats | None
               ) -> tuple[list[tuple[np.ndarray, int | None]], int, bool]:
    """The logits to decide the next tokens from, each with the draft token proposed for it: one
    row without a draft; with one, the rows of a single forward over the last token and the draft.
    Also how many tokens were drafted, and whether the draft is the grammar's forced tokens (taken
    first: they need no drafter, and the model's choice among the tokens the grammar allows there
    is sampled as it would be without them)."""
    token = decoder.next_input
    forced = decoder.forced_tokens(context - len(cache.tokens))
    if forced:
        return list(zip(cache.feed_many(model, [token] + forced), forced + [None])), len(forced), True
    room = min(decoder.max_tokens - len(decoder.tokens), context - len(cache.tokens)) - 1
    k = min(length.choose(), room) if drafter is not None else 0
    draft = drafter.propose(cache.tokens + [token], k)[:k] if k > 0 else []  # k > 0 only with a drafter
    if not draft:
        rows = [(cache.feed(model, token), None)]
    else:
        if stats is not None:
            stats.drafted += len(draft)
            stats.verify_forwards += 1
        rows = list(zip(cache.feed_many(model, [token] + draft), draft + [None]))
    return rows, len(draft), False


def stream_request(model, tokenizer: Tokenizer, request: GenerationRequest, *,
                   cache: PromptCache | None = None, drafter: Drafter | None = None,
                   draft_tokens: DraftTokens = "auto",
                   stats: SpeculationStats | None = None) -> Iterator[GenerationResponse]:
    """`stream_generate` for a ready GenerationRequest. With a cache, the longest common prefix of
    cache.tokens and the prompt is reused (not with echo, which needs logits at every prompt
    position); afterwards cache.tokens is the prompt plus the generated tokens the model has run.

    With a `drafter`, each forward verifies up to `draft_tokens` proposed tokens at once ("auto":
    as many as pay on this machine and text so far, see `draft_length`): the tokens are decided
    row by row as without it (greedy: the same tokens; sampling: the same distribution) until one
    differs from the draft; the cache then drops the rows after it. `stats` collects the
    acceptance. Under a grammar the tokens it forces (a schema's keys and punctuation) are checked
    the same way, drafter or not, and sampled as without them, so even a seeded sampled run gives
    the same tokens."""
    cache, context = _prepare(model, cache, request.prompt)
    decoder = SequenceDecoder(tokenizer, request, context=context)
    start = time.perf_counter()
    logits = cache.prefill(model, request.prompt, all_logits=request.echo)
    if request.echo:
        decoder.prompt_logprobs(logits)
    rows: list[tuple[np.ndarray, int | None]] = [(logits[-1], None)]
    length = draft_length(draft_tokens)
    drafted, iterations, started, first, forced = 0, 0, 0.0, None, False
    while True:
        base = len(cache.tokens) - len(rows)  # cached tokens before the rows' inputs
        used = accepted = 0
        for row_logits, draft in rows:
            response = decoder.step(row_logits, None if forced else draft)
            used += 1
            now = time.perf_counter()
            if first is None:
                first = now
            decode_time = now - first
            rate = (response.generated_tokens - 1) / decode_time if decode_time > 0 else 0.0
            yield dataclasses.replace(response, tokens_per_second=rate, prefill_seconds=first - start)
            if decoder.finished or (draft is not None and response.token != draft):
                break
            if draft is not None:
                accepted += 1
        if stats is not None and not forced:
            stats.accepted += accepted
        if len(rows) > 1:  # rows after the first differing token were computed from a wrong input
            cache.truncate(base + used)
        if decoder.finished:
            return
        # An iteration is timed whole, drafting, forward and deciding its tokens, from one start to
        # the next: the draft length is chosen on what a token really costs. The first two are not
        # (the prefill's row, then a first step that warms up plans and caches).
        if drafter is not None and not forced:  # forced iterations say nothing about the drafter
            now = time.perf_counter()
            iterations += 1
            if iterations > 2:
                length.timed(drafted, now - started)
            if drafted:
                length.judged(accepted, rejected=accepted < drafted)
            started = now
        rows, drafted, forced = _next_rows(model, cache, decoder, context, drafter, length, stats)


def stream_generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], max_tokens: int = 100,
                    sampling: SamplingConfig | None = None, seed: int | None = None, *,
                    stop: Sequence[str] = (), logprobs: int | None = None, echo: bool = False,
                    cache: PromptCache | None = None, drafter: Drafter | None = None,
                    draft_tokens: DraftTokens = "auto", stats: SpeculationStats | None = None,
                    grammar: Grammar | None = None) -> Iterator[GenerationResponse]:
    """Stream the continuation of `prompt` (text, encoded with bos as the tokenizer wants, or
    token ids) as GenerationResponses; the last one has finish_reason set. `drafter`: speculative
    decoding (see `stream_request`). `grammar`: the output must match it (structured output)."""
    request = GenerationRequest(tuple(_prompt_ids(tokenizer, prompt)), max_tokens,
                                sampling or SamplingConfig(), stop, seed, logprobs, echo, grammar)  # stop → tuple
    return stream_request(model, tokenizer, request.validate(), cache=cache, drafter=drafter,
                          draft_tokens=draft_tokens, stats=stats)


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], max_tokens: int = 100,
             sampling: SamplingConfig | None = None, seed: int | None = None, *, stop: Sequence[str] = (),
             cache: PromptCache | None = None, drafter: Drafter | None = None,
             draft_tokens: DraftTokens = "auto", stats: SpeculationStats | None = None,
             grammar: Grammar | None = None) -> str:
    """The generated continuation of `prompt` as one string."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, sampling, seed,
                                                   stop=stop, cache=cache, drafter=drafter,
                                                   draft_tokens=draft_tokens, stats=stats, grammar=grammar))
