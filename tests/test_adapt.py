"""FP → 1.58 bits (train/ternarize.py, hooks.py, adaround.py, calibration.py, convert_run.py): the
schedules' values, exact end points of λ and Quant-Noise, AdaRound beating round-to-nearest,
distillation's KL, fine-tuning through the trainer with the same math as a plain loop, and every
conversion method end to end on a tiny model."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from bitnet158 import quant
from bitnet158.cli import convert
from bitnet158.config import ConvertConfig, ModelConfig, TrainConfig
from bitnet158.errors import ConfigError
from bitnet158.layers import BitLinear
from bitnet158.model import Transformer
from bitnet158.tokenizer import Tokenizer
from bitnet158.train import adaround, calibration, hooks, ternarize
from bitnet158.train.convert_run import run_convert
from bitnet158.train.data import batch_for_step, eval_windows
from bitnet158.train.trainer import evaluate, train

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
    model = ternarize.rtn(src)
    assert model.config.mode == "b158" and model.config == src.config.twin("b158")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and torch.equal(src.state_dict()[k], before[k])
    layers = hooks.quantized_layers(model)
    assert len(layers) == 7 and all(m.mode == "b158" for _, m in layers)
    x = batch()
    with torch.no_grad():
        assert not torch.equal(model(x), src(x))  # the ternary model really differs from its source


# --- schedules -----------------------------------------------------------------------------------

def test_lambda_schedule_values():
    assert [hooks.lambda_schedule(s, 10) for s in (0, 1, 5, 10, 11, 1000)] == [0.0, 0.1, 0.5, 1.0, 1.0, 1.0]
    assert hooks.lambda_schedule(0, 0) == 1.0


def test_quant_noise_schedule_values():
    p = [hooks.quant_noise_schedule(s, 100, start_p=0.1) for s in (0, 30, 75, 99, 100)]
    assert p == pytest.approx([0.1, 0.1 + 0.9 * 30 / 75, 1.0, 1.0, 1.0])
    assert hooks.quant_noise_schedule(50, 100, start_p=0.0, ramp=1.0) == pytest.approx(0.5)
    assert hooks.quant_noise_schedule(0, 0) == 1.0
    with pytest.raises(ConfigError):
        hooks.quant_noise_schedule(0, 10, start_p=1.5)


def test_hooks_set_every_quantized_layer():
    model = ternarize.rtn(fp_model())
    hooks.lambda_hook(4)(1, model)
    assert {m.lam for _, m in hooks.quantized_layers(model)} == {0.25}
    hooks.noise_hook(100, start_p=0.2, ramp=0.5)(25, model)
    assert [m.noise_p for _, m in hooks.quantized_layers(model)] == pytest.approx([0.6] * 7)
    hooks.reset_knobs(model)
    assert {(m.lam, m.noise_p) for _, m in hooks.quantized_layers(model)} == {(1.0, 1.0)}


def test_lambda_hook_drives_the_trainer():
    model = ternarize.rtn(fp_model())
    seen = []

    def hook(step, m):
        hooks.lambda_hook(4)(step, m)
        seen.append(hooks.quantized_layers(m)[0][1].lam)

    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3, eval_batches=1,
                     save_every=1000, lr=1e-3)
    result = train(model, tc, tokens(), tokens(seed=5), on_step=hook, progress=False)
    assert seen == [0.0, 0.25, 0.5]
    assert result.model is model and all(math.isfinite(h["loss"]) for h in result.history)


# --- exact end points ----------------------------------------------------------------------------

@pytest.mark.parametrize("norm_placement", ["subln", "inner"])
def test_lambda_end_points_are_exact(norm_placement):
    src = fp_model(norm_placement=norm_placement)
    model = ternarize.rtn(src)
    plain = ternarize.rtn(src)  # never touched: plain QAT forward
    x = batch()
    with torch.no_grad():
        hooks.set_lambda(model, 0.0)
        assert torch.equal(model(x), src(x))        # λ = 0: the FP model, bit for bit
        hooks.set_lambda(model, 0.5)
        half = model(x)
        assert not torch.equal(half, src(x)) and not torch.equal(half, plain(x))
        hooks.set_lambda(model, 1.0)
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
    model, plain = ternarize.rtn(src), ternarize.rtn(src)
    x = batch()
    with torch.no_grad():
        hooks.set_noise(model, 0.0)
        assert torch.equal(model(x), src(x))        # p = 0: the FP model, bit for bit
        hooks.set_noise(model, 0.5)
        assert not torch.equal(model(x), plain(x)) and not torch.equal(model(x), src(x))
        hooks.set_noise(model, 1.0)
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
        return F.linear(adaround.layer_input(layer, inp, quantized=False), w0)

    def err(inp, w):
        return adaround.output_error(layer, inp, quant.fake_quant(quant.absmean_ternary, w), target(inp))

    rtn_fit, rtn_new = err(x, w0), err(x_new, w0)
    codes, scale = adaround.adaround_layer(layer, x, iters=150)
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
        adaround.adaround_layer(BitLinear(8, 8, mode="b1"), torch.randn(4, 8), iters=2)


def test_adaround_model_layer_by_layer():
    src = fp_model()
    model = ternarize.rtn(src)
    rtn_model = ternarize.rtn(src)
    done = []
    adaround.adaround_model(model, tokens(), teacher=src, batches=2, batch_size=2, seq_len=16, iters=60,
                         progress=done.append)
    assert done == [name for name, _ in hooks.quantized_layers(model)]
    for _, layer in hooks.quantized_layers(model):
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
    got = calibration.capture_inputs(model, "layers.0.mlp.down_proj", x)
    assert got.shape == (2 * 2 * 16, TINY.intermediate_size)
    assert not model.layers[0].mlp.down_proj._forward_pre_hooks


# --- distillation --------------------------------------------------------------------------------

def test_distill_loss_is_kl():
    s = torch.tensor([[[1.0, 0.0, -1.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0]]])
    p, q = t.softmax(-1), s.softmax(-1)
    assert float(hooks.distill_loss(s, t)) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    pT, qT = (t / 2).softmax(-1), (s / 2).softmax(-1)
    assert float(hooks.distill_loss(s, t, T=2.0)) == pytest.approx(4 * float((pT * (pT / qT).log()).sum()),
                                                                    rel=1e-5)
    assert float(hooks.distill_loss(t, t)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ConfigError):
        hooks.distill_loss(s, t, T=0.0)


@pytest.fixture(scope="module")
def trained_fp():
    # A teacher with something to teach: a few steps of CE on the pattern stream.
    model = fp_model()
    ternarize.finetune(model, tokens(), ConvertConfig(steps=40, lr=1e-2, batch_size=4, seq_len=16))
    return model.eval()


def test_distill_finetune_moves_student_towards_teacher(trained_fp):
    src = trained_fp
    model = ternarize.rtn(src)
    x = batch()
    with torch.no_grad():
        before = float(hooks.distill_loss(model(x), src(x)))
    history = ternarize.finetune(model, tokens(), ConvertConfig(steps=15, lr=3e-3, batch_size=4, seq_len=16),
                                 teacher=src).history
    with torch.no_grad():
        after = float(hooks.distill_loss(model(x), src(x)))
    assert len(history) == 15 and all("kd" in h for h in history)
    assert after < before, (before, after)


# --- end to end ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "adaround", "lambda", "noise", "qat", "distill",
                                    ["adaround", "lambda", "distill"], "adaround,noise"])
def test_ternarize_each_method(method):
    src = fp_model()
    before = {k: v.clone() for k, v in src.state_dict().items()}
    history = []
    config = ConvertConfig(method=method, steps=4, batch_size=2, seq_len=16, lr=1e-3, calib_batches=1,
                           adaround_iters=20)
    model = ternarize.ternarize(src, tokens(), config, history=history)
    assert isinstance(model, Transformer) and model.config.mode == "b158"
    assert {(m.lam, m.noise_p) for _, m in hooks.quantized_layers(model)} == {(1.0, 1.0)}
    names = ternarize.parse_methods(method)
    assert len(history) == (4 if set(names) & set(ternarize.FINETUNE_METHODS) else 0)
    x = batch()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    for k, v in src.state_dict().items():  # the source is untouched
        assert torch.equal(v, before[k])


def test_ternarize_rejects_bad_methods():
    with pytest.raises(ConfigError):
        ternarize.ternarize(fp_model(), tokens(), ConvertConfig(method="magic", steps=1))
    with pytest.raises(ConfigError):
        ternarize.ternarize(fp_model(), tokens(), ConvertConfig(method=("lambda", "noise"), steps=1))


# --- one training loop: fine-tuning is trainer.train with hooks -----------------------------------

def _plain_finetune(model, stream, steps, *, teacher, alpha, T, lr, batch_size, seq_len, seed, on_step):
    """The fine-tuning loop as it was written before it moved into the trainer: constant LR, AdamW
    (0.9, 0.95) without weight decay, (1 − alpha)·CE + alpha·KD, gradient clip 1."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    teacher.eval()
    model.train()
    losses = []
    for step in range(steps):
        on_step(step, model)
        x, y = batch_for_step(stream, step, batch_size, seq_len, seed)
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        with torch.no_grad():
            t_logits = teacher(x)
        loss = (1.0 - alpha) * ce + alpha * hooks.distill_loss(logits, t_logits, T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_finetune_through_the_trainer_is_the_plain_loop(trained_fp):
    src = trained_fp
    settings = dict(lr=3e-3, batch_size=4, seq_len=16, seed=3)
    ours, plain = ternarize.rtn(src), ternarize.rtn(src)
    result = ternarize.finetune(ours, tokens(), ConvertConfig(steps=5, alpha=0.5, T=2.0, **settings),
                                teacher=src, on_step=hooks.lambda_hook(4))
    expected = _plain_finetune(plain, tokens(), 5, teacher=src, alpha=0.5, T=2.0,
                               on_step=hooks.lambda_hook(4), **settings)
    assert [h["loss"] for h in result.history] == expected            # bit for bit, step by step
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), plain.state_dict().values()))
    assert {(h["lr"], h["weight_decay"]) for h in result.history} == {(3e-3, 0.0)}  # constant LR, no decay
    assert all(h["loss"] == pytest.approx(0.5 * h["ce"] + 0.5 * h["kd"], rel=1e-5) for h in result.history)
    assert result.evals == []  # no held-out tokens given: nothing evaluated


