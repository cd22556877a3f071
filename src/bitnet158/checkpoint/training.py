"""Training-run directories: step directories (`step-000200/`, each a model directory plus the
optimizer state in `trainer.safetensors` and the loop's state in `trainer.json`) and a `latest`
file naming the newest. Each step directory appears in one rename, so a process killed mid-save
leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save as safetensors_save

from ..errors import CheckpointError, first_line
from ..fileio import atomic_directory, atomic_write_bytes, clean_stale_temporaries
from ..jsonio import get_float, get_int, get_list, read_json_object
from ..model import Transformer
from . import writer
from .layout import FORMAT, LATEST, STEP_DIR

TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"


def save_training_checkpoint(run_dir: str | os.PathLike, step: int, model: Transformer, tokenizer,
                             optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2,
                             write: Callable[[Path], None] | None = None) -> Path:
    """Write run_dir/step-NNNNNN atomically, point `latest` at it, prune all but `keep` steps.
    `write(directory)` fills the step with the weights (default: the whole model directory; a
    LoRA run writes its adapter only)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(run_dir)
    target = run_dir / f"step-{step:06d}"
    with atomic_directory(target, overwrite=True) as tmp:
        if write is not None:
            write(tmp)
        else:
            writer.write_model_files(tmp, model, tokenizer)  # looked up at call time (a test slows it down)
        opt_tensors = _optimizer_tensors(model, optimizer)
        (tmp / TRAINER_TENSORS).write_bytes(safetensors_save(opt_tensors, metadata={"format": FORMAT,
                                                                                   "kind": "optimizer"}))
        (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
    atomic_write_bytes(run_dir / LATEST, target.name.encode())
    steps = sorted((int(m.group(1)), child) for child in run_dir.iterdir() if (m := STEP_DIR.match(child.name)))
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
    state_file = directory / TRAINER_STATE
    if not state_file.exists():
        raise CheckpointError(f"{directory}: {TRAINER_STATE} is missing (a model directory, not a "
                              "resumable training checkpoint)")
    state = read_json_object(state_file, nonfinite=True)  # json.dumps wrote it: an eval loss may be inf
    # the fields the training loop resumes from, checked here so a bad one is a message, not a crash
    get_int(state, "step", state_file, lo=0)
    get_list(state, "history", state_file, default=[], items=dict)
    get_list(state, "evals", state_file, default=[], items=dict)
    get_float(state, "seconds", state_file, default=0.0, lo=0.0)
    file = directory / TRAINER_TENSORS
    if not file.exists():
        raise CheckpointError(f"{file}: missing")
    if not file.is_file():  # a directory, or a FIFO that would block the open forever
        raise CheckpointError(f"{file}: not a regular file")
    try:
        tensors = safetensors_load(str(file))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
        first = first_line(e)
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({first})") from None
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, slot = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{file}: optimizer state for unknown parameter {name}")
        # moments have the parameter's shape, counters are scalars: anything else fails only at
        # the resumed run's first optimizer step
        shape = params[name].shape
        if (value.dim() and value.shape != shape) or not value.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key} has shape {list(value.shape)} and dtype {value.dtype}; "
                                  f"expected a float scalar or the parameter's shape {list(shape)}")
        bad = _bad_optimizer_value(slot, value)
        if bad:
            raise CheckpointError(f"{file}: tensor {key} {bad}")
        optimizer.state[params[name]][slot] = value.to(params[name].device)
    return state


MAX_OPTIMIZER_STEP = 1e12  # AdamW's bias correction is beta ** step: a huge or negative step overflows


def _bad_optimizer_value(slot: str, value: torch.Tensor) -> str | None:
    """What is wrong with one AdamW state tensor (None: nothing). Non-finite moments would make
    every later loss NaN; a step count outside [0, 1e12] or a negative second moment fails (or
    silently misbehaves) only at the resumed run's first step."""
    if not bool(torch.isfinite(value).all()):
        return "holds NaN or infinite values"
    if slot == "step" and not bool(((value >= 0) & (value <= MAX_OPTIMIZER_STEP)).all()):
        return f"holds a step count of {float(value.reshape(-1)[0]):.3g}, outside [0, {MAX_OPTIMIZER_STEP:g}]"
    if slot == "exp_avg_sq" and bool((value < 0).any()):
        return "holds a negative second moment"
    return None
