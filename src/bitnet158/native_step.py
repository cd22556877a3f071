"""The native forward step: a packed model's whole forward over a KV cache in one call of the
compiled extension (``csrc/forward_step.cpp``).

`Transformer.forward` calls `run` first whenever it is given a cache; `run` answers None when the
step cannot serve the call, and the Python path runs as before. It serves a call when:

- the extension is built and a compiled kernel path is selected (``BITNET158_KERNEL=torch`` means
  the Python path for everything), the step is enabled (``BITNET158_NATIVE_STEP=0`` switches just
  this off; `set_enabled` does the same at run time), and autograd is off;
- the model is packed (every linear a PackedBitLinear with per-token activations), its tensors
  are fp32 on the CPU with an int8 or fp32 embedding, and the native RMSNorm rounds as torch does
  here (the bit-for-bit check in `kernels`);
- the cache is fp32 or fp16 on the CPU.

Rows are tokens at their own positions in their own cache slots, so one call serves a KVCache
(B sequences advancing together, any T), one sequence's prefill chunk in a SlotKVCache, one new
token for each of several sequences, or a mixed step of several sequences' tokens (SlotRows). With an int8 head the logits come back from native code;
with a float head the step returns the final-normed rows and the model's own head finishes them.
An int8 or q4 head (and a tied embedding of either) is read natively.

The plan (pointers to every weight) is built once per model and rebuilt when a buffer is replaced
(a load, pack_, .to()); each cache gets its view once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import kernels, native
from .errors import ConfigError
from .layers import RMSNorm
from .packed_layers import Int8Embedding, Int8Head, PackedBitLinear, Q4Table

ENV_NATIVE_STEP = "BITNET158_NATIVE_STEP"

_enabled: bool | None = None  # set_enabled's choice; None: the environment's


def enabled() -> bool:
    """Whether the native step may be used (the extension and a compiled path are checked per call)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_NATIVE_STEP, "1").strip() not in ("0", "false", "no", "off")


def set_enabled(flag: bool | None) -> None:
    """Switch the native step on or off for this process; None returns to ``BITNET158_NATIVE_STEP``."""
    global _enabled
    _enabled = flag


def _array(t: torch.Tensor | None, dtype: torch.dtype) -> np.ndarray | None:
    if t is None:
        return None
    if t.dtype != dtype or t.device.type != "cpu":
        raise _Unsupported(f"a {t.dtype} tensor on {t.device}")
    return t.detach().contiguous().numpy()


class _Unsupported(Exception):
    """The model has something the native step does not implement (the Python path serves it)."""


@dataclass
class StepPlan:
    native: Any                              # _C.StepModel
    watched: list[tuple[dict, str, Any]]     # (module._buffers or _parameters, name, tensor) it points into
    float_head: bool                         # the step returns normed rows; the model's head finishes

    def current(self) -> bool:
        return all(d.get(name) is t for d, name, t in self.watched)


class _SpecBuilder:
    def __init__(self) -> None:
        self.watched: list[tuple[dict, str, Any]] = []

    def tensor(self, module: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> np.ndarray:
        store = module._parameters if name in module._parameters else module._buffers
        t = store[name]
        self.watched.append((store, name, t))
        return _array(t, dtype)

    def table(self, prefix: str, table: nn.Module) -> dict[str, np.ndarray]:
        """A quantized head or embedding table as the spec names it."""
        if isinstance(table, Q4Table):  # fp16 scales travel as their bit patterns
            return {prefix + "_q4": self.tensor(table, "qweight", torch.uint8),
                    prefix + "_q4_scale": self.tensor(table, "group_scale", torch.float16).view(np.uint16)}
        return {prefix + "_q": self.tensor(table, "qweight", torch.int8),
                prefix + "_row_scale": self.tensor(table, "row_scale")}

    def norm(self, module: nn.Module) -> np.ndarray | None:
        if isinstance(module, nn.Identity):
            return None
        if not isinstance(module, RMSNorm):
            raise _Unsupported(f"a {type(module).__name__} norm")
        return self.tensor(module, "weight")

    def module(self, parent: nn.Module, name: str) -> nn.Module:
        """parent.<name>, watched: a plan must not outlive a swapped layer (a LoRA wrapper keeps the
        packed layer's buffers, so buffer identity alone would not notice it)."""
        child = parent._modules[name]
        self.watched.append((parent._modules, name, child))
        return child

    def linear(self, parent: nn.Module, name: str) -> dict:
        layer = self.module(parent, name)
        if not isinstance(layer, PackedBitLinear):
            raise _Unsupported(f"a {type(layer).__name__} layer")
        if layer.act_quant != "token":
            raise _Unsupported("per-tensor activation quantization (it would mix the rows of a batch)")
        return {
            "fmt": layer.format, "N": layer.out_features, "K": layer.in_features,
            "packed": self.tensor(layer, "packed", torch.uint8),
            "scale": self.tensor(layer, "weight_scale"),
            "bias": self.tensor(layer, "bias") if layer._buffers.get("bias") is not None else None,
            "norm": self.norm(layer.norm) if layer.norm is not None else None,
        }


def _build(model: Any) -> StepPlan:
    width = kernels._norm_width()
    if width is None:
        raise _Unsupported("the native RMSNorm cannot reproduce torch's rounding here")
    cfg = model.config
    b = _SpecBuilder()
    spec: dict[str, Any] = {
        "hidden": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "inter": cfg.intermediate_size, "vocab": cfg.vocab_size, "max_pos": cfg.max_seq_len,
        "relu2": cfg.activation == "relu2", "eps": float(cfg.norm_eps), "norm_width": width,
        "final_norm": b.norm(model.norm), "rope_cos": b.tensor(model, "rope_cos"),
        "rope_sin": b.tensor(model, "rope_sin"),
    }
    embed = b.module(model, "embed_tokens")
    if "lm_head" in model._modules and model.lm_head is not None:
        b.module(model, "lm_head")
    if isinstance(embed, Int8Embedding):
        spec.update(b.table("embed", embed.table))
    else:
        spec["embed_f32"] = b.tensor(embed, "weight")
    float_head = not isinstance(model.lm_head, Int8Head)
    if not float_head:
        spec.update(b.table("head", model.lm_head.table))
    blocks = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        blocks.append({
            "input_norm": b.norm(layer.input_layernorm), "post_attn_norm": b.norm(layer.post_attention_layernorm),
            "attn_sub_norm": b.norm(attn.attn_sub_norm), "ffn_sub_norm": b.norm(mlp.ffn_sub_norm),
            **{key: b.linear(attn, name) for key, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                                                           ("o", "o_proj"))},
            **{key: b.linear(mlp, name) for key, name in (("gate", "gate_proj"), ("up", "up_proj"),
                                                          ("down", "down_proj"))},
        })
    spec["blocks"] = blocks
    return StepPlan(native.extension().StepModel(spec), b.watched, float_head)


