"""Sampling by hand: each filter and penalty on hand-made logits, their order, the ranges refused,
and one sequence's sampler (own seeded generator, penalty history)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from bitnet158.errors import ConfigError
from bitnet158.sampling import (SamplingConfig, TokenSampler, apply_logit_bias, apply_presence_frequency_penalty,
                                apply_repetition_penalty, filter_min_p, filter_top_k, filter_top_p, sample)
from bitnet158.sampling import generator as np_generator

INF = float("-inf")


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)
GREEDY = SamplingConfig(temperature=0.0)


def test_top_k_by_hand():
    logits = f32([1.0, 3.0, 2.0, 0.0])
    assert filter_top_k(logits, 2).tolist() == [INF, 3.0, 2.0, INF]
    assert filter_top_k(logits, 0).tolist() == logits.tolist()


def test_top_p_by_hand():
    probs = f32([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    kept = filter_top_p(logits, 0.75)  # 0.5 < 0.75 ≤ 0.8: the two most likely tokens
    assert np.isfinite(kept).tolist() == [True, True, False, False]
    kept = filter_top_p(logits, 0.5)   # the top token alone reaches 0.5
    assert np.isfinite(kept).tolist() == [True, False, False, False]


def test_min_p_by_hand():
    logits = np.log(f32([0.5, 0.3, 0.15, 0.05]))
    # threshold = min_p · 0.5: 0.29 → 0.145 keeps three tokens, 0.61 → 0.305 keeps one
    assert np.isfinite(filter_min_p(logits, 0.29)).tolist() == [True, True, True, False]
    assert np.isfinite(filter_min_p(logits, 0.61)).tolist() == [True, False, False, False]
    assert np.isfinite(filter_min_p(logits, 1.0)).tolist() == [True, False, False, False]
    assert filter_min_p(logits, 0.0) is logits
    kept = filter_min_p(logits, 0.29)
    assert kept[:3].tolist() == logits[:3].tolist()  # survivors keep their logits exactly


def test_repetition_penalty_by_hand_ids_and_mask_agree():
    logits = f32([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    mask = torch.tensor([True, True, False])
    assert apply_repetition_penalty(logits, mask, 2.0).tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # the input is never modified


def test_presence_and_frequency_penalties_by_hand():
    logits = f32([1.0, 2.0, 3.0, 4.0])
    counts = f32([0.0, 1.0, 3.0, 0.0])
    # logit -= presence·(count > 0) + frequency·count
    out = apply_presence_frequency_penalty(logits, counts, 0.5, 0.25)
    assert out.tolist() == [1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 4.0]
    out = apply_presence_frequency_penalty(logits, counts, -1.0, 0.0)  # negative ones encourage repeats
    assert out.tolist() == [1.0, 3.0, 4.0, 4.0]
    assert apply_presence_frequency_penalty(logits, counts, 0.0, 0.0) is logits


def test_logit_bias_by_hand_bans_and_forces_tokens():
    logits = f32([1.0, 3.0, 2.0, 0.0])
    assert apply_logit_bias(logits, ((1, -1.5), (3, 0.5))).tolist() == [1.0, 1.5, 2.0, 0.5]
    assert apply_logit_bias(logits, ()) is logits
    banned = SamplingConfig(temperature=0.0, logit_bias={1: -100})
    assert banned.logit_bias == ((1, -100),)  # a mapping is kept as sorted pairs: hashable, frozen
    hash(banned)
    assert int(sample(logits, banned)) == 2
    forced = SamplingConfig(temperature=1.0, logit_bias={3: 100})
    rng = np_generator(0)
    assert {int(sample(logits, forced, generator=rng)) for _ in range(50)} == {3}
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        sample(logits, SamplingConfig(temperature=0.0, logit_bias={4: 1.0}))


def test_greedy_is_exactly_argmax_of_raw_logits_without_penalties():
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000) * 5
        assert int(sample(logits, GREEDY, seen=torch.tensor([1, 2, 3]), counts=torch.ones(1000))) == \
            int(logits.argmax())
    logits = f32([1.0, 0.9, 0.0])
    penalized = dataclasses.replace(GREEDY, frequency_penalty=0.2)
    assert int(sample(logits, penalized, counts=f32([1.0, 0.0, 0.0]))) == 1  # 0.8 < 0.9


def test_sampling_respects_filters_and_seed():
    logits = f32([0.0, 5.0, 4.9, -3.0])
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    draws = {int(sample(logits, cfg, generator=np.random.default_rng(s))) for s in range(50)}
    assert draws == {1, 2}
    assert int(sample(logits, SamplingConfig(temperature=0.0))) == 1
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=0.0).validate()


def _support(logits: torch.Tensor, cfg: SamplingConfig, draws: int = 300) -> set[int]:
    return {int(sample(logits, cfg, generator=np.random.default_rng(s))) for s in range(draws)}


def test_temperature_comes_before_min_p():
    logits = np.log(f32([0.5, 0.3, 0.2]))
    # T = 1: 0.3 ≥ 0.5·0.5 survives. T = 0.5: p ∝ [0.25, 0.09, 0.04], 0.09/0.25 = 0.36 < 0.5 does not
    assert _support(logits, SamplingConfig(temperature=1.0, min_p=0.5)) == {0, 1}
    assert _support(logits, SamplingConfig(temperature=0.5, min_p=0.5)) == {0}


def test_top_k_comes_before_top_p_and_min_p_keeps_ratios():
    logits = np.log(f32([0.4, 0.3, 0.2, 0.1]))
    # top_p 0.75 alone: the mass before each token is 0, .4, .7, .9, so three tokens survive
    assert _support(logits, SamplingConfig(temperature=1.0, top_p=0.75)) == {0, 1, 2}
    # top_k 3 first renormalizes to [4, 3, 2]/9: the mass before the third is 7/9 ≥ 0.75
    assert _support(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.75)) == {0, 1}
    # min_p compares with the most likely token: 0.2/0.4 ≥ 0.4 stays, 0.1/0.4 goes
    assert _support(logits, SamplingConfig(temperature=1.0, min_p=0.4)) == {0, 1, 2}


@pytest.mark.parametrize("bad", [
    {"presence_penalty": 2.01}, {"presence_penalty": -2.5}, {"frequency_penalty": 3.0},
    {"frequency_penalty": -2.01}, {"min_p": -0.1}, {"min_p": 1.5}, {"min_p": math.nan},
    {"temperature": -1.0}, {"temperature": math.nan}, {"temperature": math.inf}, {"top_k": -1},
    {"top_k": 1.5}, {"top_p": 0.0}, {"top_p": 1.1}, {"repetition_penalty": 0.0},
    {"repetition_penalty": math.nan}, {"presence_penalty": math.nan}, {"logit_bias": {1: 100.5}},
    {"logit_bias": {-1: 1.0}}, {"logit_bias": {1: math.nan}}, {"logit_bias": {"1": 1.0}},
    {"logit_bias": {i: 1.0 for i in range(301)}},
])
def test_out_of_range_settings_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError) as info:
        SamplingConfig(**bad).validate()
    message = str(info.value)
    assert "\n" not in message and next(iter(bad)) in message


def test_range_edges_are_accepted_and_the_config_is_frozen():
    for edge in ({"presence_penalty": 2.0}, {"presence_penalty": -2.0}, {"frequency_penalty": -2.0},
                 {"min_p": 0.0}, {"min_p": 1.0}, {"temperature": 0.0}):
        SamplingConfig(**edge).validate()
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingConfig().temperature = 1.0  # type: ignore[misc]


def test_sampler_history_by_hand():
    logits = f32([1.0, 0.9, 0.0])
    # frequency 0.2: 0 (→0.8), 1 (→0.7), 0 (→0.6), 1 ...: the penalty grows with each use
    freq = TokenSampler(dataclasses.replace(GREEDY, frequency_penalty=0.2))
    assert [freq(logits) for _ in range(4)] == [0, 1, 0, 1]
    # presence 0.5: 0 (→0.5), 1 (→0.4), then 0 for good: the penalty is paid once
    pres = TokenSampler(dataclasses.replace(GREEDY, presence_penalty=0.5))
    assert [pres(logits) for _ in range(5)] == [0, 1, 0, 0, 0]
    # the prompt counts for the repetition penalty (1.0 / 2 < 0.9), not for presence or frequency
    rep = TokenSampler(dataclasses.replace(GREEDY, repetition_penalty=2.0), prompt=[0])
    assert rep(logits) == 1
    prompt_only = TokenSampler(dataclasses.replace(GREEDY, presence_penalty=2.0), prompt=[0])
    assert prompt_only(logits) == 0


def test_sampler_matches_sample_with_the_same_history_and_generator():
    cfg = SamplingConfig(temperature=0.9, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.4,
                         frequency_penalty=0.3)
    torch.manual_seed(1)
    steps = [torch.randn(50) for _ in range(30)]
    sampler = TokenSampler(cfg, prompt=[3, 4], seed=11)
    got = [sampler(logits) for logits in steps]
    generator, seen, counts, expected = np_generator(11), [3, 4], np.zeros(50, dtype=np.float32), []
    for logits in steps:
        token = int(sample(logits, cfg, np.array(seen), generator, counts=counts))
        expected.append(token)
        seen.append(token)
        counts[token] += 1
    assert got == expected


def test_seeded_samplers_are_reproducible_and_unseeded_ones_follow_torch_manual_seed():
    cfg = SamplingConfig(temperature=1.0)
    torch.manual_seed(5)
    steps = [torch.randn(40) for _ in range(20)]

    def run(seed):
        sampler = TokenSampler(cfg, seed=seed)
        return [sampler(x) for x in steps]

    assert run(7) == run(7)
    assert run(7) != run(8)
    torch.manual_seed(123)
    first = run(None)
    torch.manual_seed(123)
    assert run(None) == first
    state = torch.get_rng_state()
    TokenSampler(GREEDY)  # greedy draws nothing from the global generator
    assert torch.equal(torch.get_rng_state(), state)


def test_extreme_but_valid_settings_still_give_a_token():
    """A tiny temperature, or a repetition penalty that overflows float32, must not make NaN
    probabilities (torch.multinomial would raise): the sample is then the argmax."""
    logits = f32([1.0, 3.0, 2.0, -1.0])
    gen = np.random.default_rng(0)
    assert sample(logits, SamplingConfig(temperature=1e-40), generator=gen).item() == 1
    huge = f32([3e38, 1.0, -3e38, 0.5])
    cfg = SamplingConfig(temperature=1.0, repetition_penalty=1e-3)
    assert sample(huge, cfg, seen=torch.tensor([0, 2]), generator=gen).item() == 0
