"""Typed configs that travel with the weights: ModelConfig, TrainConfig, ConvertConfig, and the named
presets.

`ModelConfig.from_dict` ignores keys it does not know, so a config.json written by a later
version (or with extra bookkeeping) still loads; every value is checked by `validate()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, short_repr
from .jsonio import as_number

MODES = ("b158", "b1", "fp")
ACTIVATIONS = ("swiglu", "relu2")
NORM_PLACEMENTS = ("subln", "inner")
ACT_QUANT = ("token", "tensor")
SCHEDULES = ("auto", "two-stage", "cosine", "constant")

# Upper bounds on a model's shape, each far above any real model (the largest open ones have ~126
# layers, hidden 16384, FFN 53248, 128 heads, 262144-token vocabularies and 1M-token contexts).
# They make a hostile or mistyped config fail in validate(), before the skeleton is built (every
# layer is several modules even on the meta device: 20,000 layers took 20 s, 10^6 reached 24 GB)
# and before any tensor is sized from it.
MAX_SHAPE = {
    "vocab_size": 2**22,           # 16x the largest real vocabulary (262144)
    "hidden_size": 65536,          # 4x the largest real hidden size (16384)
    "num_layers": 1024,            # 8x the deepest real decoder (126); the skeleton still builds in ~1 s
    "num_heads": 1024,             # 8x the most heads (128)
    "num_kv_heads": 1024,          # never more than num_heads
    "intermediate_size": 262144,   # ~5x the widest real FFN (53248)
    "max_seq_len": 2**20,          # the longest real contexts (~1M tokens)
}
# The RoPE tables are max_seq_len x head_dim floats (cos and sin, built in float64 first): a 1M
# context at head_dim 256 is 2^28 entries; beyond that the tables alone would take many GB.
MAX_ROPE_ENTRIES = 2**28
ROPE_THETA_MAX = 1e12  # real bases go up to ~3.6e9 (long-context LLaMA 3 variants); above is a typo


def _from_dict(cls, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in data.items() if k in names})
    cfg.validate()
    return cfg


class _Serializable:
    """to_dict / from_dict for the config dataclasses (from_dict ignores unknown keys, validates)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)


def _check_positive_ints(cfg: Any, what: str, names: tuple[str, ...],
                         limits: dict[str, int] | None = None) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{what}: {name} must be a positive integer, got {short_repr(value)}")
        if limits and name in limits and value > limits[name]:
            raise ConfigError(f"{what}: {name} {short_repr(value)} is over the limit {limits[name]:,} "
                              f"(far above any real model)")


def _check_real(what: str, name: str, value: Any, lo: float, hi: float, hi_open: bool) -> None:
    """A finite number in (lo, hi] or (lo, hi): JSON's 1e400 arrives as inf, "x" as a string."""
    number = as_number(value)
    if not (math.isfinite(number) and lo < number and (number < hi if hi_open else number <= hi)):
        raise ConfigError(f"{what}: {name} must be a finite number in ({lo:g}, {hi:g}{')' if hi_open else ']'}, "
                          f"got {short_repr(value)}")


# How a KV cache stores keys and values. fp16 halves its memory and the bytes attention reads a
# step at long contexts; attention still computes in fp32, over the rounded values.
# fp32; fp16 (rounded to nearest even); q8: int8 codes with one fp32 scale per position of a KV
# head (hd values), quantized like the activations (quant.absmax_int8_per_token)
KV_DTYPES = ("fp32", "fp16", "q8")


def check_kv_dtype(name: Any) -> str:
    """A KV cache dtype name (KV_DTYPES), or a one-line ConfigError."""
    if name not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {short_repr(name)}; expected one of {', '.join(KV_DTYPES)}")
    return name


# Effective storage bits of one linear weight, per mode: log2(3) for ternary, 1 for binary, and
# 16 for the FP twin as it would be deployed (bf16).
WEIGHT_BITS = {"b158": math.log2(3), "b1": 1.0, "fp": 16.0}


def parameter_counts(config: "ModelConfig") -> dict[str, float]:
    """What `Transformer.stats()` counts, from the config's shapes alone (no torch, no weights):
    parameters, linear_parameters (the BitLinear weights), embedding_parameters, linear_weight_bits,
    linear_weight_megabytes."""
    c = config
    d, f, heads, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    ins = [d, d, d, heads, d, d, f]  # q, k, v, o, gate, up, down: their input widths
    outs = [heads, kv, kv, d, f, f, d]
    linear = c.num_layers * sum(i * o for i, o in zip(ins, outs))
    embed = c.vocab_size * d * (1 if c.tie_embeddings else 2)
    if c.norm_placement == "inner":  # every BitLinear normalizes its own input
        block_norms = sum(ins)
    else:  # the block norms, and the sub-norms unless plain LLaMA
        block_norms = 2 * d + ((heads + f) if c.sub_norm else 0)
    biases = heads + 2 * kv if c.qkv_bias else 0
    bits = WEIGHT_BITS[c.mode]
    return {"parameters": linear + embed + c.num_layers * (block_norms + biases) + d,  # + the final norm
            "linear_parameters": linear, "embedding_parameters": embed, "linear_weight_bits": bits,
            "linear_weight_megabytes": linear * bits / 8 / 1e6}


