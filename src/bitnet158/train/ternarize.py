"""From full precision to 1.58 bits: turn a trained FP twin into a ternary (b158) model.

Methods (combine them in `ternarize`, applied in this order):
    rtn       round-to-nearest absmean ternarization: copy the latent weights, switch the mode
    adaround  AdaRound adapted to ternary (adaround.py, FORMATS §7.2): learn, per weight, floor or
              ceil of W/s within {-1, 0, 1} so each layer's output matches the FP layer on
              calibration data
    lambda    λ warm-up fine-tuning (FORMATS §5.1): W + λ(q(W) − W) on weights and activations,
              λ = min(step / warmup, 1)
    noise     Quant-Noise fine-tuning (FORMATS §7.1): quantize a random share p of the weights,
              p rising to 1 so the run ends as plain QAT
    qat       plain quantization-aware fine-tuning
    distill   fine-tune on KL(teacher ‖ student) with the FP model as teacher (plus CE if alpha < 1)

Fine-tuning is `trainer.train` on the existing model at a constant LR, with the λ / Quant-Noise
schedules as its per-step hook and distillation as its loss hook (hooks.py). Everything here
works on any `Transformer` and takes tokens, never files.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..config import ConvertConfig, TrainConfig
from ..errors import ConfigError
from ..model import Transformer
from .adaround import adaround_model
from .calibration import calibration_batches, input_rms
from .hooks import distillation, lambda_hook, noise_hook, reset_knobs
from .trainer import StepHook, TrainResult, train

METHODS = ("rtn", "adaround", "lambda", "noise", "qat", "distill")
FINETUNE_METHODS = ("lambda", "noise", "qat", "distill")


# --- round to nearest ----------------------------------------------------------------------------

SUB_NORMS = ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
SUB_NORM_INPUTS = {"self_attn.attn_sub_norm": "self_attn.o_proj", "mlp.ffn_sub_norm": "mlp.down_proj"}


def rtn(fp_model: Transformer, calib_tokens: torch.Tensor | None = None, *, calib_batches: int = 2,
        batch_size: int = 4, seq_len: int = 64, seed: int = 0) -> Transformer:
    """A b158 model with the FP twin's weights: the latent weights are copied and the absmean
    round-to-nearest ternarization happens at every forward. The FP model is left untouched.

    A plain-LLaMA source (sub_norm=False, e.g. a Hugging Face import) gets the BitNet sub-norms
    inserted before o_proj and down_proj, so the result has the b1.58 topology every other part of
    the package (packing, export, fine-tuning recipes) expects. A norm cannot be the identity
    function, so its gain starts at the mean per-token RMS of that projection's input in the FP
    model over calibration windows of `calib_tokens`: the least-squares scalar g for x ≈ g·x/rms(x),
    which keeps each projection's output at its FP magnitude on average. Without tokens the gain
    starts at 1.
    """
    param = next(fp_model.parameters())
    cfg = fp_model.config.twin("b158")
    insert = cfg.norm_placement == "subln" and not cfg.sub_norm
    if insert:
        cfg = dataclasses.replace(cfg, sub_norm=True).validate()
    model = Transformer(cfg).to(device=param.device, dtype=param.dtype)
    missing, unexpected = model.load_state_dict(fp_model.state_dict(), strict=not insert)
    if insert:
        assert not unexpected and all(k.rsplit(".", 1)[0].endswith(SUB_NORMS) for k in missing), missing
        if calib_tokens is not None:
            calib = calibration_batches(calib_tokens, calib_batches, batch_size, seq_len, seed)
            gains = input_rms(fp_model, [f"layers.{i}.{SUB_NORM_INPUTS[n]}" for i in range(cfg.num_layers)
                                         for n in SUB_NORMS], calib)
            with torch.no_grad():
                for i in range(cfg.num_layers):
                    for n in SUB_NORMS:
                        model.get_submodule(f"layers.{i}.{n}").weight.fill_(gains[f"layers.{i}.{SUB_NORM_INPUTS[n]}"])
    return model


# --- fine-tuning through the trainer -------------------------------------------------------------

def finetune_config(config: ConvertConfig, device: torch.device | str = "cpu") -> TrainConfig:
    """The trainer settings of a conversion's fine-tuning: `config.steps` at the constant
    `config.lr`, no warm-up of the LR, no weight decay, gradient clip 1."""
    return TrainConfig(steps=config.steps, batch_size=config.batch_size, seq_len=config.seq_len, lr=config.lr,
                       warmup=0, weight_decay=0.0, schedule="constant", grad_clip=1.0, seed=config.seed,
                       device=str(device))


def finetune(model: Transformer, tokens: torch.Tensor, config: ConvertConfig | None = None, *,
             teacher: Transformer | None = None, on_step: StepHook | None = None,
             progress: bool = False) -> TrainResult:
    """Fine-tune `model` in place on `tokens` with `trainer.train` (settings: `finetune_config`):
    cross-entropy, or with a teacher (1 − alpha)·CE + alpha·KL (the `distillation` loss hook);
    `on_step` is the λ / Quant-Noise hook. Returns the trainer's result (one history row per step)."""
    config = (config or ConvertConfig()).validate()
    device = next(model.parameters()).device
    loss_fn = None if teacher is None else distillation(teacher, config.alpha, config.T)
    return train(model, finetune_config(config, device), tokens, on_step=on_step, loss_fn=loss_fn,
                 progress=progress, desc="fine-tune")


