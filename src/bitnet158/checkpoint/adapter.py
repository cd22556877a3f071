"""LoRA adapter directories as PEFT keeps them, so `peft.PeftModel.from_pretrained` loads ours
on the model `export-hf` writes, and we load adapters PEFT wrote for that model:

    adapter_config.json          PEFT's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]

Our module names are Hugging Face's without the decoder's `model.` prefix; PEFT adds
`base_model.model.` and drops the adapter name ("default"). A training run keeps one adapter per
step directory (step-NNNNNN/, `latest`), and `resolve_adapter` finds the newest, as `resolve`
does for model directories.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from ..errors import CheckpointError, ConfigError, first_line, shown
from ..fileio import atomic_directory
from ..jsonio import get_bool, get_float, get_int, get_list, get_str, read_json_object
from ..lora import PROJECTIONS, LoRAConfig, add_lora, lora_layers
from .layout import LATEST, STEP_DIR

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."  # PeftModel → LlamaForCausalLM-like → its decoder `model`
_KEY = re.compile(r"^base_model\.model\.model\.(layers\.\d+\.(?:self_attn|mlp)\.([a-z_]+))\.lora_([AB])\.weight$")


def peft_config(config: LoRAConfig, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoraConfig fields for a plain LoRA on nn.Linear layers."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRALinear's A and B under PEFT's names (fp32, contiguous copies)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().float().cpu().contiguous().clone()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().float().cpu().contiguous().clone()
    return out


def write_adapter_files(directory: Path, model: nn.Module, config: LoRAConfig, base_model: str | None = None) -> None:
    """The two adapter files into an existing directory (a step directory being written)."""
    tensors = adapter_tensors(model)
    if not tensors:
        raise ConfigError("the model has no LoRA layers to save")
    (directory / ADAPTER_WEIGHTS).write_bytes(safetensors_save(tensors, metadata={"format": "pt"}))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config, base_model), indent=2) + "\n")


def save_adapter(model: nn.Module, path: str | os.PathLike, config: LoRAConfig, *, base_model: str | None = None,
                 overwrite: bool = False) -> Path:
    """An adapter directory, written in one rename."""
    path = Path(path)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_adapter_files(tmp, model, config, base_model)
    return path


def resolve_adapter(path: str | os.PathLike) -> Path:
    """The adapter directory `path` names: itself, or the newest step of a fine-tuning run."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such adapter directory")
    if (path / ADAPTER_CONFIG).exists():
        return path
    try:
        name = (path / LATEST).read_text(encoding="utf-8").strip()[:64] if (path / LATEST).is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if STEP_DIR.match(name) and (path / name / ADAPTER_CONFIG).exists():
        return path / name
    steps = sorted((int(m.group(1)), c) for c in path.iterdir()
                   if (m := STEP_DIR.match(c.name)) and (c / ADAPTER_CONFIG).exists())
    if steps:
        return steps[-1][1]
    raise CheckpointError(f"{path}: not a LoRA adapter (no {ADAPTER_CONFIG}, no step directories with one)")


def read_adapter_config(directory: Path) -> LoRAConfig:
    """adapter_config.json as a LoRAConfig; what we cannot apply (DoRA, rsLoRA, per-layer ranks,
    other PEFT methods, regex targets) is refused in one line."""
    file = directory / ADAPTER_CONFIG
    doc = read_json_object(file)
    get_str(doc, "peft_type", file, choices=("LORA",))
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if get_bool(doc, flag, file, default=False):
            raise CheckpointError(f"{file}: {flag} adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if doc.get(key):
            raise CheckpointError(f"{file}: per-layer {key} is not supported")
    if doc.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: LoRA bias {shown(str(doc.get('bias')))} is not supported")
    targets = doc.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{file}: target_modules as a pattern is not supported; list the module names")
    targets = get_list(doc, "target_modules", file, items=str)
    r = get_int(doc, "r", file)
    if r <= 0:
        raise CheckpointError(f"{file}: LoRA rank must be a positive integer, got {r}")
    config = LoRAConfig(r=r, alpha=get_float(doc, "lora_alpha", file, positive=True),
                        dropout=get_float(doc, "lora_dropout", file, default=0.0, lo=0.0, hi=0.999),
                        targets=tuple(targets))
    try:
        return config.validate()
    except ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_adapter(path: str | os.PathLike) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {our module name: (A [r, in], B [out, r])}) of an adapter directory or run."""
    directory = resolve_adapter(path)
    config = read_adapter_config(directory)
    file = directory / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        tensors = safetensors_load(str(file))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first_line(e)})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in PROJECTIONS:
            raise CheckpointError(f"{file}: unexpected tensor {shown(key)} (only LoRA A/B of the projections)")
        if not value.is_floating_point() or value.dim() != 2 or not torch.isfinite(value).all():
            raise CheckpointError(f"{file}: {key} must be a finite 2-D float tensor")
        pairs.setdefault(m.group(1), {})[m.group(3)] = value.float()
    if not pairs:
        raise CheckpointError(f"{file}: holds no LoRA tensors")
    out = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{file}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        out[name] = (ab["A"], ab["B"])
    return config, out


def _check_shapes(model: nn.Module, config: LoRAConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  where: Path | str) -> None:
    modules = dict(model.named_modules())
    for name, (a, b) in pairs.items():
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            raise CheckpointError(f"{where}: the adapter has {name}, which this model lacks (an adapter "
                                  "for another model?)")
        want_a, want_b = (config.r, layer.in_features), (layer.out_features, config.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise CheckpointError(f"{where}: {name} lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit this "
                                  f"model's {layer.out_features}x{layer.in_features} layer at rank {config.r} "
                                  "(an adapter for another model?)")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, frozen_base: bool = False) -> LoRAConfig:
    """Apply an adapter to `model` unmerged, in place: each named projection becomes a LoRALinear
    over its base (kept as it is unless `frozen_base`) holding the adapter's A and B. Checked
    against the model's shapes before anything changes."""
    config, pairs = read_adapter(path)
    where = resolve_adapter(path)
    _check_shapes(model, config, pairs, where)
    wanted = {name.rpartition(".")[2] for name in pairs}
    add_lora(model, LoRAConfig(config.r, config.alpha, config.dropout, tuple(sorted(wanted))),
             frozen_base=frozen_base)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in pairs:  # a projection PEFT was told to target but the file lacks
                layer.lora_B.zero_()
                continue
            a, b = pairs[name]
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    return config
