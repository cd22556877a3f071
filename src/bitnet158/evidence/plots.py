"""PNG plots of a results dict (matplotlib, Agg backend: no display needed). Each writer takes
the results and a path, and is written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from ..fileio import atomic_write_bytes
from .paper import TABLE1, TABLE1_PARAMS
from .quality import LABELS

COLORS = {"b158": "tab:blue", "b1": "tab:orange", "fp": "tab:green"}
STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib  # heavy (~0.5 s): only a report that draws pays for it

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    _pyplot().close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step losses of a small batch are too noisy to compare."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves(results: dict, path: Path) -> None:
    plt = _pyplot()
    quality = results["quality"]
    fig, ax = plt.subplots(figsize=(8, 5))
    steps = quality["train"]["steps"]
    window = max(1, steps // 40)
    for i, size in enumerate(quality["sizes"]):
        for mode, m in size["models"].items():
            label = f"{size['name']} {LABELS[mode]}"
            ax.plot(range(1, len(m["train_loss"]) + 1), _smooth(m["train_loss"], window),
                    color=COLORS[mode], linestyle=STYLES[i % len(STYLES)], linewidth=1.2, label=f"{label} train")
            ax.plot([e["step"] for e in m["evals"]], [e["loss"] for e in m["evals"]], marker="o", markersize=3,
                    color=COLORS[mode], linestyle="none")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats); dots: held-out")
    ax.set_title(f"Training loss (moving average over {window} steps), same tokens and seed")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    _save(fig, path)


def ppl_ratio(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = results["quality"]["sizes"]
    for mode in ("b158", "b1"):
        pts = [(s["linear_parameters"], s[f"ppl_ratio_{mode}_fp"]) for s in sizes if f"ppl_ratio_{mode}_fp" in s]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=COLORS[mode], label=f"ours: {LABELS[mode]} / FP")
    paper = [(TABLE1_PARAMS[k], v["bitnet_ppl"] / v["llama_ppl"]) for k, v in TABLE1.items()]
    ax.plot(*zip(*paper), marker="s", color="gray", linestyle="--", label="paper: b1.58 / LLaMA (100B tokens)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (ours: linear layers; paper: model size)")
    ax.set_ylabel("held-out perplexity ratio")
    ax.set_title("Quality gap to the full-precision twin vs size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def cost(results: dict, path: Path) -> None:
    plt = _pyplot()
    shapes = results["cost"]["shapes"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    names = [s["name"] for s in shapes]
    x = range(len(shapes))
    panels = (("memory_ratio", "memory_ratio", "FP16 size / packed size"),
              ("latency_ratio", "latency_ratio", "decode latency: bf16 / packed"),
              ("prefill_ratio", None, "prefill throughput: packed / bf16"))
    for ax, (key, paper_key, title) in zip(axes, panels):
        ours = [s[key] for s in shapes]
        bars = ax.bar([i - 0.2 for i in x], ours, width=0.4, color="tab:blue", label="ours (this run)")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        if paper_key is not None:
            paper = [TABLE1.get(s["preset"], {}).get(paper_key, 0.0) for s in shapes]
            bars = ax.bar([i + 0.2 for i in x], paper, width=0.4, color="gray", label="paper (GPU, Table 1)")
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("ratio (higher is better for ternary)")
    fig.suptitle(f"Random packed ternary (i2, int8 head) vs torch bf16, {results['cost']['threads']} threads, "
                 f"kernel {results['cost']['kernel_path']}", fontsize=10)
    _save(fig, path)


def energy(results: dict, path: Path) -> None:
    plt = _pyplot()
    shapes = results["energy"]["shapes"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = range(len(shapes))
    ax.bar([i - 0.27 for i in x], [s["fp16_uj"] for s in shapes], width=0.27, color="tab:green", label="FP16 mul+add")
    ax.bar([i for i in x], [s["ternary_uj"] for s in shapes], width=0.27, color="tab:blue", label="ternary int8 add")
    ax.bar([i + 0.27 for i in x], [s["ternary_with_rescale_uj"] for s in shapes], width=0.27, color="tab:purple",
           label="ternary + fp32 rescale")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [s["name"] for s in shapes], fontsize=8)
    ax.set_ylabel("µJ per token (linear layers, 7 nm op model)")
    ax.set_title("Matmul arithmetic energy per token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


PLOTS = {"loss_curves.png": loss_curves, "ppl_ratio.png": ppl_ratio, "cost.png": cost, "energy.png": energy}


def make_plots(results: dict, out: Path) -> list[str]:
    written = []
    for name, writer in PLOTS.items():
        writer(results, out / name)
        written.append(name)
    return written
