"""Cost at the paper's shapes, no training: a random packed ternary model against the same
architecture in torch bf16, measured one model at a time in this process (build, measure, free)
so the peak is one model, never two: packed size vs FP16 size, decode latency, prefill
throughput, and package energy per decoded token where RAPL is readable.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import kernels
from ..bench import time_model, use_kernel_threads
from ..cache import KVCache
from ..config import ModelConfig, preset
from ..model import Transformer
from ..pack import random_packed
from ..packed_layers import PackConfig, PackedBitLinear
from .energy import Rapl, measure_joules, model_energy
from .settings import CostShape, EvidenceSettings

GB = 1e9


def shape_config(shape: CostShape) -> ModelConfig:
    cfg = preset(shape.preset)
    overrides = {}
    if shape.layers is not None:
        overrides["num_layers"] = shape.layers
    if shape.vocab_size is not None:
        overrides["vocab_size"] = shape.vocab_size
    return dataclasses.replace(cfg, **overrides).validate() if overrides else cfg


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every stored tensor (parameters and persistent buffers), a shared one once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def bf16_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """The FP twin in bf16 with random weights, allocated directly in bf16 (never fp32: at the 3B
    shape an fp32 copy alone would take 13 GB)."""
    with torch.device("meta"):
        model = Transformer(config.twin("fp"))
    model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.bfloat16) * 0.02)
    model.init_buffers()  # RoPE tables come back fp32; the model computes in its weights' dtype
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def decode_energy(model: torch.nn.Module, rapl: Rapl, tokens: int) -> dict[str, float]:
    """Package joules per decoded token over `tokens` decode steps (after a 1-token prefill)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, batch_size=1, max_len=tokens + 1, dtype=dtype)
    token = model(torch.zeros(1, 1, dtype=torch.long), cache)[:, -1].argmax(-1, keepdim=True)

    def run() -> None:
        nonlocal token
        for _ in range(tokens):
            token = model(token, cache)[:, -1].argmax(-1, keepdim=True)

    joules, seconds = measure_joules(rapl, run)
    return {"j_per_token": joules / tokens, "watts": joules / seconds}


def _measure(build: Callable[[], torch.nn.Module], threads: int, packed: bool, settings: EvidenceSettings,
             rapl: Rapl) -> dict:
    t0 = time.perf_counter()
    model = build()
    built_s = time.perf_counter() - t0
    if packed:
        use_kernel_threads(threads)  # kernel pool gets the cores, torch's own ops one thread
    else:
        torch.set_num_threads(threads)
    row = {"bytes": tensor_bytes(model), "build_s": built_s}
    if packed:
        linear = sum(m.packed.numel() + m.weight_scale.numel() * 4 for m in model.modules()
                     if isinstance(m, PackedBitLinear))
    else:
        linear = sum(m.weight.numel() * m.weight.element_size() for m in model.layers.modules()
                     if isinstance(m, torch.nn.Linear) or hasattr(m, "quantized_weight"))
    row["linear_bytes"] = linear
    t = time_model(model, settings.prompt_tokens, settings.decode_tokens, settings.repeats)
    row["decode_ms"] = t["decode_s"] * 1e3
    row["prefill_tok_s"] = settings.prompt_tokens / t["prefill_s"]
    if rapl.available:
        row.update(decode_energy(model, rapl, settings.energy_tokens))
    del model
    gc.collect()
    return row


def run_cost(settings: EvidenceSettings, rapl: Rapl, threads: int, progress: bool = True, log=print) -> dict:
    """One row per shape: packed (i2, int8 head) vs bf16, with the ratios (bf16 / packed)."""
    torch_threads = torch.get_num_threads()
    rows = []
    bar = tqdm(settings.shapes, desc="cost at paper shapes", disable=not progress, unit="shape",
               dynamic_ncols=True)
    try:
        for shape in bar:
            cfg = shape_config(shape)
            full = preset(shape.preset)
            bar.set_postfix_str(f"{shape.name}: packed", refresh=True)
            packed = _measure(lambda: random_packed(cfg, PackConfig(format="i2", head="int8"), progress=progress),
                              threads, True, settings, rapl)
            bar.set_postfix_str(f"{shape.name}: bf16", refresh=True)
            bf16 = _measure(lambda: bf16_model(cfg), threads, False, settings, rapl)
            energy = model_energy(cfg)
            row = {
                "name": shape.name, "preset": shape.preset, "layers": cfg.num_layers, "full_layers": full.num_layers,
                "vocab_size": cfg.vocab_size, "vocab_cut": shape.vocab_size is not None, "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size, "tied_embeddings": cfg.tie_embeddings,
                "linear_parameters": int(energy["macs"]),
                "packed_gb": packed["bytes"] / GB, "fp16_gb": bf16["bytes"] / GB,
                "memory_ratio": bf16["bytes"] / packed["bytes"],
                "linear_packed_gb": packed["linear_bytes"] / GB, "linear_fp16_gb": bf16["linear_bytes"] / GB,
                "linear_memory_ratio": bf16["linear_bytes"] / packed["linear_bytes"],
                "linear_bits_per_weight": 8 * packed["linear_bytes"] / energy["macs"],
                "non_linear_packed_gb": (packed["bytes"] - packed["linear_bytes"]) / GB,
                "decode_ms_packed": packed["decode_ms"], "decode_ms_bf16": bf16["decode_ms"],
                "latency_ratio": bf16["decode_ms"] / packed["decode_ms"],
                "prefill_tok_s_packed": packed["prefill_tok_s"], "prefill_tok_s_bf16": bf16["prefill_tok_s"],
                "prefill_ratio": packed["prefill_tok_s"] / bf16["prefill_tok_s"],
                "build_s": packed["build_s"] + bf16["build_s"],
            }
            if rapl.available:
                row.update(energy_j_per_token_packed=packed["j_per_token"], energy_j_per_token_bf16=bf16["j_per_token"],
                           energy_reduction_pct=100 * (1 - packed["j_per_token"] / bf16["j_per_token"]))
            rows.append(row)
            log(f"  {shape.name}: packed {row['packed_gb']:.3f} GB vs fp16 {row['fp16_gb']:.3f} GB; decode "
                f"{row['decode_ms_packed']:.1f} ms vs {row['decode_ms_bf16']:.1f} ms per token")
    finally:
        bar.close()
        torch.set_num_threads(torch_threads)
    return {"threads": threads, "kernel_path": kernels.current_path(), "format": "i2", "head": "int8",
            "prompt_tokens": settings.prompt_tokens, "decode_tokens": settings.decode_tokens,
            "repeats": settings.repeats, "shapes": rows}
