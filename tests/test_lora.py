"""LoRA beside a frozen ternary base (bitnet158.lora): exact base arithmetic, zero-B identity,
gradients only to adapters, the float reference, and the base held as int8 codes; the embedding
and head's update (one update of a tied table, or one each when untied)."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import ModelConfig, Transformer, quant
from bitnet158.errors import ConfigError
from bitnet158.layers import BitLinear
from bitnet158.lora import (FACTOR_NAMES, PROJECTIONS, FrozenInt8Head, FrozenTernaryLinear, LoRAConfig,
                            LoRAEmbedding, LoRAHead, LoRALinear, TiedHead, add_lora, factors, lora_layers,
                            lora_modules)
from bitnet158.pack import pack_
from bitnet158.packed_layers import Int8Embedding, Int8Head, PackConfig, PackedBitLinear
from common import one_torch_thread  # noqa: F401  (the fixture, by name)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bitlinear(k: int = 48, n: int = 40, seed: int = 0, **kw) -> BitLinear:
    torch.manual_seed(seed)
    return BitLinear(k, n, **kw)


def _model(seed: int = 0, tie: bool = True, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=64, tie_embeddings=tie, **kw)
    return Transformer(cfg)


def test_frozen_base_is_the_packed_layers_integers_and_bitlinears_values():
    layer = _bitlinear()
    x = torch.randn(3, 5, 48)
    frozen = FrozenTernaryLinear.from_layer(layer)
    assert frozen.codes.dtype == torch.int8 and set(frozen.codes.unique().tolist()) <= {-1, 0, 1}
    assert not list(frozen.parameters())  # buffers only: nothing to train, no fp32 latent weights
    packed = PackedBitLinear.from_bitlinear(layer)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x), rtol=0, atol=1e-5)
        ref = packed(x)
    assert torch.allclose(frozen(x).detach(), ref, rtol=0, atol=1e-6)
    # from the packed layer's codes: the same base
    assert torch.equal(FrozenTernaryLinear.from_layer(packed).codes, frozen.codes)


def test_zero_b_gives_exactly_the_base_output():
    layer = _bitlinear(norm=True)
    lora = LoRALinear(FrozenTernaryLinear.from_layer(layer), r=4, alpha=8.0, dropout=0.1).train()
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    x = torch.randn(2, 7, 48)
    assert torch.equal(lora(x), lora.base(x))


def test_output_equals_float_reference():
    layer = _bitlinear(seed=1)
    lora = LoRALinear(FrozenTernaryLinear.from_layer(layer), r=4, alpha=16.0)
    torch.nn.init.normal_(lora.lora_B, std=0.1)
    x = torch.randn(4, 6, 48)
    codes, s_w = layer.quantized_weight()
    q, s_x = quant.absmax_int8_per_token(x)
    base = (q.double() @ codes.double().T) * s_x.double() * s_w.double()  # the ternary product in float64
    ref = base + x.double() @ lora.lora_A.double().T @ lora.lora_B.double().T * (16.0 / 4)
    with torch.no_grad():
        torch.testing.assert_close(lora(x).double(), ref, rtol=0, atol=1e-5)


def _randomize(model, std: float = 0.01) -> None:
    """Non-zero updates everywhere (the factors that start at zero: the projections' B, the embedding's A)."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            for p in m.parameters(recurse=False):
                if p.abs().sum() == 0:
                    p.normal_(std=std)


def test_gradients_reach_only_adapters_and_the_input_through_the_ste():
    model = _model()
    add_lora(model, LoRAConfig(r=2, alpha=4.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in FACTOR_NAMES for n in trainable)
    # A and B, 7 projections, 2 layers; the tied table's one update (its head holds no factors of its own)
    assert len(trainable) == 2 * 7 * 2 + 2
    assert {"embed_tokens.lora_embedding_A", "embed_tokens.lora_embedding_B"} <= trainable
    _randomize(model)
    tokens = torch.randint(0, 300, (2, 10))
    model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] in FACTOR_NAMES:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the first layer's adapters learn only if the gradient passed down through later frozen bases
    assert model.layers[0].self_attn.q_proj.lora_A.grad.abs().sum() > 0
    assert model.embed_tokens.base.weight.grad is None  # the table itself stays frozen


@pytest.mark.parametrize("packed", [False, True])
def test_zero_update_gives_exactly_the_base_output_including_the_head(packed):
    model = _model().eval()
    if packed:
        pack_(model, PackConfig(format="i2"))
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        before = model(tokens)
    add_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.1), frozen_base=False)
    assert isinstance(model.embed_tokens, LoRAEmbedding) and isinstance(model.lm_head, LoRAHead)
    assert torch.count_nonzero(model.embed_tokens.lora_embedding_A) == 0  # PEFT's embedding: A starts at zero
    assert torch.count_nonzero(model.embed_tokens.lora_embedding_B) > 0
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
        assert torch.equal(model.train()(tokens), before)  # dropout on the head's input: still nothing


