"""µs per layer call of our packed-ternary kernels against torch F.linear (fp32 and bf16), one run.

What is measured
----------------
For every weight shape W [N, K] of BitNet-b1.58-2B-4T (2560×2560 q/o, 640×2560 k/v, 6912×2560
gate/up, 2560×6912 down), every batch size M (1 = a decode step, 128 = a prefill chunk) and every
thread count:

- **our variants**: every packed format registered in ``bitnet158.formats.FORMATS`` × every kernel
  path of ``kernels.available_paths()`` except ``torch`` (and ``scalar`` unless ``--paths`` names
  it). One call is the native call a packed layer makes: ``kernels.ternary_matmul_numpy`` with
  int8 activations [M, K] in and int32 [M, N] out (a fresh output array each call; the layer also
  holds numpy arrays, so torch's tensor ↔ numpy conversions, ~5–10 µs, are not in it).
  **Activation quantization (absmax → int8) and the scale multiply are not included.**
- **torch**: ``F.linear(x, W)`` with x and W both fp32, then both bf16 (output in the same dtype).

Every call reads a weight matrix that is not in cache, as in a real decode step where ~200 distinct
matrices pass by: each variant holds enough copies of its weights (packed bytes, or the torch
tensors) that their total exceeds ``--llc-multiple`` × the last-level cache (read from sysfs), and
calls cycle through them. Variants are interleaved within each round (and their order rotated from
round to round) so that machine noise hits all of them alike; a round times a block of calls of one
variant (enough calls to last ~``--round-ms``), after a quarter as many untimed calls (the first
milliseconds after a switch run slow for every variant), and the table shows the median µs per call
over rounds.
Before timing, every variant's output is checked against an exact fp32 reference.

The same run measures the machine's memory read bandwidth two ways, for each thread count:

- **interleaved** (the yardstick): two ``memory read`` variants that stream through cold buffers of
  the same size as the i2 weights (one ``read_sum`` per buffer, on the same thread pool, through the
  same Python call), reading each thread's share as 1 stream and as 4 interleaved streams (one
  stream leaves bandwidth unused: the hardware prefetcher restarts at every page; torch's fp32 GEMV,
  which reads several rows at once, beat a 1-stream probe by 10 %). They take their turn in every
  M = 1 round beside the kernels. This machine's bandwidth drifts by ±20 % from second to second
  with other tenants' load, so each round's kernel rate is divided by the better probe's rate in the
  *same* round, and the median of those paired ratios is reported (best round over best probe round
  beside it);
- **one large buffer** (``kernels.memory_read_bandwidth``, 1 and 4 streams, best of several probes at
  the start, after each shape and at the end): the machine's peak, printed for reference with the
  best round of each variant against it.

And it times each variant on one weight copy that stays in cache (M = 1, largest shape): the rate
the kernel computes at when memory is not the limit. Where that is near the DRAM rate, the kernel is
compute-bound and no prefetching can bring it closer to the bandwidth.

For M = 1 it prints the weight bytes read per second as a fraction of each, for our packed bytes and
(as a sanity check of the probe) for torch's dense weights. Goals (issue, acceptance points 3 and 4):
M = 1 ≥ 6× faster than torch bf16; M = 128 faster than torch bf16; weight bytes/s on the largest
shape ≥ 85 % of the read bandwidth (the paired median).

How to run
----------
    python benchmarks/kernels.py                       # all shapes, M = 1 and 128, 1 and 2 threads
    python benchmarks/kernels.py --quick               # fewer rounds and copies (a smoke run)
    python benchmarks/kernels.py --shapes 6912x2560 --m 1 --threads 1,2 --json out.json
    python benchmarks/kernels.py --paths avx2,scalar   # add the scalar oracle (slow)

Every figure printed comes from this run; ``--json`` writes them all for a report.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bitnet158 import kernels
from bitnet158.formats import FORMATS, get_format

# BitNet-b1.58-2B-4T: hidden 2560, 5 KV heads × 128 = 640, FFN 6912. W is [N = out, K = in].
DEFAULT_SHAPES = "2560x2560,640x2560,6912x2560,2560x6912"
DEFAULT_M = "1,128"
DEFAULT_THREADS = "1,2"
DEFAULT_ROUNDS = 21
QUICK_ROUNDS = 5
DEFAULT_LLC_MULTIPLE = 4.0
QUICK_LLC_MULTIPLE = 2.0
FALLBACK_LLC = 32 << 20
GOAL_M1_SPEEDUP = 6.0
GOAL_M128_SPEEDUP = 1.0
GOAL_BW_FRACTION = 0.85
PROBES = {"memory read ×1": 1, "memory read ×4": 4}  # interleaved probe variant → streams per thread


# ---- machine ------------------------------------------------------------------------------------
def _parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


def last_level_cache() -> tuple[int, str]:
    """Bytes of the highest-level data/unified cache of cpu0, and where the figure came from."""
    best_level, best_size = -1, 0
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "level")) as f:
                level = int(f.read())
            with open(os.path.join(d, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if level > best_level or (level == best_level and size > best_size):
            best_level, best_size = level, size
    if best_size <= 0:
        return FALLBACK_LLC, "fallback (sysfs unreadable)"
    return best_size, f"L{best_level} from sysfs"


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_THREADS = [1]


def busy_wait(seconds: float) -> None:
    """Wait without idling the core: one that sleeps comes back slow for milliseconds (the first
    ~5 ms of a block ran 20-40 % slow after time.sleep on this VM), which would tax whichever
    variant runs next."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def set_threads(n: int) -> None:
    _THREADS[0] = n
    torch.set_num_threads(n)
    kernels.set_num_threads(n)


