"""Calibration: a few fixed windows of tokens, and what a model's layers see on them.

Used by `ternarize.rtn` (the inserted sub-norms' starting gains) and by AdaRound (each layer's
inputs). Every function here leaves the model's mode and hooks as it found them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .data import batch_for_step


def calibration_batches(tokens: torch.Tensor, batches: int, batch_size: int, seq_len: int,
                        seed: int = 0) -> list[torch.Tensor]:
    """A few fixed random windows of `tokens` ([batch_size, seq_len] each)."""
    return [batch_for_step(tokens, i, batch_size, seq_len, seed + 7919)[0] for i in range(batches)]


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
