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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_model_dir
from ..config import MAX_SHAPE, ModelConfig
from ..errors import BitNetError, CheckpointError, short_repr, shown
from ..formats import get_format
from ..jsonio import get_bool, get_dict, get_float, get_int, get_list, get_str, read_json_object
from ..layers import BitLinear
from ..model import Transformer
from ..packed_layers import PackConfig, PackedBitLinear
from ..safetensors_io import PlannedTensor
from ..tokenizer import Tokenizer
from .hf_common import (OnePacked, TensorSource, float_tensor, hf_name, hf_shape, latent_from_ternary,
                        rope_theta, unpack_hf_ternary)
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
            rope_theta=rope_theta(doc, source, 500000.0),  # BitNetConfig's default
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
    model: Transformer  # on the meta device (the packed skeleton for packed imports)
    producers: dict[str, Callable[[], torch.Tensor]]  # our state-dict name → its tensor, in state-dict order


def _plan(directory: str | os.PathLike, *, latent: bool = False, mode: str | None = None) -> _Plan:
    """Check config.json and the tensor names, and say how to make each of our tensors; nothing
    heavy is read yet."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    source = directory / "config.json"
    doc = read_json_object(source)
    config = hf_model_config(doc, source)
    layout = hf_layout(doc, source)
    if mode is not None:
        if layout.packed and mode != "b158":
            raise CheckpointError(f"{source}: a packed ternary checkpoint cannot load as mode {mode!r}")
        try:
            config = config.twin(mode)
        except BitNetError as e:
            raise CheckpointError(f"load_hf: {e}") from None
    src = TensorSource(directory)
    packing = PackConfig(format=PACKED_FORMAT, head="fp32") if layout.packed and not latent else None
    with torch.device("meta"):
        model = Transformer(config, packing)
    fmt = get_format(PACKED_FORMAT)

    def hf(ours: str) -> str:
        return hf_name(ours, layout.names)

    producers: dict[str, Callable[[], torch.Tensor]] = {}
    consumed: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (BitLinear, PackedBitLinear)):
            continue
        if layout.packed:
            consumed.update({hf(name + ".weight"), hf(name + ".weight_scale")})
            one = OnePacked(lambda name=name, m=module: _ternary(src, layout, name, m.out_features, m.in_features))
            if isinstance(module, PackedBitLinear):
                producers[name + ".packed"] = lambda one=one: torch.from_numpy(fmt.pack(one.take_codes().numpy()))
                producers[name + ".weight_scale"] = lambda one=one: torch.tensor([one.scale()], dtype=torch.float32)
            else:
                producers[name + ".weight"] = lambda one=one: latent_from_ternary(one.take_codes(), one.scale())
        else:
            shape = torch.Size([module.out_features, module.in_features])
            producers[name + ".weight"] = lambda n=hf(name + ".weight"), shape=shape: float_tensor(src, n, shape)
            consumed.add(hf(name + ".weight"))
    state = model.state_dict()  # meta tensors: names, shapes and dtypes only
    for name, t in state.items():
        if name not in producers:  # embedding, norms, untied head: plain floats
            producers[name] = lambda n=hf(name), shape=t.shape: float_tensor(src, n, shape)
            consumed.add(hf(name))
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # a tied head may be saved too
    extra = sorted(n for n in src.names() - consumed - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise CheckpointError(f"{directory}: unexpected tensor {shown(extra[0])} (config.json has no such weight)")
    return _Plan(directory, doc, model, {name: producers[name] for name in state})


# --- entry points --------------------------------------------------------------------------

def load_hf(directory: str | os.PathLike, *, latent: bool = False, mode: str | None = None):
    """(Transformer, Tokenizer or None) from a Hugging Face BitNetForCausalLM directory.

    Packed repos load into the packed runtime (PackedBitLinear, format i2, fp32 embedding/head);
    `latent=True` gives the training form instead (see the module docstring). Latent-master repos
    load into BitLinear; `mode="fp"` builds the full-precision twin (what transformers runs for a
    BitNet config without `quantization_config`).
    """
    plan = _plan(directory, latent=latent, mode=mode)
    tensors = {name: make() for name, make in plan.producers.items()}
    plan.model.load_state_dict(tensors, strict=True, assign=True)
    plan.model.init_buffers()
    return plan.model, read_hf_tokenizer(plan.directory, plan.doc)


def import_hf(directory: str | os.PathLike, out: str | os.PathLike, *, latent: bool = False,
              overwrite: bool = False) -> Path:
    """Convert a Hugging Face BitNet directory into our checkpoint directory `out`, streamed.

    Packed repos become a packed directory (format i2, fp32 head: what `load_hf` builds) and
    latent-master repos (or `latent=True`) a training-form one; `bitnet158.load` reads either.
    The tokenizer keeps its special tokens (bos, eos and end-of-turn, generation_config.json's
    list), whether bos starts a prompt, and the chat template. Tensors are converted and written
    one at a time into a temporary directory renamed into place, so peak memory is about the
    largest tensor, and a failure leaves `out` untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists (pass overwrite=True / --force to replace it)")
    plan = _plan(directory, latent=latent)
    tokenizer: Tokenizer | None = read_hf_tokenizer(plan.directory, plan.doc)
    state = plan.model.state_dict()
    entries = [PlannedTensor(name, state[name].dtype, tuple(state[name].shape), make)
               for name, make in plan.producers.items()]
    return write_model_dir(out, plan.model.config, plan.model.packing, entries, tokenizer, overwrite=overwrite)