# ---- variants -----------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str               # "i2/avx2", "torch fp32", "memory read"
    kind: str               # "ours" | "torch" | "probe"
    bytes_per_copy: int     # weight bytes one call reads
    copies: list = field(default_factory=list)
    call: Callable[[int, int], object] | None = None  # (copy index, M) -> output
    next_copy: int = 0

    def run(self, m: int, calls: int, warmup: int = 0) -> float:
        """Seconds per call over `calls` calls, each on the next copy of the weights, after
        `warmup` untimed calls (also on fresh copies)."""
        n = len(self.copies)
        i = self.next_copy
        call = self.call
        # As the packed runtime does (bench.use_kernel_threads): our kernels run on their own pool
        # with torch's OpenMP team at one thread, so its spinning workers do not steal the cores;
        # torch's F.linear gets all the threads.
        torch.set_num_threads(1 if self.kind != "torch" else _THREADS[0])
        if self.kind != "torch" and _THREADS[0] > 1:
            busy_wait(0.02)  # let torch's OpenMP workers, spinning after its last region, go to sleep
        for _ in range(warmup):
            call(i, m)
            i = i + 1 if i + 1 < n else 0
        t0 = time.perf_counter()
        for _ in range(calls):
            call(i, m)
            i = i + 1 if i + 1 < n else 0
        dt = time.perf_counter() - t0
        self.next_copy = i
        return dt / calls


def n_copies(bytes_per_copy: int, target: int) -> int:
    return max(2, math.ceil(target / bytes_per_copy))


