"""Quantizers as pure functions (FORMATS §1). No modules, no state.

One convention throughout the package: every scale returned here is a *dequantization
multiplier*, so `w ≈ codes * scale` and `x ≈ codes * scale`. Statistics are computed in fp32 and
the epsilon is a clamp on the statistic (1e-5), as in every reference implementation.

>>> w = torch.tensor([[0.5, -1.5], [0.0, 1.0]])
>>> codes, s = absmean_ternary(w)       # mean|w| = 0.75
>>> codes.tolist(), float(s)
([[1, -1], [0, 1]], 0.75)
"""

from __future__ import annotations

import torch

EPS = 1e-5  # clamp on mean|W| and on max|x|, as in the FAQ, HF, 1bitLLM and torchao code


def absmean_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 weights: codes = RoundClip(W / max(mean|W|, eps), -1, 1), scale = max(mean|W|, eps).

    Returns int8 codes in {-1, 0, +1} with w's shape and a 0-d fp32 scale. Rounding is torch's
    half-to-even, so W/s = ±0.5 maps to 0 and ±1.5 to ±2 → clipped to ±1.
    """
    wf = w.detach().float()
    scale = wf.abs().mean().clamp(min=EPS)
    codes = (wf / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale


def sign_binary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet (b1) weights: codes = Sign(W - mean W) with the paper's Sign (0 → -1), scale = mean|W|.

    The scale β is the mean of |W| of the *uncentred* W ([B1] §2.1). Returns int8 codes in {-1, +1}.
    """
    wf = w.detach().float()
    centred = wf - wf.mean()
    codes = torch.where(centred > 0, 1, -1).to(torch.int8)
    scale = wf.abs().mean().clamp(min=EPS)
    return codes, scale


def absmax_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations, per token (last dim): codes = clamp(round(x · 127/max|x|), -128, 127).

    Returns int8 codes with x's shape and fp32 scales of shape x.shape[:-1] + (1,), where
    scale = max(max|x|, eps) / 127 dequantizes. Codes land in [-127, 127] by construction.
    """
    xf = x.detach().float()
    absmax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    codes = (xf * (127.0 / absmax)).round().clamp(-128, 127).to(torch.int8)
    return codes, absmax / 127.0


def absmax_int8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The BitNet (b1) training variant: one absmax for the whole tensor ([B1] §2.1, "per tensor
    during training"). Same rounding and clamp as the per-token quantizer; 0-d scale."""
    xf = x.detach().float()
    absmax = xf.abs().amax().clamp(min=EPS)
    codes = (xf * (127.0 / absmax)).round().clamp(-128, 127).to(torch.int8)
    return codes, absmax / 127.0


WEIGHT_QUANTIZERS = {"b158": absmean_ternary, "b1": sign_binary}
ACT_QUANTIZERS = {"token": absmax_int8_per_token, "tensor": absmax_int8_per_tensor}


def fake_quant(quantizer, v: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize: codes · scale, in v's dtype (no gradient)."""
    codes, scale = quantizer(v)
    return (codes.float() * scale).to(v.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward returns `q` exactly; backward hands the gradient to `v` unchanged.

    Equivalent to the papers' `v + (q - v).detach()` but without its float rounding, so the
    training forward uses exactly the values the packed kernels compute with, and autograd keeps
    nothing for backward.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def ste(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of q, the gradient of the identity w.r.t. v."""
    return _StraightThrough.apply(v, q.detach())


def lambda_mix(v: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """λ warm-up (FORMATS §5.1): v + λ(q − v) forward, identity gradient to v.

    λ = 0 returns v itself and λ = 1 returns exactly q (no float round trip), so both ends equal
    plain full precision and plain quantization-aware training bit for bit.
    """
    if lam <= 0.0:
        return v
    if lam >= 1.0:
        return ste(v, q)
    return ste(v, torch.lerp(v.detach(), q.detach(), lam))


def noise_mix(v: torch.Tensor, q: torch.Tensor, p: float, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """Quant-Noise (FORMATS §7.1): each weight is quantized with probability p, the rest stay
    full precision; the gradient is the identity to v. p = 1 is plain QAT, p = 0 is FP, exactly."""
    if p <= 0.0:
        return v
    if p >= 1.0:
        return ste(v, q)
    mask = torch.rand(v.shape, generator=generator, device=v.device) < p
    return ste(v, torch.where(mask, q.detach(), v.detach()))
