"""What the GGUF exporter and importer share: the bitnet archs, our module names ⇄ GGUF tensor
stems, and bitnet.cpp's I2_S layout both ways."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .gguf_header import F16, I2_S, TQ1_0, TQ2_0

GGUF_TYPES = ("tq2_0", "tq1_0", "i2_s", "f16")
ARCH = "bitnet"
SWIGLU_ARCHS = ("bitnet", "bitnet-b1.58")  # upstream, and bitnet.cpp's 1bitLLM-style arch
RELU2_ARCHS = ("bitnet-25",)               # bitnet.cpp's 2B4T arch (relu² FFN); import only
QK_K = 256
I2S_BLOCK = 128
MAX_CONTEXT = 1 << 18  # a forged context_length must not size the RoPE tables
# llama_ftype values (llama.h): MOSTLY_F16, MOSTLY_TQ1_0, MOSTLY_TQ2_0, and the fork's MOSTLY_I2_S
FILE_TYPE = {"f16": 1, "tq1_0": 36, "tq2_0": 37, "i2_s": 40}
GGML_TYPE = {"f16": F16, "tq1_0": TQ1_0, "tq2_0": TQ2_0, "i2_s": I2_S}
PAD_KEY = "bitnet158.feed_forward_length"  # the unpadded FFN width, when export padded it

# our module path (per block) → GGUF tensor stem
LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
          "post_attention_layernorm": "ffn_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}


def pack_i2s(codes: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp I2_S, the x86 ACT_PARALLEL layout its Python converter writes (FORMATS §4.3):
    the flattened tensor in 128-value blocks of 32 bytes, byte k holding values k, k+32, k+64, k+96
    in bits 7-6, 5-4, 3-2, 1-0, code = value + 1; then 32 bytes whose first 4 are the fp32 scale."""
    u = (codes.reshape(-1, 4, 32).astype(np.uint8) + 1)          # [block, group, k]
    packed = (u[:, 0] << 6) | (u[:, 1] << 4) | (u[:, 2] << 2) | u[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def unpack_i2s(data: np.ndarray, n: int, name: str) -> tuple[np.ndarray, float]:
    body = data[:n // 4].reshape(-1, 32)
    u = np.stack([(body >> 6) & 3, (body >> 4) & 3, (body >> 2) & 3, body & 3], axis=1)  # [block, group, k]
    if (u == 3).any():
        raise FormatError(f"tensor {name}: I2_S holds the invalid 2-bit code 3")
    scale = float(data[n // 4:n // 4 + 4].copy().view(np.float32)[0])
    return (u.astype(np.int8) - 1).reshape(-1), scale