def build_variants(n: int, k: int, ms: list[int], formats: list[str], paths: list[str],
                   target_bytes: int, mem_cap: int, rng: np.random.Generator):
    """Weights for one shape: per variant enough distinct copies to exceed `target_bytes`."""
    codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    xq = {m: torch.from_numpy(rng.integers(-127, 128, size=(m, k), dtype=np.int8)) for m in ms}
    xf = {m: xq[m].to(torch.float32) * 0.01 for m in ms}  # any values: dense kernels are data-blind
    xb = {m: xf[m].to(torch.bfloat16) for m in ms}

    plan = []  # (name, kind, bytes_per_copy, fmt, path)
    for fmt in formats:
        nb = get_format(fmt).packed_nbytes(n, k)
        for path in paths:
            plan.append((f"{fmt}/{path}", "ours", nb, fmt, path))
    plan.append(("torch fp32", "torch", n * k * 4, None, torch.float32))
    plan.append(("torch bf16", "torch", n * k * 2, None, torch.bfloat16))
    if 1 in ms and kernels.extension_available():
        for name, streams in PROBES.items():
            plan.append((name, "probe", get_format("i2").packed_nbytes(n, k), None, streams))

    counts = [n_copies(p[2], target_bytes) for p in plan]
    total = sum(c * p[2] for c, p in zip(counts, plan))
    scale = 1.0
    if total > mem_cap:  # shrink every variant alike, never below 2 copies
        scale = mem_cap / total
        counts = [max(2, int(c * scale)) for c in counts]

    variants: list[Variant] = []
    packed_once: dict[str, np.ndarray] = {}
    for (name, kind, nb, fmt, extra), count in zip(plan, counts):
        v = Variant(name, kind, nb)
        if kind == "ours":
            if fmt not in packed_once:
                packed_once[fmt] = get_format(fmt).pack(codes)
            # Distinct buffers with the same bytes: caches key on addresses, not contents.
            v.copies = [kernels.aligned_copy(packed_once[fmt]) for _ in range(count)]  # as a loaded model's
            xs = {m: x.numpy() for m, x in xq.items()}

            def call(i, m, v=v, fmt=fmt, path=extra, xs=xs):
                return kernels.ternary_matmul_numpy(xs[m], v.copies[i], fmt, n, k, path=path)
        elif kind == "probe":
            v.copies = [kernels.aligned_copy(np.ones(nb, dtype=np.uint8)) for _ in range(count)]
            ext = kernels._load_extension()

            def call(i, m, v=v, ext=ext, streams=extra):
                return ext.read_sum(v.copies[i], _THREADS[0], streams)
        else:
            w = torch.from_numpy(codes).to(extra) * 0.02
            v.copies = [w.clone() for _ in range(count)]
            x = xf if extra == torch.float32 else xb

            def call(i, m, v=v, x=x):
                return F.linear(x[m], v.copies[i])
        v.call = call
        variants.append(v)
    return variants, codes, xq, scale


def check_outputs(variants: list[Variant], codes: np.ndarray, xq: dict, ms: list[int]) -> None:
    """Each variant against the exact product (fp32 is exact: |sums| < 2**24 for these K)."""
    w = torch.from_numpy(codes).to(torch.float32)
    for m in ms:
        ref = xq[m].to(torch.float32) @ w.T
        for v in variants:
            if v.kind == "probe":
                continue
            got = v.call(0, m)
            if v.kind == "ours":
                ok = torch.equal(torch.from_numpy(got), ref.to(torch.int32))
            else:  # torch uses scaled weights/activations; check it computes the same product
                want = ref * (0.01 * 0.02)
                tol = 1e-4 if got.dtype == torch.float32 else 5e-2
                ok = torch.allclose(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))
            if not ok:
                raise SystemExit(f"error: {v.name} gives wrong results at M={m}, W {tuple(codes.shape)}")


