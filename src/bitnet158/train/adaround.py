"""AdaRound adapted to ternary weights (FORMATS §7.2; Nagel et al. 2020): learn, per weight, floor
or ceil of W/s within {-1, 0, 1} so each layer's output matches the FP layer on calibration data.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import quant
from ..errors import ConfigError
from ..layers import BitLinear
from ..model import Transformer
from .calibration import calibration_batches, capture_inputs
from .hooks import quantized_layers, reset_knobs

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020): h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1).
ZETA, GAMMA = 1.1, -0.1


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
