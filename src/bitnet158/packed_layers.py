"""Inference layers over packed weights: PackedBitLinear (ternary or binary codes, 2 or 1.6 bits a
weight, one fp32 scale) and the int8 per-row table that serves as output head and tied embedding;
with PackConfig (`pack_config`), the typed description of how a model is packed.

These sit at the layer level, beside BitLinear: the Transformer builds them directly when it is
constructed with a PackConfig (`Transformer(config, packing=...)`, e.g. on the meta device to
load a packed directory), and `pack.pack_` converts a trained model's layers into them.

A PackedBitLinear computes exactly what the training-form BitLinear computes, but in integers:

    q, s_x = absmax_int8(norm(x))                 (the same quantizer as training)
    y      = (q @ codesᵀ) · (s_x · s_w)            (int32 product, both scales applied after)

so the two differ only by float summation order.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import kernels, quant
from .errors import ConfigError
from .formats import get_format
from .formats.q4_table import Q4_BLOCK, Q4_GROUP, dequantize_rows_q4, quantize_rows_q4  # noqa: F401 (re-exported)
from .layers import BitLinear, RMSNorm
from .pack_config import AUTO, HEADS, TABLE_HEADS, PackConfig, shape_key  # noqa: F401 (re-exported)

class PackedBitLinear(nn.Module):
    """Inference-only BitLinear over packed ternary (or binary) codes.

    Buffers: ``packed`` (uint8, the format's bytes), ``weight_scale`` (fp32 [1]), ``bias`` if any;
    an RMSNorm ``norm`` when the layer had one inside (FAQ placement).
    """

    def __init__(self, in_features: int, out_features: int, *, format: str = "i2", act_quant: str = "token",
                 norm: bool = False, eps: float = 1e-5, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = get_format(format).name
        self.act_quant = act_quant
        nbytes = get_format(format).packed_nbytes(out_features, in_features)
        self.register_buffer("packed", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.norm = RMSNorm(in_features, eps).to(device) if norm else None
        self._codes: torch.Tensor | None = None  # unpacked weights, only for the torch fallback path

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer: BitLinear, format: str = "i2") -> "PackedBitLinear":
        if layer.mode == "fp":
            raise ConfigError("an fp (full-precision twin) layer cannot be packed to ternary")
        packed = cls(layer.in_features, layer.out_features, format=format, act_quant=layer.act_quant,
                     norm=layer.norm is not None, eps=layer.norm.eps if layer.norm is not None else 1e-5,
                     bias=layer.bias is not None)
        codes, scale = layer.quantized_weight()
        packed.packed = torch.from_numpy(get_format(format).pack(codes.cpu()))
        packed.weight_scale = scale.reshape(1).float().cpu()
        if layer.bias is not None:
            packed.bias = layer.bias.detach().float().cpu().clone()
        if layer.norm is not None:
            packed.norm.load_state_dict(layer.norm.state_dict())
        return packed

    def codes(self) -> torch.Tensor:
        """The int8 ternary codes [out, in] (decoded from the packed bytes)."""
        return kernels.unpack_codes(self.packed, self.format, self.out_features, self.in_features)

    def _native_args(self) -> tuple[np.ndarray, float]:
        """(packed bytes as numpy, weight scale as a float) for the native call, cached until a
        buffer is replaced (load, pack, .to()). Read through ``_buffers``: nn.Module's attribute
        lookup costs ~2 µs a buffer, and a decode step makes ~200 of these calls."""
        bufs = self._buffers
        packed, scale = bufs["packed"], bufs["weight_scale"]
        cached = self.__dict__.get("_native_cache")
        if cached is None or cached[0] is not packed or cached[1] is not scale:
            cached = (packed, scale, packed.numpy(), float(scale))
            self.__dict__["_native_cache"] = cached
        return cached[2], cached[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        if self.norm is not None:
            x = self.norm(x)
        path = kernels.current_path()
        if path != kernels.TORCH_PATH and x.dtype == torch.float32 and not x.requires_grad and x.is_cpu:
            # One native call (quantize, integer product, scales) with numpy around it: at decode
            # sizes each torch op on the way (even a reshape, ~1.5 µs) costs as much as a small
            # layer's product.
            packed, scale = self._native_args()
            xn = x.numpy()
            y = kernels.bitlinear(xn.reshape(-1, k), packed, self.format, self.out_features, k, scale,
                                  self.act_quant == "token", path)
            y = torch.from_numpy(y.reshape(xn.shape[:-1] + (self.out_features,)))
            bias = self._buffers["bias"]
            return y if bias is None else y + bias
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        q, s = quant.ACT_QUANTIZERS[self.act_quant](x2)
        if path == kernels.TORCH_PATH and self._codes is None:
            self._codes = self.codes().float()
        acc = kernels.ternary_matmul(q, self.packed, self.format, self.out_features, k, path=path,
                                     codes=self._codes)
        y = acc.to(torch.float32) * (s.reshape(-1, 1) * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, format={self.format}, norm={self.norm is not None}, "
                f"bias={self.bias is not None}")


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: codes in [-127, 127] and fp32 row scales with w ≈ codes · scale."""
    wf = w.detach().float()
    absmax = wf.abs().amax(dim=1).clamp(min=quant.EPS)
    codes = (wf * (127.0 / absmax)[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes, absmax / 127.0


class Int8Table(nn.Module):
    """An int8 per-row table (``qweight`` [rows, dim], ``row_scale`` [rows]) serving as the output
    head (logits = int8 x · int8 table, both scales after) and, when tied, as the embedding."""

    def __init__(self, rows: int, dim: int, device=None):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(rows, dim, dtype=torch.int8, device=device))
        self.register_buffer("row_scale", torch.ones(rows, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> "Int8Table":
        table = cls(*w.shape)
        table.qweight, table.row_scale = quantize_rows_int8(w.cpu())
        return table

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.qweight[tokens].to(torch.float32) * self.row_scale[tokens].unsqueeze(-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        q, s = quant.absmax_int8_per_token(x.reshape(-1, k))
        acc = kernels.int8_matmul(q, self.qweight)
        return (acc.to(torch.float32) * s * self.row_scale).reshape(*lead, -1)


class Q4Table(nn.Module):
    """A 4-bit grouped table (``qweight`` uint8 [rows, dim / 2], ``group_scale`` fp16 [rows, dim / 32])
    serving as the output head and, when tied, the embedding: 4.5 bits a value. Logits are the
    int8 activations times the codes, each group's integer sum scaled by its fp16 scale."""

    def __init__(self, rows: int, dim: int, device=None):
        super().__init__()
        if dim % Q4_BLOCK:
            raise ConfigError(f"a q4 head needs a hidden size that is a multiple of {Q4_BLOCK}, got {dim}")
        self.rows, self.dim = rows, dim
        self.register_buffer("qweight", torch.zeros(rows, dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("group_scale", torch.ones(rows, dim // Q4_GROUP, dtype=torch.float16, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor) -> "Q4Table":
        table = cls(*w.shape)
        table.qweight, table.group_scale = quantize_rows_q4(w.cpu())
        return table

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return dequantize_rows_q4(self.qweight, self.group_scale)
        return dequantize_rows_q4(self.qweight[rows.reshape(-1)], self.group_scale[rows.reshape(-1)])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dequantize(tokens).reshape(*tokens.shape, self.dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        q, s = quant.absmax_int8_per_token(x.reshape(-1, k))
        y = kernels.q4_matmul(q, self.qweight, self.group_scale)
        return (y * s).reshape(*lead, -1)


def head_table(head: str, rows: int, dim: int) -> nn.Module:
    """An empty table for a quantized head kind (TABLE_HEADS)."""
    return Q4Table(rows, dim) if head == "q4" else Int8Table(rows, dim)


def head_table_from_weight(head: str, w: torch.Tensor) -> nn.Module:
    return Q4Table.from_weight(w) if head == "q4" else Int8Table.from_weight(w)


class Int8Embedding(nn.Module):
    """Embedding lookups from a quantized table, an Int8Table or a Q4Table (owned here when the
    head is tied to it)."""

    def __init__(self, table: Int8Table):
        super().__init__()
        self.table = table

    @property
    def weight(self) -> torch.Tensor:  # what code asking for the embedding's shape sees
        return self.table.qweight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.embed(tokens)


class Int8Head(nn.Module):
    """The output head over a quantized table (Int8Table or Q4Table); `shared` tables (tied embeddings) are not re-registered,
    so each tensor is stored once."""

    def __init__(self, table: Int8Table, shared: bool = False):
        super().__init__()
        if shared:
            object.__setattr__(self, "_table", table)
        else:
            self._table_owned = table

    @property
    def table(self) -> Int8Table:
        shared = self.__dict__.get("_table")
        return shared if shared is not None else self._table_owned

    @property
    def weight(self) -> torch.Tensor:
        return self.table.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.logits(x)


def float_head_dtype(head: str) -> torch.dtype:
    return torch.float16 if head == "fp16" else torch.float32
