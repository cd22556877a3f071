"""What the inference verbs (generate, chat, serve) share: the runtime that loads the checkpoint.

`--runtime torch` loads any checkpoint into a torch Transformer (LoRA adapters included);
`--runtime native` runs a packed directory on the compiled step alone, without importing torch;
`auto` (the default, or BITNET158_RUNTIME) takes torch when it is installed. Both answer a model
that generation, chat and the server drive the same way (`runner.Runner`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import native
from ..config import KV_DTYPES, check_kv_dtype
from ..errors import CheckpointError, ConfigError
from ..runner import set_kv_dtype
from ..runtime import RUNTIMES, choose
from ..tokenizer import Tokenizer


def add_runtime_argument(p: argparse.ArgumentParser) -> None:
    """--runtime and --kv-cache (how the model runs)."""
    p.add_argument("--runtime", choices=RUNTIMES, help="torch (any checkpoint, adapters), native (packed "
                   "directories on the compiled step, without torch) or auto (default: torch when installed)")
    p.add_argument("--kv-cache", choices=KV_DTYPES, default="fp32",
                   help="how the KV cache stores keys and values: fp16 takes half the memory and reads half the "
                        "bytes a step at long contexts, q8 (int8 with a scale per row) about a quarter; attention "
                        "still computes in fp32; default %(default)s")


def load_model(path: str | Path, *, runtime: str | None, threads: int | None,
               adapter: str | Path | None = None, need_tokenizer: bool = True,
               kv_dtype: str = "fp32") -> tuple[Any, Tokenizer | None]:
    """(model, tokenizer) for generation, its KV caches stored as `kv_dtype`; a checkpoint without
    a tokenizer is a one-line error (unless `need_tokenizer` is False: a draft model shares the
    main model's)."""
    check_kv_dtype(kv_dtype)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    if choose(runtime) == "native":
        if adapter is not None:
            raise ConfigError("--adapter needs the torch runtime (a LoRA adapter runs in torch): "
                              "install torch or leave out --runtime native")
        from .. import runtime as native_runtime

        model, tokenizer = native_runtime.load(path, with_tokenizer=need_tokenizer)
        if threads is not None:
            native.set_num_threads(threads)
    else:
        from .. import checkpoint
        from ..bench import use_kernel_threads
        from ..checkpoint.adapter import load_adapter
        from .common import set_threads

        set_threads(threads)
        model, tokenizer = checkpoint.load(path, with_tokenizer=need_tokenizer)
        if adapter is not None:
            load_adapter(model, adapter)
        if model.packing is not None:
            use_kernel_threads(threads)
    set_kv_dtype(model, kv_dtype)
    if tokenizer is None and need_tokenizer:
        raise CheckpointError(f"{path}: no tokenizer.json beside the weights")
    return model, tokenizer