def plan_for(model: Any) -> StepPlan | None:
    """The model's native plan, built on first use and again after a buffer is replaced; None
    when the model has something the step does not implement (`unsupported_reason` says what)."""
    cached = model.__dict__.get("_step_plan")
    if isinstance(cached, StepPlan) and cached.current():
        return cached
    if isinstance(cached, tuple) and all(d.get(n) is t for d, n, t in cached[1]):
        return None  # unsupported, and nothing has changed since
    if model.packing is None:
        return None
    try:
        plan = _build(model)
    except _Unsupported as why:
        watched = [(m._buffers, n, t) for m in model.modules() for n, t in m._buffers.items()]
        watched += [(m._modules, n, c) for m in model.modules() for n, c in m._modules.items()]
        model.__dict__["_step_plan"] = (str(why), watched)
        return None
    model.__dict__["_step_plan"] = plan
    return plan


def unsupported_reason(model: Any) -> str | None:
    """Why the native step cannot run this model (None: it can, where the extension is built)."""
    if model.packing is None:
        return "the model is not packed"
    if not kernels.extension_available():
        return "the compiled extension is unavailable"
    plan_for(model)
    cached = model.__dict__.get("_step_plan")
    return cached[0] if isinstance(cached, tuple) else None


def _cache_view(cache: Any) -> Any:
    view = cache.__dict__.get("_step_view")
    if view is None:
        if any(t.dtype not in (torch.float32, torch.float16, torch.int8) or t.device.type != "cpu"
               for t in cache.keys[:1] + cache.values[:1]):
            return None
        scales = getattr(cache, "key_scales", None)
        view = native.extension().StepCache(
            [t.numpy() for t in cache.keys], [t.numpy() for t in cache.values],
            None if scales is None else [t.numpy() for t in scales],
            None if scales is None else [t.numpy() for t in cache.value_scales])
        cache.__dict__["_step_view"] = view
    return view


def usable(model: Any) -> bool:
    """Whether a forward of this model would run natively now (given a cache)."""
    return (model.packing is not None and enabled() and not torch.is_grad_enabled()
            and kernels.current_path() != kernels.TORCH_PATH and kernels.extension_available()
            and plan_for(model) is not None)


def run(model: Any, tokens: torch.Tensor, cache: Any, start: int | torch.Tensor, last_only: bool) -> torch.Tensor | None:
    """Logits [B, T or 1, vocab] for `tokens` [B, T] over `cache` (a KVCache or a SlotBatch) whose
    rows start at `start` (as `cache.positions(T)` answered), advancing the cache; or None when
    the native step cannot serve this call."""
    if not usable(model) or tokens.device.type != "cpu":
        return None
    plan = plan_for(model)
    B, T = tokens.shape
    slot_cache = getattr(cache, "cache", None)  # a SlotBatch's SlotKVCache
    view = _cache_view(slot_cache if slot_cache is not None else cache)
    if view is None:
        return None
    if slot_cache is None:  # KVCache: row b is slot b, all at one offset
        if start + T > cache.max_len:
            raise ConfigError(f"sequence of {start + T} tokens exceeds the KV cache length {cache.max_len}")
        slots = np.repeat(np.arange(B, dtype=np.int32), T)
        pos = np.tile(np.arange(start, start + T, dtype=np.int32), B)
    elif hasattr(cache, "segments"):  # a SlotRows mixed step: several sequences side by side in one row
        slots = np.asarray(cache.row_slots(), dtype=np.int32)
        pos = np.asarray(cache.row_positions(), dtype=np.int32)
    elif isinstance(start, int):  # one sequence of T tokens
        slots = np.full(T, cache.slots[0], dtype=np.int32)
        pos = np.arange(start, start + T, dtype=np.int32)
    else:  # several sequences, one token each
        slots = np.asarray(cache.slots, dtype=np.int32)
        pos = start.reshape(-1).numpy().astype(np.int32)
    picked = getattr(cache, "out_rows", None)
    if last_only:
        rows = np.arange(T - 1, B * T, T, dtype=np.int32)
    elif picked is not None:
        rows = np.asarray(picked, dtype=np.int32)
    else:
        rows = np.arange(B * T, dtype=np.int32)
    out = plan.native.forward(view, tokens.reshape(-1).numpy(), slots, pos, rows, kernels.current_path())
    cache.advance(T)
    x = torch.from_numpy(out).reshape(B, len(rows) // B, out.shape[-1])
    return model.head(x) if plan.float_head else x
