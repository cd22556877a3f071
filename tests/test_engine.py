"""The continuous-batching engine: requests side by side give exactly what each gives alone, one
decode forward serves many sequences, and slots, queue, cancellation and shutdown behave."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import bitnet158 as bn
from bitnet158 import native_step
from bitnet158.cache import KVCache, SlotKVCache
from bitnet158.config import ModelConfig
from bitnet158.errors import ConfigError
from bitnet158.generate import GenerationRequest, generate_step
from bitnet158.runner import set_kv_dtype
from bitnet158.sampling import SamplingConfig
from bitnet158.serve.engine import Engine, QueueFull
from engine_fixtures import GREEDY, model, tok  # noqa: F401 (fixtures)


def _alone(model, prompt, n, sampling=GREEDY, seed=None):
    return list(generate_step(model, list(prompt), sampling, n, seed))


def _prompts(tok, count):
    words = "the a def return with print range block code value".split()
    return [tok.encode_prompt(" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 9)))
            for i in range(count)]


def test_slot_batch_step_equals_each_sequence_alone(model, tok):
    prompts = _prompts(tok, 3)
    cache = SlotKVCache(model.config, slots=4)
    rows = []
    with torch.no_grad():
        for slot, p in zip((2, 0, 3), prompts):
            rows.append((slot, model(torch.tensor([p]), cache.bind([slot]))[0, -1].argmax().item()))
        batched = model(torch.tensor([[t] for _, t in rows]), cache.bind([s for s, _ in rows]))[:, -1]
        for b, (p, (_, t)) in enumerate(zip(prompts, rows)):
            alone = KVCache(model.config)
            model(torch.tensor([p]), alone)
            assert torch.equal(model(torch.tensor([[t]]), alone)[0, -1], batched[b])


@pytest.mark.parametrize("native", [True, False])
def test_a_mixed_step_equals_each_sequence_alone(model, tok, native):
    """New tokens of two decoding sequences and a prompt chunk of a third, side by side in one row
    (SlotKVCache.bind_rows), give each sequence what it gets alone — through the native step and
    through the Python path."""
    prompts = _prompts(tok, 3)
    native_step.set_enabled(native)
    try:
        with torch.no_grad():
            cache = SlotKVCache(model.config, slots=3)
            nxt = []
            for slot, p in zip((0, 1), prompts[:2]):
                nxt.append(model(torch.tensor([p]), cache.bind([slot]))[0, -1].argmax().item())
            third = prompts[2] + prompts[0]
            model(torch.tensor([third[:2]]), cache.bind([2]))  # its first chunk, alone
            ids = torch.tensor([[nxt[0], nxt[1], *third[2:]]])
            binding = cache.bind_rows([(0, 1), (1, 1), (2, len(third) - 2)], out_rows=[0, 1, ids.shape[1] - 1])
            mixed = model(ids, binding)[0]
            assert cache.lengths == [len(prompts[0]) + 1, len(prompts[1]) + 1, len(third)]
            for row, (p, t) in enumerate(zip(prompts[:2], nxt)):
                alone = KVCache(model.config)
                model(torch.tensor([p]), alone)
                want = model(torch.tensor([[t]]), alone)[0, -1]
                assert torch.equal(mixed[row], want) if native else torch.allclose(mixed[row], want, atol=1e-4)
            alone = KVCache(model.config)
            want = model(torch.tensor([third]), alone)[0, -1]
            assert torch.allclose(mixed[2], want, atol=2e-2) and mixed[2].argmax() == want.argmax()
    finally:
        native_step.set_enabled(None)


def test_long_prompts_are_prefilled_a_chunk_per_step_beside_decoding(model, tok):
    engine = Engine(model, tok, max_concurrency=3, prefill_chunk=4).start()
    try:
        prompts = [p * 3 for p in _prompts(tok, 3)]
        requests = [GenerationRequest(prompt=tuple(p), max_tokens=6, sampling=GREEDY) for p in prompts]
        streams = [engine.submit(r) for r in requests]
        got = [[r.token for r in s if r.finish_reason != "stop" or r.token not in tok.end_ids] for s in streams]
        for p, tokens in zip(prompts, got):
            expected = _alone(model, p, 6)
            cut = next((j for j, t in enumerate(expected) if t in tok.end_ids), len(expected))
            assert tokens == expected[:cut]
        assert engine.mixed_forwards > max(len(p) for p in prompts) // 4  # chunks, several beside decoding
    finally:
        engine.shutdown(timeout=10)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=0)


def test_32_concurrent_streams_equal_their_single_request_output(model, tok):
    engine = Engine(model, tok, max_concurrency=32, max_queue=64).start()
    try:
        prompts = _prompts(tok, 32)
        lengths = [4 + (i * 5) % 17 for i in range(32)]
        requests = [GenerationRequest(prompt=tuple(p), max_tokens=n, sampling=GREEDY) for p, n in zip(prompts, lengths)]
        results: dict[int, list[int]] = {}

        def consume(i, stream):
            results[i] = [r.token for r in stream if r.finish_reason != "stop" or r.token not in tok.end_ids]

        streams = [engine.submit(r) for r in requests]
        threads = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            expected = _alone(model, p, n)
            cut = next((j for j, t in enumerate(expected) if t in tok.end_ids), len(expected))
            assert results[i] == expected[:cut], i
        assert max(engine.batch_sizes) > 1  # one forward really served several sequences
    finally:
        engine.shutdown(drain=False, timeout=10)


def test_an_fp16_cache_serves_the_same_tokens_as_generate_over_fp16(tok):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=128)
    model = bn.pack_(bn.Transformer(cfg)).eval()
    fp32_summary = Engine(model, tok, max_concurrency=4).cache_summary()
    set_kv_dtype(model, "fp16")
    engine = Engine(model, tok, max_concurrency=4).start()
    try:
        assert engine.cache.keys[0].dtype == torch.float16
        assert "4 slots × 128 positions" in engine.cache_summary() and "(fp16)" in engine.cache_summary()
        assert "(fp32)" in fp32_summary and engine.cache.nbytes * 2 == SlotKVCache(cfg, 4, 128).nbytes
        prompts = _prompts(tok, 4)
        streams = [engine.submit(GenerationRequest(prompt=tuple(p), max_tokens=10, sampling=GREEDY)) for p in prompts]
        for p, stream in zip(prompts, streams):
            got = [r.token for r in stream]
            assert got == _alone(model, p, 10)[:len(got)]  # _alone's cache is fp16 too
    finally:
        engine.shutdown(drain=False, timeout=10)


def test_a_cache_that_cannot_fit_is_refused_before_it_is_allocated(model, tok):
    with pytest.raises(ConfigError, match=r"KV cache for 100000000 slots × 128 positions would take .* GB \(fp32\), "
                                          r"more than the .* GB available; lower --max-concurrency or --context, or "
                                          r"use --kv-cache fp16 \(half\) or q8"):
        Engine(model, tok, max_concurrency=10**8)
    set_kv_dtype(model, "q8")
    try:
        with pytest.raises(ConfigError, match=r"GB \(q8\), .*--context$"):  # nothing smaller to suggest
            Engine(model, tok, max_concurrency=10**8)
    finally:
        set_kv_dtype(model, "fp32")
    with pytest.raises(ConfigError, match="at least 2 positions"):
        Engine(model, tok, max_len=1)
    assert Engine(model, tok, max_concurrency=2, max_len=40).cache.max_len == 40


def test_seeded_sampling_does_not_depend_on_the_neighbours(model, tok):
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    prompts = _prompts(tok, 4)
    engine = Engine(model, tok, max_concurrency=4).start()
    try:
        streams = [engine.submit(GenerationRequest(prompt=tuple(p), max_tokens=8, sampling=sampling, seed=i))
                   for i, p in enumerate(prompts)]
        together = [[r.token for r in s] for s in streams]
        for i, p in enumerate(prompts):
            alone = [r.token for r in engine.submit(GenerationRequest(prompt=tuple(p), max_tokens=8,
                                                                      sampling=sampling, seed=i))]
            assert alone == together[i]
    finally:
        engine.shutdown(timeout=10)


def test_queue_full_cancel_frees_the_slot_and_shutdown_drains(model, tok):
    engine = Engine(model, tok, max_concurrency=1, max_queue=1)
    prompt = tuple(_prompts(tok, 1)[0])
    long = GenerationRequest(prompt=prompt, max_tokens=100, sampling=GREEDY)
    first = engine.submit(long)
    engine.submit(long)            # waits in the queue
    with pytest.raises(QueueFull):
        engine.submit(long)
    with pytest.raises(ConfigError, match="context"):
        engine.submit(GenerationRequest(prompt=tuple([1] * 200), max_tokens=1))
    engine.start()
    first.cancel()                 # the slot goes to the waiting request at the next step
    deadline = time.monotonic() + 30
    while engine.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.waiting == 0
    short = engine.submit(GenerationRequest(prompt=prompt, max_tokens=3, sampling=GREEDY))
    engine.shutdown(drain=True, timeout=60)  # drains: the queued short request still completes
    assert list(short)[-1].finish_reason in ("length", "stop")


def test_served_adapter_gives_what_generate_with_the_adapter_gives(model, tok, tmp_path):
    """`serve --adapter`: the engine's loader applies the LoRA adapter unmerged, and batched
    requests give the adapted model's own greedy tokens (which differ from the base's)."""
    from bitnet158 import checkpoint
    from bitnet158.checkpoint.adapter import load_adapter, save_adapter
    from bitnet158.cli.serve import engine_loader
    from bitnet158.lora import LoRAConfig, add_lora, lora_modules

    base = checkpoint.save_packed(model, tmp_path / "base", tok)
    adapted, _ = bn.load(base)
    config = LoRAConfig(r=4, alpha=8.0)  # projections and the tied table (cached steps in Python)
    add_lora(adapted, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in lora_modules(adapted).values():
            for p in layer.parameters(recurse=False):
                p.normal_(0.0, 0.3)
    save_adapter(adapted, tmp_path / "adapter", config)
    reference, _ = bn.load(base)
    load_adapter(reference, tmp_path / "adapter")
    engine, _ = engine_loader(base, max_concurrency=3, max_queue=4, adapter=tmp_path / "adapter")()
    try:
        prompts = _prompts(tok, 3)
        streams = [engine.submit(GenerationRequest(prompt=tuple(p), max_tokens=6, sampling=GREEDY)) for p in prompts]
        got = [[r.token for r in s] for s in streams]
    finally:
        engine.shutdown(timeout=10)
    differs = False
    for p, tokens in zip(prompts, got):
        want = _alone(reference, p, 6)
        cut = next((j + 1 for j, t in enumerate(want) if t in tok.end_ids), len(want))
        assert tokens == want[:cut]
        differs |= want != _alone(model, p, 6)
    assert differs  # the adapter changes the output, so the comparison means something
