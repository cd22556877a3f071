"""The trainer's hooks for turning an FP model ternary (FORMATS §5.1, §7.1):

    per-step hooks  `on_step(step, model)`, run before each step of `trainer.train`:
        lambda_hook   λ warm-up: W + λ(q(W) − W) on weights and activations, λ = min(step / warmup, 1)
        noise_hook    Quant-Noise: quantize a random share p of the weights, p rising to 1 so the
                      run ends as plain QAT
    loss hooks  `loss_fn(logits, inputs, targets) → (loss, logged parts)`:
        distillation  KL(teacher ‖ student) with the FP model as teacher, plus CE if alpha < 1

Each knob is a plain attribute of every quantized BitLinear (`lam`, `noise_p`); `reset_knobs`
puts back the deployed b1.58 model (λ = p = 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import BitLinear

if TYPE_CHECKING:  # the hook's type only; the trainer is not needed to build one
    from .trainer import LossFn


def quantized_layers(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """Every quantized BitLinear of `model`, with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear) and m.mode != "fp"]


# --- λ warm-up -----------------------------------------------------------------------------------

def lambda_schedule(step: int, warmup: int) -> float:
    """λ = min(step / warmup, 1) (the HF blog's best, FORMATS §5.1); warmup ≤ 0 means λ = 1.

    >>> [lambda_schedule(s, 4) for s in (0, 2, 4, 9)]
    [0.0, 0.5, 1.0, 1.0]
    """
    if warmup <= 0:
        return 1.0
    return min(step / warmup, 1.0)


def set_lambda(model: nn.Module, lam: float) -> None:
    """Set λ on every quantized BitLinear (weights and activations mix alike)."""
    for _, layer in quantized_layers(model):
        layer.lam = float(lam)


def lambda_hook(warmup: int) -> Callable[[int, nn.Module], None]:
    """An `on_step(step, model)` hook for `trainer.train` that applies the λ schedule."""
    def on_step(step: int, model: nn.Module) -> None:
        set_lambda(model, lambda_schedule(step, warmup))
    return on_step


# --- Quant-Noise ---------------------------------------------------------------------------------

def quant_noise_schedule(step: int, total: int, start_p: float = 0.1, ramp: float = 0.75) -> float:
    """The share p of weights quantized at `step`: linear from `start_p` at step 0 to 1 at
    step ramp·total, then 1, so the last (1 − ramp) of the run is plain QAT (FORMATS §7.1).

    >>> [quant_noise_schedule(s, 8, start_p=0.0, ramp=0.5) for s in (0, 2, 4, 7)]
    [0.0, 0.5, 1.0, 1.0]
    """
    if not 0.0 <= start_p <= 1.0:
        raise ConfigError(f"quant-noise start_p must be in [0, 1]; got {start_p}")
    end = ramp * total
    if end <= 0:
        return 1.0
    return min(start_p + (1.0 - start_p) * step / end, 1.0)


def set_noise(model: nn.Module, p: float) -> None:
    """Set the Quant-Noise share p on every quantized BitLinear. `quant.noise_mix` draws a fresh
    per-weight Bernoulli(p) mask from torch's global generator on every forward, and one per
    activation entry for the int8 activations, so p = 0 is the FP model and p = 1 plain QAT."""
    for _, layer in quantized_layers(model):
        layer.noise_p = float(p)


def noise_hook(total: int, start_p: float = 0.1, ramp: float = 0.75) -> Callable[[int, nn.Module], None]:
    """An `on_step(step, model)` hook that applies `quant_noise_schedule`."""
    def on_step(step: int, model: nn.Module) -> None:
        set_noise(model, quant_noise_schedule(step, total, start_p, ramp))
    return on_step


def reset_knobs(model: nn.Module) -> None:
    """λ = 1 and p = 1 everywhere: the plain b1.58 model, as deployed."""
    set_lambda(model, 1.0)
    set_noise(model, 1.0)


# --- distillation --------------------------------------------------------------------------------

def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², averaged over positions (Hinton et al.;
    the T² keeps gradient magnitudes comparable across temperatures)."""
    if T <= 0:
        raise ConfigError(f"distillation temperature must be > 0; got {T}")
    s = F.log_softmax(student_logits.float().flatten(0, -2) / T, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


def distillation(teacher: nn.Module, alpha: float = 1.0, T: float = 1.0) -> LossFn:
    """A `loss_fn(logits, inputs, targets)` hook for `trainer.train`: (1 − alpha)·CE +
    alpha·distill_loss(student, teacher), the teacher run on the same inputs without gradients.
    Logs both parts ("ce", "kd") in the trainer's history rows. Puts the teacher in eval mode."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distillation alpha must be in [0, 1]; got {alpha}")
    if T <= 0:
        raise ConfigError(f"distillation temperature must be > 0; got {T}")
    teacher.eval()

    def loss_fn(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor):
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten().long())
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        kd = distill_loss(logits, teacher_logits, T)
        return (1.0 - alpha) * ce + alpha * kd, {"ce": float(ce.detach()), "kd": float(kd.detach())}
    return loss_fn
