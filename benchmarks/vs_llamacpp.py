"""bitnet158 against llama.cpp on the same weights, in one run: decode and prefill tokens/s at
1 and 2 threads, ours ÷ llama.cpp, and each against the floor a streaming read sets (the read
bandwidth measured here, in this run, ÷ the bytes a token must read).

One random ternary model with the exact BitNet-b1.58-2B-4T shapes, SiLU-gated (the FFN llama.cpp's
`bitnet` graph runs), is built with `pack.random_packed`, exported with our `export_gguf(...,
type="tq2_0")`, its tied head requantized to Q6_K by `llama-quantize` (llama.cpp's usual output
type; the f16 one would read 656 MB a token) and run by llama.cpp's `llama-bench`; the same packed model runs through
`bench.time_model` (native step, i2 codes), once with the int8 head `pack` writes by default and once
with the 4-bit grouped head (`--head q4`, 56 % of int8's bytes). llama-bench is built from the llama-cpp-python
0.3.36 sources (which vendor llama.cpp) with llama-quantize, as scripts/check_llamacpp.sh does, in $LLAMACPP_DIR
(default /tmp/llamacpp); pip fetches the source distribution if it is not there yet, so the first
run needs the package index and a few minutes of compiling.

    python benchmarks/vs_llamacpp.py                  # 1 and 2 threads, 3 runs each
    python benchmarks/vs_llamacpp.py --threads 2 --runs 1

Speculative decoding is not timed here: its speed depends on how often drafts are accepted, which
random weights cannot show (see `bitnet158 generate --speculate ngram` on a trained model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bitnet158 import kernels
from bitnet158.bench import time_model, use_kernel_threads
from bitnet158.config import preset
from bitnet158.interop.gguf_export import export_gguf
from bitnet158.pack import random_packed
from bitnet158.packed_layers import PackConfig, PackedBitLinear

VERSION = "0.3.36"


def llama_tools(work: Path, jobs: int) -> tuple[Path, Path]:
    """llama-bench and llama-quantize built from the llama-cpp-python sources (built here when missing)."""
    bench, quantize = (work / "build-bench" / "bin" / name for name in ("llama-bench", "llama-quantize"))
    if bench.exists() and quantize.exists():
        return bench, quantize
    src = work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    work.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        print(f"fetching llama-cpp-python {VERSION} sources into {work}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(work)], check=True, capture_output=True)
        subprocess.run(["tar", "-xzf", str(work / f"llama_cpp_python-{VERSION}.tar.gz"), "-C", str(work)], check=True)
    print(f"building llama-bench in {work / 'build-bench'} (a few minutes)", flush=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(work / "build-bench"), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DGGML_OPENMP=OFF"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(work / "build-bench"), "-j", str(jobs), "--target", "llama-bench",
                    "llama-quantize"], check=True, capture_output=True)
    return bench, quantize


def q6k_head(quantize: Path, gguf: Path) -> Path:
    """The same GGUF with llama.cpp's usual head: token_embd (the tied output) in Q6_K instead of
    f16, the ternary tensors kept TQ2_0 (llama-quantize --token-embedding-type q6_k)."""
    out = gguf.with_name(gguf.stem + "-q6k.gguf")
    subprocess.run([str(quantize), "--allow-requantize", "--token-embedding-type", "q6_k", "--output-tensor-type",
                    "q6_k", str(gguf), str(out), "TQ2_0"], check=True, capture_output=True)
    return out


def run_llama_bench(exe: Path, gguf: Path, threads: int, prompt: int, tokens: int) -> dict[str, float]:
    """llama.cpp's prefill and decode tokens/s (its own mean over its repetitions)."""
    out = subprocess.run([str(exe), "-m", str(gguf), "-p", str(prompt), "-n", str(tokens), "-t", str(threads),
                          "-r", "2", "-o", "json"], check=True, capture_output=True, text=True)
    rates = {}
    for test in json.loads(out.stdout):
        key = "prefill" if test["n_prompt"] > 0 and test["n_gen"] == 0 else "decode"
        rates[key] = float(test["avg_ts"])
    return rates


def ours(model, threads: int, prompt: int, tokens: int) -> dict[str, float]:
    use_kernel_threads(threads)
    t = time_model(model, prompt, tokens, repeats=1)
    return {"prefill": prompt / t["prefill_s"], "decode": 1 / t["decode_s"]}


