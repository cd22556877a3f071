"""Prompt caching in the serving engine: a freed slot keeps its keys, a request that starts with the
same tokens prefills only the rest and still gives generate()'s tokens; the slot with the longest
shared prefix is chosen, unmatched requests take the slot freed longest ago; echo, a failed
forward and `prompt_cache=False` never reuse."""

from __future__ import annotations

import pytest

import bitnet158 as bn
from bitnet158 import kernels, native_step, runtime
from bitnet158.generate import GenerationRequest, generate_step
from bitnet158.serve.engine import Engine
from bitnet158.serve.prompt_cache import WAIT_FOR_SHARED, SlotPrefixes, best_lender, common_prefix
from engine_fixtures import GREEDY, model, tok  # noqa: F401 (fixtures)


@pytest.fixture(params=["native", "torch", pytest.param("runtime", marks=pytest.mark.skipif(
    not kernels.extension_available(), reason="the torch-free runtime needs the compiled extension"))])
def served_model(request, model, tok, tmp_path_factory):
    """The model the engine serves: the torch model through the native step or the Python path, or
    the same weights loaded by the torch-free runtime."""
    if request.param == "runtime":
        path = bn.save_packed(model, tmp_path_factory.mktemp("pc") / "m", tok)
        yield runtime.load(path)[0]
        return
    native_step.set_enabled(request.param == "native")
    yield model
    native_step.set_enabled(True)


def _ids(tok, text):
    return tuple(tok.encode_prompt(text))


def _run(engine, prompt, n=8, **kw):
    """(tokens, cached_tokens, last response) of one request run to its end."""
    responses = list(engine.submit(GenerationRequest(prompt=tuple(prompt), max_tokens=n, sampling=GREEDY, **kw)))
    return [r.token for r in responses], responses[-1].cached_tokens, responses[-1]


def _alone(model, tok, prompt, n=8):
    want = list(generate_step(model, list(prompt), GREEDY, n))
    cut = next((j + 1 for j, t in enumerate(want) if t in tok.end_ids), len(want))
    return want[:cut]


def test_common_prefix_counts_shared_leading_tokens():
    assert common_prefix([], [1, 2]) == 0
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([9], [1]) == 0


def test_slot_prefixes_choose_the_longest_match_else_the_slot_freed_longest_ago():
    slots = SlotPrefixes(3)
    assert [slots.take([5, 6])[0] for _ in range(3)] == [0, 1, 2]
    slots.release(1, [1, 2, 3, 4])
    slots.release(0, [1, 2, 9])
    slots.release(2, [7, 7])
    assert slots.take([1, 2, 3, 8]) == (1, 3)   # the longest shared prefix wins
    assert slots.take([4, 4]) == (0, 0)         # no match: slot 0 was freed before slot 2
    assert slots.take([7, 7]) == (2, 1)         # all of it held: the last token is still run
    slots.release(2, [7, 7, 7])
    assert slots.take([7, 7, 7, 7], reuse=False) == (2, 0)
    off = SlotPrefixes(1, enabled=False)
    off.take([1])
    off.release(0, [1, 2, 3])
    assert off.take([1, 2, 3, 4]) == (0, 0)


def test_the_lender_is_the_slot_covering_most_of_the_prompt_beyond_what_is_held():
    lenders = {0: [5, 6, 7, 8, 1], 1: [5], 2: [5, 6, 7, 8, 9, 10]}
    assert best_lender([5, 6, 7, 8, 9, 10, 11], 0, lenders) == (2, 6)
    assert best_lender([5, 6, 7, 8, 9], 0, lenders) == (0, 4)  # never the prompt's last token; the first of equals
    assert best_lender([5, 6, 7, 2], 0, lenders) == (0, 3)     # the first of equals
    assert best_lender([5, 6, 7, 2], 3, lenders) is None       # nothing beyond what it has
    assert best_lender([9, 9], 0, lenders) is None


def test_a_conversation_reuses_its_prefix_and_gives_generates_tokens(model, tok, served_model):
    """Turn 2's prompt is turn 1's prompt, answer and a new message: it prefills only what the slot
    did not hold, and its tokens equal generate() on the whole prompt (native step, torch path,
    torch-free runtime)."""
    engine = Engine(served_model, tok, max_concurrency=2, max_queue=2).start()
    try:
        first = _ids(tok, "def f(x):")
        answer, cached, _ = _run(engine, first)
        assert cached == 0 and answer == _alone(model, tok, first)
        second = first + tuple(answer) + _ids(tok, " for i in range(10):")
        tokens, cached, last = _run(engine, second)
        assert cached == len(first) + len(answer) - 1  # the answer's last token was never fed
        assert last.prompt_tokens == len(second)
        assert tokens == _alone(model, tok, second)
        again, cached, _ = _run(engine, second)  # the same prompt again: all but its last token
        assert cached == len(second) - 1 and again == tokens
    finally:
        engine.shutdown(timeout=30)


