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
