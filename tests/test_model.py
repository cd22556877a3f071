"""BitLinear, convert(), and the Transformer: norms are learned, RoPE is HF's, the KV cache
reproduces one full forward."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitnet158 import BitLinear, KVCache, Transformer, convert, preset, quant
from bitnet158.errors import ConfigError
from bitnet158.model import apply_rope, rope_tables


def small(**kw):
    base = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                vocab_size=97, max_seq_len=64)
    base.update(kw)
    return preset("tiny", **base)


# ---- BitLinear and convert -----------------------------------------------------------------

def test_bitlinear_forward_equals_manual_fake_quant():
    torch.manual_seed(0)
    layer = BitLinear(12, 5, mode="b158", norm=True)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 12)
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
    xc, xs = quant.absmax_int8_per_token(xn)
    wc, ws = quant.absmean_ternary(layer.weight)
    # integer product, both scales applied after: the packed kernels' arithmetic
    expected = (xc.double() @ wc.double().T) * xs.double() * ws.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_inner_norm_is_a_learned_saved_parameter():
    layer = BitLinear(8, 4, norm=True)
    assert "norm.weight" in layer.state_dict()
    layer(torch.randn(3, 8)).square().sum().backward()
    assert layer.norm.weight.grad is not None and layer.norm.weight.grad.abs().sum() > 0


def test_binary_mode_uses_two_values():
    layer = BitLinear(32, 16, mode="b1")
    w = layer.effective_weight().detach()
    assert len(w.unique()) == 2


def test_fp_mode_is_plain_linear():
    layer = BitLinear(8, 4, mode="fp")
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_convert_non_transformer_module_and_it_learns():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    before = net[2].weight.detach().clone()
    convert(net, exclude=())
    assert all(isinstance(net[i], BitLinear) for i in (0, 2, 4))
    assert torch.equal(net[2].weight.detach(), before)          # latent weights kept
    assert net[0].bias is not None                               # biases kept
    # the converted net fits a simple function: loss falls by a large factor
    x = torch.randn(512, 4)
    y = (x[:, :1] - 2 * x[:, 1:2]).sin()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = F.mse_loss(net(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_convert_bare_linear_and_exclusions():
    lin = nn.Linear(6, 3)
    bit = convert(lin)
    assert isinstance(bit, BitLinear) and torch.equal(bit.weight.detach(), lin.weight.detach())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 4)

    net = convert(Net())
    assert isinstance(net.body, BitLinear) and type(net.lm_head) is nn.Linear


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="mode"):
        BitLinear(4, 4, mode="b2")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


# ---- the transformer ---------------------------------------------------------------------

def test_rope_matches_explicit_pair_rotation():
    cfg = small()
    cos, sin = rope_tables(cfg)
    x = torch.randn(1, 1, 5, cfg.head_dim)
    out = apply_rope(x, cos[:5], sin[:5])
    half = cfg.head_dim // 2
    for pos in range(5):
        for i in range(half):
            angle = pos * cfg.rope_theta ** (-2 * i / cfg.head_dim)
            a, b = x[0, 0, pos, i].item(), x[0, 0, pos, i + half].item()
            assert math.isclose(out[0, 0, pos, i].item(), a * math.cos(angle) - b * math.sin(angle), abs_tol=1e-5)
            assert math.isclose(out[0, 0, pos, i + half].item(), b * math.cos(angle) + a * math.sin(angle),
                                abs_tol=1e-5)


@pytest.mark.parametrize("placement", ["subln", "inner"])
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_kv_cache_matches_full_forward_fp(placement, activation):
    torch.manual_seed(0)
    model = Transformer(small(mode="fp", norm_placement=placement, activation=activation)).eval()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, batch_size=2)
        parts = [model(tokens[:, :7], cache), model(tokens[:, 7:12], cache)]
        parts += [model(tokens[:, i:i + 1], cache) for i in range(12, 20)]
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)


def test_kv_cache_matches_full_forward_ternary():
    torch.manual_seed(0)
    model = Transformer(small(mode="b158")).eval()
    tokens = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config)
        steps = torch.cat([model(tokens[:, :4], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(4, 24)], 1)
    # int8 activation rounding can flip on float-order differences: argmax must still agree
    assert (full.argmax(-1) == steps.argmax(-1)).float().mean() >= 0.95
    assert (full - steps).abs().max() < 0.1


def test_every_parameter_gets_a_gradient_and_is_saved():
    model = Transformer(small(mode="b158"))
    tokens = torch.randint(0, 97, (2, 10))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    names = set(model.state_dict())
    for name, p in model.named_parameters():
        assert name in names
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fp_twin_has_same_shapes_and_stats():
    cfg = small()
    a, b = Transformer(cfg), Transformer(cfg.twin("fp"))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert a.stats()["linear_weight_bits"] == pytest.approx(math.log2(3))
    assert b.stats()["linear_weight_bits"] == 16


@pytest.mark.parametrize("overrides", [{}, {"norm_placement": "inner"}, {"sub_norm": False}, {"qkv_bias": True},
                                       {"tie_embeddings": False}, {"mode": "b1", "activation": "relu2"}])
def test_stats_from_the_config_count_the_modules_parameters(overrides):
    """stats() comes from the config alone (so a torch-free `info` can print it): it must count
    what the model really holds."""
    model = Transformer(small(**overrides))
    stats = model.stats()
    assert stats["parameters"] == sum(p.numel() for p in model.parameters())  # a tied table counted once
    assert stats["linear_parameters"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    assert stats["embedding_parameters"] == sum(p.numel() for n, p in model.named_parameters()
                                                if n.startswith(("embed_tokens", "lm_head")))


def test_2b4t_preset_shapes():
    cfg = preset("2b4t")
    with torch.device("meta"):
        model = Transformer(cfg)
    layer = model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (640, 2560)
    assert layer.mlp.down_proj.weight.shape == (2560, 6912)
    assert layer.mlp.ffn_sub_norm.weight.shape == (6912,)
    assert model.lm_head is None and cfg.activation == "relu2"
    assert model.stats()["parameters"] == 2_412_820_480  # the model card's count (FORMATS §2.1)


def test_rmsnorm_matches_its_formula_in_float64():
    from bitnet158.layers import RMSNorm
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 48))
    x = torch.randn(3, 5, 48) * 4
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert torch.allclose(norm(x).double(), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the fused inference route gives the same values
        assert torch.allclose(norm(x).double(), want, rtol=1e-5, atol=1e-6)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16
