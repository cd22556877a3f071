"""From full precision to 1.58 bits: turn a trained FP twin into a ternary (b158) model.

Methods (combine them in `convert_model`, applied in this order):
    rtn       round-to-nearest absmean ternarization: copy the latent weights, switch the mode
    adaround  AdaRound adapted to ternary (FORMATS §7.2): learn, per weight, floor or ceil of W/s
              within {-1, 0, 1} so each layer's output matches the FP layer on calibration data
    lambda    λ warm-up fine-tuning (FORMATS §5.1): W + λ(q(W) − W) on weights and activations,
              λ = min(step / warmup, 1)
    noise     Quant-Noise fine-tuning (FORMATS §7.1): quantize a random share p of the weights,
              p rising to 1 so the run ends as plain QAT
    qat       plain quantization-aware fine-tuning
    distill   fine-tune on KL(teacher ‖ student) with the FP model as teacher (plus CE if alpha < 1)

Everything here works on any `Transformer` and takes tokens, never files.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import quant
from ..errors import ConfigError
from ..layers import BitLinear
from ..model import Transformer
from .data import batch_for_step

METHODS = ("rtn", "adaround", "lambda", "noise", "qat", "distill")
FINETUNE_METHODS = ("lambda", "noise", "qat", "distill")

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020): h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1).
ZETA, GAMMA = 1.1, -0.1


def quantized_layers(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """Every quantized BitLinear of `model`, with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BitLinear) and m.mode != "fp"]


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