def kv_cache_bytes(config: "ModelConfig", sequences: int, positions: int, kv_dtype: str) -> int:
    """Bytes of a KV cache holding `positions` keys and values for each of `sequences`."""
    kind = check_kv_dtype(kv_dtype)
    per_row = config.head_dim * {"fp32": 4, "fp16": 2, "q8": 1}[kind] + (4 if kind == "q8" else 0)  # + a row's scale
    return 2 * config.num_layers * config.num_kv_heads * per_row * sequences * positions


ROPE_SCALINGS = ("none", "llama3")


@dataclass(frozen=True)
class ModelConfig(_Serializable):
    """Shapes and numerics of a LLaMA-like BitNet decoder.

    mode: "b158" ternary weights {-1,0,+1} (absmean), "b1" binary {-1,+1}, "fp" the full-precision
    twin. norm_placement: "subln" puts explicit norms in the block (input, post-attention, and the
    attn/ffn sub-norms of BitNet b1.58 2B4T); "inner" puts an RMSNorm inside every BitLinear and
    drops the block norms (the b1.58 FAQ recipe).
    sub_norm: with "subln", whether the attn/ffn sub-norms exist. False is plain LLaMA (a Hugging
    Face FP model as imported); converting to b1.58 inserts them (train/ternarize.py).
    qkv_bias: biases on q/k/v_proj (Qwen2); BitNet itself has none.

    Frozen: it travels with the weights, so a change is a new config (`dataclasses.replace`).
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    mode: str = "b158"
    norm_placement: str = "subln"
    act_quant: str = "token"
    tie_embeddings: bool = True
    sub_norm: bool = True
    qkv_bias: bool = False
    # RoPE frequency scaling: "none", or "llama3" (Llama 3.1/3.2: long wavelengths divided by
    # rope_factor, short ones kept, a smooth blend between; rope.rope_arrays)
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> "ModelConfig":
        _check_positive_ints(self, "model config", ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                                    "num_kv_heads", "intermediate_size", "max_seq_len"), MAX_SHAPE)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model config: hidden_size {self.hidden_size} is not divisible by "
                              f"num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config: num_heads {self.num_heads} is not divisible by "
                              f"num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.max_seq_len * self.head_dim > MAX_ROPE_ENTRIES:
            raise ConfigError(f"model config: max_seq_len {self.max_seq_len:,} × head_dim {self.head_dim} is over "
                              f"{MAX_ROPE_ENTRIES:,} RoPE table entries; lower max_seq_len")
        _check_real("model config", "rope_theta", self.rope_theta, 0.0, ROPE_THETA_MAX, hi_open=False)
        _check_real("model config", "norm_eps", self.norm_eps, 0.0, 1.0, hi_open=True)
        for name, allowed in (("mode", MODES), ("activation", ACTIVATIONS),
                              ("norm_placement", NORM_PLACEMENTS), ("act_quant", ACT_QUANT)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model config: {name} must be one of {', '.join(allowed)}; "
                                  f"got {short_repr(getattr(self, name))}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"model config: rope_scaling must be one of {', '.join(ROPE_SCALINGS)}; "
                              f"got {short_repr(self.rope_scaling)}")
        if self.rope_scaling == "llama3":
            _check_real("model config", "rope_factor", self.rope_factor, 0.0, 1e4, hi_open=False)
            _check_real("model config", "rope_low_freq_factor", self.rope_low_freq_factor, 0.0, 1e4, hi_open=False)
            _check_real("model config", "rope_high_freq_factor", self.rope_high_freq_factor,
                        as_number(self.rope_low_freq_factor), 1e4, hi_open=False)
            _check_positive_ints(self, "model config", ("rope_original_context",), {"rope_original_context": 1 << 24})
        for name in ("tie_embeddings", "sub_norm", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model config: {name} must be true or false, "
                                  f"got {short_repr(getattr(self, name))}")
        return self

    def twin(self, mode: str) -> "ModelConfig":
        """The same architecture with another weight mode (the FP twin is `cfg.twin("fp")`)."""
        return dataclasses.replace(self, mode=mode).validate()


@dataclass
class TrainConfig(_Serializable):
    """How to train; its defaults are `bitnet158 train`'s. `lr=None` picks the mode's default peak
    (high for b1.58/b1, as the paper prescribes); `schedule="auto"` picks the paper's two-stage
    schedule for b1.58/b1 and warm-up + cosine for FP; "constant" (warm-up, then `lr`) is what
    fine-tuning during an FP → ternary conversion uses."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float | None = None
    lr_stage2: float | None = None
    warmup: int = 30
    weight_decay: float = 0.1
    schedule: str = "auto"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> "TrainConfig":
        _check_positive_ints(self, "train config", ("steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                                                    "eval_batches", "save_every", "keep_checkpoints"))
        if self.warmup < 0 or self.warmup >= self.steps:
            raise ConfigError(f"train config: warmup {self.warmup} must be in [0, steps={self.steps})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train config: schedule must be auto, two-stage, cosine or constant; "
                              f"got {self.schedule!r}")
        for name in ("lr", "lr_stage2"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"train config: {name} must be positive, got {value!r}")
        return self


@dataclass(frozen=True)
class ConvertConfig(_Serializable):
    """How to turn an FP model ternary (train/ternarize.py); its defaults are `bitnet158 convert`'s.

    method: comma-separated (or a sequence) of rtn, adaround, lambda, noise (or quant-noise), qat,
    distill. The fine-tuning methods run `steps` of `batch_size` × `seq_len` tokens at the constant
    `lr` (AdamW, no weight decay, gradient clip 1); `warmup` is λ's warm-up (None: steps // 2);
    Quant-Noise's share rises from `noise_start_p` to 1 at `noise_ramp` of the run; distillation
    mixes (1 − alpha)·CE + alpha·KL at temperature `T`. AdaRound learns from `calib_batches`
    windows for `adaround_iters` iterations per layer. `max_bytes` caps the default corpus;
    `heldout_windows` is how many held-out windows the reported perplexities use.
    """

    method: str | tuple[str, ...] = "adaround,lambda,distill"
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 128
    max_bytes: int | None = 2_000_000
    seed: int = 0
    warmup: int | None = None
    noise_start_p: float = 0.1
    noise_ramp: float = 0.75
    T: float = 1.0
    alpha: float = 1.0
    calib_batches: int = 2
    adaround_iters: int = 200
    heldout_windows: int = 32

    def validate(self) -> "ConvertConfig":
        _check_positive_ints(self, "convert config", ("steps", "batch_size", "seq_len", "calib_batches",
                                                      "adaround_iters", "heldout_windows"))
        if not self.lr > 0:
            raise ConfigError(f"convert config: lr must be positive, got {self.lr!r}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ConfigError(f"convert config: max_bytes must be positive, got {self.max_bytes!r}")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"convert config: warmup must be ≥ 0, got {self.warmup!r}")
        if not 0.0 <= self.noise_start_p <= 1.0:
            raise ConfigError(f"convert config: noise_start_p must be in [0, 1]; got {self.noise_start_p}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"convert config: alpha must be in [0, 1]; got {self.alpha}")
        if not self.T > 0:
            raise ConfigError(f"convert config: T must be > 0; got {self.T}")
        return self


# Peak learning rates by mode. The paper trains b1.58 at a higher peak than its FP LLaMA twin
# (1.5e-3 vs 2.5e-4 at 700M) because small latent updates rarely flip a ternary weight; at our
# tiny sizes both go higher, keeping the same ordering. Stage 2 peaks at 2/3 of stage 1 (1.5→1.0).
DEFAULT_LR = {"b158": 4e-3, "b1": 4e-3, "fp": 2e-3}
STAGE2_RATIO = 2.0 / 3.0


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    note: str
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=688, max_seq_len=512),
        "demo size (~2.6M params + embeddings): trains in minutes on 2 CPU cores",
    ),
    "small": Preset(
        ModelConfig(vocab_size=16384, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                    intermediate_size=1376, max_seq_len=1024),
        "~32M params: a real CPU training run (hours)",
    ),
    "700m": Preset(
        ModelConfig(vocab_size=32000, hidden_size=1536, num_layers=24, num_heads=24, num_kv_heads=24,
                    intermediate_size=4096, max_seq_len=2048, tie_embeddings=False),
        "the b1.58 paper's 700M shape (FAQ Table 1)",
    ),
    "1.3b": Preset(
        ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=32, num_kv_heads=32,
                    intermediate_size=5460, max_seq_len=2048, tie_embeddings=False),
        "the b1.58 paper's 1.3B shape",
    ),
    "3b": Preset(
        ModelConfig(vocab_size=32000, hidden_size=3200, num_layers=26, num_heads=32, num_kv_heads=32,
                    intermediate_size=8640, max_seq_len=2048, tie_embeddings=False),
        "the b1.58 paper's 3B shape",
    ),
    "2b4t": Preset(
        ModelConfig(vocab_size=128256, hidden_size=2560, num_layers=30, num_heads=20, num_kv_heads=5,
                    intermediate_size=6912, max_seq_len=4096, rope_theta=500000.0, norm_eps=1e-5,
                    activation="relu2", tie_embeddings=True),
        "exact BitNet b1.58 2B4T shapes (relu² gated FFN, GQA 20/5, tied 128256 vocab)",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named ModelConfig, with field overrides: `preset("tiny", mode="fp")`."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(PRESETS[name].model, **overrides).validate()
