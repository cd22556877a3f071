"""LoRA beside ternary layers: a frozen base held as int8 codes + scale, and low-rank adapters.

    y = base(x) + dropout(x) · Aᵀ · Bᵀ · (alpha / r)          A [r, in], B [out, r], B = 0 at start

The base (FrozenTernaryLinear) computes exactly the packed runtime's integers, q_x·codesᵀ · s_x·s_w,
from int8 codes it holds (1 byte a weight, never fp32 latent weights). Its gradient reaches the
input straight through the activation quantizer (as BitLinear's STE does in training) and never
the codes. For inference `LoRALinear` wraps any base layer as it is (a PackedBitLinear keeps its
kernel; the adapter's float product is added to its output).

`add_lora(model, LoRAConfig(...))` swaps the target projections in place and freezes every other
parameter, so only `lora_A` / `lora_B` train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, quant
from .errors import ConfigError
from .layers import BitLinear, swap_modules
from .packed_layers import Int8Head, PackedBitLinear

# The seven projections of a LLaMA / BitNet block, by their (Hugging Face) module names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BACKWARD_ROWS = 4096  # output rows per chunk of the input gradient: bounds the float copy of the codes


@dataclass(frozen=True)
class LoRAConfig:
    """r: rank; alpha: the scale numerator (the product is multiplied by alpha / r); dropout on
    the adapter's input while training; targets: which projections get an adapter."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    def validate(self) -> "LoRAConfig":
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise ConfigError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(PROJECTIONS)}")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _int_product(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact q @ codesᵀ for int8 q [M, K] and int8 codes [N, K], as float32 integers."""
    if q.is_cpu:
        return kernels.int8_matmul(q, codes).to(torch.float32)
    # elsewhere a float product is exact: |Σ| ≤ 127·K < 2^24 for every K a model here has
    return q.float() @ codes.float().T


class _FrozenQuantMatmul(torch.autograd.Function):
    """y = (q_x @ codesᵀ) · s_x · s_w with q_x, s_x the int8 activation quantizer of x.

    Backward: the gradient to x passes straight through the quantizer (the STE), so
    dx = (dy · s_w) @ codes; the codes and their scale get none. Only the int8 codes are kept for
    backward, and their float copy is made a chunk of rows at a time."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, act_quant: str) -> torch.Tensor:
        q, s = quant.ACT_QUANTIZERS[act_quant](x2)
        ctx.save_for_backward(codes, w_scale)
        # the same expression as PackedBitLinear's, so the two agree bit for bit
        return _int_product(q, codes) * (s.reshape(-1, 1) * w_scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, w_scale = ctx.saved_tensors
        g = grad.float() * w_scale  # w_scale: [1] or one scale per output row
        dx = torch.zeros(g.shape[0], codes.shape[1], dtype=torch.float32, device=g.device)
        for n0 in range(0, codes.shape[0], _BACKWARD_ROWS):
            dx.addmm_(g[:, n0:n0 + _BACKWARD_ROWS], codes[n0:n0 + _BACKWARD_ROWS].float())
        return dx, None, None, None


def frozen_quant_matmul(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor,
                        act_quant: str = "token") -> torch.Tensor:
    """x [..., K] → [..., N]: int8 activations times frozen int8 codes, both scales after."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = _FrozenQuantMatmul.apply(x.reshape(-1, k), codes, w_scale, act_quant)
    return y.reshape(*lead, codes.shape[0]).to(x.dtype)


class FrozenTernaryLinear(nn.Module):
    """A BitLinear's forward over frozen int8 codes [out, in] and an fp32 scale: the base that LoRA
    trains beside. Buffers only (codes, weight_scale, bias); an inner RMSNorm stays but is frozen."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, *, act_quant: str = "token",
                 bias: torch.Tensor | None = None, norm: nn.Module | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.act_quant = act_quant
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", scale.detach().float().reshape(1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.norm = norm
        if norm is not None:
            norm.requires_grad_(False)

    @classmethod
    def from_layer(cls, layer: nn.Module) -> "FrozenTernaryLinear":
        """From a training-form BitLinear (its quantized weight) or a PackedBitLinear (its codes)."""
        if isinstance(layer, BitLinear):
            if layer.mode == "fp":
                raise ConfigError("an fp (full-precision twin) model has no ternary base for LoRA; "
                                  "use --method full")
            codes, scale = layer.quantized_weight()
        elif isinstance(layer, PackedBitLinear):
            codes, scale = layer.codes(), layer.weight_scale
        else:
            raise ConfigError(f"LoRA needs a ternary layer as its base, got {type(layer).__name__}")
        return cls(codes, scale, act_quant=layer.act_quant, bias=layer.bias, norm=layer.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        y = frozen_quant_matmul(x, self.codes, self.weight_scale, self.act_quant)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class FrozenInt8Head(nn.Module):
    """A packed model's int8 output head with a gradient to its input (the table stays frozen):
    the same integers as Int8Head, through the straight-through quantizer."""

    def __init__(self, head: Int8Head):
        super().__init__()
        self.head = head  # a tied head does not register its table, so nothing is stored twice

    @property
    def weight(self) -> torch.Tensor:
        return self.head.table.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.head.table
        return frozen_quant_matmul(x, table.qweight, table.row_scale)


class LoRALinear(nn.Module):
    """`base(x) + dropout(x) · Aᵀ · Bᵀ · scaling`; `base` is any layer mapping in → out features."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next((t.device for t in (*base.parameters(), *base.buffers())), None)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's initialisation; B = 0 makes ΔW = 0

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output alone (float, no quantization)."""
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _target_test(targets: tuple[str, ...]):
    def wanted(name: str, m: nn.Module) -> bool:
        return isinstance(m, (BitLinear, PackedBitLinear)) and name.rpartition(".")[2] in targets
    return wanted


def add_lora(model: nn.Module, config: LoRAConfig, *, frozen_base: bool = True) -> list[str]:
    """Put a LoRALinear on every target projection of `model`, in place; returns their names.

    frozen_base=True (training): each base becomes a FrozenTernaryLinear (its latent weights are
    dropped), every other parameter is frozen, and an int8 head gets its gradient path. With
    False (inference) the bases stay as they are, packed kernels included."""
    config = config.validate()
    names = [name for name, m in model.named_modules() if name and _target_test(config.targets)(name, m)]
    if not names:
        raise ConfigError(f"the model has no {', '.join(config.targets)} ternary layers to adapt")

    def make(layer: nn.Module) -> LoRALinear:
        base = FrozenTernaryLinear.from_layer(layer) if frozen_base else layer
        return LoRALinear(base, config.r, config.alpha, config.dropout)

    swap_modules(model, _target_test(config.targets), make)
    for layer in lora_layers(model).values():  # new modules start in training mode; follow the model's
        layer.train(model.training)
    # A native step plan built before the swap watches only buffers, which the swap keeps: drop it,
    # so the next forward re-plans (and finds the LoRA layers it cannot run natively).
    model.__dict__.pop("_step_plan", None)
    if frozen_base:
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
        head = getattr(model, "lm_head", None)
        if isinstance(head, Int8Head):
            model.lm_head = FrozenInt8Head(head)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
