"""Hostile grammars: whatever JSON schema, regular expression or Lark text a client sends, compiling
it is a Grammar or a one-line ConfigError, a few masked steps under it finish or fail in one line,
and nothing takes long. (llguidance is Rust: a panic would arrive as a BaseException that no
`except Exception` catches, and a pathological pattern could cost seconds a token.)"""

from __future__ import annotations

import time

import numpy as np
import pytest
from engine_fixtures import tok  # noqa: F401  (module-scoped fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitnet158.errors import ConfigError, GenerationError
from bitnet158.structured import Grammar, GrammarMatcher

KEYWORDS = ["type", "properties", "items", "enum", "const", "anyOf", "oneOf", "allOf", "not", "$ref", "$defs",
            "pattern", "minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "minItems", "maxItems",
            "required", "additionalProperties", "format", "prefixItems", "x-guidance", "multipleOf"]
WORDS = ["string", "object", "array", "integer", "number", "boolean", "null", "#", "#/$defs/a", "#/properties/a",
         "^a+$", "(a|b)*c", "[", "email", "date-time", "uuid", "a", "whitespace_flexible"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15), st.text(max_size=8),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), st.sampled_from(WORDS))
SCHEMAS = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(WORDS), st.text(max_size=4)), inner,
                    max_size=5)), max_leaves=30)
PATTERN_ALPHABET = "ab01.*+?|()[]{}^$\\-,dws:=<>!"
LIMIT_S = 10.0  # compile plus a few steps; ordinary ones take milliseconds
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exercise(grammar: Grammar, tokenizer) -> None:
    """Compile against the tokenizer, then run a few masked steps choosing allowed tokens."""
    start = time.perf_counter()
    try:
        grammar.validate(tokenizer)
        matcher = GrammarMatcher(grammar, tokenizer, tokenizer.vocab_size)
        rng = np.random.default_rng(0)
        for _ in range(6):
            if matcher.complete:
                break
            masked = matcher.mask(rng.standard_normal(tokenizer.vocab_size).astype(np.float32))
            matcher.accept(int(np.argmax(masked)))
    except (ConfigError, GenerationError) as exc:
        message = str(exc)
        assert message and "\n" not in message, message
    assert time.perf_counter() - start < LIMIT_S


@SETTINGS
@given(schema=SCHEMAS)
def test_any_json_schema(tok, schema):  # noqa: F811
    try:
        grammar = Grammar.json_schema(schema)
    except ConfigError as exc:  # not an object or true
        assert "\n" not in str(exc)
        return
    exercise(grammar, tok)


@SETTINGS
@given(pattern=st.text(alphabet=PATTERN_ALPHABET, min_size=1, max_size=24))
def test_any_regex(tok, pattern):  # noqa: F811
    exercise(Grammar.regex(pattern), tok)


@SETTINGS
@given(body=st.text(alphabet="startb: \"a|()*+?/%[]\n", min_size=1, max_size=40))
def test_any_lark_text(tok, body):  # noqa: F811
    exercise(Grammar.lark(body), tok)


@pytest.mark.parametrize("grammar", [
    Grammar.regex("(a{1,1000}){1,1000}"),
    Grammar.regex("((a|aa)+)+b"),
    Grammar.json_schema({"type": "string", "pattern": "^(a+)+$"}),
    Grammar.json_schema({"type": "array", "items": {"$ref": "#"}, "minItems": 1}),
    Grammar.json_schema({"anyOf": [{"type": "string", "pattern": f"^{'a' * i}[0-9]{{{i}}}$"} for i in range(1, 60)]}),
    Grammar.lark("start: a\na: a a | \"x\""),
])
def test_known_pathological_grammars(tok, grammar):  # noqa: F811
    exercise(grammar, tok)
