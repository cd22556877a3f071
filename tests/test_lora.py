"""LoRA beside a frozen ternary base (bitnet158.lora): exact base arithmetic, zero-B identity,
gradients only to adapters, the float reference, and the base held as int8 codes."""

from __future__ import annotations

import pytest
import torch

from bitnet158 import ModelConfig, Transformer, quant
from bitnet158.errors import ConfigError
from bitnet158.layers import BitLinear
from bitnet158.lora import (PROJECTIONS, FrozenInt8Head, FrozenTernaryLinear, LoRAConfig, LoRALinear, add_lora,
                            lora_layers)
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig, PackedBitLinear
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


def test_gradients_reach_only_adapters_and_the_input_through_the_ste():
    model = _model()
    add_lora(model, LoRAConfig(r=2, alpha=4.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(std=0.01)
    tokens = torch.randint(0, 300, (2, 10))
    model(tokens).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # the first layer's adapters learn only if the gradient passed down through later frozen bases
    assert model.layers[0].self_attn.q_proj.lora_A.grad.abs().sum() > 0


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
    assert len(names) == 14 and {n.rpartition(".")[2] for n in names} == set(PROJECTIONS)
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
    assert isinstance(model.lm_head, FrozenInt8Head)
    assert not any(isinstance(m, PackedBitLinear) for m in model.modules())
    out = model(tokens)
    torch.testing.assert_close(out.detach(), before, rtol=0, atol=1e-5)
    out.logsumexp(-1).mean().backward()  # reaches the adapters through the int8 head
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_A"))


def test_inference_wrap_keeps_packed_kernels():
    model = _model().eval()
    pack_(model, PackConfig(format="i2"))
    add_lora(model, LoRAConfig(r=2), frozen_base=False)
    assert all(isinstance(m.base, PackedBitLinear) for m in lora_layers(model).values())


@pytest.mark.parametrize("kw, fragment", [
    ({"r": 0}, "rank must be a positive integer"),
    ({"r": -3}, "rank must be a positive integer"),
    ({"alpha": 0.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"targets": ("lm_head",)}, "unknown LoRA target"),
])
def test_bad_config_is_one_line(kw, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        LoRAConfig(**kw).validate()
    assert "\n" not in str(info.value)


def test_fp_model_has_no_ternary_base():
    with pytest.raises(ConfigError, match="use --method full"):
        add_lora(_model(mode="fp"), LoRAConfig())
