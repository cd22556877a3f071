"""Model directories and training checkpoints: safetensors + JSON, written atomically, validated
on load. Never pickle.

One reader (`ModelDir`: document, config, packing, meta skeleton, validated tensors, tokenizer)
and one writer (`write_model_dir` / `save`) serve every part of the package: loading, saving,
packing, training runs, and the Hugging Face and GGUF importers and exporters. `layout` says what
is on disk; `training` adds the optimizer state of resumable runs.
"""

from .layout import (CONFIG, FORMAT, FORMAT_VERSION, LATEST, TOKENIZER, WEIGHT_ALIGN, WEIGHTS,
                     config_document, read_config_document, resolve)
from .modeldir import ModelDir, load, load_config, open_model_dir
from .packing import pack_dir
from .training import TRAINER_STATE, TRAINER_TENSORS, load_training_state, save_training_checkpoint
from .writer import model_entries, save, save_packed, write_files, write_model_dir, write_model_files

__all__ = [
    "CONFIG", "FORMAT", "FORMAT_VERSION", "LATEST", "TOKENIZER", "WEIGHT_ALIGN", "WEIGHTS", "TRAINER_STATE",
    "TRAINER_TENSORS", "ModelDir", "config_document", "load", "load_config", "load_training_state",
    "model_entries", "open_model_dir", "pack_dir", "read_config_document", "resolve", "save", "save_packed",
    "save_training_checkpoint", "write_files", "write_model_dir", "write_model_files",
]
