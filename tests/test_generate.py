"""Generation: cached against a plain uncached argmax loop, end tokens and stop strings, logprobs
and echo against the model's own log_softmax, seeds, the request's checks, and a PromptCache that
keeps a chat's prefix between turns. (Sampling by hand: test_sampling; stop strings: test_stops.)"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet158 import Transformer, preset
from bitnet158.errors import ConfigError
from bitnet158.generate import (GenerationRequest, PromptCache, SequenceDecoder, generate, generate_step,
                                stream_generate)
from bitnet158.logprobs import token_text
from bitnet158.sampling import SamplingConfig
from bitnet158.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = preset("tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=300, max_seq_len=64, mode="fp")
    return Transformer(cfg).eval()


def test_greedy_generation_equals_uncached_argmax_loop(model):
    prompt = [5, 17, 42]
    got = list(generate_step(model, prompt, SamplingConfig(temperature=0.0), max_tokens=12))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_generation_stops_at_context_and_rejects_bad_prompts(model):
    got = list(generate_step(model, list(range(60)), SamplingConfig(temperature=0.0), max_tokens=100))
    assert len(got) == 4
    with pytest.raises(ConfigError):
        list(generate_step(model, [], max_tokens=3))


def test_stream_pieces_join_to_generate_and_seed_is_reproducible(model):
    tok = Tokenizer.train(["def f(x):\n    return x * 2  # é ü 中文\n"] * 30, vocab_size=300)
    cfg = SamplingConfig(temperature=1.0, top_p=0.9)
    pieces = list(stream_generate(model, tok, "def", max_tokens=10, sampling=cfg, seed=3))
    assert "".join(p.text for p in pieces) == generate(model, tok, "def", 10, cfg, seed=3)
    assert pieces[-1].finish_reason in ("stop", "length")
    assert pieces[-1].generated_tokens == len(pieces)


GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def roles_tok() -> Tokenizer:
    """300 ids like the model; <|endoftext|> = 0 is eos, <|begin_of_text|> = 1 is bos."""
    return Tokenizer.train(["def f(x):\n    return x * 2  # é ü 中文\n"] * 30, vocab_size=300,
                           special_tokens=("<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>"))


def test_generation_stops_at_any_end_token(model, roles_tok):
    free = list(generate_step(model, roles_tok.encode("def"), GREEDY, max_tokens=12))
    assert 0 not in free  # eos never comes, so the plain run below goes to the length limit
    stop_at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])
    end = roles_tok.backend.id_to_token(free[stop_at])  # any vocabulary token may be declared an end
    tok = Tokenizer.from_section(roles_tok.backend, {"eos_token": "<|endoftext|>",
                                                     "end_tokens": ["<|endoftext|>", end]})
    pieces = list(stream_generate(model, tok, "def", max_tokens=12, sampling=GREEDY))
    assert [p.token for p in pieces] == free[:stop_at + 1]
    assert pieces[-1].finish_reason == "stop" and all(p.finish_reason is None for p in pieces[:-1])
    assert generate(model, tok, "def", 12, GREEDY) == tok.decode(free[:stop_at])  # the end token is not text
    plain = list(stream_generate(model, roles_tok, "def", max_tokens=12, sampling=GREEDY))  # eos only
    assert [p.token for p in plain] == free and plain[-1].finish_reason == "length"


def test_prompt_starts_with_bos_when_add_bos(model, roles_tok):
    tok = Tokenizer.from_section(roles_tok.backend, {"eos_token": "<|endoftext|>",
                                                     "bos_token": "<|begin_of_text|>", "add_bos": True})
    body = tok.encode("def")
    pieces = list(stream_generate(model, tok, "def", max_tokens=6, sampling=GREEDY))
    assert pieces[0].prompt_tokens == len(body) + 1
    assert [p.token for p in pieces] == list(generate_step(model, [1] + body, GREEDY, max_tokens=6))
    empty = list(stream_generate(model, tok, "", max_tokens=4, sampling=GREEDY))  # starts at bos
    assert empty[0].prompt_tokens == 1
    assert [p.token for p in empty] == list(generate_step(model, [1], GREEDY, max_tokens=4))
    no_bos = list(stream_generate(model, roles_tok, "def", max_tokens=6, sampling=GREEDY))
    assert no_bos[0].prompt_tokens == len(body)


# ----- the request, the per-sequence decoder, stop strings, logprobs, echo, seeds, PromptCache -----

def onehot(token: int, vocab: int = 300) -> torch.Tensor:
    """Next-token logits whose argmax is `token`: drives a greedy decoder without a model."""
    logits = torch.zeros(vocab)
    logits[token] = 10.0
    return logits


def byte_ids(tok: Tokenizer) -> dict[bytes, int]:
    """The id of every token that stands for exactly these bytes (the byte alphabet and merges)."""
    table: dict[bytes, int] = {}
    for i in range(tok.vocab_size):
        table.setdefault(tok.token_bytes(i), i)
    return table


@pytest.mark.parametrize("bad, word", [
    ({"prompt": ()}, "empty"), ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"), ({"seed": "7"}, "seed"), ({"stop": ("ok", "")}, "empty stop"),
    ({"sampling": SamplingConfig(presence_penalty=2.5)}, "presence_penalty"), ({"prompt": (1, -2)}, "prompt"),
    ({"echo": 1}, "echo"),
])
def test_request_checks_are_one_line_config_errors(bad, word):
    with pytest.raises(ConfigError, match=word) as info:
        GenerationRequest(**{"prompt": (1, 2), **bad}).validate()
    assert "\n" not in str(info.value)


def test_request_is_immutable_and_normalizes_lists():
    r = GenerationRequest(prompt=[1, 2], stop="\n\n", logprobs=20).validate()
    assert r.prompt == (1, 2) and r.stop == ("\n\n",)
    assert hash(r) == hash(GenerationRequest((1, 2), stop=("\n\n",), logprobs=20))


def test_decoder_end_tokens_length_and_state(roles_tok):
    a, b = roles_tok.encode("a")[0], roles_tok.encode("b")[0]
    tok = Tokenizer.from_section(roles_tok.backend, {"eos_token": "<|endoftext|>",
                                                     "end_tokens": ["<|endoftext|>", "<|eot_id|>"]})
    d = SequenceDecoder(tok, GenerationRequest(prompt=(a,), max_tokens=5, sampling=GREEDY))
    first = d.step(onehot(a))
    assert (first.text, first.token, first.finish_reason, d.next_input) == ("a", a, None, a)
    assert first.tokens_per_second == 0.0 and first.prefill_seconds == 0.0 and first.logprob is None
    last = d.step(onehot(2))  # <|eot_id|>: an end token like eos; its text is not output
    assert (last.text, last.finish_reason, d.finished, d.tokens) == ("", "stop", True, [a, 2])
    with pytest.raises(RuntimeError):
        d.step(onehot(a))
    d = SequenceDecoder(roles_tok, GenerationRequest((a,) * 10, max_tokens=5, sampling=GREEDY), context=12)
    out = [d.step(onehot(b)) for _ in range(2)]  # the context leaves room for 2
    assert [r.finish_reason for r in out] == [None, "length"] and d.max_tokens == 2
    with pytest.raises(ConfigError, match="context"):
        SequenceDecoder(roles_tok, GenerationRequest(prompt=(a,) * 12), context=12)


def test_decoder_holds_back_a_stop_string_split_over_tokens(roles_tok):
    ids = byte_ids(roles_tok)
    d = SequenceDecoder(roles_tok, GenerationRequest((5,), max_tokens=10, sampling=GREEDY, stop=("bc",)))
    out = [d.step(onehot(ids[ch])) for ch in (b"a", b"b", b"c")]
    assert [r.text for r in out] == ["a", "", ""] and out[-1].finish_reason == "stop"
    d = SequenceDecoder(roles_tok, GenerationRequest((5,), max_tokens=3, sampling=GREEDY, stop=("bc",)))
    out = [d.step(onehot(ids[ch])) for ch in (b"a", b"b", b"d")]  # "b" comes out once it cannot start "bc"
    assert [r.text for r in out] == ["a", "", "bd"] and out[-1].finish_reason == "length"
    d = SequenceDecoder(roles_tok, GenerationRequest((5,), max_tokens=3, sampling=GREEDY, stop=("bc",)))
    out = [d.step(onehot(ids[ch])) for ch in (b"a", b"b")] + [d.step(onehot(0))]  # eos flushes the held "b"
    assert [r.text for r in out] == ["a", "", "b"] and out[-1].finish_reason == "stop"


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))], True
    return text, False


POOL = [b"a", b"b", b" ", b"\n", b"\xc3", b"\xa9", "é".encode(), b"ab"]  # é split over two tokens, or one


@settings(max_examples=120, deadline=None)
@given(picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=16),
       stops=st.lists(st.text("ab é\n", min_size=1, max_size=3), min_size=1, max_size=3))
def test_stop_strings_never_leak_whatever_the_tokens(roles_tok, picks, stops):
    table = byte_ids(roles_tok)
    ids = [table[POOL[p]] for p in picks if POOL[p] in table]
    if not ids:
        return
    d = SequenceDecoder(roles_tok, GenerationRequest(prompt=(5,), max_tokens=len(ids), sampling=GREEDY,
                                                     stop=tuple(stops)))
    out = []
    for i in ids:
        out.append(d.step(onehot(i)))
        if d.finished:
            break
    full = b"".join(roles_tok.token_bytes(i) for i in ids).decode("utf-8", "replace")
    expected, stopped = _reference_cut(full, stops)
    assert "".join(r.text for r in out) == expected
    assert out[-1].finish_reason == ("stop" if stopped else "length")


def _uncached_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([list(ids)]))[0]


def test_logprobs_are_log_softmax_of_the_raw_logits(model, roles_tok):
    cfg = SamplingConfig(temperature=1.0, top_k=5, presence_penalty=1.0)  # transforms do not touch logprobs
    pieces = list(stream_generate(model, roles_tok, "def", max_tokens=6, sampling=cfg, seed=1, logprobs=3))
    prompt = roles_tok.encode_prompt("def")
    for i, r in enumerate(pieces):
        lp = torch.log_softmax(_uncached_logits(model, prompt + [p.token for p in pieces[:i]])[-1], -1)
        assert r.logprob.token == r.token and r.logprob.text == token_text(roles_tok, r.token)
        assert r.logprob.logprob == pytest.approx(float(lp[r.token]), abs=1e-4)
        top = torch.topk(lp, 3)
        assert [t[0] for t in r.logprob.top] == top.indices.tolist()
        assert [t[2] for t in r.logprob.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t[1] for t in r.logprob.top] == [token_text(roles_tok, t) for t in top.indices.tolist()]
        assert r.prompt_logprobs is None
    zero = list(stream_generate(model, roles_tok, "def", max_tokens=2, sampling=GREEDY, logprobs=0))
    assert zero[0].logprob.top == [] and zero[0].logprob.logprob == pytest.approx(
        float(torch.log_softmax(_uncached_logits(model, prompt)[-1], -1).max()), abs=1e-4)


def test_echo_gives_the_prompts_logprobs_from_a_full_forward(model, roles_tok):
    prompt = roles_tok.encode("def f(x):")
    pieces = list(stream_generate(model, roles_tok, prompt, 3, GREEDY, echo=True, logprobs=2))
    lp = torch.log_softmax(_uncached_logits(model, prompt), -1)
    first = pieces[0].prompt_logprobs
    assert len(first) == len(prompt) and first[0] is None
    for i in range(1, len(prompt)):
        assert first[i].token == prompt[i]
        assert first[i].logprob == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-5)
        assert [t[0] for t in first[i].top] == torch.topk(lp[i - 1], 2).indices.tolist()
    assert all(p.prompt_logprobs is None for p in pieces[1:])
    plain = list(stream_generate(model, roles_tok, prompt, max_tokens=3, sampling=GREEDY))
    assert [p.token for p in plain] == [p.token for p in pieces]


def test_seeded_sampling_is_reproducible_across_layers(model, roles_tok):
    cfg = SamplingConfig(temperature=1.0, min_p=0.05, frequency_penalty=0.5)
    prompt = roles_tok.encode("def")
    runs = [[r.token for r in stream_generate(model, roles_tok, prompt, 10, cfg, seed=s)] for s in (4, 4, 5)]
    assert runs[0] == runs[1] != runs[2]
    ids = list(generate_step(model, prompt, cfg, 10, seed=4))  # ids do not stop at end tokens
    assert ids[:len(runs[0])] == runs[0]


def test_stop_strings_through_generate(model, roles_tok):
    free = list(stream_generate(model, roles_tok, "def", max_tokens=20, sampling=GREEDY))
    text = "".join(p.text for p in free)
    token_texts = [roles_tok.decode([p.token]) for p in free]
    k = next(i for i in range(3, len(free)) if token_texts[i] and token_texts[i - 1])
    stop = token_texts[k - 1][-1] + token_texts[k][0]  # spans a token boundary
    pieces = list(stream_generate(model, roles_tok, "def", max_tokens=20, sampling=GREEDY, stop=[stop]))
    assert "".join(p.text for p in pieces) == text[:text.index(stop)]
    assert pieces[-1].finish_reason == "stop" and len(pieces) <= k + 1
    assert generate(model, roles_tok, "def", 20, GREEDY, stop=[stop]) == text[:text.index(stop)]


def test_prompt_cache_keeps_a_chats_prefix(model, roles_tok):
    cache = PromptCache(model)
    turn1 = roles_tok.encode("def f(x):")
    out1 = [r.token for r in stream_generate(model, roles_tok, turn1, 6, GREEDY, cache=cache)]
    assert cache.tokens == turn1 + out1[:-1]  # the last token never went through the model
    turn2 = turn1 + out1 + roles_tok.encode("\n    return")
    out2 = [r.token for r in stream_generate(model, roles_tok, turn2, 6, GREEDY, cache=cache)]
    assert cache.last_prefill == len(turn2) - (len(turn1) + len(out1) - 1)
    assert out2 == [r.token for r in stream_generate(model, roles_tok, turn2, 6, GREEDY)]  # from scratch
    assert cache.tokens == turn2 + out2[:-1]
    branch = turn1[:3] + roles_tok.encode(" ü 中")  # a different continuation truncates the cache
    out3 = list(generate_step(model, branch, GREEDY, 5, cache=cache))
    assert cache.last_prefill == len(branch) - 3 and out3 == list(generate_step(model, branch, GREEDY, 5))
    again = list(stream_generate(model, roles_tok, branch, 3, GREEDY, cache=cache, echo=True))
    assert cache.last_prefill == len(branch) and len(again[0].prompt_logprobs) == len(branch)
    same = list(generate_step(model, branch[:2], GREEDY, 2, cache=cache))  # a prefix of what is cached
    assert cache.last_prefill == 1 and same == list(generate_step(model, branch[:2], GREEDY, 2))
    cache.reset()
    assert cache.tokens == [] and cache.kv.offset == 0
    other = PromptCache(Transformer(preset("tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                           intermediate_size=64, vocab_size=300, max_seq_len=64)))
    with pytest.raises(ConfigError, match="different model"):
        list(generate_step(model, turn1, GREEDY, 2, cache=other))
    with pytest.raises(ConfigError, match="vocabulary"):
        list(stream_generate(model, roles_tok, [1, 300], 2, GREEDY))