def test_loss_hook_parts_are_averaged_over_micro_batches(trained_fp):
    model = ternarize.rtn(trained_fp)
    tc = TrainConfig(steps=2, batch_size=2, grad_accum=2, seq_len=16, warmup=0, lr=1e-3, schedule="constant")
    result = train(model, tc, tokens(), loss_fn=hooks.distillation(trained_fp, alpha=0.25), progress=False)
    for row in result.history:
        assert set(row) == {"step", "loss", "lr", "weight_decay", "ce", "kd"}
        assert row["loss"] == pytest.approx(0.75 * row["ce"] + 0.25 * row["kd"], rel=1e-5)
    with pytest.raises(ConfigError):
        hooks.distillation(trained_fp, alpha=1.5)
    with pytest.raises(ConfigError):
        hooks.distillation(trained_fp, T=0.0)


def test_convert_config_defaults_and_checks():
    c = ConvertConfig()
    assert (c.method, c.steps, c.lr, c.batch_size, c.seq_len, c.max_bytes, c.seed) == (
        "adaround,lambda,distill", 100, 1e-4, 8, 128, 2_000_000, 0)
    assert ConvertConfig.from_dict({"steps": 3, "unknown": 1}).steps == 3
    for bad in ({"steps": 0}, {"lr": 0.0}, {"alpha": 2.0}, {"T": 0.0}, {"max_bytes": 0},
                {"noise_start_p": -0.1}):
        with pytest.raises(ConfigError):
            ConvertConfig(**bad).validate()


