"""The training loop: it learns, it resumes exactly, its schedules are the paper's, and gradient
accumulation averages micro-batches."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from bitnet158 import checkpoint
from bitnet158.cli import train as train_verb
from bitnet158.config import DEFAULT_LR, STAGE2_RATIO, TrainConfig, preset
from bitnet158.errors import ConfigError
from bitnet158.model import Transformer
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data import batch_for_step, default_corpus, eval_windows, tokenize_corpus
from bitnet158.train.schedule import constant, cosine, lr_and_wd, peak_lrs, resolved_schedule, two_stage
from bitnet158.train.trainer import evaluate, train

TINY = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
            max_seq_len=64)


@pytest.fixture(scope="module")
def data():
    corpus = default_corpus(max_bytes=200_000)
    tok = Tokenizer.train((d.text for d in corpus.train), vocab_size=300)
    return tok, tokenize_corpus(corpus, tok)


def tiny(mode: str, tok: Tokenizer):
    return preset("tiny", **TINY, vocab_size=tok.vocab_size, mode=mode)


# --- it learns -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["b158", "fp"])
def test_training_lowers_heldout_loss(data, mode):
    tok, streams = data
    cfg = tiny(mode, tok)
    tc = TrainConfig(steps=30, batch_size=8, seq_len=64, warmup=3, eval_every=10, eval_batches=4,
                     save_every=1000, seed=0)
    eval_x, eval_y = eval_windows(streams.heldout, tc.seq_len, tc.eval_batches * tc.batch_size)
    torch.manual_seed(tc.seed)  # the same initial weights `train` draws
    untrained = evaluate(Transformer(cfg), eval_x, eval_y)
    assert untrained == pytest.approx(math.log(tok.vocab_size), abs=0.3)  # ~uniform at init

    result = train(cfg, tc, streams.train, streams.heldout, progress=False)
    assert [e["step"] for e in result.evals] == [10, 20, 30]
    assert len(result.history) == 30 and all(math.isfinite(h["loss"]) for h in result.history)
    final = result.evals[-1]["loss"]
    assert final < untrained - 0.8, (untrained, result.evals)
    assert final < result.evals[0]["loss"]
    assert result.final_perplexity == pytest.approx(math.exp(final))
    assert evaluate(result.model, eval_x, eval_y) == pytest.approx(final, rel=1e-6)
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < first - 0.8
    assert result.tokens == 30 * 8 * 64


def test_training_rejects_too_little_text_and_too_long_windows(data):
    tok, streams = data
    cfg = tiny("b158", tok)
    with pytest.raises(ConfigError, match="fewer than one window"):
        train(cfg, TrainConfig(steps=2, warmup=0, seq_len=64), streams.train[:40], streams.heldout, progress=False)
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len"):
        train(cfg, TrainConfig(steps=2, warmup=0, seq_len=128), streams.train, streams.heldout, progress=False)


# --- exact resume --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["b158"])
def test_resume_is_exact(data, tmp_path, mode):
    tok, streams = data
    cfg = tiny(mode, tok)
    tc = TrainConfig(steps=8, batch_size=4, seq_len=32, warmup=2, eval_every=4, eval_batches=2,
                     save_every=2, seed=7)

    full = train(cfg, tc, streams.train, streams.heldout, tokenizer=tok, run_dir=tmp_path / "full",
                 progress=False)

    cut = tmp_path / "cut"
    first = train(cfg, tc, streams.train, streams.heldout, tokenizer=tok, run_dir=cut, until=4, progress=False)
    assert [h["step"] for h in first.history] == [1, 2, 3, 4]
    assert (cut / "latest").read_text() == "step-000004"
    rest = train(cfg, tc, streams.train, streams.heldout, tokenizer=tok, run_dir=cut, resume=True,
                 progress=False)

    losses_full = [h["loss"] for h in full.history]
    losses_resumed = [h["loss"] for h in rest.history]
    assert losses_resumed == losses_full  # exactly, not approximately
    assert losses_full[:4] == [h["loss"] for h in first.history]
    assert rest.history == full.history  # lr and weight decay too
    assert rest.evals == full.evals and [e["step"] for e in full.evals] == [4, 8]
    sf, sr = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    # The resumed run's checkpoint on disk is the same as the uninterrupted one's.
    on_disk = checkpoint.load(cut, with_tokenizer=False)[0].state_dict()
    assert all(torch.equal(sf[k], on_disk[k]) for k in sf)
    assert (cut / "latest").read_text() == "step-000008"
    # And the losses did change over the run (not a frozen model that trivially "resumes").
    assert len(set(losses_full)) == 8


def test_resume_with_a_different_config_is_refused(data, tmp_path):
    tok, streams = data
    tc = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup=1, eval_every=4, eval_batches=1, save_every=2)
    train(tiny("b158", tok), tc, streams.train, streams.heldout, tokenizer=tok, run_dir=tmp_path, until=2,
          progress=False)
    with pytest.raises(Exception, match="model config differs"):
        train(tiny("fp", tok), tc, streams.train, streams.heldout, run_dir=tmp_path, resume=True, progress=False)


# --- schedules (pure functions, hand-computed values) ---------------------------------------------

def test_two_stage_schedule_values():
    tc = TrainConfig(steps=100, warmup=10, lr=1e-3, lr_stage2=6e-4, weight_decay=0.1)
    lr = lambda s: lr_and_wd(tc, "b158", s)  # noqa: E731
    assert resolved_schedule(tc, "b158") == "two-stage" and resolved_schedule(tc, "b1") == "two-stage"
    # Warm-up: linear from lr1/warmup up to lr1.
    assert lr(0) == pytest.approx((1e-4, 0.1))
    assert lr(4) == pytest.approx((5e-4, 0.1))
    assert lr(9) == pytest.approx((1e-3, 0.1))
    # Stage 1: from lr1 toward lr2 over the whole run, weight decay 0.1.
    assert lr(10) == pytest.approx((1e-3, 0.1))
    assert lr(49) == pytest.approx((1e-3 - 4e-4 * 39 / 90, 0.1))  # 8.2667e-4
    # Mid-point: the LR drops to the stage-2 peak and weight decay turns off.
    assert lr(50) == pytest.approx((6e-4, 0.0))
    assert lr(49)[0] - lr(50)[0] > 2e-4
    assert lr(75) == pytest.approx((3e-4, 0.0))
    assert lr(99) == pytest.approx((6e-4 * 0.02, 0.0))  # last step: 1.2e-5, near 0
    assert all(lr(s)[1] == 0.0 for s in range(50, 100))
    assert all(lr(s)[1] == 0.1 for s in range(0, 50))
    # Monotone within each stage.
    assert all(lr(s)[0] >= lr(s + 1)[0] for s in range(10, 49))
    assert all(lr(s)[0] > lr(s + 1)[0] for s in range(50, 99))


def test_two_stage_without_warmup_reaches_the_mean_at_the_midpoint():
    lr_mid, _ = two_stage(50, 100, 0, 1.5e-3, 1.0e-3, 0.1)
    lr_before, wd_before = two_stage(49, 100, 0, 1.5e-3, 1.0e-3, 0.1)
    assert lr_before == pytest.approx(1.5e-3 - 0.5e-3 * 49 / 100)
    assert lr_mid == pytest.approx(1.0e-3) and wd_before == 0.1
    assert two_stage(0, 100, 0, 1.5e-3, 1.0e-3, 0.1) == pytest.approx((1.5e-3, 0.1))


def test_default_peaks_follow_the_paper():
    tc = TrainConfig(steps=100, warmup=10)
    lr1, lr2 = peak_lrs(tc, "b158")
    assert lr1 == DEFAULT_LR["b158"] and lr2 == pytest.approx(lr1 * 2 / 3) and STAGE2_RATIO == pytest.approx(2 / 3)
    assert peak_lrs(tc, "fp")[0] == DEFAULT_LR["fp"] < DEFAULT_LR["b158"]
    assert lr_and_wd(tc, "b158", 9)[0] == pytest.approx(DEFAULT_LR["b158"])
    assert lr_and_wd(tc, "fp", 9)[0] == pytest.approx(DEFAULT_LR["fp"])


def test_cosine_schedule_values_for_fp():
    tc = TrainConfig(steps=100, warmup=10, lr=1e-3, weight_decay=0.1, min_lr_ratio=0.1)
    assert resolved_schedule(tc, "fp") == "cosine"
    lr = lambda s: lr_and_wd(tc, "fp", s)  # noqa: E731
    assert lr(0) == pytest.approx((1e-4, 0.1))
    assert lr(9) == pytest.approx((1e-3, 0.1))
    assert lr(10) == pytest.approx((1e-3, 0.1))
    assert lr(55) == pytest.approx((5.5e-4, 0.1))  # half-way through the decay: (0.1 + 0.9·0.5)·lr
    assert lr(99) == pytest.approx((1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90))), 0.1))
    assert lr(99)[0] == pytest.approx(1.0027e-4, rel=1e-3)
    assert all(lr(s)[1] == 0.1 for s in range(100))  # FP keeps its weight decay throughout
    assert all(lr(s)[0] > lr(s + 1)[0] for s in range(10, 99))
    assert cosine(0, 100, 0, 2e-3, 0.0, 0.0) == pytest.approx((2e-3, 0.0))


def test_schedule_override():
    tc = TrainConfig(steps=100, warmup=10, lr=1e-3, schedule="cosine")
    assert resolved_schedule(tc, "b158") == "cosine"
    assert lr_and_wd(tc, "b158", 55) == pytest.approx((5.5e-4, 0.1))
    tc = TrainConfig(steps=100, warmup=10, lr=1e-3, lr_stage2=6e-4, schedule="two-stage")
    assert lr_and_wd(tc, "fp", 50) == pytest.approx((6e-4, 0.0))


def test_constant_schedule_for_fine_tuning():
    tc = TrainConfig(steps=10, warmup=0, lr=1e-4, weight_decay=0.0, schedule="constant")
    assert resolved_schedule(tc, "b158") == "constant"
    assert {lr_and_wd(tc, mode, s) for mode in ("b158", "fp") for s in range(10)} == {(1e-4, 0.0)}
    tc = TrainConfig(steps=10, warmup=4, lr=1e-3, weight_decay=0.1, schedule="constant")
    assert lr_and_wd(tc, "b158", 0) == pytest.approx((2.5e-4, 0.1))  # linear warm-up first
    assert [lr_and_wd(tc, "b158", s) for s in (3, 4, 9)] == [(1e-3, 0.1)] * 3
    assert constant(0, 0, 2e-3, 0.0) == (2e-3, 0.0)
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="linear").validate()


def test_training_an_existing_model_in_place_without_heldout(data):
    tok, streams = data
    torch.manual_seed(1)
    model = Transformer(tiny("b158", tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = TrainConfig(steps=3, batch_size=2, seq_len=16, warmup=0, eval_every=1, save_every=100)
    result = train(model, tc, streams.train, progress=False)
    assert result.model is model and result.evals == [] and math.isnan(result.final_perplexity)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_train_defaults_are_train_config_defaults():
    p = argparse.ArgumentParser()
    train_verb.add_arguments(p)
    args = p.parse_args([])
    assert train_verb.NAME == "train" and train_verb.HELP
    assert TrainConfig.from_dict(vars(args)) == TrainConfig()
    assert args.mode == "b158" and args.preset == "tiny"


def test_trainer_applies_the_schedule_and_keeps_norm_gains_undecayed(data):
    tok, streams = data
    cfg = tiny("b158", tok)
    tc = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup=2, eval_every=6, eval_batches=1,
                     save_every=100, lr=2e-3, weight_decay=0.1)
    seen = []

    def spy(step, model):
        seen.append(step)

    result = train(cfg, tc, streams.train, streams.heldout, progress=False, on_step=spy)
    assert seen == list(range(6))
    for step, row in enumerate(result.history):
        assert (row["lr"], row["weight_decay"]) == lr_and_wd(tc, "b158", step)
    assert [row["weight_decay"] for row in result.history] == [0.1, 0.1, 0.1, 0.0, 0.0, 0.0]


# --- gradient accumulation -----------------------------------------------------------------------

def test_gradient_accumulation(data):
    tok, streams = data
    cfg = tiny("b158", tok)
    tc = TrainConfig(steps=16, batch_size=4, grad_accum=2, seq_len=32, warmup=2, eval_every=16,
                     eval_batches=2, save_every=100, seed=3)
    result = train(cfg, tc, streams.train, streams.heldout, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert result.tokens == 16 * 4 * 32 * 2

    # The logged loss of step 0 is the mean over its two micro-batches (micro-batch ids 0 and 1),
    # computed with the initial weights.
    torch.manual_seed(tc.seed)
    model = Transformer(cfg).train()
    expected = 0.0
    for micro in range(2):
        x, y = batch_for_step(streams.train, micro, tc.batch_size, tc.seq_len, tc.seed)
        expected += (F.cross_entropy(model(x).flatten(0, 1), y.flatten()) / 2).item()
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    # ... and step 1 uses micro-batches 2 and 3 (not 0 and 1 again), so its loss differs.
    assert losses[1] != pytest.approx(losses[0], rel=1e-4)
