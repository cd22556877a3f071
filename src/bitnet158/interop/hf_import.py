"""Hugging Face BitNet (`BitNetForCausalLM`, e.g. microsoft/bitnet-b1.58-2B-4T) → our Transformer.

    model, tokenizer = load_hf("bitnet-b1.58-2B-4T")            # packed repo → packed runtime
    model, tokenizer = load_hf("bitnet-b1.58-2B-4T-bf16")       # bf16 masters → training form
    import_hf("bitnet-b1.58-2B-4T", "runs/2b4t")                 # streamed into our packed directory

Layouts (FORMATS §2.3–2.4), told apart by config.json's `quantization_config`:
- **packed** (`quant_method: bitnet`, `quantization_mode` offline or absent): every projection is
  uint8 `[ceil(out/4), in]`, byte r holding rows r, R+r, 2R+r, 3R+r (R = ceil(out/4)) in bits
  1:0, 3:2, 5:4, 7:6 as code = w + 1, plus a `weight_scale` of shape [1]. Its meaning depends on
  `linear_class`: `autobitlinear` multiplies the output (weight_scale = mean|W|); `bitlinear`, the
  default when the field is absent, divides it (weight_scale = 1/mean|W|). We convert both to
  our one convention, a dequantization multiplier s with W ≈ codes·s.
- **latent masters** (no `quantization_config`, or `autobitlinear` + `online`): float weights that
  the forward re-quantizes; they load into BitLinear as they are (the training form).
- **1bitLLM** (`BitnetForCausalLM`, FORMATS §2.6: the b1.58 paper's reproduction): latent fp16
  masters under LLaMA names, with the same SubLN topology (`self_attn.inner_attn_ln` before o_proj,
  `mlp.ffn_layernorm` before down_proj), SwiGLU and full multi-head attention.

Why packed repos load into `PackedBitLinear`, not into a latent-weight BitLinear: BitLinear
re-derives its scale as mean|W| of its latent weight on every forward, and absmean quantization is
not idempotent — for W = codes·s, mean|W| = s·f (f the share of non-zero codes), so the forward
would use codes·s·f, not codes·s, and the logits would drift from the checkpoint's. The packed
runtime stores exactly (codes, s): no full-precision matrix is allocated, the integers are the
checkpoint's, and the logits match transformers up to float summation order. For fine-tuning,
`latent=True` builds latent weights W = codes·s/f instead; then mean|W| = s and round(W/s)
clips back to the same codes, so re-quantization reproduces (codes, s) up to float rounding of
the mean (`latent_from_ternary`).

Weights are read tensor by tensor (`SafetensorsReader`: plain reads, no mmap; one file or shards listed in
model.safetensors.index.json); pickle files (.bin, .pt) are refused, never opened. Every tensor
is checked against config.json (name, shape) and every tensor of the file must be consumed.
The conversion is a plan (our tensor name → a function producing it): `load_hf` runs it into a
model, `import_hf` streams it into a checkpoint file one tensor at a time, so importing a packed
repo never allocates a full-precision linear weight nor the whole model.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_model_dir
from ..config import MAX_SHAPE, ModelConfig
from ..errors import BitNetError, CheckpointError, ConfigError, short_repr, shown
from ..jsonio import get_bool, get_dict, get_float, get_int, get_list, get_str, read_json_object
from ..layers import BitLinear
from ..model import Transformer
from ..pack_plan import WeightSource, packed_plan, plan_state
from ..packed_layers import PackConfig
from ..safetensors_io import PlannedTensor, RowBlocks, row_ranges
from ..tokenizer import Tokenizer
from .hf_common import (TensorSource, float_tensor, hf_name, hf_shape, latent_from_ternary, rope_settings,
                        unpack_hf_ternary)
from .hf_tokenizer import read_hf_tokenizer

ONEBITLLM_ARCHITECTURE = "BitnetForCausalLM"  # 1bitLLM's custom class (lower-case n), FORMATS §2.6
SUPPORTED_ARCHITECTURES = ("BitNetForCausalLM", ONEBITLLM_ARCHITECTURE)
_ACTIVATIONS = {"relu2": "relu2", "silu": "swiglu"}
PACKED_FORMAT = "i2"  # our packed runtime format for imported codes (2 bits, as in the HF file)


@dataclass(frozen=True)
class HFLayout:
    """What the checkpoint's linear weights are: packed ternary or latent floats, and for packed
    ones whether `weight_scale` divides (bitlinear: 1/mean|W|) or multiplies (autobitlinear)."""

    packed: bool
    divide: bool = False
    names: str = "bitnet"  # "bitnet" (HF BitNet names) or "1bitllm" (inner_attn_ln, ffn_layernorm)


# --- config.json ---------------------------------------------------------------------------

def _is_onebitllm(doc: dict[str, Any]) -> bool:
    archs = doc.get("architectures")
    return isinstance(archs, list) and ONEBITLLM_ARCHITECTURE in archs


def hf_model_config(doc: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """Our ModelConfig (mode b158, SubLN) from a BitNetForCausalLM (or 1bitLLM BitnetForCausalLM)
    config.json document; every field is type-checked and bounded, each error naming its key."""
    archs = get_list(doc, "architectures", source, default=[], items=str) or \
        [get_str(doc, "model_type", source, default="unknown")]
    if not any(a in SUPPORTED_ARCHITECTURES or a == "bitnet" for a in archs):  # "bitnet": model_type only
        raise CheckpointError(f"{source}: architecture {shown(', '.join(archs))} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    shape = hf_shape(doc, source)
    if doc.get("input_bits", 8) != 8:  # 1bitLLM's activation bits; 8 is what everything here computes
        raise CheckpointError(f"{source}: input_bits {short_repr(doc['input_bits'])} is not supported "
                              f"(only 8-bit activations)")
    default_act = "silu" if _is_onebitllm(doc) else "relu2"  # each class's default
    act = get_str(doc, "hidden_act", source, default=default_act)
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {short_repr(act)} is not supported; "
                              f"supported: {', '.join(_ACTIVATIONS)}")
    if doc.get("attention_bias") or doc.get("mlp_bias"):
        raise CheckpointError(f"{source}: biased projections are not supported (BitNet has no biases)")
    try:
        return ModelConfig(
            **shape, max_seq_len=get_int(doc, "max_position_embeddings", source, default=2048, lo=1,
                                         hi=MAX_SHAPE["max_seq_len"]),
            **rope_settings(doc, source, 500000.0),  # BitNetConfig's default base
            norm_eps=get_float(doc, "rms_norm_eps", source, default=1e-5, positive=True),
            activation=_ACTIVATIONS[act], mode="b158", norm_placement="subln",
            tie_embeddings=get_bool(doc, "tie_word_embeddings", source, default=False),
        ).validate()
    except BitNetError as e:
        raise CheckpointError(f"{source}: {e}") from None


def hf_layout(doc: dict[str, Any], source: Path | str = "config.json") -> HFLayout:
    """Packed or latent, the weight_scale convention (from `quantization_config`) and the names."""
    layout = _quant_layout(doc, source)
    return replace(layout, names="1bitllm") if _is_onebitllm(doc) else layout


def _quant_layout(doc: dict[str, Any], source: Path | str) -> HFLayout:
    qc = get_dict(doc, "quantization_config", source, default={})
    if not qc:
        return HFLayout(packed=False)
    where = f"{source}: quantization_config"
    method = qc.get("quant_method")
    if method != "bitnet":
        raise CheckpointError(f"{source}: quant_method {short_repr(method)} is not supported for a ternary import "
                              f"(expected 'bitnet')")
    if qc.get("use_rms_norm"):
        raise CheckpointError(f"{source}: quantization_config.use_rms_norm (a norm inside every linear) "
                              f"is not supported")
    kept = [m for m in get_list(qc, "modules_to_not_convert", where, default=[]) if "_proj" in short_repr(m, 200)]
    if kept:
        raise CheckpointError(f"{source}: modules_to_not_convert keeps {short_repr(kept[0])} full precision; "
                              f"not supported")
    linear_class = qc.get("linear_class", "bitlinear")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise CheckpointError(f"{source}: linear_class {short_repr(linear_class)} is not supported "
                              f"(expected bitlinear or autobitlinear)")
    if linear_class == "autobitlinear" and qc.get("quantization_mode", "offline") == "online":
        return HFLayout(packed=False)
    return HFLayout(packed=True, divide=linear_class == "bitlinear")


# --- tensors -------------------------------------------------------------------------------

def _ternary(src: TensorSource, layout: HFLayout, ours: str, out_features: int, in_features: int
             ) -> tuple[torch.Tensor, float]:
    """(int8 codes [out, in], our dequantization multiplier s) of one packed projection."""
    name = hf_name(ours + ".weight", layout.names)
    packed = src.get(name)
    shape = [(out_features + 3) // 4, in_features]
    if packed.dtype != torch.uint8:
        raise CheckpointError(f"{src.directory}: tensor {name} has dtype {packed.dtype}; config.json says "
                              f"packed, expected uint8 {shape}")
    if list(packed.shape) != shape:
        raise CheckpointError(f"{src.directory}: tensor {name} has shape {list(packed.shape)}, "
                              f"config.json implies packed {shape}")
    try:
        codes = unpack_hf_ternary(packed, out_features)
    except ValueError as e:
        raise CheckpointError(f"{src.directory}: tensor {name}: {e}") from None
    scale_name = hf_name(ours + ".weight_scale", layout.names)
    ws = src.get(scale_name)
    if ws.numel() != 1 or not ws.is_floating_point():
        raise CheckpointError(f"{src.directory}: tensor {scale_name} has shape {list(ws.shape)} and dtype "
                              f"{ws.dtype}, expected one float")
    value = float(ws.float())
    if not (value > 0 and value != float("inf")):
        raise CheckpointError(f"{src.directory}: tensor {scale_name} is {value}; scales must be positive")
    # bitlinear stores 1/mean|W| and divides; autobitlinear stores mean|W| and multiplies
    return codes, (1.0 / value if layout.divide else value)


# --- the conversion plan ---------------------------------------------------------------------

@dataclass
class _Plan:
    directory: Path
    doc: dict[str, Any]
    config: ModelConfig
    packing: PackConfig | None  # None: the training form
    entries: list[PlannedTensor]  # in state-dict order


def _plan(directory: str | os.PathLike, *, latent: bool = False, mode: str | None = None,
          pack: PackConfig | None = None, keep_dtype: bool = False) -> _Plan:
    """Check config.json and the tensor names, and say how to make each tensor of the output;
    nothing heavy is read yet. Packed repos give a packed plan (format i2, fp32 head unless
    `pack` says otherwise) and masters a training-form one, unless `latent` / `pack` ask for the
    other form."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    source = directory / "config.json"
    doc = read_json_object(source)
    config = hf_model_config(doc, source)
    layout = hf_layout(doc, source)
    if latent and pack is not None:
        raise ConfigError("latent (the training form) and pack (a packed directory) exclude each other")
    if mode is not None:
        if layout.packed and mode != "b158":
            raise CheckpointError(f"{source}: a packed ternary checkpoint cannot load as mode {mode!r}")
        try:
            config = config.twin(mode)
        except BitNetError as e:
            raise CheckpointError(f"load_hf: {e}") from None
    if layout.packed and not latent and pack is None:
        pack = PackConfig(format=PACKED_FORMAT, head="fp32")  # the file's codes, its float head exactly
    src = TensorSource(directory)
    with torch.device("meta"):
        train = Transformer(config)
    shapes = {name: tuple(t.shape) for name, t in train.state_dict().items()}
    linears = {name: m for name, m in train.named_modules() if isinstance(m, BitLinear)}

    def hf(ours: str) -> str:
        return hf_name(ours, layout.names)

    def ternary(prefix: str) -> tuple[torch.Tensor, float]:
        return _ternary(src, layout, prefix, linears[prefix].out_features, linears[prefix].in_features)

    weights = WeightSource(tensor=lambda name: float_tensor(src, hf(name), shapes[name]),
                           rows=lambda name, a, b: float_tensor(src, hf(name), shapes[name], rows=(a, b)),
                           ternary=ternary if layout.packed else None)
    consumed = {hf(name) for name in shapes}
    if layout.packed:
        consumed |= {hf(prefix + ".weight_scale") for prefix in linears}
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # a tied head may be saved too
    extra = sorted(n for n in src.names() - consumed - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensor {shown(extra[0])} (config.json has no such weight)")
    if pack is not None:
        plan = packed_plan(config, pack, weights)
        return _Plan(directory, doc, config, plan.packing, plan.entries)
    entries = []
    for name, shape in shapes.items():
        prefix = name.removesuffix(".weight")
        if layout.packed and prefix in linears:  # latent weights that re-quantize to the file's codes
            entries.append(PlannedTensor(name, torch.float32, shape,
                                         lambda p=prefix: latent_from_ternary(*ternary(p))))
            continue
        dtype = src.dtype(hf(name)) if keep_dtype else torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32  # float_tensor names the problem when it is read
        if len(shape) == 2 and shape[0] * shape[1] >= 1 << 24:  # the embedding and head: a block at a time
            make = lambda n=name, s=shape: RowBlocks(  # noqa: E731
                weights.rows(n, a, b) if not keep_dtype else float_tensor(src, hf(n), s, widen=False, rows=(a, b))
                for a, b in row_ranges(s[0], s[1] * 4))
        else:
            make = lambda n=name, s=shape: float_tensor(src, hf(n), s, widen=not keep_dtype)  # noqa: E731
        entries.append(PlannedTensor(name, dtype, shape, make))
    return _Plan(directory, doc, config, None, entries)


# --- entry points --------------------------------------------------------------------------

def load_hf(directory: str | os.PathLike, *, latent: bool = False, mode: str | None = None):
    """(Transformer, Tokenizer or None) from a Hugging Face BitNetForCausalLM directory.

    Packed repos load into the packed runtime (PackedBitLinear, format i2, fp32 embedding/head);
    `latent=True` gives the training form instead (see the module docstring). Latent-master repos
    load into BitLinear; `mode="fp"` builds the full-precision twin (what transformers runs for a
    BitNet config without `quantization_config`).
    """
    plan = _plan(directory, latent=latent, mode=mode)
    with torch.device("meta"):
        model = Transformer(plan.config, plan.packing)
    model.load_state_dict(plan_state(plan.entries), strict=True, assign=True)
    model.init_buffers()
    return model, read_hf_tokenizer(plan.directory, plan.doc)


def import_hf(directory: str | os.PathLike, out: str | os.PathLike, *, latent: bool = False,
              pack: PackConfig | str | None = None, keep_dtype: bool = False, tokenizer: str | os.PathLike | None = None,
              overwrite: bool = False, progress: bool = False) -> Path:
    """Convert a Hugging Face BitNet directory into our checkpoint directory `out`, streamed.

    Forms: `pack` (a PackConfig or a format name) writes a packed directory straight from float
    masters or packed codes; `latent=True` writes the training form (float masters as they are,
    kept in their fp16/bf16 dtype with `keep_dtype`, or latent weights made from packed codes).
    With neither, packed repos become a packed directory (format i2, fp32 head: what `load_hf`
    builds) and master repos a training-form one. `bitnet158.load` reads either.

    The tokenizer (tokenizer.json, or a SentencePiece tokenizer.model converted; `tokenizer`: a
    file or directory to take it from instead) keeps its special tokens, whether bos starts a
    prompt, and the chat template; a directory with none imports with a warning. Tensors are
    converted and written one at a time (the embedding a block of rows at a time) into a
    temporary directory renamed into place, so peak memory stays near the largest tensor, and a
    failure leaves `out` untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    if isinstance(pack, str):
        pack = PackConfig(format=pack)
    plan = _plan(directory, latent=latent, pack=pack, keep_dtype=keep_dtype)
    tok = _tokenizer(plan, tokenizer)
    return write_model_dir(out, plan.config, plan.packing, plan.entries, tok, overwrite=overwrite, progress=progress)


def _tokenizer(plan: _Plan, override: str | os.PathLike | None) -> Tokenizer | None:
    if override is None:
        tok = read_hf_tokenizer(plan.directory, plan.doc)
    else:
        path = Path(override)
        if not path.exists():
            raise CheckpointError(f"{path}: no such tokenizer file or directory")
        tok = read_hf_tokenizer(path if path.is_dir() else path.parent, plan.doc,
                                file=None if path.is_dir() else path)
        if tok is None:
            raise CheckpointError(f"{path}: holds no tokenizer.json or tokenizer.model")
    if tok is None:
        warnings.warn(f"{plan.directory} has no tokenizer (no tokenizer.json or tokenizer.model): the model "
                      f"imports without one and cannot turn text into tokens; pass --tokenizer PATH "
                      f"(tokenizer= in Python) to add one", NoTokenizerWarning, stacklevel=3)
    elif tok.vocab_size > plan.config.vocab_size:
        raise CheckpointError(f"{plan.directory}: the tokenizer has {tok.vocab_size} tokens but the model's "
                              f"embedding has {plan.config.vocab_size} rows")
    return tok


class NoTokenizerWarning(UserWarning):
    """An import found no tokenizer to keep."""
