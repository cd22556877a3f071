"""Speculative decoding: drafts verified k at a time change no greedy token and no sampling
distribution; the cache keeps only what was accepted; the drafters propose what they should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitnet158.config import ModelConfig
from bitnet158.errors import ConfigError
from bitnet158.generate import GenerationRequest, PromptCache, SpeculationStats, stream_request
from bitnet158.model import Transformer
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158.sampling import SamplingConfig, generator, sample_with_draft
from bitnet158.draft_length import AdaptiveDraftLength, check_draft_tokens
from bitnet158.speculative import DraftModel, PromptLookup
from bitnet158.tokenizer import Tokenizer

TEXT = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n"
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT] * 20, vocab_size=300)


def _trained(tok, seed: int, hidden: int, steps: int) -> Transformer:
    """A tiny model trained briefly on repetitive code, so it repeats (and drafts get accepted)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=2 * hidden, max_seq_len=256)
    model = Transformer(cfg)
    ids = torch.tensor(tok.encode(TEXT * 8))
    batch = torch.stack([ids[i:i + 65] for i in range(0, 8 * 12, 12)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pack_(model, PackConfig()).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _trained(tok, 0, 64, 100)


def _run(model, tok, prompt, drafter=None, sampling=GREEDY, max_tokens=60, seed=None, stop=(), k=6):
    stats = SpeculationStats()
    cache = PromptCache(model)
    request = GenerationRequest(tuple(prompt), max_tokens, sampling, tuple(stop), seed).validate()
    responses = list(stream_request(model, tok, request, cache=cache, drafter=drafter, draft_tokens=k, stats=stats))
    return [r.token for r in responses], "".join(r.text for r in responses), responses[-1], stats, cache


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    #        0  1  2  3  4  5  6  7  8  9
    seq = [7, 1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3]
    assert lookup.propose(seq, 2) == [4, 1]          # "1 2 3" last seen at 5..7, followed by 4 1
    assert lookup.propose([5, 6, 7, 6], 3) == [7, 6]  # no 2- or 3-gram repeat; "6" at 1 → 7 6
    assert lookup.propose([1, 2, 3], 4) == []
    assert lookup.propose([4], 4) == []
    with pytest.raises(ConfigError):
        PromptLookup(max_ngram=0)
    with pytest.raises(ConfigError):
        check_draft_tokens(0)


@pytest.mark.parametrize("k", [1, 4, 8, "auto"])
def test_greedy_output_is_unchanged_by_prompt_lookup(model, tok, k):
    prompt = tok.encode(TEXT * 2 + "def add")
    plain, text, last, _, plain_cache = _run(model, tok, prompt)
    spec, spec_text, spec_last, stats, cache = _run(model, tok, prompt, PromptLookup(), k=k)
    assert spec == plain and spec_text == text and spec_last.finish_reason == last.finish_reason
    if k != "auto":  # auto drafts only what the timings say pays, so how much is not fixed
        assert stats.accepted > 0 and stats.verify_forwards < len(spec) - 1
    assert cache.tokens == plain_cache.tokens == list(prompt) + plain[:-1]  # only accepted tokens stay cached
    assert cache.kv.offset == len(cache.tokens)


def test_draft_tokens_are_auto_or_a_bounded_integer():
    assert check_draft_tokens("auto") == "auto" and check_draft_tokens("3") == 3 and check_draft_tokens(64) == 64
    for bad in (0, 65, "x", 2.0, True, "-1"):
        with pytest.raises(ConfigError, match="draft tokens must be 'auto' or an integer"):
            check_draft_tokens(bad)


def test_auto_draft_length_picks_the_k_with_most_tokens_per_second():
    """Hand-computed: a plain iteration 1 s, each drafted token +0.5 s, acceptance 0.8: expected
    tokens per second are 1, 1.8/1.5 = 1.2, 2.44/2 = 1.22, 2.952/2.5 = 1.18 for k = 0..3: k = 2."""
    length = AdaptiveDraftLength(8, decay=1.0)  # no decay: the first measurement of each stays
    assert length.choose() == 0  # a plain step is timed first
    length.timed(0, 1.0)
    assert length.choose() == 2  # no draft timed yet: a short one
    length.timed(2, 2.0)
    length.judged(5, rejected=True)  # with the prior's 3 accepted / 1 rejection: 8 / (8 + 2)
    assert length.acceptance == pytest.approx(0.8)
    assert length.choose() == 2


def test_auto_draft_length_stops_drafting_where_drafts_cost_full_steps_and_probes_again():
    length = AdaptiveDraftLength(8, decay=1.0, probe_every=4)
    length.timed(0, 1.0)
    length.timed(3, 4.0)  # compute-bound: every drafted token costs a whole step
    length.judged(2, rejected=True)  # acceptance 5/7: no k can beat a plain step
    assert [length.choose() for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    cheap = AdaptiveDraftLength(8, decay=1.0)
    cheap.timed(0, 1.0)
    cheap.timed(4, 1.04)  # memory-bound: drafted rows are nearly free
    cheap.judged(30, rejected=True)  # acceptance 33/35
    assert cheap.choose() == 8


def test_greedy_output_is_unchanged_by_a_draft_model(model, tok):
    small = _trained(tok, 1, 32, 80)
    prompt = tok.encode(TEXT + "def sub")
    plain = _run(model, tok, prompt)[0]
    spec, _, _, stats, _ = _run(model, tok, prompt, DraftModel(small, model.config.vocab_size))
    assert spec == plain and stats.drafted > 0 and stats.accepted > 0
    with pytest.raises(ConfigError, match="vocabulary"):
        DraftModel(small, model.config.vocab_size + 1)


def test_stop_strings_and_max_tokens_cut_inside_an_accepted_draft(model, tok):
    prompt = tok.encode(TEXT * 2 + "def add")
    for max_tokens in (1, 2, 7):
        plain = _run(model, tok, prompt, max_tokens=max_tokens)[0]
        assert _run(model, tok, prompt, PromptLookup(), max_tokens=max_tokens)[0] == plain
    plain_text = _run(model, tok, prompt, stop=["return"])[1]
    spec_text, spec_last = _run(model, tok, prompt, PromptLookup(), stop=["return"])[1:3]
    assert spec_text == plain_text and spec_last.finish_reason == "stop"


def test_a_draft_keeps_the_sampling_distribution():
    """Accept-or-replace against a one-hot draft: each token's frequency is its probability, for a
    draft the model likes, one it dislikes, and one outside the filtered set."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    cfg = SamplingConfig(temperature=0.8, top_k=4)
    probs = torch.zeros(5)
    kept = torch.topk(logits / 0.8, 4).indices
    probs[kept] = torch.softmax(logits[kept] / 0.8, -1)
    gen = generator(0)
    n = 40_000
    for draft in (0, 2, 3):
        counts = torch.bincount(torch.tensor([sample_with_draft(logits, cfg, draft, generator=gen)
                                              for _ in range(n)]), minlength=5).float()
        # 5 standard deviations of a binomial count: fails for a wrong rule, not by chance
        tolerance = 5 * torch.sqrt(n * probs * (1 - probs)) + 1
        assert torch.all((counts - n * probs).abs() <= tolerance), (draft, counts / n, probs)


def test_sampling_with_a_drafter_runs_and_is_seeded(model, tok):
    prompt = tok.encode(TEXT + "def")
    warm = SamplingConfig(temperature=0.7)
    a = _run(model, tok, prompt, PromptLookup(), sampling=warm, seed=5)[0]
    b = _run(model, tok, prompt, PromptLookup(), sampling=warm, seed=5)[0]
    assert a == b and len(a) == 60
