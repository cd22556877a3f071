"""The 4-bit grouped table format of the q4 output head (and tied embedding): not a ternary
weight format (those are FORMATS), but a packed layout the kernels read all the same, so it lives
here, below them. csrc/q4_gemm.h mirrors it.

Each row is blocks of Q4_BLOCK = 64 values in 32 bytes: byte j holds value j of the block in its
low nibble and value j + 32 in its high one, so each nibble half lines up with 32 consecutive
activations. Every Q4_GROUP = 32 values share one fp16 scale d; a code c in [1, 15] stands for
(c − 8) · d (symmetric absmax: d = max|w| / 7 over the group, at least quant.EPS).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..quant import EPS  # the floor of a group's scale (an all-zero group), as activations clamp absmax

Q4_GROUP = 32  # values sharing one fp16 scale
Q4_BLOCK = 64  # values per 32 packed bytes: byte j holds value j (low nibble) and value j + 32 (high)


def quantize_rows_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of 32 along each row, symmetric absmax 4-bit: codes c = round(w / d) + 8 in [1, 15]
    with d = max|w| / 7 per group, stored as fp16 (w ≈ (c − 8) · d). Returns packed bytes
    [rows, dim / 2] (uint8, the Q4_BLOCK layout) and scales [rows, dim / 32] (fp16)."""
    rows, dim = w.shape
    if dim % Q4_BLOCK:
        raise ConfigError(f"a q4 head needs a hidden size that is a multiple of {Q4_BLOCK}, got {dim}")
    groups = w.detach().float().reshape(rows, dim // Q4_GROUP, Q4_GROUP)
    d = (groups.abs().amax(-1) / 7.0).clamp(min=EPS).to(torch.float16)
    codes = ((groups / d.float()[..., None]).round().clamp(-7, 7) + 8).to(torch.uint8)
    blocks = codes.reshape(rows, dim // Q4_BLOCK, 2, Q4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, dim // 2), d


def dequantize_rows_q4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 rows [rows, dim] of a q4 table (its codes minus 8, times the group scale)."""
    rows, half = packed.shape
    blocks = packed.reshape(rows, half // (Q4_BLOCK // 2), 1, Q4_BLOCK // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(rows, -1, Q4_GROUP).float() - 8.0
    return (codes * scales.float()[..., None]).reshape(rows, 2 * half)
