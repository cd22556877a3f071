"""The native forward step (csrc/forward_step.cpp) against the Python packed path it replaces:
each op through a model that differs from the others by that op, greedy decoding token for token,
batches of sequences at their own positions, threads, the cache it writes, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitnet158 as bn
from bitnet158 import kernels, native_step
from bitnet158.cache import KVCache, SlotKVCache
from bitnet158.config import ModelConfig
from bitnet158.generate import generate_step
from bitnet158.model import Transformer
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158.sampling import SamplingConfig

pytestmark = pytest.mark.skipif(not kernels.extension_available() or kernels.current_path() == kernels.TORCH_PATH,
                                reason="the native step needs the compiled extension")

FORMATS = ("i2", "base3", "lut2")
GREEDY = SamplingConfig(temperature=0.0)
# The two paths round the same way everywhere but in attention and SiLU (fp32 summation order,
# exp ulps); a one-ulp difference there can flip one int8 activation code, which moves a logit by
# about 1e-3 here.
ATOL = 2e-2


def packed_model(seed: int = 0, fmt: str = "i2", head: str = "int8", **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=96, max_seq_len=64), **overrides})
    return pack_(Transformer(cfg), PackConfig(format=fmt, head=head)).eval()


def both_paths(model, run):
    """run(model) with the Python path, then with the native step (the model's plan checked used)."""
    with torch.no_grad():
        native_step.set_enabled(False)
        try:
            want = run(model)
        finally:
            native_step.set_enabled(None)
        assert native_step.usable(model), native_step.unsupported_reason(model)
        return want, run(model)


def prefill_then_decode(model, batch: int = 2, prompt: int = 7, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (batch, prompt + steps), generator=gen)
    cache = KVCache(model.config, batch)
    outs = [model(tokens[:, :prompt], cache)]
    outs += [model(tokens[:, i:i + 1], cache) for i in range(prompt, prompt + steps)]
    return outs


# One model per op or variant: a wrong op shows up as the variant that exercises it.
VARIANTS = {
    "swiglu, sub-norms, GQA": {},
    "relu2 (2B4T)": dict(activation="relu2"),
    "inner norms (FAQ)": dict(norm_placement="inner"),
    "no sub-norms (LLaMA)": dict(sub_norm=False),
    "q/k/v biases (Qwen2)": dict(qkv_bias=True),
    "multi-head (no GQA)": dict(num_kv_heads=4),
    "untied head": dict(tie_embeddings=False),
    "binary b1": dict(mode="b1"),
    "odd widths": dict(hidden_size=40, num_heads=2, num_kv_heads=1, intermediate_size=72),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_op_matches_the_python_path(variant):
    model = packed_model(**VARIANTS[variant])
    if variant.startswith("q/k/v"):
        for layer in model.layers:  # pack_ keeps the biases; make them matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    want, got = both_paths(model, prefill_then_decode)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("head", ["int8", "q4", "fp32", "fp16"])
def test_formats_and_heads_match_the_python_path(fmt, head):
    want, got = both_paths(packed_model(fmt=fmt, head=head), prefill_then_decode)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_the_cache_it_writes_is_the_python_paths():
    model = packed_model()
    caches = []

    def run(m):
        cache = KVCache(m.config, 2)
        m(torch.arange(20).reshape(2, 10) * 7 % 300, cache)
        caches.append(cache)
        return cache.offset

    want, got = both_paths(model, run)
    assert want == got == 10
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _attention_reference(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def test_attention_rope_and_gqa_against_torch_sdpa():
    """The attention inside the step, read back through the cache it filled: recompute q from the
    Python layers and compare attention outputs with torch's SDPA over the native keys/values."""
    model = packed_model(num_heads=4, num_kv_heads=1)
    tokens = torch.arange(12).reshape(1, 12) * 11 % 300
    with torch.no_grad():
        cache = KVCache(model.config, 1)
        native = model(tokens, cache)
        ref_cache = KVCache(model.config, 1)
        native_step.set_enabled(False)
        try:
            python = model(tokens, ref_cache)
        finally:
            native_step.set_enabled(None)
        keys, values = cache.keys[0][:, :, :12], cache.values[0][:, :, :12]
        torch.testing.assert_close(keys, ref_cache.keys[0][:, :, :12], atol=1e-5, rtol=1e-5)
        x = model.layers[0].input_layernorm(model.embed_tokens(tokens))
        attn = model.layers[0].self_attn
        q = attn.q_proj(x).view(1, 12, 4, -1).transpose(1, 2)
        q = bn.model.apply_rope(q, model.rope_cos[:12], model.rope_sin[:12])
        torch.testing.assert_close(_attention_reference(q, keys, values),
                                   _attention_reference(q, ref_cache.keys[0][:, :, :12], ref_cache.values[0][:, :, :12]),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native, python, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a few seconds on repetitive text, so greedy choices have margins
    (a random model's near-uniform logits would let a one-ulp difference pick another token)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=320)
    model = Transformer(cfg)
    pattern = torch.tensor([(i * i + 3 * i) % 61 for i in range(40)])
    data = pattern.repeat(8)[: 8 * 33].reshape(8, 33)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict(), cfg


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", [1, 3])
def test_greedy_256_tokens_are_the_python_paths(trained, fmt, threads):
    state, cfg = trained
    model = Transformer(cfg)
    model.load_state_dict(state)
    pack_(model, PackConfig(format=fmt)).eval()
    before = kernels.get_num_threads()
    kernels.set_num_threads(threads)
    try:
        prompt = [5, 9, 17, 31, 2]
        want, got = both_paths(model, lambda m: list(generate_step(m, prompt, GREEDY, 256)))
    finally:
        kernels.set_num_threads(before)
    assert got == want and len(got) == 256


def test_sequences_at_their_own_positions_equal_each_alone():
    """Five sequences of different lengths in one step give bit for bit what each gives alone
    through the native step, and match the Python path's batched step."""
    model = packed_model(max_seq_len=64)
    prompts = [[(7 * i + j) % 300 for j in range(3 + 4 * i)] for i in range(5)]
    nxt = torch.tensor([[11], [22], [33], [44], [55]])

    def batched(m):
        cache = SlotKVCache(m.config, slots=6)
        slots = [4, 0, 2, 5, 1]
        for slot, p in zip(slots, prompts):
            m(torch.tensor([p]), cache.bind([slot]))
        return m(nxt, cache.bind(slots))[:, -1]

    want, got = both_paths(model, batched)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            cache = KVCache(model.config)
            model(torch.tensor([p]), cache)
            assert torch.equal(model(nxt[b:b + 1], cache)[0, -1], got[b])


def test_threads_split_rows_without_changing_a_bit():
    """Enough rows and vocabulary that every parallel section of the step runs on the pool (the
    head's scaling loop once read the workers' own empty scratch and crashed)."""
    model = packed_model(vocab_size=4096, max_seq_len=64)
    tokens = torch.arange(48).reshape(3, 16) * 37 % 4096
    before = kernels.get_num_threads()
    outs = []
    try:
        for threads in (1, 3):
            kernels.set_num_threads(threads)
            with torch.no_grad():
                outs.append(model(tokens, KVCache(model.config, 3)))
    finally:
        kernels.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(kernels.available_paths()[0] == "scalar", reason="no SIMD path on this CPU")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 16), (8, 1, 32), (6, 2, 12), (12, 3, 24), (5, 5, 24)])
def test_simd_paths_give_the_portable_loops_bits(heads, kv_heads, head_dim, kv_dtype):
    """Attention in register tiles (the query heads of one KV head together, on x86; lanes and
    softmax sums in vectors; p·v in blocks of value rows) keeps the one-query loop's arithmetic;
    with an int8 head every other op is exact or the same bits too, so the logits of a prefill and
    a decode step are identical on the scalar path and the best one, over fp32, fp16 and q8 caches.
    150 positions: more than one p·v block (8 KiB of value rows) at hd 16-32 in fp32 and hd 32 in
    fp16; restarting the sums at a block fails 5 of these cases."""
    model = packed_model(vocab_size=300, hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=kv_heads,
                         max_seq_len=160)
    tokens = torch.arange(300).reshape(2, 150) * 7 % 300
    outs = []
    try:
        for path in ("scalar", kernels.available_paths()[0]):
            kernels.set_path(path)
            with torch.no_grad():
                cache = KVCache(model.config, 2, dtype=kv_dtype)
                outs.append(torch.cat([model(tokens, cache), model(tokens[:, :1] + 1, cache)], 1))
    finally:
        kernels.set_path(None)
    assert torch.equal(outs[0], outs[1])


def test_bad_rows_are_clear_errors_not_crashes():
    model = packed_model()
    with torch.no_grad():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            model(torch.tensor([[5, 300]]), KVCache(model.config))
        cache = KVCache(model.config, max_len=8)
        with pytest.raises(bn.errors.ConfigError, match="exceeds the KV cache length 8"):
            model(torch.zeros(1, 9, dtype=torch.long), cache)


def test_falls_back_where_it_cannot_serve():
    model = packed_model(act_quant="tensor")
    assert native_step.plan_for(model) is None
    assert "per-tensor" in native_step.unsupported_reason(model)
    assert native_step.unsupported_reason(packed_model()) is None
    training_form = Transformer(ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4,
                                            num_kv_heads=2, intermediate_size=96, max_seq_len=64))
    assert native_step.unsupported_reason(training_form) == "the model is not packed"
    model = packed_model()
    with torch.no_grad():
        assert native_step.run(model, torch.tensor([[1]]), KVCache(model.config), 0, False) is not None
        native_step.set_enabled(False)
        try:
            assert native_step.run(model, torch.tensor([[1]]), KVCache(model.config), 0, False) is None
        finally:
            native_step.set_enabled(None)
    assert native_step.run(model, torch.tensor([[1]]), KVCache(model.config), 0, False) is None  # autograd on


def test_a_replaced_buffer_rebuilds_the_plan():
    model = packed_model()
    plan = native_step.plan_for(model)
    assert native_step.plan_for(model) is plan
    other = packed_model(seed=1)
    model.load_state_dict(other.state_dict())  # copies in place: same tensors, new values
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[3, 4]]), KVCache(model.config)),
                                   other(torch.tensor([[3, 4]]), KVCache(other.config)))
    model.layers[0].self_attn.q_proj.packed = other.layers[0].self_attn.q_proj.packed.clone()
    assert native_step.plan_for(model) is not plan


def test_a_swapped_layer_rebuilds_the_plan():
    """A wrapper around a packed layer keeps its buffers; the plan must still notice the swap."""
    model = packed_model()
    plan = native_step.plan_for(model)

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model.layers[0].mlp.down_proj = Doubled(model.layers[0].mlp.down_proj)
    assert native_step.plan_for(model) is None and "Doubled" in native_step.unsupported_reason(model)
    assert plan is not None
