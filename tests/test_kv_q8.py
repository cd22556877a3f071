"""The q8 KV cache (int8 codes and one fp32 scale per position of a KV head): its rows are the
activation quantizer's (quant.absmax_int8_per_token), the native step against the Python path over
q8 caches, slots batched against each sequence alone, the torch-free runtime against the torch
model, the serving engine's prompt cache copying scales with codes, and its size (the SIMD tiles
against the portable loop over q8: tests/test_native_step.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import needs_step
from common import small_packed_model as packed_model

from bitnet158 import checkpoint, native_step, runtime
from bitnet158.cache import KVCache, SlotKVCache
from bitnet158.config import kv_cache_bytes
from bitnet158.generate import GenerationRequest, PromptCache, generate_step
from bitnet158.quant import absmax_int8_per_token
from bitnet158.runner import runner_for, set_kv_dtype
from bitnet158.sampling import SamplingConfig
from bitnet158.serve.engine import Engine
from bitnet158.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0.0)


def run(model, tokens, dtype, native: bool):
    """Logits of a prefill and one decode step, and the cache."""
    with torch.no_grad():
        native_step.set_enabled(native)
        try:
            cache = KVCache(model.config, tokens.shape[0], dtype=dtype)
            logits = torch.cat([model(tokens, cache), model(tokens[:, :1] + 1, cache)], 1)
        finally:
            native_step.set_enabled(None)
    return logits, cache


def test_rows_are_quantized_like_the_activations():
    """The Python path stores absmax_int8_per_token of each row: codes = round(x · 127/max|x|),
    scale = max|x| / 127, and reads code × scale."""
    model = packed_model()
    tokens = torch.arange(20).reshape(1, 20) * 7 % 300
    _, cache = run(model, tokens, torch.int8, native=False)
    float_logits, float_cache = run(model, tokens, torch.float32, native=False)
    keys = float_cache.keys[0][:, :, :21]  # layer 0 sees the same inputs either way
    codes, scales = absmax_int8_per_token(keys)
    assert torch.equal(cache.keys[0][:, :, :21], codes)
    assert torch.equal(cache.key_scales[0][:, :, :21], scales.squeeze(-1))
    assert codes.abs().max() == 127
    dequantized = codes.float() * scales
    assert (dequantized - keys).abs().max() <= scales.max() / 2 + 1e-7  # half a step at most


@needs_step
def test_native_step_over_a_q8_cache_matches_the_python_path():
    model = packed_model()
    tokens = torch.arange(40).reshape(2, 20) * 7 % 300
    want, want_cache = run(model, tokens, torch.int8, native=False)
    got, got_cache = run(model, tokens, torch.int8, native=True)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    # layer 0's rows come from the same inputs: the same codes and scales, bit for bit
    assert torch.equal(got_cache.keys[0], want_cache.keys[0]) and torch.equal(got_cache.values[0], want_cache.values[0])
    assert torch.equal(got_cache.key_scales[0], want_cache.key_scales[0])
    assert torch.equal(got_cache.value_scales[0], want_cache.value_scales[0])
    for a, b in zip(want_cache.keys + want_cache.values, got_cache.keys + got_cache.values):
        assert b.dtype == torch.int8 and (a.int() - b.int()).abs().max() <= 1  # later layers: an fp32 ulp apart
    fp32, fp32_cache = run(model, tokens, torch.float32, native=True)
    assert not torch.equal(got, fp32)  # the rounding is real...
    torch.testing.assert_close(got, fp32, atol=5e-2, rtol=0)  # ...and small
    assert got_cache.nbytes * 3 < fp32_cache.nbytes


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_step), False], ids=["native", "python"])
def test_slot_caches_in_q8_batch_as_each_sequence_alone(native):
    model = packed_model()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    slots = SlotKVCache(model.config, 2, 32, dtype=torch.int8)
    native_step.set_enabled(native)
    try:
        with torch.no_grad():
            model(torch.tensor([prompts[0] + prompts[1]]), slots.bind_rows([(0, 3), (1, 5)]))
            both = model(torch.tensor([[1, 2]]), slots.bind_rows([(0, 1), (1, 1)]))
            again = model(torch.tensor([[3], [4]]), slots.bind([0, 1]))  # one token each, SlotBatch
            for i, p in enumerate(prompts):
                alone = KVCache(model.config, dtype=torch.int8)
                model(torch.tensor([p]), alone)
                assert torch.equal(model(torch.tensor([[1 + i]]), alone)[0, -1], both[0, i])
                assert torch.equal(model(torch.tensor([[3 + i]]), alone)[0, -1], again[i, -1])
    finally:
        native_step.set_enabled(None)


@needs_step
def test_the_runtime_over_q8_gives_the_torch_models_logits_and_tokens(tmp_path):
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n", "The with statement.\n"] * 10, vocab_size=300)
    model = packed_model()
    path = checkpoint.save_packed(model, tmp_path / "m", tok)
    native_model, _ = runtime.load(path)
    set_kv_dtype(model, "q8")
    set_kv_dtype(native_model, "q8")
    prompt = [3, 4, 5, 6, 7, 8, 9, 10]
    a = runner_for(model).logits(prompt, runner_for(model).new_cache(32))
    b = runner_for(native_model).logits(prompt, runner_for(native_model).new_cache(32))
    np.testing.assert_array_equal(a, b)
    assert list(generate_step(model, prompt, GREEDY, 20)) == list(generate_step(native_model, prompt, GREEDY, 20))


@needs_step
def test_the_engines_prompt_cache_copies_scales_with_codes():
    """A request that copies a running request's prefix gives generate()'s tokens over q8 slots:
    the copy carries each row's scale with its codes."""
    tok = Tokenizer.train(["def f(x):\n    return x + 1\n", "The with statement wraps a block.\n"] * 10,
                          vocab_size=300)
    model = packed_model(vocab_size=tok.vocab_size, max_seq_len=128)
    set_kv_dtype(model, "q8")
    engine = Engine(model, tok, max_concurrency=2)  # not started: steps run here
    engine._worker = engine.runner.worker()
    system = tuple(tok.encode_prompt("def f(x):\n    return x + 1\nThe with statement wraps a block.\n"))
    prompts = [system + tuple(tok.encode_prompt(t)) for t in ("def", "The")]
    with engine._worker:
        streams = [engine.submit(GenerationRequest(prompt=p, max_tokens=6, sampling=GREEDY)) for p in prompts]
        while engine.running or engine.waiting:
            engine._step()
    for prompt, stream in zip(prompts, streams):
        responses = list(stream)
        want = list(generate_step(model, list(prompt), GREEDY, 6))
        cut = next((j + 1 for j, t in enumerate(want) if t in tok.end_ids), len(want))
        assert [r.token for r in responses] == want[:cut]
    assert responses[-1].cached_tokens > 16
    set_kv_dtype(model, "fp32")


def test_set_kv_dtype_q8_and_its_size():
    model = packed_model()
    set_kv_dtype(model, "q8")
    cache = PromptCache(model)
    assert all(t.dtype == torch.int8 for t in cache.kv.keys + cache.kv.values)
    assert all(t.dtype == torch.float32 for t in cache.kv.key_scales + cache.kv.value_scales)
    slots = runner_for(model).new_slot_cache(2, 16)
    cfg = model.config
    assert slots.nbytes == kv_cache_bytes(cfg, 2, 16, "q8") == 2 * 2 * 2 * 16 * cfg.num_kv_heads * (cfg.head_dim + 4)
    assert kv_cache_bytes(cfg, 2, 16, "fp32") == 4 * kv_cache_bytes(cfg, 2, 16, "q8") * cfg.head_dim // (cfg.head_dim + 4)
    out = list(generate_step(model, [3, 4, 5], GREEDY, max_tokens=8))
    set_kv_dtype(model, "fp32")
    assert len(out) == 8
