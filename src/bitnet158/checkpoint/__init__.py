"""Model directories and training checkpoints: safetensors + JSON, written atomically, validated
on load. Never pickle.

One reader (`ModelDir`: document, config, packing, meta skeleton, validated tensors, tokenizer)
and one writer (`write_model_dir` / `save`) serve every part of the package: loading, saving,
packing, training runs, and the Hugging Face and GGUF importers and exporters. `layout` says what
is on disk; `training` adds the optimizer state of resumable runs.
"""

from __future__ import annotations

import importlib
from typing import Any

# `layout` is plain files and JSON (the torch-free runtime reads it); the rest needs torch and is
# imported when first used
from .layout import (CONFIG, FORMAT, FORMAT_VERSION, LATEST, TOKENIZER, WEIGHT_ALIGN, WEIGHTS,
                     config_document, read_config_document, resolve)

_LAZY = {
    **dict.fromkeys(("ModelDir", "load", "load_config", "open_model_dir"), "modeldir"),
    "pack_dir": "packing",
    **dict.fromkeys(("TRAINER_STATE", "TRAINER_TENSORS", "load_training_state", "save_training_checkpoint"),
                    "training"),
    **dict.fromkeys(("model_entries", "save", "save_packed", "write_files", "write_model_dir", "write_model_files"),
                    "writer"),
}

__all__ = [
    "CONFIG", "FORMAT", "FORMAT_VERSION", "LATEST", "TOKENIZER", "WEIGHT_ALIGN", "WEIGHTS", "TRAINER_STATE",
    "TRAINER_TENSORS", "ModelDir", "config_document", "load", "load_config", "load_training_state",
    "model_entries", "open_model_dir", "pack_dir", "read_config_document", "resolve", "save", "save_packed",
    "save_training_checkpoint", "write_files", "write_model_dir", "write_model_files",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
