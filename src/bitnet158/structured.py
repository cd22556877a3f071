"""Structured output: generation that must match a JSON schema, a regular expression or a Lark
grammar (OpenAI's `response_format`, `bitnet158 generate --json-schema`).

Before each token is sampled, every vocabulary entry that cannot continue a match is set to -inf,
so sampling (greedy or not, with penalties, top-k/p, drafts) only ever picks a token that keeps
the text on the grammar; once the grammar is complete and nothing more may follow, the sequence
ends with finish_reason "stop". The masks come from llguidance (a Rust library: an Earley parser
over the grammar, run across the tokenizer's byte trie), which bounds the work a hostile grammar
can cause per token and reports a bad one as an error rather than hanging.

JSON is generated compact by default (no whitespace between tokens: small models otherwise spend
their tokens on newlines and indentation); a schema's own `"x-guidance": {"whitespace_flexible":
true}` allows it again.

>>> grammar = Grammar.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}})
>>> grammar.kind
'json_schema'
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, GenerationError, first_line
from .tokenizer import Tokenizer

GrammarKind = Literal["json_schema", "regex", "lark"]
KINDS: tuple[str, ...] = ("json_schema", "regex", "lark")
MAX_GRAMMAR_CHARS = 1 << 20  # a grammar's source text; llguidance's own limits bound the work
_JSON_DEFAULTS = {"whitespace_flexible": False}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # a base dependency; a broken install still gets one line
        raise ConfigError("structured output needs the llguidance package "
                          f"(pip install llguidance): {first_line(exc)}") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What a generation must match. `source` is the JSON schema as JSON text (kind "json_schema"),
    the pattern ("regex", matched against the whole output) or the grammar ("lark")."""
    kind: GrammarKind
    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> "Grammar":
        """A JSON value matching `schema` (a dict, true for any JSON value, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ConfigError(f"the JSON schema is not valid JSON: {first_line(exc)}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError(f"a JSON schema is an object (or true), got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema, ensure_ascii=False))  # key order is the output's order

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> "Grammar":
        return cls("lark", grammar)

    @staticmethod
    def read(path: str | os.PathLike, what: str) -> str:
        """A grammar or schema file's text, refused (one line) when missing, too long or not UTF-8."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_GRAMMAR_CHARS * 4 + 1)  # UTF-8: at most 4 bytes a character
            if len(data) > MAX_GRAMMAR_CHARS * 4:
                raise ConfigError(f"the {what} {str(path)!r} is longer than {MAX_GRAMMAR_CHARS} characters")
            text = data.decode("utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the {what} {str(path)!r}: {exc.strerror or first_line(exc)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"the {what} {str(path)!r} is not UTF-8 text") from None
        if len(text) > MAX_GRAMMAR_CHARS:
            raise ConfigError(f"the {what} {str(path)!r} is longer than {MAX_GRAMMAR_CHARS} characters")
        return text

    def validate(self, tokenizer: Tokenizer | None = None) -> "Grammar":
        """ConfigError (one line) unless llguidance compiles it (against `tokenizer` when given)."""
        if self.kind not in KINDS:
            raise ConfigError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"a {self.kind} grammar needs its text")
        if len(self.source) > MAX_GRAMMAR_CHARS:
            raise ConfigError(f"the {self.kind} grammar has {len(self.source)} characters; "
                              f"at most {MAX_GRAMMAR_CHARS}")
        llg = _llguidance()
        lltok = _lltokenizer(tokenizer) if tokenizer else None
        error = _guarded(f"the {self.kind} grammar is invalid", ConfigError,
                         lambda: llg.LLMatcher.validate_grammar(self._compiled(llg), lltok, limits=_limits(llg)))
        if error:
            raise ConfigError(f"the {self.kind} grammar is invalid: {_message(error)}")
        return self

    def _compiled(self, llg: Any) -> str:
        if self.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(self.source, defaults=_JSON_DEFAULTS)
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        return llg.LLMatcher.grammar_from_lark(self.source)


def _guarded(what: str, error: type[Exception], call: Any, *args: Any, **kwargs: Any) -> Any:
    """call(*args) with anything llguidance raises as `error` (one line): its Rust panics arrive
    as pyo3's PanicException, a BaseException, which would otherwise pass every handler."""
    try:
        return call(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: B036  (see above)
        raise error(f"{what}: {_message(str(exc)) if str(exc).strip() else type(exc).__name__}") from None


def _limits(llg: Any) -> Any:
    return llg.LLParserLimits(verbose_errors=False)  # errors name the problem, not parser internals


def _message(error: str) -> str:
    """llguidance's error as one line, without its position prefix ("at 1(8): ...")."""
    line = error.strip().splitlines()[0] if error.strip() else "unknown error"
    head, sep, rest = line.partition(": ")
    return rest if sep and head.startswith("at ") else line


# One LLTokenizer per (tokenizer, vocabulary size): building one walks the whole vocabulary.
_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, dict[int | None, Any]]" = weakref.WeakKeyDictionary()


def _lltokenizer(tokenizer: Tokenizer, vocab: int | None = None) -> Any:
    if vocab == tokenizer.vocab_size:
        vocab = None  # the same table: the server's check and its engine's matchers share one
    per_vocab = _TOKENIZERS.setdefault(tokenizer, {})
    if vocab not in per_vocab:
        llg = _llguidance()
        per_vocab[vocab] = _guarded("structured output cannot use this tokenizer", ConfigError, llg.LLTokenizer,
                                    tokenizer.to_str(), n_vocab=vocab, eos_token=list(tokenizer.end_ids))
    return per_vocab[vocab]


class GrammarMatcher:
    """One sequence's position in a grammar: `mask` the next-token logits, `accept` the token
    sampled from them; `complete` once nothing more may follow."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, vocab: int):
        llg = _llguidance()
        self.vocab = vocab
        self._matcher = _guarded(f"the {grammar.kind} grammar is invalid", ConfigError, lambda: llg.LLMatcher(
            _lltokenizer(tokenizer, vocab), grammar._compiled(llg), limits=_limits(llg), log_level=0))
        if self._matcher.is_error():
            raise ConfigError(f"the {grammar.kind} grammar is invalid: {_message(self._matcher.get_error())}")

    def allowed(self) -> np.ndarray:
        """A bool per vocabulary entry: may it come next?"""
        mask = _guarded("the grammar could not continue", GenerationError, self._matcher.compute_bitmask)
        bits = np.frombuffer(mask, dtype=np.uint8)
        if self._matcher.is_error():
            raise GenerationError(f"the grammar could not continue: {_message(self._matcher.get_error())}")
        return np.unpackbits(bits, bitorder="little")[: self.vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` [vocab] with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        if not allowed.any():
            raise GenerationError("the grammar allows no next token")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)

    def accept(self, token: int) -> None:
        if not _guarded("the grammar could not continue", GenerationError, self._matcher.consume_token, int(token)):
            raise GenerationError(f"token {token} does not continue the grammar: "
                                  f"{_message(self._matcher.get_error())}")

    def forced(self) -> list[int]:
        """The tokens the grammar forces next, whatever the model says (JSON keys and punctuation
        of a schema): worth checking in one forward, as speculative drafts are."""
        return [int(t) for t in _guarded("the grammar could not continue", GenerationError,
                                         self._matcher.compute_ff_tokens)]

    @property
    def complete(self) -> bool:
        """The grammar is matched and allows nothing more (not even more of the same)."""
        return bool(self._matcher.is_stopped())
