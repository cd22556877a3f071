"""FP → 1.58 bits (train/adapt.py): the schedules' values, exact end points of λ and Quant-Noise,
AdaRound beating round-to-nearest, distillation's KL, and every conversion method end to end on a
tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet158 import quant
from bitnet158.config import ModelConfig, TrainConfig
from bitnet158.errors import ConfigError
from bitnet158.layers import BitLinear
from bitnet158.model import Transformer
from bitnet158.train import adapt
from bitnet158.train.trainer import train

TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                   intermediate_size=64, max_seq_len=32, mode="fp")


def fp_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_dict({**TINY.to_dict(), **overrides})
    return Transformer(cfg).eval()


def tokens(n: int = 4000, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    # A learnable stream (a noisy repeating pattern), so fine-tuning has something to fit.
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 13 * 3 % vocab
    noise = torch.randint(0, vocab, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, base)


def batch(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


# --- round to nearest ----------------------------------------------------------------------------

def test_rtn_copies_weights_and_quantizes():
    src = fp_model()
    before = {k: v.clone() for k, v in src.state_dict().items()}
    model = adapt.rtn(src)
    assert model.config.mode == "b158" and model.config == src.config.twin("b158")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(src.state_dict()[k], before[k])
    layers = adapt.quantized_layers(model)
    assert len(layers) == 7 and all(m.mode == "b158" for _, m in layers)
    x = batch()
    with torch.no_grad():
        assert not torch.equal(model(x), src(x))  # the ternary model really differs from its source


# --- schedules -----------------------------------------------------------------------------------

def test_lambda_schedule_values():
    assert [adapt.lambda_schedule(s, 10) for s in (0, 1, 5, 10, 11, 1000)] == [0.0, 0.1, 0.5, 1.0, 1.0, 1.0]
    assert adapt.lambda_schedule(0, 0) == 1.0


def test_quant_noise_schedule_values():
    p = [adapt.quant_noise_schedule(s, 100, start_p=0.1) for s in (0, 30, 75, 99, 100)]
    assert p == pytest.approx([0.1, 0.1 + 0.9 * 30 / 75, 1.0, 1.0, 1.0])
    assert adapt.quant_noise_schedule(50, 100, start_p=0.0, ramp=1.0) == pytest.approx(0.5)
    assert adapt.quant_noise_schedule(0, 0) == 1.0
    with pytest.raises(ConfigError):
        adapt.quant_noise_schedule(0, 10, start_p=1.5)


def test_hooks_set_every_quantized_layer():
    model = adapt.rtn(fp_model())
    adapt.lambda_hook(4)(1, model)
    assert {m.lam for _, m in adapt.quantized_layers(model)} == {0.25}
    adapt.noise_hook(100, start_p=0.2, ramp=0.5)(25, model)
    assert [m.noise_p for _, m in adapt.quantized_layers(model)] == pytest.approx([0.6] * 7)
    adapt.reset_knobs(model)
    assert {(m.lam, m.noise_p) for _, m in adapt.quantized_layers(model)} == {(1.0, 1.0)}


def test_lambda_hook_drives_the_trainer():
    model = adapt.rtn(fp_model())
    seen = []

    def hook(step, m):
        adapt.lambda_hook(4)(step, m)
        seen.append(adapt.quantized_layers(m)[0][1].lam)

    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3, eval_batches=1,
                     save_every=1000, lr=1e-3)
    result = train(model.config, tc, tokens(), tokens(seed=5), model=model, on_step=hook, progress=False)
    assert seen == [0.0, 0.25, 0.5]
    assert result.model is model and all(math.isfinite(h["loss"]) for h in result.history)


# --- exact end points ----------------------------------------------------------------------------

@pytest.mark.parametrize("norm_placement", ["subln", "inner"])
def test_lambda_end_points_are_exact(norm_placement):
    src = fp_model(norm_placement=norm_placement)
    model = adapt.rtn(src)
    plain = adapt.rtn(src)  # never touched: plain QAT forward
    x = batch()
    with torch.no_grad():
        adapt.set_lambda(model, 0.0)
        assert torch.equal(model(x), src(x))        # λ = 0: the FP model, bit for bit
        adapt.set_lambda(model, 0.5)
        half = model(x)
        assert not torch.equal(half, src(x)) and not torch.equal(half, plain(x))
        adapt.set_lambda(model, 1.0)
        assert torch.equal(model(x), plain(x))      # λ = 1: plain QAT, bit for bit


def test_quant_noise_end_points_are_exact():
    torch.manual_seed(0)
    layer = BitLinear(48, 24)
    x = torch.randn(5, 48)
    with torch.no_grad():
        qat = layer(x)
        layer.noise_p = 1.0
        assert torch.equal(layer(x), qat)                                      # p = 1: plain QAT
        layer.noise_p = 0.0
        assert layer.effective_weight() is layer.weight                        # p = 0: FP weights
        assert layer.quantize_input(x) is x                                    # and FP activations
        assert torch.equal(layer(x), F.linear(x, layer.weight))
        # 0 < p < 1: a fresh Bernoulli(p) mask per forward picks quantized or FP per weight
        layer.noise_p = 0.3
        wq = quant.fake_quant(quant.absmean_ternary, layer.weight)
        used = layer.effective_weight()
        from_q = used.eq(wq) & used.ne(layer.weight)
        from_fp = used.eq(layer.weight) & used.ne(wq)
        assert torch.all(used.eq(wq) | used.eq(layer.weight))
        assert 0.2 < from_q.float().mean() < 0.4 and from_fp.float().mean() > 0.55
    # the gradient reaches every latent weight unchanged (identity STE)
    layer.noise_p = 0.3
    layer.effective_weight().sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones_like(layer.weight))


@pytest.mark.parametrize("norm_placement", ["subln", "inner"])
def test_quant_noise_whole_model_end_points_are_exact(norm_placement):
    src = fp_model(norm_placement=norm_placement)
    model, plain = adapt.rtn(src), adapt.rtn(src)
    x = batch()
    with torch.no_grad():
        adapt.set_noise(model, 0.0)
        assert torch.equal(model(x), src(x))        # p = 0: the FP model, bit for bit
        adapt.set_noise(model, 0.5)
        assert not torch.equal(model(x), plain(x)) and not torch.equal(model(x), src(x))
        adapt.set_noise(model, 1.0)
        assert torch.equal(model(x), plain(x))      # p = 1: plain QAT, bit for bit


# --- AdaRound ------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", [False, True])
def test_adaround_beats_round_to_nearest(norm):
    torch.manual_seed(0)
    layer = BitLinear(64, 32, norm=norm)
    mix = torch.randn(64, 64)  # correlated inputs, as real activations are
    x, x_new = torch.randn(512, 64) @ mix, torch.randn(512, 64) @ mix
    w0 = layer.weight.detach().clone()
    rtn_codes, s0 = quant.absmean_ternary(w0)

    def target(inp):
        return F.linear(adapt.layer_input(layer, inp, quantized=False), w0)

    def err(inp, w):
        return adapt.output_error(layer, inp, quant.fake_quant(quant.absmean_ternary, w), target(inp))

    rtn_fit, rtn_new = err(x, w0), err(x_new, w0)
    codes, scale = adapt.adaround_layer(layer, x, iters=150)
    ar_fit, ar_new = err(x, layer.weight), err(x_new, layer.weight)
    assert ar_fit < 0.8 * rtn_fit, (ar_fit, rtn_fit)
    assert ar_new < 0.9 * rtn_new, (ar_new, rtn_new)   # and on calibration rows it never saw
    # the layer's own quantizer returns exactly the learned rounding, at the original scale
    got, s = layer.quantized_weight()
    assert torch.equal(got, codes) and torch.equal(scale, s0)
    assert float(s) == pytest.approx(float(s0), rel=1e-6)  # absmean of the rewritten latent: float sum order
    # every choice is floor or ceil of W/s, clipped to the ternary range
    u = w0 / s0
    lo, hi = u.floor().clamp(-1, 1), (u.floor() + 1).clamp(-1, 1)
    assert torch.all(codes.float().eq(lo) | codes.float().eq(hi))
    assert 0 < codes.ne(rtn_codes).float().mean() < 0.5


def test_adaround_rejects_non_ternary():
    with pytest.raises(ConfigError):
        adapt.adaround_layer(BitLinear(8, 8, mode="b1"), torch.randn(4, 8), iters=2)


def test_adaround_model_layer_by_layer():
    src = fp_model()
    model = adapt.rtn(src)
    rtn_model = adapt.rtn(src)
    done = []
    adapt.adaround_model(model, tokens(), teacher=src, batches=2, batch_size=2, seq_len=16, iters=60,
                         progress=done.append)
    assert done == [name for name, _ in adapt.quantized_layers(model)]
    for _, layer in adapt.quantized_layers(model):
        codes, _ = layer.quantized_weight()
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        assert not layer._forward_pre_hooks  # capture hooks removed
    x = batch()
    with torch.no_grad():
        ref = src(x)
        ar = (model(x) - ref).pow(2).mean()
        base = (rtn_model(x) - ref).pow(2).mean()
    assert torch.isfinite(ar) and ar < base, (float(ar), float(base))


def test_capture_inputs_stops_at_the_layer():
    model = fp_model()
    x = [batch(), batch(3)]
    got = adapt.capture_inputs(model, "layers.0.mlp.down_proj", x)
    assert got.shape == (2 * 2 * 16, TINY.intermediate_size)
    assert not model.layers[0].mlp.down_proj._forward_pre_hooks


# --- distillation --------------------------------------------------------------------------------

def test_distill_loss_is_kl():
    s = torch.tensor([[[1.0, 0.0, -1.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0]]])
    p, q = t.softmax(-1), s.softmax(-1)
    assert float(adapt.distill_loss(s, t)) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    pT, qT = (t / 2).softmax(-1), (s / 2).softmax(-1)
    assert float(adapt.distill_loss(s, t, T=2.0)) == pytest.approx(4 * float((pT * (pT / qT).log()).sum()),
                                                                    rel=1e-5)
    assert float(adapt.distill_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ConfigError):
        adapt.distill_loss(s, t, T=0.0)


@pytest.fixture(scope="module")
def trained_fp():
    # A teacher with something to teach: a few steps of CE on the pattern stream.
    model = fp_model()
    adapt.finetune(model, tokens(), steps=40, lr=1e-2, batch_size=4, seq_len=16)
    return model.eval()


def test_distill_finetune_moves_student_towards_teacher(trained_fp):
    src = trained_fp
    model = adapt.rtn(src)
    x = batch()
    with torch.no_grad():
        before = float(adapt.distill_loss(model(x), src(x)))
    history = adapt.finetune(model, tokens(), steps=15, teacher=src, lr=3e-3, batch_size=4, seq_len=16)
    with torch.no_grad():
        after = float(adapt.distill_loss(model(x), src(x)))
    assert len(history) == 15 and all("kd" in h for h in history)
    assert after < before, (before, after)


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "adaround", "lambda", "noise", "qat", "distill",
                                    ["adaround", "lambda", "distill"], "adaround,noise"])
def test_convert_model_each_method(method):
    src = fp_model()
    before = {k: v.clone() for k, v in src.state_dict().items()}
    history = []
    model = adapt.convert_model(src, method, tokens(), steps=4, batch_size=2, seq_len=16, lr=1e-3,
                                calib_batches=1, adaround_iters=20, history=history)
    assert isinstance(model, Transformer) and model.config.mode == "b158"
    assert {(m.lam, m.noise_p) for _, m in adapt.quantized_layers(model)} == {(1.0, 1.0)}
    names = adapt._methods(method)
    assert len(history) == (4 if set(names) & set(adapt.FINETUNE_METHODS) else 0)
    x = batch()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    for k, v in src.state_dict().items():  # the source is untouched
        assert torch.equal(v, before[k])


def test_convert_model_rejects_bad_methods():
    with pytest.raises(ConfigError):
        adapt.convert_model(fp_model(), "magic", tokens(), steps=1)
    with pytest.raises(ConfigError):
        adapt.convert_model(fp_model(), ["lambda", "noise"], tokens(), steps=1)
