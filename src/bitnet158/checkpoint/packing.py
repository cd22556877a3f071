"""Pack a training-form model directory into a packed one, streamed: each linear weight is read,
quantized, packed, written and dropped in turn, and the head table is made a block of rows at a
time, so the 2B4T shapes pack in well under 2 GB instead of building the fp32 model (~10 GB).

    pack_dir("runs/demo/b158", "runs/demo/b158-i2", PackConfig(format="i2"))

The bytes are those of `pack_` + `save_packed` on the loaded model (pack_plan.py says why).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..pack_plan import WeightSource, packed_plan
from ..packed_layers import PackConfig
from .modeldir import ModelDir
from .writer import write_model_dir


def pack_dir(src: str | os.PathLike, out: str | os.PathLike, packing: PackConfig | None = None, *,
             overwrite: bool = False, progress: bool = False) -> Path:
    """Write `out`, the packed form of the training-form directory (or run) `src`, streamed and
    atomic. Returns `out`."""
    md = ModelDir(src)
    if md.packing is not None:
        raise ConfigError(f"{md.path} is already packed ({md.packing.describe()})")
    if md.config.mode == "fp":
        raise ConfigError(f"{md.path} is a full-precision (fp) model; only b158 and b1 models pack")
    tokenizer = md.tokenizer()  # checked before any work: a bad one fails fast
    plan = packed_plan(md.config, packing or PackConfig(), WeightSource(md.tensor, md.rows))
    return write_model_dir(out, md.config, plan.packing, plan.entries, tokenizer, overwrite=overwrite,
                           progress=progress)