@torch.no_grad()
def input_rms(model: nn.Module, layer_names: Sequence[str], batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean per-token RMS of the inputs each named layer sees over `batches`, in one forward per
    batch (hooks accumulate sums; no activations are kept)."""
    sums = {name: [0.0, 0] for name in layer_names}
    handles = []
    for name in layer_names:
        def hook(module, args, name=name):
            x = args[0].detach().float().flatten(0, -2)
            sums[name][0] += float(x.pow(2).mean(-1).sqrt().sum())
            sums[name][1] += x.shape[0]
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for tokens in batches:
            model(tokens)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: total / max(count, 1) for name, (total, count) in sums.items()}


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
    """An `on_step(step, model)` hook for `trainer.train` or `finetune` that applies the λ schedule."""
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


# --- AdaRound for ternary weights ----------------------------------------------------------------

def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def layer_input(layer: BitLinear, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    """What the layer's weight multiplies: its inner norm (if any), then (if `quantized`) its own
    int8 activation fake-quantization, whatever the layer's λ is set to. fp32, no gradient."""
    with torch.no_grad():
        x = x.float()
        if layer.norm is not None:
            x = layer.norm(x).float()
        if quantized:
            x = quant.fake_quant(quant.ACT_QUANTIZERS[layer.act_quant], x)
    return x


def output_error(layer: BitLinear, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over rows of ‖x_q Wᵀ − target‖² with the layer's own activation quantization."""
    xq = layer_input(layer, x).flatten(0, -2)
    y = F.linear(xq, weight.float())
    return float((y - target.flatten(0, -2).float()).pow(2).sum(-1).mean())


def adaround_layer(layer: BitLinear, calib_inputs: torch.Tensor, iters: int = 300, *,
                   target: torch.Tensor | None = None, lr: float = 5e-2, reg_weight: float = 0.01,
                   beta: tuple[float, float] = (20.0, 2.0), warm: float = 0.2, batch_rows: int = 1024,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaRound adapted to ternary weights (FORMATS §7.2), in place on `layer`.

    With s = max(mean|W|, eps) fixed and u = W/s, each weight is floor(u) + h(V) clipped to
    [-1, 1], where h is the rectified sigmoid, V starts where h = frac(u), and V minimises
        mean_rows ‖x_q W_softᵀ s − target‖²  +  reg_weight · mean(1 − |2h − 1|^β)
    with β annealed from beta[0] to beta[1] after the first `warm` share of iterations (no
    regulariser before). x_q is the layer's own int8 activation quantization of `calib_inputs`
    ([..., in_features], the inputs the layer sees); `target` defaults to the FP output of the
    layer on the unquantized inputs (the latent weights, no quantization), so the rounding also
    compensates activation quantization. Then h is hardened (h ≥ 0.5 → ceil).

    The latent weight is rewritten to codes · s / f (f = the share of non-zero codes): its absmean
    is again s (up to float summation order) and RoundClip gives back the learned codes, so
    `layer.quantized_weight()` returns exactly the learned codes at scale s. Returns (int8 codes
    [out, in], fp32 0-d scale s).
    """
    if layer.mode != "b158":
        raise ConfigError(f"adaround needs a ternary (b158) layer; this one is {layer.mode!r}")
    if iters < 1:
        raise ConfigError(f"adaround iters must be ≥ 1; got {iters}")
    w = layer.weight.detach().float()
    bias = layer.bias.detach().float() if layer.bias is not None else None
    x = calib_inputs.detach().flatten(0, -2)                                   # [rows, in]
    xq = layer_input(layer, x)                                                 # [rows, in]
    if target is None:
        target = F.linear(layer_input(layer, x, quantized=False), w, bias)
    target = target.detach().float().flatten(0, -2)                           # [rows, out]
    if target.shape != (x.shape[0], layer.out_features):
        raise ConfigError(f"adaround target has shape {tuple(target.shape)}; expected "
                          f"{(x.shape[0], layer.out_features)}")

    _, scale = quant.absmean_ternary(w)
    u = w / scale
    base = u.floor()
    # Only weights with u in [-1, 1) choose between two distinct ternary values; the rest clip to ±1.
    active = (u >= -1.0) & (u < 1.0)
    frac = (u - base).clamp(0.0, 1.0)
    v = torch.logit(((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = x.shape[0]
    warm_iters = int(warm * iters)

    for it in range(iters):
        if rows > batch_rows:
            idx = torch.randint(0, rows, (batch_rows,), generator=gen).to(x.device)
            xb, tb = xq[idx], target[idx]
        else:
            xb, tb = xq, target
        h = _rectified_sigmoid(v)
        w_soft = (base + h).clamp(-1.0, 1.0) * scale
        y = F.linear(xb, w_soft, bias)
        loss = (y - tb).pow(2).sum(-1).mean()
        if it >= warm_iters:
            t = (it - warm_iters) / max(iters - warm_iters - 1, 1)
            b = beta[0] + (beta[1] - beta[0]) * t                               # annealed 20 → 2
            reg = (1.0 - (2.0 * h[active] - 1.0).abs().pow(b)).mean() if active.any() else h.sum() * 0
            # Scale the regulariser to the reconstruction's magnitude so reg_weight is unit-free.
            loss = loss + reg_weight * reg * tb.pow(2).sum(-1).mean().detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.no_grad():
        codes = (base + (_rectified_sigmoid(v) >= 0.5).float()).clamp(-1, 1)
        _write_codes(layer, codes, scale)
    return codes.to(torch.int8), scale


def _write_codes(layer: BitLinear, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Latent weight whose absmean ternarization is exactly (codes, scale)."""
    nonzero = codes.ne(0).float().mean()
    if nonzero == 0:  # all zero: any latent weight rounding to 0 will do
        layer.weight.zero_()
        return
    latent = codes * (scale / nonzero)       # mean|latent| = scale; latent/scale = codes/f, |codes/f| ≥ 1
    layer.weight.copy_(latent.to(layer.weight.dtype))
    got, _ = quant.absmean_ternary(layer.weight)
    assert torch.equal(got, codes.to(torch.int8)), "adaround: the rewritten latent weight lost its codes"


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


@torch.no_grad()
def capture_inputs(model: nn.Module, layer_name: str, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """The inputs [rows, in_features] that `layer_name` sees over `batches` of tokens. The forward
    stops at the layer (a hook raises), so only this layer's inputs are ever held."""
    layer = model.get_submodule(layer_name)
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0].detach().flatten(0, -2).float())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for tokens in batches:
            try:
                model(tokens)
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(seen)


def calibration_batches(tokens: torch.Tensor, batches: int, batch_size: int, seq_len: int,
                        seed: int = 0) -> list[torch.Tensor]:
    """A few fixed random windows of `tokens` ([batch_size, seq_len] each)."""
    return [batch_for_step(tokens, i, batch_size, seq_len, seed + 7919)[0] for i in range(batches)]


def adaround_model(model: Transformer, calib_tokens: torch.Tensor, *, teacher: Transformer | None = None,
                   batches: int = 2, batch_size: int = 4, seq_len: int = 64, iters: int = 200,
                   seed: int = 0, progress: Callable[[str], None] | None = None, **kwargs) -> Transformer:
    """AdaRound every quantized BitLinear of `model`, one layer at a time in forward order, in place.

    For each layer, its inputs are captured from `model` itself (earlier layers already rounded,
    so later layers learn to absorb their error) and its target is the same-named layer of
    `teacher` (the FP model; default: a full-precision copy of `model` taken first) on the
    teacher's own inputs. Memory is bounded by one layer's inputs over `batches` windows.
    """
    if teacher is None:
        teacher = Transformer(model.config.twin("fp")).to(next(model.parameters()).device)
        teacher.load_state_dict(model.state_dict())
    reset_knobs(model)
    calib = calibration_batches(calib_tokens, batches, batch_size, seq_len, seed)
    for i, (name, layer) in enumerate(quantized_layers(model)):
        x_student = capture_inputs(model, name, calib)
        x_teacher = capture_inputs(teacher, name, calib)
        with torch.no_grad():
            target = teacher.get_submodule(name)(x_teacher).float()
        del x_teacher
        adaround_layer(layer, x_student, iters, target=target, seed=seed + i, **kwargs)
        if progress is not None:
            progress(name)
    return model


# --- distillation and fine-tuning ----------------------------------------------------------------

def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², averaged over positions (Hinton et al.;
    the T² keeps gradient magnitudes comparable across temperatures)."""
    if T <= 0:
        raise ConfigError(f"distillation temperature must be > 0; got {T}")
    s = F.log_softmax(student_logits.float().flatten(0, -2) / T, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


def finetune(model: Transformer, train_tokens: torch.Tensor, *, steps: int,
             teacher: Transformer | None = None, alpha: float = 1.0, T: float = 1.0, lr: float = 1e-4,
             weight_decay: float = 0.0, batch_size: int = 8, seq_len: int = 64, grad_clip: float = 1.0,
             seed: int = 0, on_step: Callable[[int, nn.Module], None] | None = None,
             ) -> list[dict[str, float]]:
    """A short fine-tuning loop at constant LR (AdamW 0.9/0.95): loss = (1 − alpha)·CE +
    alpha·distill_loss(student, teacher) when a teacher is given, else CE. `on_step(step, model)`
    runs before each step (the λ and Quant-Noise hooks). Returns one row per step."""
    if steps < 1:
        raise ConfigError(f"fine-tuning steps must be ≥ 1; got {steps}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distillation alpha must be in [0, 1]; got {alpha}")
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    if teacher is not None:
        teacher.eval()
    model.train()
    history = []
    for step in range(steps):
        if on_step is not None:
            on_step(step, model)
        x, y = batch_for_step(train_tokens, step, batch_size, seq_len, seed)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        row = {"step": step + 1, "ce": float(ce.detach())}
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = distill_loss(logits, t_logits, T)
            loss = (1.0 - alpha) * ce + alpha * kd
            row["kd"] = float(kd.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if not math.isfinite(float(loss.detach())):
            raise ConfigError(f"fine-tuning diverged at step {step + 1}; lower the learning rate")
        row["loss"] = float(loss.detach())
        history.append(row)
    opt.zero_grad(set_to_none=True)
    return history


# --- the whole conversion ------------------------------------------------------------------------

def _methods(method: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in method.split(",")] if isinstance(method, str) else list(method)
    names = ["noise" if m == "quant-noise" else m for m in names]  # the CLI's spelling
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"unknown conversion method {unknown or names!r}; choose from {', '.join(METHODS)}")
    if "lambda" in names and "noise" in names:
        # BitLinear lets Quant-Noise override λ on the weights; combining them would be ambiguous.
        raise ConfigError("conversion methods 'lambda' and 'noise' are alternatives; pick one")
    return names


def convert_model(src_model_fp: Transformer, method: str | Sequence[str], tokens: torch.Tensor, *,
                  steps: int = 100, lr: float = 1e-4, batch_size: int = 8, seq_len: int = 64,
                  warmup: int | None = None, noise_start_p: float = 0.1, noise_ramp: float = 0.75,
                  T: float = 1.0, alpha: float = 1.0, calib_batches: int = 2, adaround_iters: int = 200,
                  seed: int = 0, history: list | None = None) -> Transformer:
    """FP → b1.58 with the named methods (a list, or a comma-separated string), e.g.
    ["adaround", "lambda", "distill"]: RTN copy, then AdaRound on calibration windows of `tokens`,
    then (if any of lambda / noise / qat / distill) `steps` of fine-tuning on `tokens` with the
    λ (warm-up = `warmup`, default steps // 2) or Quant-Noise schedule and, with distill, the FP
    model as teacher. A source without sub-norms (a Hugging Face LLaMA-family import) gets them
    inserted (see `rtn`). Returns a new plain b158 model (λ = p = 1); the source is left untouched.
    Fine-tuning rows are appended to `history` if given."""
    names = _methods(method)
    src_model_fp.eval()
    model = rtn(src_model_fp, tokens, calib_batches=calib_batches, batch_size=batch_size, seq_len=seq_len,
                seed=seed)
    if "adaround" in names:
        adaround_model(model, tokens, teacher=src_model_fp, batches=calib_batches, batch_size=batch_size,
                       seq_len=seq_len, iters=adaround_iters, seed=seed)
    if any(m in FINETUNE_METHODS for m in names):
        hook = None
        if "lambda" in names:
            hook = lambda_hook(steps // 2 if warmup is None else warmup)
        elif "noise" in names:
            hook = noise_hook(steps, noise_start_p, noise_ramp)
        rows = finetune(model, tokens, steps=steps, teacher=src_model_fp if "distill" in names else None,
                        alpha=alpha, T=T, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed,
                        on_step=hook)
        if history is not None:
            history.extend(rows)
    reset_knobs(model)
    model.eval()
    return model
