"""LoRA beside ternary layers: a frozen base held as int8 codes + scale, and low-rank adapters.

    y = base(x) + dropout(x) · Aᵀ · Bᵀ · (alpha / r)          A [r, in], B [out, r], B = 0 at start

The base (FrozenTernaryLinear) computes exactly the packed runtime's integers, q_x·codesᵀ · s_x·s_w,
from int8 codes it holds (1 byte a weight, never fp32 latent weights). Its gradient reaches the
input straight through the activation quantizer (as BitLinear's STE does in training) and never
the codes. For inference `LoRALinear` wraps any base layer as it is (a PackedBitLinear keeps its
kernel; the adapter's float product is added to its output).

The embedding table and the output head take a low-rank update too (targets `embed_tokens`,
`lm_head`, PEFT's names), in PEFT's layout:

    embedding   e = base(t) + Aᵀ[t] · Bᵀ · (alpha / r)     A [r, vocab], B [hidden, r], A = 0 at start
    head        y = base(x) + dropout(x) · Aᵀ · Bᵀ · (alpha / r)   A [r, hidden], B [vocab, r]

On a tied model (one table for both ends) the two share one update ΔE = (B·A)ᵀ·alpha/r of that
table: the head's A and B are the embedding's B and A transposed, as PEFT ties them
(`ensure_weight_tying`). A full fine-tune trains that table; without it LoRA cannot follow a
small model, whose table is a quarter of its weights.

`add_lora(model, LoRAConfig(...))` swaps the targets in place and freezes every other parameter,
so only the adapters' factors train.
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
from .packed_layers import Int8Head, PackedBitLinear, Q4Table

# The seven projections of a LLaMA / BitNet block, by their (Hugging Face) module names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TABLES = ("embed_tokens", "lm_head")  # the embedding and the output head (one table when tied)
TARGETS = PROJECTIONS + TABLES
FACTOR_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")  # what trains
_CHUNK_ROWS = 4096  # output rows a chunk: bounds the float copy of the codes and a head's int32 products


@dataclass(frozen=True)
class LoRAConfig:
    """r: rank; alpha: the scale numerator (the product is multiplied by alpha / r; None: 2·r, a
    scale of 2 at any rank); dropout on the adapter's input while training; targets: which modules
    get an adapter (the projections and, by default, the embedding and head)."""

    r: int = 32
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.alpha is None and isinstance(self.r, int) and not isinstance(self.r, bool):
            object.__setattr__(self, "alpha", 2.0 * self.r)

    def validate(self) -> "LoRAConfig":
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("LoRA needs at least one target module")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ConfigError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
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
    backward. Both directions go a chunk of output rows at a time: at a 128k-row head a whole
    int32 product, its scale matrix or a float copy of the codes would each be as large as the
    logits."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, act_quant: str) -> torch.Tensor:
        q, s = quant.ACT_QUANTIZERS[act_quant](x2)
        ctx.save_for_backward(codes, w_scale)
        out = torch.empty(q.shape[0], codes.shape[0], dtype=torch.float32, device=q.device)
        s = s.reshape(-1, 1)
        for n0 in range(0, codes.shape[0], _CHUNK_ROWS):
            n1 = n0 + _CHUNK_ROWS
            # per element the same expression as PackedBitLinear's, so the two agree bit for bit
            torch.mul(_int_product(q, codes[n0:n1]), s * _rows(w_scale, n0, n1), out=out[:, n0:n1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, w_scale = ctx.saved_tensors
        dx = torch.zeros(grad.shape[0], codes.shape[1], dtype=torch.float32, device=grad.device)
        for n0 in range(0, codes.shape[0], _CHUNK_ROWS):
            n1 = n0 + _CHUNK_ROWS
            dx.addmm_(grad[:, n0:n1].float() * _rows(w_scale, n0, n1), codes[n0:n1].float())
        return dx, None, None, None


def _rows(w_scale: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """A weight scale for output rows n0:n1: one for the whole layer, or one per row (a head)."""
    return w_scale if w_scale.numel() == 1 else w_scale[n0:n1]


def frozen_quant_matmul(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor,
                        act_quant: str = "token") -> torch.Tensor:
    """x [..., K] → [..., N]: int8 activations times frozen int8 codes, both scales after."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = _FrozenQuantMatmul.apply(x.reshape(-1, k), codes, w_scale, act_quant).to(x.dtype)
    # a 2-D input gets the Function's own output, not a view of it: LoRAHead adds to it in place
    return y if x.dim() == 2 else y.reshape(*lead, codes.shape[0])


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


