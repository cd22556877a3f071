"""Energy: the papers' 7 nm operation-count model applied to our matmuls, and measured package
energy from RAPL where the kernel exposes it.

The op-count model counts what the papers count: one multiply and one add per weight per token
for an FP16 matmul, one INT8 add per weight per token for a ternary one (a weight of -1/0/+1
turns each product into an add, a subtract or nothing; the dense count is the paper's). Only the
linear (BitLinear) layers are counted — attention scores, norms, the head and the embedding are
the same in both models and left out, as in the papers. Our runtime also rescales each output
once (integer sum x s_x * s_w, in fp32); that term is reported separately so the paper's
accounting and ours can both be read off.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..layers import BitLinear
from ..model import Transformer
from .paper import ENERGY_7NM_PJ

RAPL_GLOB = "/sys/class/powercap/intel-rapl*"


def linear_shapes(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out_features N, in_features K) of every BitLinear of the model, built on the meta
    device (no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    return [(name, m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, BitLinear)]


def matmul_energy_pj(n: int, k: int, tokens: int = 1, table: dict[str, float] = ENERGY_7NM_PJ) -> dict[str, float]:
    """Picojoules of a [tokens, K] x [K, N] matmul under the op-count model.

    fp16: N·K multiplies + N·K adds per token; ternary: N·K int8 adds per token (the paper's
    accounting); rescale: N fp32 multiplies per token (our runtime's dequantisation)."""
    macs = n * k * tokens
    fp16 = macs * (table["fp16_mul"] + table["fp16_add"])
    ternary = macs * table["int8_add"]
    rescale = n * tokens * table["fp32_mul"]
    return {"fp16_pj": fp16, "ternary_pj": ternary, "rescale_pj": rescale, "macs": macs}


def model_energy(config: ModelConfig, tokens: int = 1) -> dict[str, float]:
    """Summed over every linear layer of `config`, for `tokens` tokens."""
    total = {"fp16_pj": 0.0, "ternary_pj": 0.0, "rescale_pj": 0.0, "macs": 0}
    for _, n, k in linear_shapes(config):
        for key, value in matmul_energy_pj(n, k, tokens).items():
            total[key] += value
    total["ratio_paper_accounting"] = total["fp16_pj"] / total["ternary_pj"]
    total["ratio_with_rescale"] = total["fp16_pj"] / (total["ternary_pj"] + total["rescale_pj"])
    return total


@dataclass
class Rapl:
    """Package-level RAPL counters (µJ), or the reason none can be read."""

    zones: list[Path]
    reason: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.zones)


def find_rapl() -> Rapl:
    # Top-level zones (intel-rapl:N) are packages; intel-rapl:N:M are sub-domains inside them.
    tops = [Path(p) for p in sorted(glob.glob(RAPL_GLOB)) if Path(p).name.count(":") == 1]
    if not glob.glob("/sys/class/powercap"):
        return Rapl([], "/sys/class/powercap does not exist on this machine (no RAPL driver, typical in a VM)")
    if not tops:
        return Rapl([], "no intel-rapl package zone under /sys/class/powercap")
    readable = []
    for zone in tops:
        try:
            int((zone / "energy_uj").read_text())
            readable.append(zone)
        except (OSError, ValueError) as e:
            return Rapl([], f"{zone / 'energy_uj'} is not readable ({e.__class__.__name__}; usually root only)")
    return Rapl(readable)


def _read_uj(zone: Path) -> int:
    return int((zone / "energy_uj").read_text())


def _max_uj(zone: Path) -> int:
    try:
        return int((zone / "max_energy_range_uj").read_text())
    except (OSError, ValueError):
        return 2 ** 32


def measure_joules(rapl: Rapl, fn: Callable[[], object]) -> tuple[float, float]:
    """(joules over all packages, seconds) while `fn` runs; counters that wrapped are unwrapped."""
    start = [_read_uj(z) for z in rapl.zones]
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    total = 0
    for zone, before in zip(rapl.zones, start):
        after = _read_uj(zone)
        total += after - before if after >= before else after + _max_uj(zone) - before
    return total / 1e6, seconds


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512_BF16 or AMX): without it torch converts bf16
    to fp32 in software, which makes the bf16 baseline slower than an optimised FP runtime."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        return float("nan")


def run_energy(shapes: list[tuple[str, ModelConfig]], rapl: Rapl, estimate_tokens: int = 512) -> dict:
    """The op-count model per shape (per token and per `estimate_tokens` tokens) and the RAPL status."""
    rows = []
    for name, config in shapes:
        e = model_energy(config)
        rows.append({
            "name": name, "linear_parameters": int(e["macs"]),
            "fp16_uj": e["fp16_pj"] / 1e6, "ternary_uj": e["ternary_pj"] / 1e6,
            "rescale_uj": e["rescale_pj"] / 1e6, "ternary_with_rescale_uj": (e["ternary_pj"] + e["rescale_pj"]) / 1e6,
            "ratio_paper_accounting": e["ratio_paper_accounting"], "ratio_with_rescale": e["ratio_with_rescale"],
            "fp16_mj_estimate": e["fp16_pj"] * estimate_tokens / 1e9,
            "ternary_mj_estimate": (e["ternary_pj"] + e["rescale_pj"]) * estimate_tokens / 1e9,
            "fp16_j_estimate": e["fp16_pj"] * estimate_tokens / 1e12,
            "ternary_j_estimate": (e["ternary_pj"] + e["rescale_pj"]) * estimate_tokens / 1e12,
        })
    return {"table_pj": dict(ENERGY_7NM_PJ), "estimate_tokens": estimate_tokens, "shapes": rows,
            "rapl": {"available": rapl.available, "reason": rapl.reason, "zones": [str(z) for z in rapl.zones]}}
