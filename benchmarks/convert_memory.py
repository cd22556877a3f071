"""Peak memory of Hugging Face export and import at the real BitNet b1.58 2B4T shapes.

    python benchmarks/convert_memory.py                 # 2B4T shapes, ~2-4 min on 2 cores, ~5 GB of disk
    python benchmarks/convert_memory.py --preset tiny   # a quick look

A random packed checkpoint with the exact 2B4T shapes (`random_packed`, i2 codes, int8 tied head)
is written locally; then, each in its own subprocess:
  baseline  a process that only imports the library (torch included) and the interop modules
  export    `save_hf(ckpt, hf_dir)`: packed autobitlinear layout, float32 embedding (the default)
  import    `import_hf(hf_dir, out)`: back into our packed i2 directory
Each child reports its own peak resident set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`). The
table compares the peak above the baseline with the largest single tensor the step reads or
writes: a conversion that streams tensor by tensor stays within a small multiple of it, one that
builds every tensor first would need about the whole file on top.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _largest_tensor(directory: Path) -> tuple[str, int]:
    """(name, bytes) of the largest tensor in a directory's safetensors files, from the headers."""
    best = ("", 0)
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                size = info["data_offsets"][1] - info["data_offsets"][0]
                best = max(best, (name, size), key=lambda x: x[1])
    return best


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def child(step: str, args: list[str]) -> None:
    """Run one step in this (fresh) process and print its peak RSS as JSON on the last line."""
    import bitnet158  # noqa: F401
    from bitnet158.interop import hf, hf_export  # noqa: F401

    start = time.perf_counter()
    if step == "generate":
        from bitnet158.checkpoint import save_packed
        from bitnet158.config import preset
        from bitnet158.pack import random_packed
        from bitnet158.packed_layers import PackConfig

        model = random_packed(preset(args[0]), PackConfig(format="i2", head="int8"))
        save_packed(model, args[1])
    elif step == "export":
        hf_export.save_hf(args[0], args[1])
    elif step == "import":
        hf.import_hf(args[0], args[1])
    elif step != "baseline":
        raise SystemExit(f"unknown step {step}")
    print(json.dumps({"peak": _peak_rss_bytes(), "seconds": time.perf_counter() - start}))


def _run(step: str, *args: str) -> dict:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", step, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="2b4t", help="model shape preset (default: 2b4t, the real shapes)")
    parser.add_argument("--work", help="directory for the files (default: a temporary one, removed after)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        child(a.child[0], a.child[1:])
        return
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="convert_memory."))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, hf_dir, back = work / "ckpt", work / "hf", work / "imported"
    for d in (ckpt, hf_dir, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        print(f"preset {a.preset}: generating a random packed checkpoint in {work} ...", flush=True)
        gen = _run("generate", a.preset, str(ckpt))
        base = _run("baseline")
        exp = _run("export", str(ckpt), str(hf_dir))
        imp = _run("import", str(hf_dir), str(back))
        mb = 1e-6
        print(f"checkpoint  {_dir_bytes(ckpt) * mb:8.1f} MB  (generated in {gen['seconds']:.0f} s)")
        print(f"HF export   {_dir_bytes(hf_dir) * mb:8.1f} MB")
        print(f"imported    {_dir_bytes(back) * mb:8.1f} MB")
        print(f"baseline RSS (import bitnet158 + interop): {base['peak'] * mb:8.1f} MB")
        print(f"{'step':8s} {'peak RSS':>10s} {'above base':>11s} {'largest tensor (read / written)':>44s} "
              f"{'ratio':>6s} {'time':>6s}")
        for label, r, src, dst in (("export", exp, ckpt, hf_dir), ("import", imp, hf_dir, back)):
            s_name, s_size = _largest_tensor(src)
            d_name, d_size = _largest_tensor(dst)
            largest = max(s_size, d_size)
            above = r["peak"] - base["peak"]
            print(f"{label:8s} {r['peak'] * mb:8.1f} MB {above * mb:8.1f} MB {s_size * mb:14.1f} MB / "
                  f"{d_size * mb:8.1f} MB ({d_name if d_size >= s_size else s_name}) "
                  f"{above / largest:5.2f}x {r['seconds']:5.0f} s")
        print("ratio = (peak − baseline) / largest tensor; whole-file sizes are listed above for comparison")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
