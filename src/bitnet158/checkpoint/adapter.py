"""LoRA adapter directories as PEFT keeps them, so `peft.PeftModel.from_pretrained` loads ours
on the model `export-hf` writes, and we load adapters PEFT wrote for that model:

    adapter_config.json          PEFT's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
                                 base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]
                                 base_model.model.model.embed_tokens.lora_embedding_A            [r, vocab]
                                 base_model.model.model.embed_tokens.lora_embedding_B            [hidden, r]
                                 base_model.model.lm_head.lora_A.weight                          [r, hidden]
                                 base_model.model.lm_head.lora_B.weight                          [vocab, r]

Our module names are Hugging Face's without the decoder's `model.` prefix (lm_head sits beside the
decoder); PEFT adds `base_model.model.` and drops the adapter name ("default"). A tied model's
one table update is written as PEFT ties it (`ensure_weight_tying`): LoRA on embed_tokens and on
lm_head with the factors transposed, both in the file, so the unmerged PEFT forward is ours
whether or not that PEFT version ties them. PEFT's copy of the base table (`base_layer.weight`,
saved whenever an embedding is targeted) is read for its shape only: the model holds the table.

A training run keeps one adapter per step directory (step-NNNNNN/, `latest`), and
`resolve_adapter` finds the newest, as `resolve` does for model directories.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from ..errors import CheckpointError, ConfigError, first_line, shown
from ..fileio import atomic_directory
from ..jsonio import get_bool, get_float, get_int, get_list, get_str, read_json_object
from ..lora import TABLES, TARGETS, LoRAConfig, LoRAHead, add_lora, factors, lora_modules, set_factors
from .layout import LATEST, STEP_DIR

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_ROOT = "base_model.model."  # PeftModel → LlamaForCausalLM-like (where lm_head sits)
PEFT_PREFIX = PEFT_ROOT + "model."  # → its decoder `model` (the layers, embed_tokens)
_KEYS = (  # (pattern, the group naming the module's kind) for each tensor an adapter may hold
    re.compile(r"^base_model\.model\.model\.(layers\.\d+\.(?:self_attn|mlp)\.([a-z_]+))"
               r"\.lora_([AB])\.weight$"),
    re.compile(r"^base_model\.model\.model\.((embed_tokens))\.lora_embedding_([AB])$"),
    re.compile(r"^base_model\.model\.((lm_head))\.lora_([AB])\.weight$"),
)
_BASE_COPY = re.compile(r"^base_model\.model\.(?:model\.)?(embed_tokens|lm_head)\.base_layer\.weight$")


def peft_config(config: LoRAConfig, base_model: str | None = None, *, tied: bool = False) -> dict[str, Any]:
    """adapter_config.json: PEFT's LoraConfig fields for a plain LoRA (nn.Linear and nn.Embedding
    layers); `tied`: the embedding and head share one update (PEFT's ensure_weight_tying)."""
    doc = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    if tied:  # only then: a PEFT older than the option would not know the key
        doc["ensure_weight_tying"] = True
    return doc


def peft_keys(name: str) -> tuple[str, str]:
    """PEFT's keys of a module's A and B."""
    if name == "embed_tokens":
        return f"{PEFT_PREFIX}{name}.lora_embedding_A", f"{PEFT_PREFIX}{name}.lora_embedding_B"
    prefix = PEFT_ROOT if name == "lm_head" else PEFT_PREFIX
    return f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_B.weight"


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's A and B under PEFT's names (fp32, contiguous copies; a tied head's are its
    embedding's, transposed)."""
    out = {}
    for name, module in lora_modules(model).items():
        for key, t in zip(peft_keys(name), factors(module)):
            out[key] = t.detach().float().cpu().contiguous().clone()
    return out


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return isinstance(head, LoRAHead) and head.tied is not None


def write_adapter_files(directory: Path, model: nn.Module, config: LoRAConfig, base_model: str | None = None) -> None:
    """The two adapter files into an existing directory (a step directory being written)."""
    tensors = adapter_tensors(model)
    if not tensors:
        raise ConfigError("the model has no LoRA layers to save")
    doc = peft_config(config, base_model, tied=_tied(model))
    (directory / ADAPTER_WEIGHTS).write_bytes(safetensors_save(tensors, metadata={"format": "pt"}))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(doc, indent=2) + "\n")


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
    other PEFT methods, regex targets, whole modules to save) is refused in one line."""
    file = directory / ADAPTER_CONFIG
    doc = read_json_object(file)
    get_str(doc, "peft_type", file, choices=("LORA",))
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if get_bool(doc, flag, file, default=False):
            raise CheckpointError(f"{file}: {flag} adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if doc.get(key):
            raise CheckpointError(f"{file}: {key} is not supported")
    if doc.get("bias", "none") != "none":
        raise CheckpointError(f"{file}: LoRA bias {shown(str(doc.get('bias')))} is not supported")
    targets = doc.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{file}: target_modules as a pattern is not supported; list the module names")
    # PEFT matches a target against the end of a module's name (it writes "model.embed_tokens"
    # when it ties the head): the last part is the kind of module
    targets = dict.fromkeys(t.rpartition(".")[2] for t in get_list(doc, "target_modules", file, items=str))
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


Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _match(key: str) -> tuple[str, str, str] | None:
    """(our module name, its kind, "A" or "B") of an adapter tensor's key."""
    for pattern in _KEYS:
        m = pattern.match(key)
        if m is not None and m.group(2) in TARGETS:
            return m.group(1), m.group(2), m.group(3)
    return None


