"""Sampling filters by hand, and generation (cached) against a plain uncached argmax loop."""

import pytest
import torch

from bitnet158 import Transformer, preset
from bitnet158.errors import ConfigError
from bitnet158.generate import generate, generate_step, stream_generate
from bitnet158.sampling import SamplingConfig, apply_repetition_penalty, filter_top_k, filter_top_p, sample
from bitnet158.tokenizer import Tokenizer

INF = float("-inf")


def test_top_k_by_hand():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert filter_top_k(logits, 2).tolist() == [INF, 3.0, 2.0, INF]
    assert filter_top_k(logits, 0).tolist() == logits.tolist()


def test_top_p_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = filter_top_p(logits, 0.75)  # 0.5 < 0.75 ≤ 0.8: the two most likely tokens
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    kept = filter_top_p(logits, 0.5)   # the top token alone reaches 0.5
    assert torch.isfinite(kept).tolist() == [True, False, False, False]


def test_repetition_penalty_by_hand():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_sampling_respects_filters_and_seed():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    draws = {int(sample(logits, cfg, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {1, 2}
    assert int(sample(logits, SamplingConfig(temperature=0.0))) == 1
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=0.0).validate()


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
