"""Structured output: generation constrained to a regular expression, a JSON schema or a Lark
grammar, in the Python API and through the server's `response_format`.

The references are independent of llguidance: a brute-force regex mask (every vocabulary entry
tried against the `regex` module's partial matching) for the greedy choice at each step, and
json.loads plus hand-written checks for schemas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import regex
import torch
from engine_fixtures import GREEDY, model, tok  # noqa: F401  (module-scoped fixtures)
from serve_helpers import running_server

from bitnet158 import checkpoint
from bitnet158.cli.serve import engine_loader
from bitnet158.errors import ConfigError
from bitnet158.generate import GenerationRequest, SequenceDecoder, generate, stream_generate
from bitnet158 import save_packed
from bitnet158.sampling import SamplingConfig
from bitnet158.serve.api import create_app
from bitnet158.structured import Grammar

PATTERN = r"[0-9]{3}-[a-z]{2,5}"
SCHEMA = {"type": "object",
          "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "ok", "n"], "additionalProperties": False}


def check_schema_value(text: str) -> dict:
    value = json.loads(text)
    assert list(value) == ["color", "ok", "n"]  # the schema's order, compact
    assert value["color"] in ("red", "green") and isinstance(value["ok"], bool)
    assert isinstance(value["n"], int) and not isinstance(value["n"], bool) and 0 <= value["n"] <= 99
    assert text == json.dumps(value, separators=(",", ":"))
    return value


def logits_after(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float().numpy()


def test_greedy_regex_picks_the_best_token_the_pattern_allows(model, tok):  # noqa: F811
    """At every step the token is the highest-logit one among those a brute-force partial match
    allows (and an end token only once the whole pattern matches)."""
    prompt = tok.encode_prompt("def ")
    responses = list(stream_generate(model, tok, prompt, 40, GREEDY, grammar=Grammar.regex(PATTERN)))
    text = "".join(r.text for r in responses)
    assert regex.fullmatch(PATTERN, text) and responses[-1].finish_reason == "stop"
    ids, so_far = list(prompt), ""
    for r in responses:
        logits = logits_after(model, ids)
        allowed = np.zeros(logits.shape[0], dtype=bool)
        for t in range(tok.vocab_size):
            if t in tok.end_ids:
                allowed[t] = regex.fullmatch(PATTERN, so_far) is not None
            else:
                piece = tok.token_bytes(t).decode("utf-8", errors="replace")
                allowed[t] = regex.fullmatch(PATTERN, so_far + piece, partial=True) is not None
        assert r.token == int(np.argmax(np.where(allowed, logits, -np.inf)))
        ids.append(r.token)
        so_far += tok.token_bytes(r.token).decode("utf-8")


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_json_schema_output_parses_and_matches(model, tok, seed):  # noqa: F811
    sampling = GREEDY if seed is None else SamplingConfig(temperature=1.0, top_p=0.95)
    responses = list(stream_generate(model, tok, "The ", 80, sampling, seed, grammar=Grammar.json_schema(SCHEMA)))
    check_schema_value("".join(r.text for r in responses))
    assert responses[-1].finish_reason == "stop"  # the closed object ends it: nothing may follow


@pytest.mark.parametrize("grammar", [Grammar.json_schema(SCHEMA), Grammar.regex("(ab|[0-9]){1,12}c")])
def test_speculation_keeps_the_grammar_and_the_tokens(model, tok, grammar):  # noqa: F811
    """Drafts the grammar forbids have probability 0 and are rejected by the usual rule: greedy
    output with prompt-lookup drafts equals plain greedy output under the same grammar."""
    from bitnet158.generate import SpeculationStats
    from bitnet158.speculative import PromptLookup
    prompt = "ababab 1212 ababab 1212 "
    plain = generate(model, tok, prompt, 40, GREEDY, grammar=grammar)
    stats = SpeculationStats()
    drafted = generate(model, tok, prompt, 40, GREEDY, grammar=grammar, drafter=PromptLookup(), draft_tokens=3,
                       stats=stats)
    assert drafted == plain


KEYED = {"type": "object", "properties": {"customer_identifier": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "delivery_is_express": {"type": "boolean"},
                                          "destination": {"enum": ["warehouse_north", "warehouse_south"]}},
         "required": ["customer_identifier", "delivery_is_express", "destination"], "additionalProperties": False}


def one_by_one(model, tok, prompt: str, max_tokens: int, sampling: SamplingConfig, seed, grammar) -> list[int]:  # noqa: F811
    """The reference: a decoder fed one forward per token (no drafts, no forced tokens)."""
    from bitnet158.generate import PromptCache
    request = GenerationRequest(tuple(tok.encode_prompt(prompt)), max_tokens, sampling, seed=seed, grammar=grammar)
    decoder, cache = SequenceDecoder(tok, request), PromptCache(model)
    response = decoder.step(cache.prefill(model, request.prompt)[-1])
    while not decoder.finished:
        response = decoder.step(cache.feed(model, decoder.next_input))
    assert response.finish_reason == "stop"
    return decoder.tokens


@pytest.mark.parametrize("sampling, seed", [(GREEDY, None), (SamplingConfig(temperature=1.0), 3),
                                            (SamplingConfig(temperature=0.7, top_k=20), 11)])
def test_forced_tokens_run_in_one_forward_and_change_nothing(model, tok, monkeypatch, sampling, seed):  # noqa: F811
    """A schema's keys are forced: they are checked in one forward instead of one each, and the
    tokens (seeded sampling included) equal one-forward-per-token decoding's."""
    from bitnet158.generate import PromptCache
    grammar = Grammar.json_schema(KEYED)
    expected = one_by_one(model, tok, "The ", 120, sampling, seed, grammar)
    forwards = []
    for name in ("feed", "feed_many"):
        original = getattr(PromptCache, name)
        monkeypatch.setattr(PromptCache, name, lambda self, *a, _f=original, **k: forwards.append(1) or _f(self, *a, **k))
    got = [r.token for r in stream_generate(model, tok, "The ", 120, sampling, seed, grammar=grammar)]
    assert got == expected
    check = json.loads(tok.decode(got))
    assert set(check) == set(KEYED["properties"])
    assert len(forwards) < len(got) / 2  # most tokens were forced


