"""Fold a LoRA adapter into a training-form model's latent weights: W' = W + B·A·(alpha/r). The
layer re-ternarizes W' on every forward (absmean), so the merged model is not the unmerged one:
`merge` prints the held-out loss of both so the user sees what the rounding cost."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import BitLinear, swap_modules
from ..lora import LoRALinear


def _fold(layer: nn.Module) -> nn.Module:
    base = layer.base
    if not isinstance(base, BitLinear) or base.mode == "fp":
        raise ConfigError("merge needs a training-form ternary checkpoint (latent weights); a packed one "
                          "keeps only its codes: apply the adapter unmerged with --adapter instead")
    with torch.no_grad():
        delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling  # [out, in]
        base.weight.add_(delta.to(base.weight.dtype))
    return base


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base with the adapter folded into the latent weight, in place."""
    return swap_modules(model, lambda name, m: isinstance(m, LoRALinear), _fold)