# --- the whole conversion ------------------------------------------------------------------------

def parse_methods(method: str | Sequence[str]) -> list[str]:
    """Method names from a list or a comma-separated string ("quant-noise" is "noise"), checked."""
    names = [m.strip() for m in method.split(",")] if isinstance(method, str) else list(method)
    names = ["noise" if m == "quant-noise" else m for m in names]  # the CLI's spelling
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown conversion method {unknown or names!r}; choose from {', '.join(METHODS)}")
    if "lambda" in names and "noise" in names:
        # BitLinear lets Quant-Noise override λ on the weights; combining them would be ambiguous.
        raise ConfigError("conversion methods 'lambda' and 'noise' are alternatives; pick one")
    return names


def ternarize(source: Transformer, tokens: torch.Tensor, config: ConvertConfig | None = None, *,
              history: list | None = None, progress: bool = False) -> Transformer:
    """FP → b1.58 with `config.method` (a list, or a comma-separated string), e.g.
    "adaround,lambda,distill": RTN copy, then AdaRound on calibration windows of `tokens`, then (if
    any of lambda / noise / qat / distill) `config.steps` of fine-tuning on `tokens` with the λ
    (warm-up = `config.warmup`, default steps // 2) or Quant-Noise schedule and, with distill, the
    FP model as teacher. A source without sub-norms (a Hugging Face LLaMA-family import) gets them
    inserted (see `rtn`). Returns a new plain b158 model (λ = p = 1); the source is left untouched.
    Fine-tuning rows are appended to `history` if given."""
    config = (config or ConvertConfig()).validate()
    names = parse_methods(config.method)
    source.eval()
    model = rtn(source, tokens, calib_batches=config.calib_batches, batch_size=config.batch_size,
                seq_len=config.seq_len, seed=config.seed)
    if "adaround" in names:
        adaround_model(model, tokens, teacher=source, batches=config.calib_batches,
                       batch_size=config.batch_size, seq_len=config.seq_len, iters=config.adaround_iters,
                       seed=config.seed)
    if any(m in FINETUNE_METHODS for m in names):
        hook = None
        if "lambda" in names:
            hook = lambda_hook(config.steps // 2 if config.warmup is None else config.warmup)
        elif "noise" in names:
            hook = noise_hook(config.steps, config.noise_start_p, config.noise_ramp)
        result = finetune(model, tokens, config, teacher=source if "distill" in names else None, on_step=hook,
                          progress=progress)
        if history is not None:
            history.extend(result.history)
    reset_knobs(model)
    model.eval()
    return model