def test_lark_grammar_and_json_object(model, tok):  # noqa: F811
    lark = 'start: "yes" | "no" | "maybe"'
    assert generate(model, tok, "for ", 10, GREEDY, grammar=Grammar.lark(lark)) in ("yes", "no", "maybe")
    text = generate(model, tok, "for ", 60, SamplingConfig(temperature=1.0), seed=5, grammar=Grammar.json_object())
    assert text.startswith("{")  # an object, closed or cut at max_tokens


def test_max_tokens_cuts_a_grammar_short(model, tok):  # noqa: F811
    responses = list(stream_generate(model, tok, "The ", 3, GREEDY, grammar=Grammar.json_schema(SCHEMA)))
    assert responses[-1].finish_reason == "length" and "".join(r.text for r in responses).startswith('{"')


def test_logprobs_stay_the_models(model, tok):  # noqa: F811
    """The grammar decides what may be sampled; the reported logprobs are the model's own."""
    prompt = tuple(tok.encode_prompt("def "))
    plain = SequenceDecoder(tok, GenerationRequest(prompt, 5, GREEDY, logprobs=2))
    constrained = SequenceDecoder(tok, GenerationRequest(prompt, 5, GREEDY, logprobs=2, grammar=Grammar.regex("[0-9]+")))
    logits = logits_after(model, list(prompt))
    a, b = plain.step(logits), constrained.step(logits)
    assert b.text.isdigit() and b.logprob.top == a.logprob.top