class LoRAEmbedding(nn.Module):
    """`base(tokens) + Aᵀ[tokens] · Bᵀ · scaling`: PEFT's LoRA on an embedding (lora_embedding_A
    [r, vocab], lora_embedding_B [hidden, r]); `base` is any embedding (a float table or a packed
    model's quantized one). A starts at zero, so the update starts at zero."""

    def __init__(self, base: nn.Module, num_embeddings: int, embedding_dim: int, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, r, device=device))
        # PEFT draws B from N(0, 1); scaled by 1/sqrt(hidden) here so that, as the head's A when
        # tied, it projects the unit-RMS final hidden state to O(1) (nn.Linear's scale), not O(√hidden)
        nn.init.normal_(self.lora_embedding_B, std=embedding_dim ** -0.5)

    @property
    def weight(self) -> torch.Tensor:
        """The base table (what code asking for the embedding's shape, dtype or device reads)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """ΔE [vocab, hidden] = (B·A)ᵀ · scaling."""
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        base = self.base(tokens)
        rows = F.embedding(tokens, self.lora_embedding_A.T)  # [..., r]
        return base + (rows @ self.lora_embedding_B.T * self.scaling).to(base.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, r={self.r}, alpha={self.alpha}"


class TiedHead(nn.Module):
    """A tied model's output head as a module: logits = x · Eᵀ over the embedding's table (the
    embedding is not registered again, so nothing is stored twice)."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._embedding.weight)  # what Transformer.head computes for a tied model


class LoRAHead(nn.Module):
    """`base(x) + dropout(x) · Aᵀ · Bᵀ · scaling` over an output head: PEFT's LoRA on `lm_head`
    (A [r, hidden], B [vocab, r]). Tied to a LoRAEmbedding it holds no factors of its own: A and
    B are the embedding's B and A transposed, one update of the one table."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, tied: LoRAEmbedding | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if tied is not None:
            object.__setattr__(self, "_tied", tied)  # not registered: the factors train and save once
        else:
            device = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
            self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRALinear (PEFT's Linear)

    @property
    def tied(self) -> LoRAEmbedding | None:
        return self.__dict__.get("_tied")

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, hidden], B [vocab, r]) as PEFT's lm_head holds them."""
        tied = self.tied
        if tied is not None:
            return tied.lora_embedding_B.T, tied.lora_embedding_A.T
        return self.lora_A, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = self.base(x2)  # [tokens, vocab]; no base here keeps its output for backward
        a, b = self.factors()
        low = F.linear(self.dropout(x2).to(a.dtype), a) * self.scaling  # [tokens, r]: scaled while narrow
        # added in place: at a 128k vocabulary the logits are a step's largest activation, and a
        # separate product (or a sum beside them) would be one more of them
        out.addmm_(low.to(out.dtype), b.T.to(out.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        tied = self.tied is not None
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}, tied={tied}"


AdapterModule = LoRALinear | LoRAEmbedding | LoRAHead


def _target_test(targets: tuple[str, ...]):
    def wanted(name: str, m: nn.Module) -> bool:
        return isinstance(m, (BitLinear, PackedBitLinear)) and name.rpartition(".")[2] in targets
    return wanted


def add_lora(model: nn.Module, config: LoRAConfig, *, frozen_base: bool = True,
             tie: bool = True) -> list[str]:
    """Put an adapter on every target of `model`, in place; returns their names.

    frozen_base=True (training): each projection's base becomes a FrozenTernaryLinear (its latent
    weights are dropped), every other parameter is frozen, and an int8 head gets its gradient
    path. With False (inference) the bases stay as they are, packed kernels included. `tie`: on a
    tied model with both embed_tokens and lm_head targeted, the two share one update (False: each
    has its own, as an adapter PEFT trained without `ensure_weight_tying` may)."""
    config = config.validate()
    projections = tuple(t for t in config.targets if t in PROJECTIONS)
    names = [name for name, m in model.named_modules() if name and _target_test(projections)(name, m)]
    if projections and not names:
        raise ConfigError(f"the model has no {', '.join(projections)} ternary layers to adapt")

    def make(layer: nn.Module) -> LoRALinear:
        base = FrozenTernaryLinear.from_layer(layer) if frozen_base else layer
        return LoRALinear(base, config.r, config.alpha, config.dropout)

    swap_modules(model, _target_test(projections), make)
    names += _add_table_lora(model, config, frozen_base, tie)
    for layer in lora_modules(model).values():  # new modules start in training mode; follow the model's
        layer.train(model.training)
    # A native step plan built before the swap watches only buffers, which the swap keeps: drop it,
    # so the next forward re-plans (and finds the LoRA layers it cannot run natively).
    model.__dict__.pop("_step_plan", None)
    if frozen_base:
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.rpartition(".")[2] in FACTOR_NAMES)
    return names