def token_bytes(model) -> int:
    """Bytes one decode step must read: every packed linear and the head's table with its scales
    (the KV cache of a short context and the norms are noise beside them)."""
    linear = sum(m.packed.numel() for m in model.modules() if isinstance(m, PackedBitLinear))
    head = sum(b.numel() * b.element_size() for b in model.lm_head.table.buffers())
    return linear + head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of both, for ranges")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--llamacpp-dir", default=os.environ.get("LLAMACPP_DIR", "/tmp/llamacpp"))
    ap.add_argument("--jobs", type=int, default=2, help="compile jobs for llama-bench")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--preset", default="2b4t", help="model shapes (other presets: a quick check of the script)")
    ap.add_argument("--no-llamacpp", action="store_true", help="time only ours against the floor (no llama.cpp build)")
    ap.add_argument("--heads", default="int8,q4",
                    help="our output heads to time, comma-separated (int8: the default of `pack`; q4: 4.5 bits)")
    args = ap.parse_args()

    exe, quantize = (None, None) if args.no_llamacpp else llama_tools(Path(args.llamacpp_dir), args.jobs)
    cfg = dataclasses.replace(preset(args.preset), activation="swiglu")
    heads = args.heads.split(",")
    t0 = time.perf_counter()
    # the same seed gives every head the same ternary codes; each head's table is random (values change no
    # speed here), and llama.cpp's Q6_K head is requantized from the first listed head's table
    models = {head: random_packed(cfg, PackConfig(format="i2", head=head), progress=True).eval() for head in heads}
    per_token = {head: token_bytes(model) for head, model in models.items()}
    print(f"random {args.preset}-shaped SwiGLU model, i2 codes, heads {', '.join(heads)}, built in "
          f"{time.perf_counter() - t0:.0f}s; GB read per token: "
          + ", ".join(f"{head} {b / 1e9:.3f}" for head, b in per_token.items()) + f"; kernel path {kernels.current_path()}")
    threads = [int(t) for t in args.threads.split(",")]
    results: dict = {"kernel": kernels.current_path(), "bytes_per_token": per_token, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model-tq2_0.gguf"
        report = export_gguf(models[heads[0]], gguf, type="tq2_0")
        print(f"exported {gguf.name}: {report.bytes / 1e9:.3f} GB (TQ2_0 weights, f16 embedding)")
        if quantize is not None:
            gguf = q6k_head(quantize, gguf)
            print(f"llama.cpp runs {gguf.name}: {gguf.stat().st_size / 1e9:.3f} GB (its tied head requantized to "
                  f"Q6_K, as llama.cpp's own quantizations keep it)")
        for t in threads:
            bandwidth = kernels.memory_read_bandwidth(threads=t)
            samples: dict[str, list[float]] = {}
            for _ in range(args.runs):  # alternate, so drift hits all alike
                for head, model in models.items():
                    with torch.no_grad():
                        for key, value in ours(model, t, args.prompt, args.tokens).items():
                            samples.setdefault(f"ours_{head}_{key}", []).append(value)
                if exe is not None:
                    for key, value in run_llama_bench(exe, gguf, t, args.prompt, args.tokens).items():
                        samples.setdefault("llama_" + key, []).append(value)
            floors = {head: bandwidth / b for head, b in per_token.items()}
            row = {"threads": t, "bandwidth": bandwidth, "floor_tok_s": floors, **samples}
            results["rows"].append(row)
            print(f"\n{t} thread(s): read bandwidth {bandwidth / 1e9:.1f} GB/s → decode floor "
                  + ", ".join(f"{floor:.1f} tok/s ({head} head)" for head, floor in floors.items()))
            for what in ("decode", "prefill"):
                b = samples.get("llama_" + what)
                if b:
                    print(f"  {what:<8} llama.cpp TQ2_0 (Q6_K head) {min(b):6.1f}–{max(b):6.1f} tok/s")
                for head in heads:
                    a = samples[f"ours_{head}_{what}"]
                    line = f"  {what:<8} ours, {head + ' head':<9} {min(a):6.1f}–{max(a):6.1f} tok/s"
                    if b:
                        ratios = [x / y for x, y in zip(a, b)]
                        line += (f"   ours ÷ llama.cpp {min(ratios):.2f}–{max(ratios):.2f}× "
                                 f"(median {statistics.median(ratios):.2f})")
                    if what == "decode":
                        line += f"   ours ÷ floor {min(a) / floors[head]:.0%}–{max(a) / floors[head]:.0%}"
                    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
