"""Packed inference without torch: numpy, safetensors' layout, tokenizers and the compiled step.

    >>> from bitnet158 import runtime
    >>> model, tokenizer = runtime.load("runs/demo/b158-i2")      # a packed directory
    >>> from bitnet158.generate import generate
    >>> generate(model, tokenizer, "Once upon a time", 40)

`load` reads a packed directory into a `NativeModel`, which generation, chat and the batching
server drive like a torch model (`runner.Runner`). Nothing here imports torch, so a minimal
install (`pip install bitnet158` without torch) runs `generate`, `chat` and `serve`; the full
install uses the torch path unless `--runtime native` (or `BITNET158_RUNTIME=native`) asks for
this one. Training, conversion, packing and LoRA adapters need torch.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import ConfigError
from ..tokenizer import Tokenizer
from .model import NativeCache, NativeModel, NativeSlotCache
from .weights import PackedDir, open_packed

ENV_RUNTIME = "BITNET158_RUNTIME"
RUNTIMES = ("auto", "torch", "native")

__all__ = ["NativeCache", "NativeModel", "NativeSlotCache", "PackedDir", "load", "open_packed", "choose",
           "torch_installed", "ENV_RUNTIME", "RUNTIMES"]


def load(path: str | os.PathLike, with_tokenizer: bool = True) -> tuple[NativeModel, Tokenizer | None]:
    """(model, tokenizer or None) from a packed directory (or a training run's newest step)."""
    packed = open_packed(path)
    model = NativeModel(packed)
    return model, packed.tokenizer() if with_tokenizer else None


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def choose(requested: str | None = None) -> str:
    """"torch" or "native": `requested` (or BITNET158_RUNTIME), where "auto" (the default) means
    torch when it is installed, else the torch-free runtime."""
    name = (requested or os.environ.get(ENV_RUNTIME, "") or "auto").strip().lower()
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; expected one of {', '.join(RUNTIMES)}")
    if name == "auto":
        return "torch" if torch_installed() else "native"
    if name == "torch" and not torch_installed():
        raise ConfigError("the torch runtime needs torch: pip install torch==2.13.0 (a CPU wheel), "
                          "or use --runtime native")
    return name
