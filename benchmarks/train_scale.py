"""Training throughput past one process: tokens/s of 1 vs N ranks for DDP and FSDP2, and the peak
memory of each rank, measured in one run (each configuration is a torchrun job of this script).

The step is the trainer's own (bitnet158.train.trainer.train with a Dist): forward, cross-entropy,
backward, gradient reduction, clipping, AdamW. Each rank runs one thread on CPU, so N ranks use N
cores; the global batch is the same for every world size (--batch-size is split over the ranks).

    python benchmarks/train_scale.py                          # CPU, gloo: 1 vs 2 ranks, DDP and FSDP2
    python benchmarks/train_scale.py --preset small --steps 8
    python benchmarks/train_scale.py --device cuda --precision bf16 --preset 700m --batch-size 32 \\
        --seq-len 2048                                        # every visible GPU; adds MFU
    python benchmarks/train_scale.py --prepare-data-mb 200    # prepare-data on 200 MB: peak memory, then
                                                              # a 2-rank run reading those shards

On CUDA the job uses NCCL and one GPU per rank (ranks 1 and torch.cuda.device_count()); model FLOPs
utilisation = 6·N·tokens/s (+ attention, 12·L·T·d per token) over the GPUs' peak dense bf16 FLOP/s
(--peak-tflops per GPU, or a table of known GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
               "4090": 165.0, "3090": 71.0}  # dense bf16 per GPU (tensor cores), vendor figures


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(nproc: int, *args: str, env_extra: dict | None = None, timeout: float = 1800) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"job failed ({' '.join(args[:4])} ...):\n{done.stderr[-4000:]}")


# ----- one rank of a timed job -----------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from bitnet158.config import TrainConfig, preset
    from bitnet158.train.distributed import Dist, ParallelConfig
    from bitnet158.train.trainer import train

    torch.set_num_threads(1) if args.device == "cpu" else None
    pc = ParallelConfig(parallel=args.parallel, precision=args.precision, compile=args.compile,
                        activation_checkpointing=args.activation_checkpointing)
    d = Dist.start(pc, args.device)
    mc = preset(args.preset, max_seq_len=max(args.seq_len, preset(args.preset).max_seq_len))
    steps = args.warmup + args.steps
    tc = TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, warmup=1,
                     eval_every=10 ** 9, save_every=10 ** 9, device=args.device)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (max(1_000_000, args.batch_size * args.seq_len * 4),),
                           generator=g, dtype=torch.int32)
    stamps: list[float] = []

    def stamp(step: int, model) -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    result = train(mc, tc, tokens, None, progress=False, on_step=stamp, dist=d)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    timed = stamps[args.warmup:]
    tokens_per_step = args.batch_size * args.seq_len
    row = {"tokens_per_s": tokens_per_step * (len(timed) - 1) / (timed[-1] - timed[0]),
           "peak_mb": (torch.cuda.max_memory_allocated() / 2 ** 20 if args.device.startswith("cuda")
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "params": sum(p.numel() for p in result.model.parameters()) if d.world_size == 1 else None,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    rows = [None] * d.world_size
    dist.all_gather_object(rows, row)
    if d.is_main:
        Path(args.worker_out).write_text(json.dumps({"world_size": d.world_size, "ranks": rows}))
    d.close()


# ----- the parent: every configuration, one table ----------------------------------------------

def model_flops_per_token(preset_name: str, seq_len: int) -> float:
    from bitnet158.config import preset
    from bitnet158.model import Transformer
    import torch
    with torch.device("meta"):
        model = Transformer(preset(preset_name, max_seq_len=max(seq_len, preset(preset_name).max_seq_len)))
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return 6.0 * params + 12.0 * cfg.num_layers * seq_len * cfg.hidden_size


def peak_flops(gpu: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in gpu), None)


def scale(args: argparse.Namespace) -> None:
    import torch
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    top = args.ranks or (torch.cuda.device_count() if cuda else 2)
    worlds = sorted({1, top})
    print(f"train_scale: preset {args.preset}, global batch {args.batch_size} × {args.seq_len} tokens, "
          f"{args.steps} timed steps after {args.warmup}, device {args.device}, precision {args.precision}"
          f"{', compile' if args.compile else ''}{', activation checkpointing' if args.activation_checkpointing else ''}")
    flops = model_flops_per_token(args.preset, args.seq_len)
    base: dict[str, float] = {}
    print(f"{'parallel':>8} {'ranks':>5} {'tokens/s':>10} {'speed-up':>8} {'peak MB per rank':>24}"
          + (f" {'MFU':>6}" if cuda else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for parallel in args.parallel.split(","):
            for world in worlds:
                out = Path(tmp) / f"{parallel}-{world}.json"
                flags = ["--worker", "--worker-out", str(out), "--parallel", parallel]
                for name in ("preset", "batch_size", "seq_len", "steps", "warmup", "device", "precision"):
                    flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
                flags += ["--compile"] * args.compile + ["--activation-checkpointing"] * args.activation_checkpointing
                _job(world, __file__, *flags)
                got = json.loads(out.read_text())
                tps = got["ranks"][0]["tokens_per_s"]
                base.setdefault(parallel, tps) if world == 1 else None
                peaks = "/".join(f"{r['peak_mb']:.0f}" for r in got["ranks"])
                line = f"{parallel:>8} {world:>5} {tps:>10,.0f} {tps / base[parallel]:>7.2f}x {peaks:>24}"
                if cuda:
                    peak = peak_flops(got["ranks"][0]["gpu"] or "", args.peak_tflops)
                    line += f" {flops * tps / (peak * world):>6.1%}" if peak else "   n/a (--peak-tflops)"
                print(line, flush=True)


# ----- prepare-data on a large corpus ----------------------------------------------------------

def _tree_memory(root: int) -> tuple[float, float]:
    """(sum of PSS over the process tree, largest RSS of one process), MB, from /proc."""
    pids, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = (task / "children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in pids:
                    pids.add(k)
                    frontier.append(k)
    pss = rss = 0.0
    for pid in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        except (OSError, ValueError):
            continue
        pss += int(fields["Pss"].split()[0]) / 1024
        rss = max(rss, int(fields["Rss"].split()[0]) / 1024)
    return pss, rss


def make_corpus(folder: Path, megabytes: int) -> int:
    """~`megabytes` of text: the embedded corpus's documents in a different seeded order per file."""
    import random
    from bitnet158.train.data import default_corpus
    docs = [d.text for d in default_corpus().train]
    folder.mkdir(parents=True, exist_ok=True)
    written, k = 0, 0
    while written < megabytes * 1_000_000:
        rng = random.Random(k)
        order = rng.sample(range(len(docs)), len(docs))
        with open(folder / f"part{k:03d}.txt", "w", encoding="utf-8") as f:
            size = 0
            for i in order:
                f.write(docs[i] + "\n\n")
                size += len(docs[i].encode()) + 2
                if size >= 8_000_000:
                    break
        written += size
        k += 1
    return written