def test_tied_table_takes_one_update_at_both_ends():
    model = _model().eval()
    reference = _model().eval()
    add_lora(model, LoRAConfig(r=4, alpha=8.0, targets=("embed_tokens", "lm_head")), frozen_base=False)
    _randomize(model, std=0.5)
    head = model.lm_head
    assert head.tied is model.embed_tokens and not list(head.parameters(recurse=False))
    a, b = factors(head)  # PEFT's lm_head factors: the embedding's, transposed
    embed = model.embed_tokens
    assert torch.equal(a, embed.lora_embedding_B.T) and torch.equal(b, embed.lora_embedding_A.T)
    delta = model.embed_tokens.delta_weight().detach()
    assert float(delta.abs().max()) > 1e-3
    torch.testing.assert_close(head.delta_weight(), delta, rtol=0, atol=1e-6)
    with torch.no_grad():
        reference.embed_tokens.weight.add_(delta)  # the plain model with the table replaced by E + ΔE
        tokens = torch.randint(0, 300, (2, 9))
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=0, atol=1e-5)


def test_untied_model_gets_an_update_each_and_only_the_targets():
    model = _model(tie=False)
    add_lora(model, LoRAConfig(r=2))
    assert isinstance(model.lm_head, LoRAHead) and model.lm_head.tied is None
    assert isinstance(model.lm_head.base, torch.nn.Linear) and not model.lm_head.base.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.lora_A", "lm_head.lora_B", "embed_tokens.lora_embedding_A"} <= trainable
    assert len(trainable) == 2 * 7 * 2 + 4
    # on a tied model, the embedding alone leaves the head as it was (PEFT's meaning of that target)
    only = _model()
    add_lora(only, LoRAConfig(r=2, targets=("embed_tokens",)))
    assert only.lm_head is None and isinstance(only.embed_tokens, LoRAEmbedding)
    head_only = _model()
    add_lora(head_only, LoRAConfig(r=2, targets=("lm_head",)))
    assert isinstance(head_only.lm_head.base, TiedHead) and head_only.lm_head.tied is None
    assert not isinstance(head_only.embed_tokens, LoRAEmbedding)


def test_ste_gradient_to_the_input_matches_bitlinear():
    layer = _bitlinear(seed=2)
    frozen = FrozenTernaryLinear.from_layer(layer)
    x1 = torch.randn(3, 48, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(3, 40)
    (layer(x1) * g).sum().backward()
    (frozen(x2) * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-5)


def test_every_projection_is_wrapped_and_latent_weights_are_gone():
    model = _model()
    names = add_lora(model, LoRAConfig())
    assert len(names) == 16
    assert {n.rpartition(".")[2] for n in names} == set(PROJECTIONS) | {"embed_tokens", "lm_head"}
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    some = add_lora(_model(), LoRAConfig(targets=("q_proj", "v_proj")))
    assert len(some) == 4


def test_packed_model_trains_adapters_through_its_int8_head():
    model = _model(tie=True).eval()
    pack_(model, PackConfig(format="i2"))
    tokens = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        before = model(tokens)
    add_lora(model, LoRAConfig(r=2))
    assert isinstance(model.lm_head, LoRAHead) and isinstance(model.lm_head.base, FrozenInt8Head)
    assert not any(isinstance(m, PackedBitLinear) for m in model.modules())
    out = model(tokens)
    torch.testing.assert_close(out.detach(), before, rtol=0, atol=1e-5)
    out.logsumexp(-1).mean().backward()  # reaches the adapters through the int8 head
    assert all(p.grad is not None for n, p in model.named_parameters()
               if n.endswith(("lora_A", "lora_embedding_A")))
    plain = _model(tie=True).eval()
    pack_(plain, PackConfig(format="i2"))
    add_lora(plain, LoRAConfig(r=2, targets=PROJECTIONS))  # no table update: the int8 head alone
    assert isinstance(plain.lm_head, FrozenInt8Head)


def test_inference_wrap_keeps_packed_kernels():
    model = _model().eval()
    pack_(model, PackConfig(format="i2"))
    add_lora(model, LoRAConfig(r=2), frozen_base=False)
    assert all(isinstance(m.base, PackedBitLinear) for m in lora_layers(model).values())
    assert isinstance(model.lm_head.base, Int8Head) and isinstance(model.embed_tokens.base, Int8Embedding)


def test_q4_head_does_not_train_silently_wrong():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_seq_len=64)).eval()
    pack_(model, PackConfig(format="i2", head="q4"))
    with pytest.raises(ConfigError, match="q4") as info:
        add_lora(model, LoRAConfig(r=2))
    assert "\n" not in str(info.value)


def test_alpha_follows_the_rank_unless_given():
    assert LoRAConfig().alpha == 2.0 * LoRAConfig().r and LoRAConfig(r=4).scaling == 2.0
    assert LoRAConfig(r=4, alpha=4.0).scaling == 1.0


@pytest.mark.parametrize("kw, fragment", [
    ({"r": 0}, "rank must be a positive integer"),
    ({"r": -3}, "rank must be a positive integer"),
    ({"alpha": 0.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"targets": ("norm",)}, "unknown LoRA target"),
])
def test_bad_config_is_one_line(kw, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        LoRAConfig(**kw).validate()
    assert "\n" not in str(info.value)


def test_fp_model_has_no_ternary_base():
    with pytest.raises(ConfigError, match="use --method full"):
        add_lora(_model(mode="fp"), LoRAConfig())