@pytest.mark.parametrize("make, fragment", [
    (lambda: Grammar.regex("["), "regex grammar is invalid"),
    (lambda: Grammar.json_schema({"type": "foo"}), "json_schema grammar is invalid"),
    (lambda: Grammar.json_schema("{not json"), "not valid JSON"),
    (lambda: Grammar.json_schema([1, 2]), "a JSON schema is an object"),
    (lambda: Grammar.lark("start: undefined_rule"), "lark grammar is invalid"),
    (lambda: Grammar.regex("a" * (2**20 + 1)), "at most"),
    (lambda: Grammar("xml", "<a/>"), "grammar kind must be one of"),
])
def test_bad_grammars_are_one_line_errors(tok, make, fragment):  # noqa: F811
    with pytest.raises(ConfigError) as info:
        make().validate(tok)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_a_hostile_pattern_is_bounded(model, tok):  # noqa: F811
    """Nested counted repetitions compile lazily and each mask stays within llguidance's fuel."""
    text = generate(model, tok, "def ", 8, GREEDY, grammar=Grammar.regex("(a{1,1000}){1,1000}b"))
    assert regex.fullmatch("a*b?", text)


# ---------------------------------------------------------------- through the server

@pytest.fixture(scope="module")
def served_dir(tmp_path_factory, tok):  # noqa: F811
    """The engine fixtures' shapes with room for tool definitions in the prompt (1,024 positions)."""
    import bitnet158 as bn
    from bitnet158.config import ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=1024)
    path = tmp_path_factory.mktemp("structured") / "tiny"
    save_packed(bn.pack_(bn.Transformer(cfg)).eval(), path, tok)
    return path


@pytest.fixture(scope="module")
def served(served_dir):
    app = create_app(engine_loader(served_dir, max_concurrency=3, max_queue=4), model_name="tiny")
    with running_server(app) as url:
        yield url, app.state.server.engine


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_the_engine_checks_forced_tokens_several_a_forward(client, served, served_dir):
    """Through the batching engine too: a keyed schema's forced tokens ride in the same forward as
    the sequence's next token, and the answer equals one-forward-per-token decoding."""
    engine = served[1]
    model, tk = checkpoint.load(served_dir)
    before = sum(engine.batch_sizes.values()) + engine.mixed_forwards
    reply = client.completions.create(model="tiny", prompt="The ", max_tokens=200, temperature=0,
                                      extra_body={"response_format": {"type": "json_schema",
                                                                      "json_schema": {"name": "k", "schema": KEYED}}})
    forwards = sum(engine.batch_sizes.values()) + engine.mixed_forwards - before
    expected = one_by_one(model, tk, "The ", 200, GREEDY, None, Grammar.json_schema(KEYED))
    assert reply.choices[0].text == tk.decode(expected) and reply.usage.completion_tokens == len(expected)
    assert forwards < len(expected) / 2


def test_server_json_schema_equals_generate(client, served_dir):
    model, tk = checkpoint.load(served_dir)
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA, "strict": True}}
    got = client.completions.create(model="tiny", prompt="The ", max_tokens=80, temperature=0,
                                    extra_body={"response_format": fmt})
    expected = generate(model, tk, "The ", 80, GREEDY, grammar=Grammar.json_schema(SCHEMA))
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "stop"
    check_schema_value(expected)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "colour?"}],
                                          max_tokens=80, temperature=0, response_format=fmt)
    check_schema_value(chat.choices[0].message.content)


def test_openai_parse_with_a_pydantic_model(client):
    """The client's own structured-output path: a pydantic model sent as a strict json_schema
    (with $defs and a nested list), parsed back into the model by the client."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Item(BaseModel):
        kind: Literal["fruit", "tool"]
        count: int = Field(ge=0, le=9)

    class Basket(BaseModel):
        owner: Literal["ann", "bob"]
        items: list[Item] = Field(max_length=3)

    for seed in range(3):
        reply = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "basket?"}],
                                              response_format=Basket, max_tokens=120, temperature=1.0, seed=seed)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "stop" and isinstance(message.parsed, Basket), message.content
        assert Basket.model_validate_json(message.content) == message.parsed


def test_forced_rows_beside_other_requests_change_no_answer(client, served_dir):
    """Constrained and free requests at once (the engine mixes forced rows, plain decode rows and
    prefill chunks in one forward): each answer equals generate()'s for the same request."""
    import concurrent.futures
    model, tk = checkpoint.load(served_dir)
    fmt = {"type": "json_schema", "json_schema": {"name": "k", "schema": KEYED}}
    jobs = [(f"{word} ", i % 2 == 0) for i, word in enumerate(["The", "def", "for", "with", "print", "return"])]

    def one(job):
        prompt, constrained = job
        extra = {"response_format": fmt} if constrained else {}
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=120, temperature=0,
                                         extra_body=extra).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    for (prompt, constrained), answer in zip(jobs, answers):
        grammar = Grammar.json_schema(KEYED) if constrained else None
        assert answer == generate(model, tk, prompt, 120, GREEDY, grammar=grammar)