def prepare_benchmark(args: argparse.Namespace) -> None:
    from bitnet158.tokenizer import Tokenizer
    from bitnet158.train.data import default_corpus
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train_scale_"))
    corpus = work / "corpus"
    if not corpus.exists():
        t0 = time.perf_counter()
        total = make_corpus(corpus, args.prepare_data_mb)
        print(f"corpus: {total / 1e6:.0f} MB of text in {len(list(corpus.iterdir()))} files "
              f"({time.perf_counter() - t0:.0f}s)")
    tokenizer = Tokenizer.train((d.text for d in default_corpus(max_bytes=3_000_000).train), vocab_size=4096)
    tokenizer.save(work / "tokenizer.json")
    shutil.rmtree(work / "shards", ignore_errors=True)
    cmd = [sys.executable, "-m", "bitnet158.cli", "prepare-data", str(corpus), "--tokenizer",
           str(work / "tokenizer.json"), "--out", str(work / "shards"), "--quiet"]
    cmd += ["--workers", str(args.workers)] if args.workers else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"pss": 0.0, "rss": 0.0}

    def sample() -> None:
        while proc.poll() is None:
            pss, rss = _tree_memory(proc.pid)
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            time.sleep(0.1)
    watcher = threading.Thread(target=sample)
    watcher.start()
    proc.wait()
    watcher.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit("prepare-data failed")
    manifest = json.loads((work / "shards" / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in corpus.iterdir())
    print(f"prepare-data: {size / 1e6:.0f} MB → {manifest['splits']['train']['tokens']:,} train + "
          f"{manifest['splits']['heldout']['tokens']:,} held-out ids in {seconds:.0f}s "
          f"({size / 1e6 / seconds:.1f} MB/s); peak memory: {peak['pss']:.0f} MB PSS over all processes, "
          f"{peak['rss']:.0f} MB RSS of the largest (goal: < 500 MB)")
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    _job(2, "-m", "bitnet158.cli", "train", "--parallel", "fsdp", "--data-dir", str(work / "shards"),
         "--steps", "4", "--batch-size", "4", "--seq-len", "64", "--warmup", "1", "--eval-every", "4",
         "--eval-batches", "1", "--save-every", "4", "--out", str(run), "--quiet")
    state = json.loads((run / "step-000004" / "trainer.json").read_text())
    print(f"2-rank FSDP2 run on those shards: losses {[round(h['loss'], 3) for h in state['history']]}, "
          f"held-out {state['evals'][-1]['loss']:.3f} ({time.perf_counter() - t0:.0f}s); files in {work}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8, help="global micro-batch (split over the ranks)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--parallel", default="ddp,fsdp")
    ap.add_argument("--ranks", type=int, help="the larger world size (default: 2 on CPU, every GPU on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of one GPU (for MFU)")
    ap.add_argument("--prepare-data-mb", type=int, help="instead: prepare-data on this many MB of text")
    ap.add_argument("--workers", type=int, help="prepare-data worker processes")
    ap.add_argument("--workdir", help="keep the corpus and shards here (prepare-data mode)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    elif args.prepare_data_mb:
        prepare_benchmark(args)
    else:
        scale(args)


if __name__ == "__main__":
    main()
