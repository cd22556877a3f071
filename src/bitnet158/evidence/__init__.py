"""`bitnet158 evidence`: the papers' claims measured on our own models, beside a full-precision
twin, in one run — quality (b1.58 / b1 / FP twins trained on the same tokens), cost at the
paper's shapes (random packed ternary vs torch bf16), energy (the 7 nm op-count model and RAPL
where readable) — written as report.md, results.json and PNG plots.

    from bitnet158.evidence import run_evidence
    results = run_evidence("quick", out="runs/evidence")
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

from .. import kernels
from ..errors import ConfigError
from ..fileio import atomic_write_bytes, atomic_write_json
from . import paper
from .cost import run_cost, shape_config
from .energy import cpu_model, find_rapl, native_bf16, ram_gib, run_energy
from .plots import make_plots
from .quality import run_quality
from .report import build_claims, build_report, format_summary
from .settings import ENERGY_SHAPES, EvidenceSettings, get_settings

OUTPUTS = ("report.md", "results.json")


def machine_info(threads: int) -> dict:
    ext = kernels.extension_available()
    return {"cpu": cpu_model(), "cores": os.cpu_count() or 1, "ram_gib": ram_gib(), "threads": threads,
            "kernel_path": kernels.current_path(), "extension": ext,
            "extension_error": None if ext else getattr(kernels, "_ext_error", "unavailable"),
            "native_bf16": native_bf16(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _settings_dict(s: EvidenceSettings) -> dict:
    return {"name": s.name, "note": s.note, "vocab_size": s.vocab_size, "max_bytes": s.max_bytes,
            "modes": list(s.modes), "sizes": [vars(x) for x in s.sizes], "train": s.train.to_dict(),
            "shapes": [vars(x) for x in s.shapes], "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.decode_tokens, "repeats": s.repeats, "energy_tokens": s.energy_tokens}


def _check_finite(obj, where: str = "results") -> None:
    """JSON has no NaN: a non-finite figure means a measurement failed, which must not pass silently."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def run_evidence(mode: str = "quick", data: Sequence[str] | None = None, out: str | Path = "runs/evidence",
                 threads: int | None = None, force: bool = False, progress: bool = True, log=print,
                 resume: bool = False) -> dict:
    """Run every measurement of `mode` ("quick" or "full"), write report.md, results.json and the
    plots into `out`, print the claims table, and return the results dict. The training runs are
    checkpointed under `out/quality/`; `resume=True` continues a stopped run from there."""
    settings = get_settings(mode)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not (force or resume):
        raise ConfigError(f"{out} already holds {', '.join(existing)}; pass --force to replace it or choose --out")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    out.mkdir(parents=True, exist_ok=True)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rapl = find_rapl()
    log(f"evidence ({settings.name}): {settings.note}")
    log("energy: RAPL " + ("readable: " + ", ".join(str(z) for z in rapl.zones) if rapl.available
                           else f"not available ({rapl.reason})"))

    results: dict = {"mode": settings.name, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                     "settings": _settings_dict(settings), "machine": machine_info(threads)}
    paper_dict = paper.as_dict()
    paper_dict["b158_ppl_ratio"] = {k: v["bitnet_ppl"] / v["llama_ppl"] for k, v in paper.TABLE1.items()}
    results["paper"] = paper_dict

    log("\n[1/3] quality: training b1.58, b1 and FP twins")
    results["quality"] = run_quality(settings, data, progress=progress, log=log, run_root=out / "quality",
                                     resume=resume, force=force)
    torch.set_num_threads(threads)
    log("\n[2/3] cost at the paper's shapes")
    results["cost"] = run_cost(settings, rapl, threads, progress=progress, log=log)
    log("\n[3/3] energy: 7 nm op-count model at the paper shapes")
    # The op count needs no weights (meta device), so every mode counts every paper shape in full.
    results["energy"] = run_energy([(s.name, shape_config(s)) for s in ENERGY_SHAPES], rapl)
    results["claims"] = build_claims(results)
    results["seconds"] = time.perf_counter() - t0
    results["minutes"] = results["seconds"] / 60
    results["plots"] = list(make_plots(results, out))
    _check_finite(results)

    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", build_report(results).encode("utf-8"))
    log("")
    log(format_summary(results))
    log(f"\nwrote {out / 'report.md'}, {out / 'results.json'} and {len(results['plots'])} plots "
        f"in {results['minutes']:.1f} min")
    return results


__all__ = ["run_evidence", "get_settings", "EvidenceSettings"]