# ---- measurement --------------------------------------------------------------------------------
def time_block(variants: list[Variant], m: int, rounds: int, round_s: float) -> dict[str, list[float]]:
    """Interleaved rounds; returns seconds per call, one sample per round, per variant (the memory
    read probe takes part in M = 1 blocks only)."""
    variants = [v for v in variants if v.kind != "probe" or m == 1]
    calls = {}
    for v in variants:  # calibrate (and warm up the code paths, thread pools, allocator)
        v.run(m, 1)
        t = v.run(m, 2)
        calls[v.name] = max(1, min(len(v.copies) * 4, math.ceil(round_s / max(t, 1e-9))))
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            # The first milliseconds after switching variants (and after the sleep above) run
            # slow for every variant — 640×2560 at M = 1 timed 55 µs in 20 ms blocks, 40 µs in
            # 100 ms ones; a decode step never idles like that, so a quarter of each block is
            # run untimed first.
            samples[v.name].append(v.run(m, calls[v.name], warmup=max(1, calls[v.name] // 4)))
    return samples


def time_hot(variants: list[Variant], round_s: float, rounds: int = 5) -> dict[str, float]:
    """M = 1 bytes/s of each of our variants on one weight copy that stays in cache: the kernel's
    compute rate, with memory out of the way (best of `rounds`)."""
    out = {}
    for v in variants:
        if v.kind != "ours":
            continue
        # the same calls, made through Variant.run, on the first copy only (its calls index it)
        one = Variant(v.name, v.kind, v.bytes_per_copy, copies=v.copies[:1], call=v.call)
        calls = max(3, math.ceil(round_s / max(one.run(1, 2), 1e-9)))
        out[v.name] = v.bytes_per_copy / min(one.run(1, calls, warmup=1) for _ in range(rounds))
    return out


def measure_bandwidth(threads: list[int]) -> dict[int, float]:
    out = {}
    for t in threads:
        # read_sum splits the buffer over min(threads, pool size): set the pool first.
        set_threads(t)
        out[t] = max(kernels.memory_read_bandwidth(threads=t, streams=s) for s in sorted(set(PROBES.values())))
    return out


# ---- report -------------------------------------------------------------------------------------
def fmt_shape(n: int, k: int) -> str:
    return f"{n}×{k}"


def print_tables(results: dict, shapes, ms, threads, ours: list[str], rounds: int) -> dict:
    """One table per (M, threads); returns best-of-ours per (shape, M, threads)."""
    best = {}
    cols = ours + ["torch fp32", "torch bf16"]
    width = max(11, *(len(c) + 1 for c in cols))
    for m in ms:
        for t in threads:
            print(f"\nM = {m}, threads = {t}: µs per call (median of {rounds} rounds; lower is better)")
            head = f"{'W [N×K]':<11}" + "".join(f"{c:>{width}}" for c in cols)
            head += f"  | {'best of ours':<16}{'× vs bf16':>10}{'× vs fp32':>10}"
            print(head)
            print("-" * len(head))
            for n, k in shapes:
                row = results[(n, k, m, t)]
                line = f"{fmt_shape(n, k):<11}" + "".join(f"{row[c]['median_us']:>{width}.1f}" for c in cols)
                b = min(ours, key=lambda c: row[c]["median_us"])
                sb = row["torch bf16"]["median_us"] / row[b]["median_us"]
                sf = row["torch fp32"]["median_us"] / row[b]["median_us"]
                best[(n, k, m, t)] = (b, sb, sf)
                print(line + f"  | {b:<16}{sb:>10.2f}{sf:>10.2f}")
    return best


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of NxK (W is [N, K])")
    ap.add_argument("--m", default=DEFAULT_M, help="comma list of batch sizes M")
    ap.add_argument("--threads", default=DEFAULT_THREADS, help="comma list of thread counts")
    ap.add_argument("--rounds", type=int,
                    help=f"timed rounds per variant (default {DEFAULT_ROUNDS}, --quick {QUICK_ROUNDS})")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and fewer weight copies")
    ap.add_argument("--paths", help="comma list of kernel paths (default: all available but torch, scalar)")
    ap.add_argument("--formats", help="comma list of packed formats (default: all registered)")
    ap.add_argument("--llc-multiple", type=float,
                    help=f"weight bytes per variant / last-level cache (default {DEFAULT_LLC_MULTIPLE:g}, "
                         f"--quick {QUICK_LLC_MULTIPLE:g})")
    ap.add_argument("--round-ms", type=float, default=20.0, help="target duration of one timed block")
    ap.add_argument("--mem-cap-gb", type=float,
                    help="most GB of weight copies held at once (default: half of MemAvailable, ≤ 8)")
    ap.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    args = ap.parse_args()
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    args.m = [int(v) for v in args.m.split(",")]
    args.threads = [int(v) for v in args.threads.split(",")]
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    args.llc_multiple = args.llc_multiple or (QUICK_LLC_MULTIPLE if args.quick else DEFAULT_LLC_MULTIPLE)
    available = kernels.available_paths()
    if args.paths:
        args.paths = args.paths.split(",")
        for p in args.paths:
            if p not in available or p == kernels.TORCH_PATH:
                raise SystemExit(f"error: kernel path {p!r} not available here (have {', '.join(available)}; "
                                 f"torch F.linear is always measured)")
    else:
        args.paths = [p for p in available if p not in (kernels.TORCH_PATH, "scalar")]
    if not args.paths:
        raise SystemExit("error: no native kernel path to measure (is the extension built?)")
    args.formats = args.formats.split(",") if args.formats else list(FORMATS)
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        raise SystemExit(f"error: unknown packed format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    return args


def measure_all(args, llc: int, t_start: float) -> tuple[dict, dict, list]:
    """Every (shape, M, threads) block; returns results, copies per variant and bandwidth probes.
    results[("hot", threads)] holds the cache-resident rates of the largest shape."""
    target = int(args.llc_multiple * llc)
    mem_cap = int(args.mem_cap_gb * (1 << 30)) if args.mem_cap_gb else min(8 << 30, mem_available() // 2)
    probes = [measure_bandwidth(args.threads)]
    print("memory read bandwidth (start): " + ", ".join(f"{t} thr {probes[0][t] / 1e9:.1f} GB/s"
                                                        for t in args.threads))
    rng = np.random.default_rng(0)
    results: dict = {}
    copies: dict = {}
    largest = max(args.shapes, key=lambda s: s[0] * s[1])
    for n, k in args.shapes:
        variants, codes, xq, scale = build_variants(n, k, args.m, args.formats, args.paths, target,
                                                    mem_cap, rng)
        set_threads(args.threads[0])
        check_outputs(variants, codes, xq, args.m)
        copies[fmt_shape(n, k)] = {v.name: len(v.copies) for v in variants}
        lo = min(len(v.copies) * v.bytes_per_copy for v in variants)
        note = ""
        if scale < 1:
            note = f" (memory cap: copies scaled ×{scale:.2f}; smallest set {lo / llc:.1f}× LLC)"
        print(f"[{time.perf_counter() - t_start:6.1f} s] W {fmt_shape(n, k)} (load average "
              f"{os.getloadavg()[0]:.2f}): copies "
              + ", ".join(f"{v.name} {len(v.copies)}" for v in variants) + note, file=sys.stderr)
        for t in args.threads:
            set_threads(t)
            for m in args.m:
                print(f"[{time.perf_counter() - t_start:6.1f} s]   timing M = {m}, {t} thr", file=sys.stderr)
                samples = time_block(variants, m, args.rounds, args.round_ms / 1e3)
                results[(n, k, m, t)] = {
                    v.name: {"kind": v.kind, "median_us": statistics.median(samples[v.name]) * 1e6,
                             "min_us": min(samples[v.name]) * 1e6,
                             "samples_us": [s * 1e6 for s in samples[v.name]],
                             "weight_bytes": v.bytes_per_copy, "copies": len(v.copies)}
                    for v in variants if v.name in samples}
                if m == 1 and (n, k) == largest:
                    results[("hot", t)] = time_hot(variants, args.round_ms / 1e3)
        del variants, codes, xq
        gc.collect()
        # Probe again between shapes: the machine's load drifts, and the best probe is the ceiling.
        probes.append(measure_bandwidth(args.threads))
    return results, copies, probes


def probe_rates(row: dict) -> list[float]:
    """Bytes/s of the better interleaved read probe, round by round."""
    per_probe = [[row[p]["weight_bytes"] / (t * 1e-6) for t in row[p]["samples_us"]] for p in PROBES]
    return [max(r) for r in zip(*per_probe)]


def paired_ratio(row: dict, c: str) -> tuple[float, float]:
    """Variant c's read rate over the better read probe's: median of per-round ratios (each round
    against the probes' turns in the same round), and best round over best probe round."""
    probe = probe_rates(row)
    rates = [row[c]["weight_bytes"] / (t * 1e-6) for t in row[c]["samples_us"]]
    return statistics.median(r / p for r, p in zip(rates, probe)), max(rates) / max(probe)


def print_bandwidth_fractions(results: dict, args, cols: list[str], bw: dict, hot: dict) -> dict:
    """M = 1: weight bytes read per second as a fraction of the read bandwidth, per shape,
    threads and variant. Returns {(n, k, t, variant): figures}."""
    frac: dict = {}
    paired = all(p in results[(args.shapes[0][0], args.shapes[0][1], 1, args.threads[0])] for p in PROBES)
    print("\nM = 1: weight bytes read per second (best round) and as a fraction of the read bandwidth:")
    if paired:
        print("  'paired' = median over rounds of (this round's rate / the better read probe's rate in the same "
              "round, 1 or 4 streams per thread) [best round / best probe round]")
    print("  'peak' = best round / best large-buffer probe (" +
          ", ".join(f"{t} thr {bw[t] / 1e9:.1f} GB/s" for t in args.threads) + ")")
    width = 36 if paired else 22
    head = f"{'W [N×K]':<11}{'thr':>4}{'probe':>11}  " + "".join(f"{c:>{width}}" for c in cols)
    print(head)
    print("-" * len(head))
    for n, k in args.shapes:
        for t in args.threads:
            row = results[(n, k, 1, t)]
            probe = max(probe_rates(row)) if paired else float("nan")
            cells = ""
            for c in cols:
                rate = row[c]["weight_bytes"] / (row[c]["min_us"] * 1e-6)
                fig = {"bytes_per_s": rate, "peak_fraction": rate / bw[t]}
                cells_c = f"{rate / 1e9:>6.1f} GB/s"
                if paired:
                    med, best = paired_ratio(row, c)
                    fig.update(paired_median=med, paired_best=best, probe_bytes_per_s=probe)
                    cells_c += f" {100 * med:>5.1f} % [{100 * best:>3.0f} %]"
                cells_c += f" peak {100 * rate / bw[t]:>3.0f} %"
                frac[(n, k, t, c)] = fig
                cells += f"{cells_c:>{width}}"
            print(f"{fmt_shape(n, k):<11}{t:>4}{probe / 1e9:>6.1f} GB/s  " + cells)
    big = max(args.shapes, key=lambda s: s[0] * s[1])
    for t in args.threads:
        if hot.get(t):
            probe = max(probe_rates(results[(*big, 1, t)])) if paired else bw[t]
            print(f"compute rate with the weights in cache ({fmt_shape(*big)}, {t} thr; × the read probe — "
                  f"near 1 or below means compute-bound): "
                  + ", ".join(f"{c} {r / 1e9:.1f} GB/s ({r / probe:.2f}×)" for c, r in hot[t].items()))
    return frac


def print_goals(args, best: dict, frac: dict, ours: list[str], bw: dict) -> list[dict]:
    print("\nsummary (best of our variants per shape; the worst shape decides)")
    goals = []

    def speed_goal(m: int, label: str, met_if: Callable[[float], bool]) -> None:
        for t in args.threads:
            worst = min(args.shapes, key=lambda s: best[(s[0], s[1], m, t)][1])
            b, sb, _ = best[(worst[0], worst[1], m, t)]
            met = met_if(sb)
            goals.append({"goal": label, "threads": t, "met": met, "worst_shape": fmt_shape(*worst),
                          "worst_speedup": sb, "best_variant": b,
                          "speedups": {fmt_shape(n, k): best[(n, k, m, t)][1] for n, k in args.shapes}})
            print(f"  {label}, {t} thr: {'MET' if met else 'NOT MET'} — worst {fmt_shape(*worst)} "
                  f"{sb:.2f}× ({b}); all: " + ", ".join(f"{fmt_shape(n, k)} {best[(n, k, m, t)][1]:.2f}×"
                                               for n, k in args.shapes))

    if 1 in args.m:
        speed_goal(1, f"M = 1 ≥ {GOAL_M1_SPEEDUP:g}× faster than torch bf16",
                   lambda s: s >= GOAL_M1_SPEEDUP)
    if 128 in args.m:
        speed_goal(128, "M = 128 faster than torch bf16", lambda s: s > GOAL_M128_SPEEDUP)
    if 1 in args.m:
        big = max(n * k for n, k in args.shapes)
        big_shapes = [(n, k) for n, k in args.shapes if n * k == big]
        where = " / ".join(fmt_shape(*s) for s in big_shapes)
        label = f"M = 1 weight bytes/s ≥ {100 * GOAL_BW_FRACTION:.0f} % of read bandwidth"
        # The paired median where the probe ran (extension present), else the peak fraction.
        key = "paired_median" if "paired_median" in frac[(*big_shapes[0], args.threads[0], ours[0])] else "peak_fraction"
        yardstick = "the interleaved read probe (paired median)" if key == "paired_median" else "the peak probe"
        for t in args.threads:
            fr = {c: min(frac[(n, k, t, c)][key] for n, k in big_shapes) for c in ours}  # the slower shape
            b = max(ours, key=lambda c: fr[c])
            met = fr[b] >= GOAL_BW_FRACTION
            goals.append({"goal": label, "threads": t, "met": met, "shapes": where, "best_variant": b,
                          "fraction": fr[b], "measure": key, "peak_bandwidth_Bps": bw[t], "per_variant": fr})
            print(f"  {label}, {t} thr: {'MET' if met else 'NOT MET'} — {b} {100 * fr[b]:.1f} % of "
                  f"{yardstick} on {where} (slower shape); all: "
                  + ", ".join(f"{c} {100 * fr[c]:.1f} %" for c in ours))
    return goals


def main() -> None:
    args = parse_args()
    ours = [f"{f}/{p}" for f in args.formats for p in args.paths]
    cols = ours + ["torch fp32", "torch bf16"]
    llc, llc_src = last_level_cache()

    print(__doc__.splitlines()[0])
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, last-level cache "
          f"{llc / (1 << 20):.0f} MiB ({llc_src}); torch {torch.__version__}; numpy {np.__version__}")
    print(f"kernel paths available: {', '.join(kernels.available_paths())} "
          f"(default {kernels.current_path()}); measured: {', '.join(args.paths)}; formats: "
          + ", ".join(f"{f} ({get_format(f).bits_per_weight:g} bit/w)" for f in args.formats))
    print("ours: kernels.ternary_matmul_numpy, int8 x [M, K] in, int32 [M, N] out (activation quantization "
          "NOT included); torch: F.linear fp32×fp32 and bf16×bf16")
    print(f"weights cycled per variant: > {args.llc_multiple:g}× LLC = "
          f"{args.llc_multiple * llc / (1 << 20):.0f} MiB; rounds {args.rounds}; "
          f"threads: kernels.set_num_threads (ours, torch at 1 thread meanwhile) and torch.set_num_threads (torch)")

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    results, copies, probes = measure_all(args, llc, t_start)
    hot = {t: results.pop(("hot", t)) for t in args.threads if ("hot", t) in results}
    bw = {t: max(p[t] for p in probes) for t in args.threads}
    print("memory read bandwidth (end):   " + ", ".join(f"{t} thr {probes[-1][t] / 1e9:.1f} GB/s"
                                                        for t in args.threads))
    print(f"memory read bandwidth (best of {len(probes)} probes, used below): "
          + ", ".join(f"{t} thr {bw[t] / 1e9:.1f} GB/s" for t in args.threads))
    print(f"total run time {time.perf_counter() - t_start:.0f} s; 1-min load average at start "
          f"{load_start:.2f}, at end {os.getloadavg()[0]:.2f} (other processes skew the timings)")

    best = print_tables(results, args.shapes, args.m, args.threads, ours, args.rounds)
    frac = print_bandwidth_fractions(results, args, cols, bw, hot) if 1 in args.m else {}
    goals = print_goals(args, best, frac, ours, bw)

    if args.json:
        doc = {
            "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "llc_bytes": llc,
                        "llc_source": llc_src, "torch": torch.__version__, "numpy": np.__version__,
                        "kernel_paths": kernels.available_paths(), "cpu_features": kernels.cpu_features()},
            "config": {"shapes": [list(s) for s in args.shapes], "m": args.m, "threads": args.threads,
                       "rounds": args.rounds, "llc_multiple": args.llc_multiple, "round_ms": args.round_ms,
                       "paths": args.paths, "formats": args.formats, "quick": args.quick, "copies": copies,
                       "note": "ours: int8 activations in, int32 out; activation quantization not included"},
            "bandwidth_Bps": {"probes": probes, "best": bw},
            "results": [{"n": n, "k": k, "m": m, "threads": t, "variant": name, **vals}
                        for (n, k, m, t), row in results.items() for name, vals in row.items()],
            "bandwidth_fraction_m1": [{"n": n, "k": k, "threads": t, "variant": c, **fig}
                                      for (n, k, t, c), fig in frac.items()],
            "goals": goals,
            "cache_resident_bytes_per_s_m1": {str(t): r for t, r in hot.items()},
        }
        existed = os.path.exists(args.json)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, args.json)  # atomic: a reader never sees half a file
        print(f"\n{'overwrote' if existed else 'wrote'} {args.json}")


if __name__ == "__main__":
    main()
