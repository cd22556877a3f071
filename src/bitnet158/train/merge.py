"""Fold a LoRA adapter into a training-form model's latent weights: W' = W + B·A·(alpha/r). The
layer re-ternarizes W' on every forward (absmean), so the merged model is not the unmerged one:
`merge` prints the held-out loss of both so the user sees what the rounding cost. The embedding and
head are float tables and take their update exactly (a tied model's one table once)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import BitLinear, swap_modules
from ..lora import LoRAEmbedding, LoRAHead, LoRALinear

_PACKED = ("merge needs a training-form ternary checkpoint (latent weights); a packed one keeps only its "
           "codes: apply the adapter unmerged with --adapter instead")


def _fold(layer: nn.Module) -> nn.Module:
    base = layer.base
    if not isinstance(base, BitLinear) or base.mode == "fp":
        raise ConfigError(_PACKED)
    with torch.no_grad():
        delta = (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling  # [out, in]
        base.weight.add_(delta.to(base.weight.dtype))
    return base


def _add_to(table: nn.Module, delta: torch.Tensor) -> None:
    weight = getattr(table, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise ConfigError(_PACKED)
    with torch.no_grad():
        weight.add_(delta.to(weight.dtype))


def _merge_tables(model: nn.Module) -> None:
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    embed_lora, head_lora = isinstance(embed, LoRAEmbedding), isinstance(head, LoRAHead)
    if not (embed_lora or head_lora):
        return
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        # one table serves both ends, so both must take the same update
        same = embed_lora and head_lora and (
            head.tied is embed or torch.equal(head.delta_weight(), embed.delta_weight()))
        if not same:
            raise ConfigError("the adapter changes the tied embedding and head differently, which one table "
                              "cannot hold; apply it unmerged with --adapter instead")
        _add_to(embed.base, embed.delta_weight())
        model.embed_tokens, model.lm_head = embed.base, None
        return
    if embed_lora:
        _add_to(embed.base, embed.delta_weight())
        model.embed_tokens = embed.base
    if head_lora:
        _add_to(head.base, head.delta_weight())
        model.lm_head = head.base


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapter by its base with the update folded in (the projections' latent weights,
    the embedding and head tables), in place."""
    _merge_tables(model)
    return swap_modules(model, lambda name, m: isinstance(m, LoRALinear), _fold)