def read_adapter_tensors(path: str | os.PathLike) -> tuple[LoRAConfig, Pairs, dict[str, tuple[int, ...]]]:
    """(config, {our module name: (A, B)} in PEFT's shapes, {module: shape} of PEFT's copies of
    the base tables, which are not loaded)."""
    directory = resolve_adapter(path)
    config = read_adapter_config(directory)
    file = directory / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                base = _BASE_COPY.match(key)
                if base is not None:
                    copies[base.group(1)] = tuple(f.get_slice(key).get_shape())
                    continue
                m = _match(key)
                if m is None:
                    raise CheckpointError(f"{file}: unexpected tensor {shown(key)} (only LoRA A/B of the "
                                          "projections, embed_tokens and lm_head)")
                value = f.get_tensor(key)
                if not value.is_floating_point() or value.dim() != 2 or not torch.isfinite(value).all():
                    raise CheckpointError(f"{file}: {key} must be a finite 2-D float tensor")
                pairs.setdefault(m[0], {})[m[2]] = value.float()
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first_line(e)})") from None
    if not pairs:
        raise CheckpointError(f"{file}: holds no LoRA tensors")
    out = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{file}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        out[name] = (ab["A"], ab["B"])
    return config, out, copies


def read_adapter(path: str | os.PathLike) -> tuple[LoRAConfig, Pairs]:
    """(config, {our module name: (A, B)}) of an adapter directory or run: A [r, in], B [out, r]
    for the projections and lm_head, A [r, vocab], B [hidden, r] for embed_tokens (PEFT's shapes)."""
    config, pairs, _ = read_adapter_tensors(path)
    return config, pairs


def _expected(model: nn.Module, name: str, r: int) -> tuple[tuple[int, int], tuple[int, int], str] | None:
    """The A and B shapes `name` needs on this model (None: the model has no such module)."""
    cfg = getattr(model, "config", None)
    if name in TABLES:
        if cfg is None or getattr(model, "embed_tokens", None) is None:
            return None
        if name == "lm_head" and getattr(model, "lm_head", None) is None and not cfg.tie_embeddings:
            return None
        vocab, hidden = cfg.vocab_size, cfg.hidden_size
        if name == "embed_tokens":
            return (r, vocab), (hidden, r), f"{vocab}x{hidden} embedding"
        return (r, hidden), (vocab, r), f"{vocab}x{hidden} head"
    layer = dict(model.named_modules()).get(name)
    if layer is None or not hasattr(layer, "in_features"):
        return None
    return (r, layer.in_features), (layer.out_features, r), f"{layer.out_features}x{layer.in_features} layer"


def _check_shapes(model: nn.Module, config: LoRAConfig, pairs: Pairs, copies: dict[str, tuple[int, ...]],
                  where: Path | str) -> None:
    for name, (a, b) in pairs.items():
        want = _expected(model, name, config.r)
        if want is None:
            raise CheckpointError(f"{where}: the adapter has {name}, which this model lacks (an adapter "
                                  "for another model?)")
        want_a, want_b, what = want
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise CheckpointError(f"{where}: {name} lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit this "
                                  f"model's {what} at rank {config.r} (an adapter for another model?)")
    cfg = getattr(model, "config", None)
    for name, shape in copies.items():
        if cfg is None or shape != (cfg.vocab_size, cfg.hidden_size):
            raise CheckpointError(f"{where}: the adapter's copy of {name} is {list(shape)}, not this model's "
                                  "table (an adapter for another model, or a resized vocabulary?)")


def _shares_one_update(model: nn.Module, pairs: Pairs) -> bool:
    """Whether a tied model's embedding and head adapters are one update (the head's factors are
    the embedding's transposed), as we and PEFT's ensure_weight_tying write them."""
    cfg = getattr(model, "config", None)
    if cfg is None or not cfg.tie_embeddings or not {"embed_tokens", "lm_head"} <= set(pairs):
        return False
    (ea, eb), (ha, hb) = pairs["embed_tokens"], pairs["lm_head"]
    return torch.equal(ha, eb.T) and torch.equal(hb, ea.T)


def load_adapter(model: nn.Module, path: str | os.PathLike, *, frozen_base: bool = False) -> LoRAConfig:
    """Apply an adapter to `model` unmerged, in place: each named projection becomes a LoRALinear
    over its base (kept as it is unless `frozen_base`), the embedding and head a LoRAEmbedding /
    LoRAHead, holding the adapter's A and B. Checked against the model's shapes before anything
    changes."""
    config, pairs, copies = read_adapter_tensors(path)
    where = resolve_adapter(path)
    _check_shapes(model, config, pairs, copies, where)
    wanted = {name.rpartition(".")[2] for name in pairs}
    add_lora(model, LoRAConfig(config.r, config.alpha, config.dropout, tuple(sorted(wanted))),
             frozen_base=frozen_base, tie=_shares_one_update(model, pairs))
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            if name in pairs:
                set_factors(module, *pairs[name])
            else:  # a projection PEFT was told to target but the file lacks
                factors(module)[1].zero_()
    return config
