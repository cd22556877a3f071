"""The one writer of model directories: config.json (with the packing and tokenizer sections),
model.safetensors streamed one tensor at a time with 64-byte-aligned data, tokenizer.json; the
directory appears in one rename.

    save(model, "runs/mine", tokenizer)                            # a model in memory
    write_model_dir("out", config, packing, entries, tokenizer)    # planned tensors (importers)

Importers (Hugging Face, GGUF) plan their tensors (`PlannedTensor`: name, dtype, shape and a
function that makes it) and hand the plan here, so a streamed import holds one tensor at a time
and every directory is written the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fileio import atomic_directory, atomic_write_json
from ..model import Transformer
from ..packed_layers import PackConfig
from ..safetensors_io import PlannedTensor, aligned_order, write_safetensors
from .layout import HEAD_TENSORS, CONFIG, FORMAT, TOKENIZER, WEIGHT_ALIGN, WEIGHTS, config_document



def model_entries(model: Transformer) -> list[PlannedTensor]:
    """The model's state dict as a write plan (references, no copies); a packed model's fp16 head
    is stored at that precision."""
    fp16_head = model.packing is not None and model.packing.head == "fp16"
    entries = []
    for name, t in model.state_dict().items():
        t = t.detach()
        if fp16_head and name in HEAD_TENSORS:
            entries.append(PlannedTensor(name, torch.float16, tuple(t.shape), lambda t=t: t.to(torch.float16)))
        else:
            entries.append(PlannedTensor(name, t.dtype, tuple(t.shape), lambda t=t: t.contiguous()))
    return entries


def write_files(directory: Path, config: ModelConfig, packing: PackConfig | None,
                entries: Sequence[PlannedTensor], tokenizer=None, extra: dict[str, Any] | None = None,
                progress: bool = False) -> None:
    """Write config.json, model.safetensors (and tokenizer.json) into an existing directory;
    `progress`: a bar of tensors written and megabytes."""
    # disable=None: a bar on a terminal only (not in logs or captured output)
    with tqdm(total=len(entries), unit="tensor", desc="writing", disable=None if progress else True,
              leave=False) as bar:
        def advance(_: PlannedTensor, written: int) -> None:
            bar.set_postfix_str(f"{written / 1e6:,.0f} MB", refresh=False)
            bar.update()

        write_safetensors(directory / WEIGHTS, aligned_order(entries, WEIGHT_ALIGN),
                          metadata={"format": FORMAT, "kind": "model"}, align=WEIGHT_ALIGN, progress=advance)
    atomic_write_json(directory / CONFIG, config_document(config, packing, tokenizer, extra))
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER)


def write_model_files(directory: Path, model: Transformer, tokenizer=None,
                      extra: dict[str, Any] | None = None) -> None:
    """`write_files` for a model in memory."""
    write_files(directory, model.config, model.packing, model_entries(model), tokenizer, extra)


def write_model_dir(path: str | os.PathLike, config: ModelConfig, packing: PackConfig | None,
                    entries: Sequence[PlannedTensor], tokenizer=None, *, overwrite: bool = False,
                    progress: bool = False) -> Path:
    """A model directory from planned tensors, atomically: written into a temporary sibling and
    renamed into place, so a failure leaves `path` untouched. Refuses to replace an existing
    directory unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True / --force to replace it)")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        write_files(tmp, config, packing, entries, tokenizer, progress=progress)
    return path


def save(model: Transformer, path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a model directory (training form or packed) atomically. Refuses to replace an
    existing one unless overwrite."""
    return write_model_dir(path, model.config, model.packing, model_entries(model), tokenizer, overwrite=overwrite)


def save_packed(model: Transformer, path: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save a packed model (after `pack_`) as a packed directory; same atomicity as `save`."""
    if model.packing is None:
        raise CheckpointError("the model is not packed; call bitnet158.pack_(model) first")
    return save(model, path, tokenizer, overwrite=overwrite)
