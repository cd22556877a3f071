"""bitnet158: train, convert, pack and run 1.58-bit (ternary) BitNet language models on a CPU.

    >>> import bitnet158 as bn
    >>> cfg = bn.preset("tiny")                 # a ModelConfig; cfg.twin("fp") is its FP twin
    >>> model = bn.Transformer(cfg)             # BitLinear layers: latent weights, fake-quant + STE

Names are imported when first used (PEP 562), so `import bitnet158` costs little and the
torch-free runtime (`bitnet158.runtime`) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# public name → the module that defines it
_LAZY = {
    "KVCache": "cache",
    **dict.fromkeys(("ModelDir", "load", "pack_dir", "save", "save_packed"), "checkpoint"),
    **dict.fromkeys(("PRESETS", "ModelConfig", "TrainConfig", "preset"), "config"),
    **dict.fromkeys(("BitNetError", "CheckpointError", "ConfigError", "DataError", "FormatError",
                     "GenerationError"), "errors"),
    "save_hf": "interop.hf_export",
    **dict.fromkeys(("import_hf", "load_hf"), "interop.hf_import"),
    **dict.fromkeys(("BitLinear", "RMSNorm", "convert"), "layers"),
    "Transformer": "model",
    "pack_": "pack",
    **dict.fromkeys(("PackConfig", "PackedBitLinear"), "packed_layers"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    try:  # a submodule asked for as an attribute (bn.model, bn.kernels)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
