"""The BitNet decoder: LLaMA-like, pure math (no I/O, no printing).

    x = embed_tokens(tokens)
    per block (norm_placement="subln", the 2B4T topology, FORMATS §2.2):
        h = x + o_proj(attn_sub_norm(Attn(RoPE(q_proj(n1)), RoPE(k_proj(n1)), v_proj(n1)))),  n1 = input_layernorm(x)
        x = h + down_proj(ffn_sub_norm(act(gate_proj(n2)) * up_proj(n2))),                 n2 = post_attention_layernorm(h)
    logits = lm_head(norm(x))            (lm_head = embed_tokens when tied)

With norm_placement="inner" (the FAQ recipe) every BitLinear normalizes its own input and the
block norms and sub-norms are absent; with sub_norm=False (plain LLaMA, as imported from Hugging
Face) only the sub-norms are. qkv_bias adds biases to q/k/v_proj (Qwen2). act is SiLU (SwiGLU,
default) or ReLU² (2B4T). Module names follow Hugging Face's BitNet/LLaMA names so checkpoints map
1:1. RoPE uses HF's rotate_half convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, native_step
from .cache import KVCache, SlotBatch, SlotRows
from .config import ModelConfig, parameter_counts
from .errors import ConfigError
from .layers import BitLinear, MetaSafeEmbedding, MetaSafeLinear, RMSNorm
from .packed_layers import TABLE_HEADS, Int8Embedding, Int8Head, PackConfig, PackedBitLinear, head_table
from .rope import rope_arrays

Cache = KVCache | SlotBatch | SlotRows  # what a forward can read and extend


def rope_tables(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim] in the rotate_half layout (halves repeat)."""
    hd = config.head_dim
    if torch.empty(0, device=device).is_meta:
        # Shapes only. Arithmetic on meta tensors imports torch's decomposition tables (~800
        # modules, ~70 MB resident) — a cost every packed-model load would otherwise pay.
        shape = (config.max_seq_len, hd)
        return torch.empty(shape, device=device), torch.empty(shape, device=device)
    cos, sin = rope_arrays(config)  # numpy, shared with the torch-free runtime: the same floats
    return torch.from_numpy(cos).to(device or "cpu"), torch.from_numpy(sin).to(device or "cpu")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [T, hd], or [B, 1, T, hd] when each row has its own positions.
    rotate_half(x) = cat(-x2, x1)."""
    if cos.dim() == 2 and kernels.native_small_ops(x):  # inference: one native call instead of seven torch ops
        return kernels.rope(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def _linear(config: ModelConfig, packing: PackConfig | None, d_in: int, d_out: int,
            bias: bool = False) -> BitLinear | PackedBitLinear:
    """The training-form BitLinear, or with `packing` the packed layer of the format it names for
    this shape (empty codes: filled by a load or by pack_)."""
    inner = config.norm_placement == "inner"
    if packing is not None:
        return PackedBitLinear(d_in, d_out, format=packing.format_for(d_out, d_in), act_quant=config.act_quant,
                               norm=inner, eps=config.norm_eps, bias=bias)
    return BitLinear(d_in, d_out, mode=config.mode, norm=inner, eps=config.norm_eps,
                     act_quant=config.act_quant, bias=bias)


def _subln(config: ModelConfig, dim: int, sub: bool = False) -> nn.Module:
    """A block norm; `sub` marks the attn/ffn sub-norms, which plain LLaMA (sub_norm=False) lacks."""
    wanted = config.norm_placement == "subln" and (config.sub_norm or not sub)
    return RMSNorm(dim, config.norm_eps) if wanted else nn.Identity()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, packing: PackConfig | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = _linear(config, packing, d, self.n_heads * self.hd, config.qkv_bias)
        self.k_proj = _linear(config, packing, d, self.n_kv * self.hd, config.qkv_bias)
        self.v_proj = _linear(config, packing, d, self.n_kv * self.hd, config.qkv_bias)
        self.attn_sub_norm = _subln(config, self.n_heads * self.hd, sub=True)
        self.o_proj = _linear(config, packing, self.n_heads * self.hd, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Cache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # [B, Hkv, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads)
        else:  # the cache stores k, v and knows which keys each row sees
            out = cache.attend(layer, q, k, v)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.o_proj(self.attn_sub_norm(out))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, packing: PackConfig | None = None):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.relu2 = config.activation == "relu2"
        self.gate_proj = _linear(config, packing, d, f)
        self.up_proj = _linear(config, packing, d, f)
        self.ffn_sub_norm = _subln(config, f, sub=True)
        self.down_proj = _linear(config, packing, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.relu(g).square() if self.relu2 else F.silu(g)
        return self.down_proj(self.ffn_sub_norm(g * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, packing: PackConfig | None = None):
        super().__init__()
        self.input_layernorm = _subln(config, config.hidden_size)
        self.self_attn = Attention(config, packing)
        self.post_attention_layernorm = _subln(config, config.hidden_size)
        self.mlp = FeedForward(config, packing)

    def forward(self, x, cos, sin, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """forward(tokens [B, T], cache=None) -> logits [B, T, vocab] (fp32).

    With `packing` the model is the packed runtime's: PackedBitLinear layers in the formats the
    PackConfig names and, for head "int8" or "q4", a quantized head (shared with the embedding when tied).
    Built on the meta device it is the skeleton a packed directory loads into; `pack.pack_` turns
    a trained model into the same thing in place. `packing` is None for the training form.
    """

    def __init__(self, config: ModelConfig, packing: PackConfig | None = None):
        super().__init__()
        self.config = config.validate()
        if packing is not None and config.mode == "fp":
            raise ConfigError("an fp (full-precision twin) model has no ternary weights to pack")
        self.packing: PackConfig | None = packing.validate() if packing is not None else None
        vocab, hidden = config.vocab_size, config.hidden_size
        self.embed_tokens: nn.Module = MetaSafeEmbedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(config, packing) for _ in range(config.num_layers))
        self.norm = RMSNorm(hidden, config.norm_eps)
        self.lm_head: nn.Module | None = None
        if packing is not None and packing.head in TABLE_HEADS:
            if config.tie_embeddings:  # one table, stored once, serves both ends
                table = head_table(packing.head, vocab, hidden)
                self.embed_tokens = Int8Embedding(table)
                self.lm_head = Int8Head(table, shared=True)
            else:
                self.lm_head = Int8Head(head_table(packing.head, vocab, hidden))
        elif not config.tie_embeddings:
            self.lm_head = MetaSafeLinear(hidden, vocab, bias=False)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def init_buffers(self) -> None:
        """Recompute the RoPE tables on the weights' device (after building on the meta device)."""
        device = self.embed_tokens.weight.device
        cos, sin = rope_tables(self.config, device="cpu")
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, 0.02) weights; the two projections that write into the residual stream are
        scaled by 1/sqrt(2·layers) (GPT-2) so the stream's variance stays bounded with depth."""
        if self.embed_tokens.weight.is_meta:
            return
        for head in (self.embed_tokens, self.lm_head):  # float tables only; int8 ones stay empty
            if head is not None and head.weight.is_floating_point():
                nn.init.normal_(head.weight, std=std)
        for name, p in self.layers.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("weight"):
                scaled = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, std=std / (2 * self.config.num_layers) ** 0.5 if scaled else std)

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab]; with last_only, [B, 1, vocab] for the last position (a prefill
        that only needs the next token skips the head on every other position). `cache`: a
        KVCache (rows advance together), a SlotKVCache's bound batch (rows at their own positions),
        or its bound rows (several sequences' tokens in one row; logits for its out_rows)."""
        B, T = tokens.shape
        start = cache.positions(T) if cache is not None else 0
        if isinstance(start, int):
            if start + T > self.config.max_seq_len:
                raise ValueError(f"positions up to {start + T} exceed max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:  # [B, T] positions, one row per sequence
            if int(start.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(start.max())} exceeds max_seq_len {self.config.max_seq_len}")
            cos, sin = self.rope_cos[start].unsqueeze(1), self.rope_sin[start].unsqueeze(1)
        # a packed model's whole step in native code, where it can run; the step reads the embedding
        # table itself, so an embedding that adds to it (a LoRA update) runs here in Python
        if cache is not None and isinstance(self.embed_tokens, (nn.Embedding, Int8Embedding)):
            logits = native_step.run(self, tokens, cache, start, last_only)
            if logits is not None:
                return logits
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        elif getattr(cache, "out_rows", None) is not None:  # a mixed step: only the rows it asked for
            if not cache.out_rows:
                return x.new_zeros(B, 0, self.config.vocab_size)
            x = x[:, cache.out_rows]
        return self.head(self.norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-normed hidden rows."""
        if self.lm_head is None:  # tied: the embedding reads out
            return F.linear(x, self.embed_tokens.weight).float()
        return self.lm_head(x).float()

    def stats(self) -> dict[str, float]:
        """Parameter counts and weight storage bits, for tables and `bitnet158 info` (training-form
        and packed models alike: counts come from the config's shapes, not the stored tensors)."""
        return parameter_counts(self.config)