# --- the convert verb's library call -------------------------------------------------------------

@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    text = "".join(f"def f{i}(x):\n    return x * {i % 7} + {i % 5}\n\n" for i in range(400))
    path = tmp_path_factory.mktemp("convert") / "code.txt"
    path.write_text(text, encoding="utf-8")
    return path, Tokenizer.train([text], vocab_size=300)


def test_run_convert_reports_both_perplexities(text_and_tokenizer):
    path, tok = text_and_tokenizer
    src = fp_model(vocab_size=tok.vocab_size)
    config = ConvertConfig(method="rtn,qat", steps=3, batch_size=2, seq_len=16, heldout_windows=4)
    logged = []
    result = run_convert(src, tok, config, [str(path)], log=logged.append)
    assert result.model.config.mode == "b158" and len(result.history) == 3 and logged
    x, y = eval_windows(result.prepared.tokens.heldout, 16, 4)
    assert x.shape[0] == 4
    assert result.source_perplexity == pytest.approx(math.exp(evaluate(src, x, y)), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(evaluate(result.model, x, y)), rel=1e-6)
    assert math.isfinite(result.perplexity) and result.perplexity != result.source_perplexity
    with pytest.raises(ConfigError, match="src.bin is a b158 model"):
        run_convert(result.model, tok, config, [str(path)], name="src.bin", log=logged.append)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        run_convert(src, None, config, [str(path)], log=logged.append)


def test_convert_defaults_are_convert_config_defaults():
    p = argparse.ArgumentParser()
    convert.add_arguments(p)
    args = p.parse_args(["src", "out"])
    assert convert.NAME == "convert" and convert.HELP
    assert ConvertConfig.from_dict(vars(args)) == ConvertConfig()