def test_server_streams_side_by_side_each_match(client):
    import concurrent.futures

    def one(seed: int) -> str:
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"n{seed}"}], max_tokens=80, temperature=1.0,
            seed=seed, stream=True, response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for text in pool.map(one, range(6)):
            check_schema_value(text)


@pytest.mark.parametrize("fmt, fragment", [
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "foo"}}}, "json_schema grammar is invalid"),
    ({"type": "json_schema"}, "needs a json_schema object"),
    ({"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}, "name"),
    ({"type": "yaml"}, "type"),
    ({"type": "json_schema", "json_schema": {"name": "r", "schema": [1]}}, "schema"),
])
def test_server_refuses_bad_formats(client, fmt, fragment):
    import openai
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"response_format": fmt})
    assert fragment in info.value.body["message"] and info.value.body["param"].startswith("response_format")
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices  # still serving


# ---------------------------------------------------------------- the CLI

def test_cli_generate_json_schema(served_dir, tmp_path, capsys):
    from bitnet158.cli import main
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    capsys.readouterr()
    assert main(["generate", str(served_dir), "--prompt", "The ", "--max-tokens", "80", "--temperature", "0",
                 "--json-schema", str(schema), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ")
    check_schema_value(out[len("The "):].rstrip("\n"))


@pytest.mark.parametrize("argv, fragment", [
    (["--json-schema", "missing.json"], "cannot read the JSON schema"),
    (["--regex", "("], "regex grammar is invalid"),
])
def test_cli_refuses_bad_grammars(served_dir, tmp_path, capsys, monkeypatch, argv, fragment):
    from bitnet158.cli import main
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["generate", str(served_dir), "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitnet158: error: ") and fragment in err and "\n" not in err, err


def test_cli_takes_one_grammar_option(served_dir, capsys):
    from bitnet158.cli import main
    with pytest.raises(SystemExit):
        main(["generate", str(served_dir), "--json", "--regex", "a"])
    assert "not allowed with argument --json" in capsys.readouterr().err


# ---------------------------------------------------------------- other tokenizer families

def _spm_backend(tmp_path):
    import io
    spm = pytest.importorskip("sentencepiece")
    from bitnet158.interop.spm_tokenizer import sentencepiece_backend
    from bitnet158.train.data.corpus import default_corpus
    lines = [line for doc in default_corpus().train[:100] for line in doc.text.splitlines() if line.strip()]
    blob = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=blob, vocab_size=400, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(blob.getvalue())
    return sentencepiece_backend(tmp_path / "tokenizer.model"), "</s>"


def _llama3_backend(tmp_path):
    from hf_fixtures import llama3_like_tokenizer
    return llama3_like_tokenizer(), "<|end_of_text|>"


@pytest.mark.parametrize("backend", [_spm_backend, _llama3_backend], ids=["sentencepiece-byte-fallback", "llama3-like"])
def test_imported_tokenizers_are_masked_right(tmp_path, backend):
    """A LLaMA-style SentencePiece vocabulary (Metaspace, byte fallback) and a LLaMA 3-like
    byte-level one: whatever the logits, the text decoded from the masked choices matches."""
    from bitnet158.structured import GrammarMatcher
    from bitnet158.tokenizer import Tokenizer
    vocabulary, eos = backend(tmp_path)
    tk = Tokenizer(vocabulary, eos_token=eos)
    rng = np.random.default_rng(0)
    for trial in range(3):
        matcher, ids = GrammarMatcher(Grammar.regex(PATTERN), tk, tk.vocab_size), []
        while not matcher.complete and len(ids) < 40:
            ids.append(int(np.argmax(matcher.mask(rng.standard_normal(tk.vocab_size).astype(np.float32)))))
            matcher.accept(ids[-1])
        assert matcher.complete and regex.fullmatch(PATTERN, tk.decode(ids)), tk.decode(ids)


# ---------------------------------------------------------------- tool calls (serve/tools.py)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the forecast",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    else:
        assert name == "get_time" and args in ({"zone": "UTC"}, {"zone": "CET"})


def test_named_tool_choice_is_a_matching_call(client, served_dir):
    from bitnet158.chat_template import encode_chat
    reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK], tool_choice=NAMED,
                                           max_tokens=60, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments)
    model, tk = checkpoint.load(served_dir)  # the same prompt (tools rendered) and schema through generate()
    prompt = encode_chat(tk, ASK, tools=[WEATHER, CLOCK])
    expected = generate(model, tk, prompt, 60, GREEDY, grammar=Grammar.json_schema(WEATHER["function"]["parameters"]))
    assert json.loads(call.function.arguments) == json.loads(expected)