def test_two_conversations_each_find_their_own_slot(model, tok):
    engine = Engine(model, tok, max_concurrency=2, max_queue=2).start()
    try:
        a, b = _ids(tok, "def f(x):\n    return"), _ids(tok, "The with statement")
        answer_a, _, _ = _run(engine, a)
        answer_b, _, _ = _run(engine, b)
        for prompt, answer in ((a, answer_a), (b, answer_b)):
            follow = prompt + tuple(answer) + _ids(tok, " code")
            tokens, cached, _ = _run(engine, follow)
            assert cached == len(prompt) + len(answer) - 1
            assert tokens == _alone(model, tok, follow)
    finally:
        engine.shutdown(timeout=30)


def test_echo_and_a_disabled_cache_prefill_every_token(model, tok):
    prompt = _ids(tok, "for i in range(10):")
    for engine, kw in ((Engine(model, tok, max_concurrency=1).start(), {"echo": True, "logprobs": 1}),
                       (Engine(model, tok, max_concurrency=1, prompt_cache=False).start(), {})):
        try:
            first, _, r1 = _run(engine, prompt, **kw)
            second, cached, r2 = _run(engine, prompt, **kw)
            assert cached == 0 and second == first
            assert r1.cached_tokens == 0
        finally:
            engine.shutdown(timeout=30)


def test_a_failed_forward_forgets_what_the_slot_held(model, tok):
    engine = Engine(model, tok, max_concurrency=1).start()
    try:
        prompt = _ids(tok, "The with statement wraps")
        expected, _, _ = _run(engine, prompt)
        real = engine.runner.rows_logits
        calls = []

        def fail_once(ids, binding):
            if not calls:
                calls.append(1)
                raise RuntimeError("injected")
            return real(ids, binding)

        engine.runner.rows_logits = fail_once
        with pytest.raises(RuntimeError, match="injected"):
            _run(engine, prompt + (5,))
        tokens, cached, _ = _run(engine, prompt)
        assert cached == 0 and tokens == expected
    finally:
        engine.shutdown(timeout=30)


def test_a_request_cancelled_while_prefilling_leaves_its_prefix(model, tok):
    """A prompt longer than one chunk, cancelled after its first chunk: the slot holds that chunk,
    and the same prompt resubmitted starts from it and gives generate()'s tokens."""
    engine = Engine(model, tok, max_concurrency=1, prefill_chunk=8)  # not started: steps run here
    engine._worker = engine.runner.worker()
    prompt = _ids(tok, "def f(x):\n    return x + 1\nfor i in range(10):\n    print(i)\n")
    assert len(prompt) > 16
    with engine._worker:
        stream = engine.submit(GenerationRequest(prompt=prompt, max_tokens=4, sampling=GREEDY))
        engine._step()  # admits it and prefills 8 tokens
        stream.cancel()
        engine._step()  # drops it
        again = engine.submit(GenerationRequest(prompt=prompt, max_tokens=4, sampling=GREEDY))
        while engine.running or engine.waiting:
            engine._step()
    responses = list(again)
    assert responses[-1].cached_tokens == 8
    assert [r.token for r in responses] == _alone(model, tok, prompt, 4)


@pytest.mark.parametrize("burst", [False, True], ids=["later", "at-once"])
def test_requests_side_by_side_share_a_system_prompt_by_copy(model, tok, served_model, burst):
    """Requests with the same long start, arriving while the first runs or all at once: the later
    ones copy the first one's keys (at once: after waiting for its prefill) instead of prefilling
    them beside it, and each gives generate()'s tokens."""
    engine = Engine(served_model, tok, max_concurrency=3)  # not started: steps run here
    engine._worker = engine.runner.worker()
    system = _ids(tok, "def f(x):\n    return x + 1\nThe with statement wraps a block of code.\n")
    prompts = [system + _ids(tok, tail) for tail in ("for i in", "print(i)", "range(10)")]
    assert common_prefix(prompts[1], prompts[0]) >= WAIT_FOR_SHARED

    def submit(prompt):
        return engine.submit(GenerationRequest(prompt=prompt, max_tokens=6, sampling=GREEDY))

    prefilled = []
    real = engine.runner.rows_logits

    def counting(ids, binding):
        prefilled.append(len(ids))
        return real(ids, binding)

    engine.runner.rows_logits = counting
    with engine._worker:
        streams = [submit(p) for p in (prompts if burst else prompts[:1])]
        if not burst:
            engine._step()  # admits the first
            while engine._active[0].prefilling:
                engine._step()
            streams += [submit(p) for p in prompts[1:]]
        while engine.running or engine.waiting:
            engine._step()
    for prompt, stream in zip(prompts, streams):
        responses = list(stream)
        assert [r.token for r in responses] == _alone(model, tok, prompt, 6)
        shared = common_prefix(prompt, prompts[0])
        cached = responses[-1].cached_tokens
        if prompt is prompts[0]:
            assert cached == 0
        else:  # it waits only while the first still promises WAIT_FOR_SHARED tokens it lacks
            assert shared - WAIT_FOR_SHARED < cached <= shared
    # every row the forwards ran: the shared prefix about once, the rest of each prompt, the decode steps
    assert sum(prefilled) < len(prompts[0]) + sum(len(p) - len(system) + WAIT_FOR_SHARED for p in prompts[1:]) + 3 * 6
