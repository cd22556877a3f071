"""The one reader of model directories: open once, then ask for what you need.

    md = ModelDir("runs/demo/b158-i2")      # a model, packed or training-run directory
    md.config, md.packing, md.kind          # ModelConfig, PackConfig or None, "model" | "packed"
    model = md.skeleton()                   # an empty Transformer on the meta device (packed or not)
    t = md.tensor("norm.weight")            # one tensor, read alone (no mmap) and validated
    model, tokenizer = md.load()            # everything, memory-mapped and validated, assigned in

Every tensor is checked against the skeleton before it is used: the name is expected, the shape
and dtype are exactly the skeleton's (float tensors: any float dtype, finite), packed bytes
decode to valid codes, scales are positive, and scales and norm weights are within bounds a
real model never comes near. The tokenizer must fit the embedding. The first problem is a
one-line CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import BitNetError, CheckpointError, first_line
from ..formats import get_format
from ..model import Transformer
from ..packed_layers import TABLE_HEADS, PackConfig, PackedBitLinear, float_head_dtype
from ..safetensors_io import SafetensorsReader, all_finite
from ..tokenizer import Tokenizer
from .layout import (CONFIG, HEAD_TENSORS, MAX_NORM_WEIGHT, MAX_SCALE, WEIGHTS, model_config, packing_config,
                     read_config_document, read_tokenizer, resolve)



class ModelDir:
    """A model directory (or a training run, read at its newest step), opened once."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve(path)
        self.doc: dict[str, Any] = read_config_document(self.path)
        self.file = self.path / WEIGHTS
        _ = (self.config, self.packing)  # parse both now, so a bad document fails at open

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, kind={self.kind!r})"

    @property
    def kind(self) -> str:
        return "packed" if self.packing is not None else "model"

    @cached_property
    def config(self) -> ModelConfig:
        return model_config(self.path, self.doc)

    @cached_property
    def packing(self) -> PackConfig | None:
        return packing_config(self.path, self.doc)

    def skeleton(self) -> Transformer:
        """The empty model (meta device) the tensors belong to: no weight is allocated."""
        try:
            with torch.device("meta"):
                return Transformer(self.config, self.packing)
        except BitNetError as e:
            raise CheckpointError(f"{self.path / CONFIG}: {e}") from None

    @cached_property
    def _expected(self) -> dict[str, tuple[torch.Size, torch.dtype | None]]:
        """name → (shape, exact dtype, or None for "any float dtype")."""
        head = (float_head_dtype(self.packing.head) if self.packing and self.packing.head not in TABLE_HEADS
                else None)
        out = {}
        for name, t in self.skeleton().state_dict().items():
            if head is not None and name in HEAD_TENSORS:
                out[name] = (t.shape, head)  # a float head is stored at its own precision
            else:
                out[name] = (t.shape, None if t.is_floating_point() else t.dtype)
        return out

    @cached_property
    def _packed_layers(self) -> dict[str, PackedBitLinear]:
        return {n: m for n, m in self.skeleton().named_modules() if isinstance(m, PackedBitLinear)}

    def names(self) -> list[str]:
        """The tensor names of the model, in state-dict order."""
        return list(self._expected)

    def check(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` as the model takes it (fp16 heads widened to fp32), or CheckpointError."""
        where = f"{self.file}: tensor {name}"
        if name not in self._expected:
            raise CheckpointError(f"{self.file}: unexpected tensor {name} (the config has no such weight)")
        shape, dtype = self._expected[name]
        if t.shape != shape:
            raise CheckpointError(f"{where} has shape {list(t.shape)}, the config expects {list(shape)}")
        self._check_values(name, t)
        if name.endswith(".packed"):
            layer = self._packed_layers[name[: -len(".packed")]]
            bad = get_format(layer.format).first_invalid_byte(t.numpy(), layer.out_features, layer.in_features)
            if bad is not None:
                raise CheckpointError(f"{where}: {bad}")
        return self._as_model_dtype(name, t)

    def _as_model_dtype(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Float tensors stored narrower than the model computes (an fp16 head, bf16 masters kept
        in their dtype) are widened to fp32; exact-dtype tensors (fp16 q4 scales) stay."""
        want = self._model_dtypes[name]
        return t.float() if t.is_floating_point() and want == torch.float32 and t.dtype != want else t

    @cached_property
    def _model_dtypes(self) -> dict[str, torch.dtype]:
        return {name: t.dtype for name, t in self.skeleton().state_dict().items()}

    def _check_values(self, name: str, t: torch.Tensor) -> None:
        """dtype, finiteness and bounds of a tensor or a block of its rows."""
        where = f"{self.file}: tensor {name}"
        _, dtype = self._expected[name]
        if dtype is not None and t.dtype != dtype:
            raise CheckpointError(f"{where} has dtype {t.dtype}, expected {dtype}")
        if dtype is None and not t.is_floating_point():
            raise CheckpointError(f"{where} has dtype {t.dtype}, expected a float dtype")
        if t.is_floating_point() and not all_finite(t):
            raise CheckpointError(f"{where} holds NaN or infinite values")
        if name.endswith(("weight_scale", "row_scale", "group_scale")):
            if not bool((t > 0).all()):
                raise CheckpointError(f"{where} holds a non-positive scale; scales must be positive")
            if float(t.max()) > MAX_SCALE:
                raise CheckpointError(f"{where} holds a scale of {float(t.max()):.3g}, above the bound "
                                      f"{MAX_SCALE:g} (it would overflow the logits)")
        if name.endswith("norm.weight") and t.numel() and float(t.abs().max()) > MAX_NORM_WEIGHT:
            raise CheckpointError(f"{where} holds a norm weight of magnitude {float(t.abs().max()):.3g}, "
                                  f"above the bound {MAX_NORM_WEIGHT:g}")

    @cached_property
    def _reader(self) -> SafetensorsReader:
        if not self.file.exists():
            raise CheckpointError(f"{self.file}: missing")
        try:
            reader = SafetensorsReader(self.file)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.file}: truncated or corrupt safetensors file ({first_line(e)})") from None
        present = set(reader.keys())
        missing = [n for n in self._expected if n not in present]
        if missing:
            raise CheckpointError(f"{self.file}: tensor {missing[0]} is missing")
        return reader

    def check_headers(self) -> None:
        """Every tensor's name, shape and dtype checked from the safetensors header alone (the
        header's byte ranges against the file's size too): what `info` shows without reading a
        weight. CheckpointError (one line) at the first problem."""
        reader = self._reader  # parsed and bounds-checked; every expected tensor is present
        for name in reader.keys():
            if name not in self._expected:
                raise CheckpointError(f"{self.file}: unexpected tensor {name} (the config has no such weight)")
            shape, dtype = self._expected[name]
            if tuple(reader.shape(name)) != tuple(shape):
                raise CheckpointError(f"{self.file}: tensor {name} has shape {list(reader.shape(name))}, "
                                      f"the config expects {list(shape)}")
            found = reader.dtype(name)
            if (dtype is not None and found != dtype) or (dtype is None and not found.is_floating_point):
                raise CheckpointError(f"{self.file}: tensor {name} has dtype {found}, expected "
                                      f"{dtype or 'a float dtype'}")

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads (no mmap: a streamed conversion stays near the
        largest tensor) and validated."""
        if name not in self._expected:
            raise CheckpointError(f"{self.file}: the config has no tensor {name}")
        try:
            t = self._reader.get_tensor(name)
        except ValueError as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {name} ({first_line(e)})") from None
        return self.check(name, t)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of one tensor, read alone and validated: a streamed conversion of
        the embedding holds a block of it, not the whole."""
        if name not in self._expected:
            raise CheckpointError(f"{self.file}: the config has no tensor {name}")
        shape, _ = self._expected[name]
        if tuple(self._reader.shape(name)) != tuple(shape):
            raise CheckpointError(f"{self.file}: tensor {name} has shape {list(self._reader.shape(name))}, "
                                  f"the config expects {list(shape)}")
        try:
            t = self._reader.get_rows(name, start, stop)
        except ValueError as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {name} ({first_line(e)})") from None
        self._check_values(name, t)
        return self._as_model_dtype(name, t)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, memory-mapped (the weights stay in the page cache, shared and aligned)
        and validated."""
        if not self.file.exists():
            raise CheckpointError(f"{self.file}: missing")
        if not self.file.is_file():  # a directory, or a FIFO that would block the open forever
            raise CheckpointError(f"{self.file}: not a regular file")
        try:
            with safe_open(str(self.file), framework="pt") as f:
                found = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error type for truncated/corrupt headers
            raise CheckpointError(f"{self.file}: truncated or corrupt safetensors file ({first_line(e)})") from None
        for name in self._expected:
            if name not in found:
                raise CheckpointError(f"{self.file}: tensor {name} is missing")
        return {name: self.check(name, t) for name, t in found.items()}

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer saved beside the weights (special tokens and chat template from the
        config's tokenizer section), or None."""
        return read_tokenizer(self.path, self.doc, self.config.vocab_size)

    def load(self, device: str | torch.device = "cpu", with_tokenizer: bool = True
             ) -> tuple[Transformer, Tokenizer | None]:
        """(model, tokenizer or None): the skeleton with the file's tensors assigned in, so every
        weight is allocated once."""
        model = self.skeleton()
        model.load_state_dict(self.tensors(), strict=True, assign=True)
        model.init_buffers()
        model.to(device)
        return model, self.tokenizer() if with_tokenizer else None


def load(path: str | os.PathLike, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """Load (model, tokenizer or None) from a model directory, a packed directory or a training
    run directory (its newest step)."""
    return ModelDir(path).load(device, with_tokenizer)


def load_config(path: str | os.PathLike) -> ModelConfig:
    return ModelDir(path).config


def open_model_dir(path: str | os.PathLike) -> ModelDir:
    """`ModelDir(path)`, spelled as a function for symmetry with `write_model_dir`."""
    return ModelDir(path)