def test_required_tool_choice_calls_one_of_the_tools(client):
    names = set()
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, CLOCK],
                                               tool_choice="required", max_tokens=60, temperature=1.0, seed=seed)
        (call,) = reply.choices[0].message.tool_calls
        check_call(call.function.name, call.function.arguments)
        names.add(call.function.name)
    assert names <= {"get_weather", "get_time"}


def test_a_streamed_call_equals_the_whole_one(client):
    kwargs = dict(model="tiny", messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=60, temperature=0)
    whole_call = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) > 1 and {c.index for c in calls} == {0}  # streamed in pieces
    assert calls[0].function.name == whole_call.function.name
    assert "".join(c.function.arguments for c in calls) == whole_call.function.arguments


def test_auto_answers_plain_text_as_content_and_takes_tool_history(client):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "4 C, snow"}]
    reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=12,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason in ("stop", "length")


def test_tool_history_reaches_the_template_as_objects(client, served_dir):
    """/tokenize renders as chat does: the tools block, and an earlier call's JSON-text arguments
    as an object (what transformers' templates expect); its count is the chat's prompt_tokens."""
    import httpx
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
                         {"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "4 C"}]
    url = str(client.base_url).removesuffix("/v1/").removesuffix("/v1")
    got = httpx.post(url + "/tokenize", json={"messages": history, "tools": [WEATHER]}, timeout=30).json()
    _, tk = checkpoint.load(served_dir)
    text = tk.decode(got["tokens"])
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}' in text
    assert '"name": "get_weather", "description": "the forecast"' in text and text.endswith("Tool: 4 C\nAssistant:")
    reply = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=1, temperature=0)
    assert reply.usage.prompt_tokens == got["count"]


def _responses(pieces: list[str], finish: str = "stop") -> list:
    from bitnet158.generate import GenerationResponse
    return [GenerationResponse(piece, 0, i + 1, 3, 0.0, 0.0, finish if i == len(pieces) - 1 else None)
            for i, piece in enumerate(pieces)]


def test_auto_shape_turns_a_tagged_json_answer_into_a_call(tok):  # noqa: F811
    from bitnet158.serve.responses import ToolCallShape
    shape = ToolCallShape(tok, "tiny", logprobs=False, names=["get_weather"], forced=False)
    pieces = [" <tool", "_call>", '{"name": "get_weather", ', '"arguments": {"city": "Oslo", "days": 2}}', "</tool_call>"]
    chunks = [shape.add(r) for r in _responses(pieces)]
    assert chunks[:-1] == [None] * 4  # held back while it may become a call
    delta = chunks[-1]["choices"][0]["delta"]["tool_calls"][0]
    assert delta["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert shape.whole()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_time", "parameters": {"zone": "UTC"}}', [("get_time", {"zone": "UTC"})]),  # LLaMA 3.1's key
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]),
    ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]',
     [("get_time", {}), ("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call> and then some text', None),
    ('{"name": "get_time", "arguments": {}} trailing', None),
    ('{"name": "delete_all", "arguments": {}}', None),
    ('{"name": "get_time", "arguments": "zone=UTC"}', None),
    ('[]', None),
    ('<tool_call>{"name": "get_time", "arguments": {}}', None),
])
def test_parse_calls(text, expected):
    from bitnet158.serve.tools import parse_calls
    assert parse_calls(text, ["get_weather", "get_time"]) == expected


