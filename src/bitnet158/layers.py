"""RMSNorm, BitLinear (b1.58 / b1 / fp) and `convert`, which turns the nn.Linear layers of any
torch module into BitLinear.

BitLinear in training form keeps latent full-precision weights and fake-quantizes weights and
activations on every forward with a straight-through estimator (FORMATS §1.2, §6):

    y = F.linear(STE(act_quant(norm(x))), STE(weight_quant(W)))

The forward values are exactly codes·scale, so the packed runtime (integer product, scales
applied after) reproduces it up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, quant
from .config import ACT_QUANT, MODES
from .errors import ConfigError


class MetaSafeLinear(nn.Linear):
    """nn.Linear that skips its initialiser on the meta device. Models are built on the meta
    device to load weights without allocating them, and torch's first operation on a meta tensor
    imports its decomposition tables (~800 modules, ~70 MB resident) — a cost for nothing, since
    the loaded weights replace the values. Elsewhere it initialises exactly as nn.Linear."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class MetaSafeEmbedding(nn.Embedding):
    """nn.Embedding that skips its initialiser on the meta device (see MetaSafeLinear)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, computed in fp32 (as LLaMA and BitNet do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the explicit formula (its backward is the cheaper one)
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * self.weight.float()).to(x.dtype)
        # inference: one native call that rounds exactly as torch's fused op, else that op
        w = self.weight  # one module attribute lookup (~2 µs each; 121 norms per decode step)
        y = kernels.rms_norm(x, w, self.eps)
        if y is not None:
            return y
        y = F.rms_norm(x.float(), w.shape, w.float(), self.eps)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BitLinear(nn.Module):
    """A linear layer with quantized weights and int8 activations, trained through an STE.

    mode: "b158" ternary absmean weights, "b1" binary sign weights, "fp" plain linear (the twin).
    norm: put an RMSNorm on the input inside the layer (the FAQ recipe); False when the block
    supplies explicit norms (SubLN, the 2B4T topology).
    act_quant: "token" (per-token absmax, the b1.58 and inference granularity) or "tensor" (the
    BitNet b1 training variant).
    lam, noise_p: conversion knobs (FORMATS §5.1, §7.1). lam < 1 mixes W + λ(q(W) − W) on weights
    and activations; noise_p < 1 quantizes only a random share p of the weights (and of the
    activation entries) each forward.
    Both default to 1: plain quantization-aware training.
    """

    def __init__(self, in_features: int, out_features: int, *, mode: str = "b158", norm: bool = False,
                 eps: float = 1e-5, act_quant: str = "token", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"BitLinear mode must be one of {', '.join(MODES)}; got {mode!r}")
        if act_quant not in ACT_QUANT:
            raise ConfigError(f"BitLinear act_quant must be one of {', '.join(ACT_QUANT)}; got {act_quant!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.act_quant = act_quant
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.norm = RMSNorm(in_features, eps) if norm else None
        self.lam = 1.0
        self.noise_p = 1.0
        if not self.weight.is_meta:  # see MetaSafeLinear
            nn.init.normal_(self.weight, std=0.02)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes [out, in], fp32 0-d scale) — what packing stores."""
        if self.mode == "fp":
            raise ConfigError("an fp BitLinear has no quantized weight")
        return quant.WEIGHT_QUANTIZERS[self.mode](self.weight)

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward multiplies with (quantized through the STE unless mode is fp)."""
        w = self.weight
        if self.mode == "fp":
            return w
        wq = quant.fake_quant(quant.WEIGHT_QUANTIZERS[self.mode], w)
        if self.noise_p < 1.0:
            return quant.noise_mix(w, wq, self.noise_p)
        return quant.lambda_mix(w, wq, self.lam)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        if self.mode == "fp":
            return x
        xq = quant.fake_quant(quant.ACT_QUANTIZERS[self.act_quant], x)
        if self.noise_p < 1.0:  # the noise reaches activations too, so p = 0 is exactly the FP layer
            return quant.noise_mix(x, xq, self.noise_p)
        return quant.lambda_mix(x, xq, self.lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        extra = f", act_quant={self.act_quant}" if self.act_quant != "token" else ""
        return (f"{self.in_features}, {self.out_features}, mode={self.mode}, "
                f"norm={self.norm is not None}, bias={self.bias is not None}{extra}")


def convert(module: nn.Module, mode: str = "b158", *, norm: bool = False, act_quant: str = "token",
            exclude: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear inside `module` (any torch module) by a BitLinear that keeps its
    weight and bias, in place; returns the module. Layers whose qualified name ends with a name in
    `exclude` stay full precision (the output head, by default, as in every BitNet recipe).

    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> _ = convert(net)
    >>> [type(m).__name__ for m in net]
    ['BitLinear', 'ReLU', 'BitLinear']
    """
    if type(module) is nn.Linear:  # a bare layer has no parent to swap it in: return its replacement
        holder = nn.Module()
        holder.linear = module
        return convert(holder, mode, norm=norm, act_quant=act_quant, exclude=()).linear
    def wanted(name: str, m: nn.Module) -> bool:
        return type(m) is nn.Linear and not any(name == e or name.endswith("." + e) for e in exclude)

    def to_bitlinear(linear: nn.Linear) -> BitLinear:
        bit = BitLinear(linear.in_features, linear.out_features, mode=mode, norm=norm, act_quant=act_quant,
                        bias=linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            bit.weight.copy_(linear.weight)
            if linear.bias is not None:
                bit.bias.copy_(linear.bias)
        return bit

    return swap_modules(module, wanted, to_bitlinear)


def swap_modules(module: nn.Module, wanted: Callable[[str, nn.Module], bool],
                 make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Replace, in place, every submodule for which `wanted(qualified_name, child)` holds by
    `make(child)`; returns `module`. The targets are listed first, so replacements are never
    visited."""
    targets = [(name, child) for name, child in module.named_modules() if name and wanted(name, child)]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, make(child))
    return module