def _add_table_lora(model: nn.Module, config: LoRAConfig, frozen_base: bool, tie: bool) -> list[str]:
    """The embedding's and the head's adapters (those the config targets); a packed int8 head that
    trains gets its gradient path either way."""
    want_embed, want_head = "embed_tokens" in config.targets, "lm_head" in config.targets
    head = getattr(model, "lm_head", None)
    if frozen_base and isinstance(head, Int8Head):
        if isinstance(head.table, Q4Table):
            raise ConfigError("LoRA training over a q4 head is not supported; pack with --head int8")
        head = FrozenInt8Head(head)
        model.lm_head = head
    if not (want_embed or want_head):
        return []
    embed, cfg = getattr(model, "embed_tokens", None), getattr(model, "config", None)
    if embed is None or cfg is None:
        raise ConfigError("the model has no embed_tokens table to adapt")
    if isinstance(embed, LoRAEmbedding) or isinstance(head, LoRAHead):
        raise ConfigError("the model already has a LoRA adapter on its embedding or head")
    vocab, hidden = cfg.vocab_size, cfg.hidden_size  # not the table's shape: a q4 table packs two a byte
    tied = head is None or cfg.tie_embeddings
    names, embed_lora = [], None
    if want_embed:
        embed_lora = LoRAEmbedding(embed, vocab, hidden, config.r, config.alpha)
        model.embed_tokens = embed_lora
        names.append("embed_tokens")
    if want_head:
        base = head if head is not None else TiedHead(embed)
        model.lm_head = LoRAHead(base, hidden, vocab, config.r, config.alpha, config.dropout,
                                 tied=embed_lora if tied and tie else None)
        names.append("lm_head")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear (a projection's adapter) in `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_modules(model: nn.Module) -> dict[str, AdapterModule]:
    """Every adapter in `model` (projections, embedding, head), by qualified name."""
    kinds = (LoRALinear, LoRAEmbedding, LoRAHead)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def factors(module: AdapterModule) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's (A, B) in PEFT's shapes for its kind (a tied head's are views of its embedding's)."""
    if isinstance(module, LoRAEmbedding):
        return module.lora_embedding_A, module.lora_embedding_B
    if isinstance(module, LoRAHead):
        return module.factors()
    return module.lora_A, module.lora_B


@torch.no_grad()
def set_factors(module: AdapterModule, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copy (A, B) in; a tied head's are its embedding's, so they go there (transposed)."""
    if isinstance(module, LoRAHead) and module.tied is not None:
        module.tied.lora_embedding_A.copy_(b.T)
        module.tied.lora_embedding_B.copy_(a.T)
        return
    mine_a, mine_b = factors(module)
    mine_a.copy_(a)
    mine_b.copy_(b)