@pytest.mark.parametrize("parallel, n", [(True, 2), (False, 1)])
def test_auto_shape_returns_parallel_calls(tok, parallel, n):  # noqa: F811
    from bitnet158.serve.responses import ToolCallShape
    shape = ToolCallShape(tok, "tiny", logprobs=False, names=["get_weather", "get_time"], forced=False,
                          parallel=parallel)
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    last = [shape.add(r) for r in _responses([text[:30], text[30:]])][-1]
    parts = last["choices"][0]["delta"]["tool_calls"]
    assert [p["index"] for p in parts] == list(range(n)) and parts[0]["function"]["name"] == "get_weather"
    calls = shape.whole()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"][:n]
    assert len({c["id"] for c in calls}) == n


@pytest.mark.parametrize("text, could", [("", True), ("  ", True), ("<tool", True), ("<tool_call>{", True),
                                         ("{", True), ("[", True), ("[ {", True), ("[1", False), ("<b>", False),
                                         ("It", False), ("- [x]", False)])
def test_what_may_still_become_a_call(text, could):
    from bitnet158.serve.tools import may_become_call
    assert may_become_call(text) is could


def test_auto_shape_streams_text_once_it_cannot_be_a_call(tok):  # noqa: F811
    from bitnet158.serve.responses import ToolCallShape
    shape = ToolCallShape(tok, "tiny", logprobs=False, names=["get_weather"], forced=False)
    chunks = [shape.add(r) for r in _responses([" ", "It", " snows", " {not a call}"])]
    assert chunks[0] is None and chunks[1]["choices"][0]["delta"] == {"content": " It"}
    assert [c["choices"][0]["delta"] for c in chunks[2:]] == [{"content": " snows"}, {"content": " {not a call}"}]
    assert shape.whole()["choices"][0]["message"] == {"role": "assistant", "content": " It snows {not a call}"}


def test_an_unknown_or_cut_call_stays_text(tok):  # noqa: F811
    from bitnet158.serve.responses import ToolCallShape
    for pieces, finish, forced in (([' {"name": "rm_rf", "arguments": {}}'], "stop", False),
                                   (['{"name": "get_weather", "arguments": {"ci'], "length", True)):
        shape = ToolCallShape(tok, "tiny", logprobs=False, names=["get_weather"], forced=forced)
        for r in _responses(pieces, finish):
            shape.add(r)
        choice = shape.whole()["choices"][0]
        assert choice["message"]["content"] == pieces[0] and choice["finish_reason"] == finish


def test_a_named_call_streams_its_arguments(tok):  # noqa: F811
    """OpenAI's streamed call: id, type and name with the first fragment, then fragments; a call cut
    by max_tokens stays a call with finish_reason length."""
    from bitnet158.serve.responses import ToolCallShape
    for finish, expected in (("stop", "tool_calls"), ("length", "length")):
        shape = ToolCallShape(tok, "tiny", logprobs=False, names=["get_weather"], forced=True, named="get_weather")
        pieces = ['{"city"', ':"Oslo"', ',"days":2}']
        chunks = [shape.add(r) for r in _responses(pieces, finish)]
        parts = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks]
        assert parts[0]["id"].startswith("call_") and parts[0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
        assert parts[1:] == [{"index": 0, "function": {"arguments": p}} for p in pieces[1:]]
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, expected]
        choice = shape.whole()["choices"][0]
        assert choice["finish_reason"] == expected and choice["message"]["content"] is None
        assert choice["message"]["tool_calls"][0]["function"]["arguments"] == "".join(pieces)


@pytest.mark.parametrize("changes, fragment", [
    ({"tool_choice": "required"}, "required needs tools"),
    ({"tools": [CLOCK], "tool_choice": NAMED}, "not one of the tools"),
    ({"tools": [WEATHER, WEATHER]}, "share a name"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"not": {}}}}], "tool_choice": "required"},
     "grammar is invalid"),
    ({"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "forced tool call"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "name"),
])
def test_bad_tool_requests_are_400s(client, changes, fragment):
    import openai
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **changes)
    assert fragment in info.value.body["message"], info.value.body
