"""The fp16 KV cache: its rounding (numpy's, round to nearest even), the native step against the
Python path over fp16 caches, slots batched against each sequence alone, and choosing it from the
API (the SIMD tiles against the portable loop over fp16: tests/test_native_step.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import needs_step
from common import small_packed_model as packed_model

from bitnet158 import native, native_step
from bitnet158.cache import KVCache, SlotKVCache
from bitnet158.errors import ConfigError
from bitnet158.generate import PromptCache, generate_step
from bitnet158.runner import runner_for, set_kv_dtype
from bitnet158.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def run_both(model, tokens, dtype):
    """Logits of a prefill and one decode step, and the cache, with the Python path and the native step."""
    results = []
    with torch.no_grad():
        for enabled in (False, True):
            native_step.set_enabled(enabled)
            try:
                cache = KVCache(model.config, tokens.shape[0], dtype=dtype)
                logits = torch.cat([model(tokens, cache), model(tokens[:, :1] + 1, cache)], 1)
            finally:
                native_step.set_enabled(None)
            results.append((logits, cache))
    return results


@pytest.mark.skipif(not native.extension_available(), reason="needs the compiled extension")
def test_rounding_is_numpys_round_to_nearest_even():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    edges = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, -65520.0, 1e9, np.inf, -np.inf, 2.0**-14,
                      2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-25, 2.0**-24 * 1.5, 2.0**-24 * 2.5,
                      1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 6.1e-5, -3.0e-6], dtype=np.float32)
    for values in (x, edges, (x * 1e-4).astype(np.float32), (x * 1e-36).astype(np.float32)):
        with np.errstate(over="ignore"):  # numpy warns where it rounds to inf, as it should
            want = values.astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(native.extension().float_to_half(values), want)
    assert np.isnan(native.extension().float_to_half(np.array([np.nan], np.float32)).view(np.float16)).all()


@needs_step
def test_native_step_over_an_fp16_cache_matches_the_python_path():
    model = packed_model()
    tokens = torch.arange(40).reshape(2, 20) * 7 % 300
    (want, want_cache), (got, got_cache) = run_both(model, tokens, torch.float16)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    for a, b in zip(want_cache.keys + want_cache.values, got_cache.keys + got_cache.values):
        assert b.dtype == torch.float16
        # the same fp32 values round the same way; an fp32 ulp apart they may land one fp16 ulp apart
        torch.testing.assert_close(b.float(), a.float(), atol=1e-5, rtol=1e-3)
    (fp32_logits, fp32_cache), _ = run_both(model, tokens, torch.float32)
    assert fp32_cache.nbytes == 2 * got_cache.nbytes
    assert not torch.equal(got, fp32_logits)  # the rounding is real...
    torch.testing.assert_close(got, fp32_logits, atol=5e-2, rtol=0)  # ...and small


@needs_step
def test_slot_caches_in_fp16_batch_as_each_sequence_alone():
    model = packed_model()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    slots = SlotKVCache(model.config, 2, 32, dtype=torch.float16)
    with torch.no_grad():
        model(torch.tensor([prompts[0] + prompts[1]]), slots.bind_rows([(0, 3), (1, 5)]))
        both = model(torch.tensor([[1, 2]]), slots.bind_rows([(0, 1), (1, 1)]))
        for i, p in enumerate(prompts):
            alone = KVCache(model.config, dtype=torch.float16)
            model(torch.tensor([p]), alone)
            assert torch.equal(model(torch.tensor([[1 + i]]), alone)[0, -1], both[0, i])


def test_set_kv_dtype_makes_every_new_cache_fp16():
    model = packed_model()
    assert runner_for(model).kv_dtype == "fp32"
    set_kv_dtype(model, "fp16")
    cache = PromptCache(model)
    assert all(t.dtype == torch.float16 for t in cache.kv.keys + cache.kv.values)
    assert runner_for(model).new_slot_cache(2, 16).keys[0].dtype == torch.float16
    with pytest.raises(ConfigError, match="unknown KV cache dtype 'bf16'"):
        set_kv_dtype(model, "bf16")
    out = list(generate_step(model, [3, 4, 5], GREEDY, max_tokens=8))
    set_kv_dtype(model, "fp32")
    assert len(out) == 8
