"""Model directories and training checkpoints: safetensors + JSON, written atomically, validated
on load. Never pickle.

A model directory holds
    config.json         {"format": "bitnet158", "format_version": 1, "kind": "model", "model": {...},
                         "tokenizer": {"eos_token": ...}}   (the tokenizer section only with a tokenizer)
    model.safetensors   the latent weights (metadata: format, kind)
    tokenizer.json      when the model was saved with a tokenizer
A training run directory holds step directories (`step-000200/`, each a model directory plus
`trainer.safetensors` and `trainer.json`) and a `latest` file naming the newest. Each step
directory appears in one rename, so a process killed mid-save leaves the previous one intact.
A packed directory (`kind: "packed"`, written by `save_packed` / `bitnet158 pack`) holds the
same three files; config.json adds `"packing": {"format": ..., "head": ..., "shapes": {...}}` (shapes:
the per-shape formats chosen by format "auto", e.g. {"2560x2560": "i2"}) and the tensors are
the packed runtime's (uint8 packed codes + fp32 scales per BitLinear, an int8 head). `load()`
accepts every kind of directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from . import __version__
from .config import ModelConfig
from .errors import BitNetError, CheckpointError
from .fileio import atomic_directory, atomic_write_bytes, atomic_write_json, clean_stale_temporaries
from .interop.safetensors_stream import PlannedTensor, aligned_order, write_safetensors
from .model import Transformer

FORMAT = "bitnet158"
FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"
LATEST = "latest"
WEIGHT_ALIGN = 64  # tensor data offsets in model.safetensors: whole cache lines for the kernels
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _config_document(model: Transformer, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    packing = getattr(model, "packing", None)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "packed" if packing else "model",
           "bitnet158_version": __version__, "model": model.config.to_dict()}
    if packing:
        doc["packing"] = packing.to_dict()
    doc.update(extra or {})
    return doc


def write_model_files(directory: Path, model: Transformer, tokenizer=None,
                      extra_config: dict[str, Any] | None = None) -> None:
    """Write config.json, model.safetensors (and tokenizer.json) into an existing directory."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    packing = getattr(model, "packing", None)
    if packing is not None and packing.head == "fp16":  # the float head is stored at its precision
        for name in ("embed_tokens.weight", "lm_head.weight"):
            if name in state:
                state[name] = state[name].to(torch.float16)
    entries = [PlannedTensor(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in state.items()]
    write_safetensors(directory / WEIGHTS, aligned_order(entries, WEIGHT_ALIGN),
                      metadata={"format": FORMAT, "kind": "model"}, align=WEIGHT_ALIGN)
    extra = dict(extra_config or {})
    if tokenizer is not None:  # an imported tokenizer may end text with another token than ours
        extra.setdefault("tokenizer", {"eos_token": tokenizer.eos_token})
    (directory / CONFIG).write_text(json.dumps(_config_document(model, extra), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER)


def save(model: Transformer, path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a model directory atomically. Refuses to replace an existing one unless overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --force to replace it)")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_model_files(tmp, model, tokenizer)
    return path


def resolve(path: str | os.PathLike) -> Path:
    """The model directory `path` names: itself, or the newest step of a training run."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if (path / CONFIG).exists():
        return path
    latest = path / LATEST
    if latest.exists():
        candidate = path / latest.read_text().strip()
        if (candidate / CONFIG).exists():
            return candidate
    steps = sorted((int(m.group(1)), child) for child in path.iterdir()
                   if (m := _STEP_DIR.match(child.name)) and (child / CONFIG).exists())
    if steps:
        return steps[-1][1]
    raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG}, no step directories)")


def read_config_document(directory: Path) -> dict[str, Any]:
    try:
        doc = json.loads((directory / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: {CONFIG} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "model" not in doc:
        raise CheckpointError(f"{directory / CONFIG}: not a bitnet158 config (no format/model keys)")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory / CONFIG}: format_version {doc['format_version']} is newer "
                              f"than this bitnet158 reads ({FORMAT_VERSION}); upgrade bitnet158")
    return doc


def load_config(path: str | os.PathLike) -> ModelConfig:
    directory = resolve(path)
    try:
        return ModelConfig.from_dict(read_config_document(directory)["model"])
    except BitNetError as e:
        raise CheckpointError(f"{directory / CONFIG}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{directory / CONFIG}: bad model config ({e})") from None


def read_tensors(file: Path, expected: dict[str, tuple[torch.Size, bool | torch.dtype]] | None = None,
                 ) -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking names and shapes against `expected` (name → (shape,
    must_be_float or an exact dtype)); the first problem raises CheckpointError naming the tensor."""
    if not file.exists():
        raise CheckpointError(f"{file}: missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first_line})") from None
    if expected is None:
        return tensors
    for name, (shape, must_be_float) in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{file}: tensor {name} is missing")
        t = tensors[name]
        if t.shape != shape:
            raise CheckpointError(f"{file}: tensor {name} has shape {list(t.shape)}, "
                                  f"the config expects {list(shape)}")
        if isinstance(must_be_float, torch.dtype):  # packed tensors: exactly this dtype
            if t.dtype != must_be_float:
                raise CheckpointError(f"{file}: tensor {name} has dtype {t.dtype}, expected {must_be_float}")
            must_be_float = t.is_floating_point()
        if must_be_float and not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {name} has dtype {t.dtype}, expected a float dtype")
        if must_be_float and not torch.isfinite(t).all():
            raise CheckpointError(f"{file}: tensor {name} holds NaN or infinite values")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{file}: unexpected tensor {unexpected[0]} (the config has no such weight)")
    return tensors


def load(path: str | os.PathLike, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load (model, tokenizer or None) from a model directory or a training run directory.

    The model is built on the meta device and the file's tensors are assigned in, so weights are
    allocated once. Every name, shape and dtype is checked against config.json first.
    """
    directory = resolve(path)
    config = load_config(directory)
    doc = read_config_document(directory)
    with torch.device("meta"):
        model = Transformer(config)
    if doc.get("kind") == "packed":
        tensors = _read_packed_tensors(directory, model, doc)
    else:
        expected = {k: (v.shape, True) for k, v in model.state_dict().items()}
        tensors = read_tensors(directory / WEIGHTS, expected)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.init_buffers()
    model.to(device)
    tokenizer = None
    if with_tokenizer and (directory / TOKENIZER).exists():
        from .tokenizer import DEFAULT_EOS, Tokenizer
        section = doc.get("tokenizer")
        eos = section.get("eos_token") if isinstance(section, dict) else None
        tokenizer = Tokenizer.load(directory / TOKENIZER, eos_token=eos if isinstance(eos, str) else DEFAULT_EOS)
    return model, tokenizer


def save_packed(model: Transformer, path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a packed model (after `pack_`) as a packed directory; same atomicity as `save`."""
    if getattr(model, "packing", None) is None:
        raise CheckpointError("the model is not packed; call bitnet158.pack_(model) first")
    return save(model, path, tokenizer, overwrite=overwrite)


def _read_packed_tensors(directory: Path, model: Transformer, doc: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Build the packed skeleton on the meta device, then read and check every tensor against it:
    names, shapes, exact dtypes, packed bytes that decode to valid codes, finite positive scales."""
    from .formats import get_format
    from .pack import PackConfig, PackedBitLinear, build_packed_skeleton

    file = directory / WEIGHTS
    try:
        packing = PackConfig(**doc.get("packing", {})).validate()
        build_packed_skeleton(model, packing)
    except (TypeError, BitNetError) as e:
        raise CheckpointError(f"{directory / CONFIG}: bad packing section ({e})") from None
    float_head = {"fp16": torch.float16, "fp32": torch.float32}.get(packing.head)
    expected: dict[str, tuple[torch.Size, bool | torch.dtype]] = {}
    for name, t in model.state_dict().items():
        if float_head is not None and name in ("embed_tokens.weight", "lm_head.weight"):
            expected[name] = (t.shape, float_head)
        else:
            expected[name] = (t.shape, t.dtype if not t.is_floating_point() else True)
    tensors = read_tensors(file, expected)
    for name, module in model.named_modules():
        if isinstance(module, PackedBitLinear):
            fmt = get_format(module.format)
            scale = tensors[f"{name}.weight_scale"]
            if not bool((scale > 0).all()):
                raise CheckpointError(f"{file}: tensor {name}.weight_scale is {scale.item()}; scales must be positive")
            bad = fmt.first_invalid_byte(tensors[f"{name}.packed"].numpy(), module.out_features, module.in_features)
            if bad is not None:
                raise CheckpointError(f"{file}: tensor {name}.packed: {bad}")
    for name, t in tensors.items():
        if name.endswith("row_scale") and not bool((t > 0).all()):
            raise CheckpointError(f"{file}: tensor {name} holds a non-positive scale")
        if float_head is not None and t.dtype == torch.float16:
            tensors[name] = t.float()
    return tensors


# --- training checkpoints --------------------------------------------------------------------

def save_training_checkpoint(run_dir: str | os.PathLike, step: int, model: Transformer, tokenizer,
                             optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2) -> Path:
    """Write run_dir/step-NNNNNN atomically, point `latest` at it, prune all but `keep` steps."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run_dir)
    target = run_dir / f"step-{step:06d}"
    with atomic_directory(target, overwrite=True) as tmp:
        write_model_files(tmp, model, tokenizer)
        opt_tensors = _optimizer_tensors(model, optimizer)
        (tmp / TRAINER_TENSORS).write_bytes(safetensors_save(opt_tensors, metadata={"format": FORMAT,
                                                                                   "kind": "optimizer"}))
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    atomic_write_bytes(run_dir / LATEST, target.name.encode())
    steps = sorted((int(m.group(1)), child) for child in run_dir.iterdir() if (m := _STEP_DIR.match(child.name)))
    for _, old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"{name}::{key}"] = value.detach().contiguous()
    return out


def load_training_state(directory: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimizer state saved beside a step's weights; return trainer.json."""
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: {TRAINER_STATE} is missing (a model directory, not a "
                              "resumable training checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / TRAINER_STATE}: not valid JSON ({e})") from None
    tensors = read_tensors(directory / TRAINER_TENSORS)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, slot = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{directory / TRAINER_TENSORS}: optimizer state for unknown parameter {name}")
        optimizer.state[params[name]][slot] = value.to(params[name].device)
    return state
