"""Peak memory of every conversion a whole model passes through, at the real BitNet b1.58 2B4T shapes.

    python benchmarks/convert_memory.py                 # 2B4T shapes: ~15-25 min on 2 cores, ~30 GB of disk
    python benchmarks/convert_memory.py --preset tiny   # a quick look
    python benchmarks/convert_memory.py --only hf       # the packed HF export/import pair alone

Inputs, written here tensor by tensor (the generator never holds the model either):
  1bitllm   a 1bitLLM-layout HF directory (BitnetForCausalLM, LLaMA names, untied, SwiGLU) of fp16
            random masters
  bf16      the 2B4T bf16-masters layout (BitNetForCausalLM, tied, relu²) in bf16
  packed    a random packed checkpoint (`random_packed`: i2 codes, int8 tied head)
Then, each step in its own subprocess that reports its peak resident set (ru_maxrss):
  baseline           a process that only imports the library (torch included) and the interop modules
  import 1bitllm     `import_hf(1bitllm, pack="i2")`: float masters straight to packed
  import bf16        `import_hf(bf16, pack="i2")`
  import bf16 latent `import_hf(bf16, latent=True)`: the fp32 training form (input of the next step)
  pack fp32          `pack_dir(training form)`: fp32 masters → packed i2 (was 14.4 GB before streaming)
  export gguf        `export_gguf(packed, tq2_0)`
  import gguf        `import_gguf(that file)`
  export hf          `save_hf(packed)`: the packed autobitlinear layout
  import hf          `import_hf(that directory)`: back into our packed i2 directory
The table compares the peak above the baseline with the largest single tensor the step reads or
writes: a conversion that streams stays within a small multiple of it (goal ≤ 1.5×), one that
builds every tensor first needs about the whole model on top.
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

GOAL = 1.5  # peak above the baseline, in largest tensors


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _tensor_sizes(path: Path) -> dict[str, int]:
    """name → bytes of every tensor in a directory's safetensors files, or a GGUF's, from the headers."""
    sizes: dict[str, int] = {}
    if path.is_file():  # a GGUF
        from bitnet158.interop.gguf_header import read_header

        return {name: t.nbytes for name, t in read_header(path).tensors.items()}
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                sizes[name] = info["data_offsets"][1] - info["data_offsets"][0]
    return sizes


def _largest(path: Path) -> tuple[str, int]:
    sizes = _tensor_sizes(path)
    return max(sizes.items(), key=lambda kv: kv[1]) if sizes else ("", 0)


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def write_random_hf(out: Path, preset: str, layout: str) -> None:
    """A Hugging Face directory of random float masters at `preset`'s shapes, streamed to disk."""
    import torch

    from bitnet158.config import preset as get_preset
    from bitnet158.interop.hf_common import hf_name
    from bitnet158.model import Transformer
    from bitnet158.safetensors_io import PlannedTensor, write_safetensors

    cfg = get_preset(preset)
    if layout == "1bitllm":
        import dataclasses

        cfg = dataclasses.replace(cfg, activation="swiglu", tie_embeddings=False)
        arch, act, names, dtype = "BitnetForCausalLM", "silu", "1bitllm", torch.float16
    else:
        arch, act, names, dtype = "BitNetForCausalLM", "relu2", "bitnet", torch.bfloat16
    with torch.device("meta"):
        skeleton = Transformer(cfg)

    def make(i: int, name: str, shape: tuple[int, ...]):
        def produce():
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=dtype)
            g = torch.Generator().manual_seed(i)
            return (torch.randn(shape, generator=g) * 0.02).to(dtype)
        return produce

    entries = [PlannedTensor(hf_name(name, names), dtype, tuple(t.shape), make(i, name, tuple(t.shape)))
               for i, (name, t) in enumerate(skeleton.state_dict().items())]
    out.mkdir(parents=True)
    write_safetensors(out / "model.safetensors", entries)
    (out / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": "llama" if layout == "1bitllm" else "bitnet", "hidden_act": act,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch.")}))


def child(step: str, args: list[str]) -> None:
    """Run one step in this (fresh) process and print its peak RSS as JSON on the last line."""
    import bitnet158  # noqa: F401
    from bitnet158 import checkpoint
    from bitnet158.interop import gguf_export, gguf_import, hf_export, hf_import

    start = time.perf_counter()
    if step == "random-packed":  # args: preset, activation, out
        import dataclasses

        from bitnet158.config import preset
        from bitnet158.pack import random_packed
        from bitnet158.packed_layers import PackConfig

        cfg = dataclasses.replace(preset(args[0]), activation=args[1])
        checkpoint.save_packed(random_packed(cfg, PackConfig(format="i2", head="int8")), args[2])
    elif step == "random-hf":
        write_random_hf(Path(args[2]), args[0], args[1])
    elif step == "import-pack":
        hf_import.import_hf(args[0], args[1], pack="i2")
    elif step == "import-latent":
        hf_import.import_hf(args[0], args[1], latent=True)
    elif step == "pack":
        checkpoint.pack_dir(args[0], args[1])
    elif step == "export-gguf":
        gguf_export.export_gguf(args[0], args[1], "tq2_0")
    elif step == "import-gguf":
        gguf_import.import_gguf(args[0], args[1])
    elif step == "export-hf":
        hf_export.save_hf(args[0], args[1])
    elif step == "import-hf":
        hf_import.import_hf(args[0], args[1])
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
    parser.add_argument("--only", choices=["hf", "masters", "gguf"], help="one group of steps")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        child(a.child[0], a.child[1:])
        return
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="convert_memory."))
    work.mkdir(parents=True, exist_ok=True)
    p = {name: work / name for name in ("packed", "hf", "hf-back", "1bitllm", "1bitllm-i2", "bf16", "bf16-i2",
                                        "bf16-latent", "bf16-packed", "model.gguf", "gguf-back")}
    for path in p.values():
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    mb = 1e-6
    worst = [0.0]

    def step(label: str, name: str, src: Path, dst: Path) -> None:
        """Run one step and print its row at once (a later failure loses nothing)."""
        r = _run(name, str(src), str(dst))
        (s_name, s_size), (d_name, d_size) = _largest(src), _largest(dst)
        largest, above = max(s_size, d_size), r["peak"] - base["peak"]
        worst[0] = max(worst[0], above / largest)
        print(f"{label:28s} {_bytes(src) * mb:7,.0f}MB {_bytes(dst) * mb:7,.0f}MB {r['peak'] * mb:8,.0f} MB "
              f"{above * mb:8,.0f} MB {s_size * mb:9,.0f} / {d_size * mb:6,.0f} MB "
              f"({(d_name if d_size >= s_size else s_name)[:16]:16s}) {above / largest:5.2f}x {r['seconds']:5.0f} s",
              flush=True)

    try:
        print(f"preset {a.preset}, files in {work}", flush=True)
        base = _run("baseline")
        print(f"baseline RSS (import bitnet158, torch and the interop modules): {base['peak'] * mb:,.0f} MB")
        print(f"{'step':28s} {'in':>9s} {'out':>9s} {'peak RSS':>10s} {'above base':>11s} "
              f"{'largest tensor (read / written)':>36s} {'ratio':>6s} {'time':>6s}", flush=True)
        if a.only in (None, "masters"):
            for layout in ("1bitllm", "bf16"):
                gen = _run("random-hf", a.preset, layout, str(p[layout]))
                print(f"  wrote random {layout} masters: {_bytes(p[layout] / 'model.safetensors') * mb:,.0f} MB "
                      f"in {gen['seconds']:.0f} s", flush=True)
                step(f"import {layout} → i2", "import-pack", p[layout], p[f"{layout}-i2"])
            step("import bf16 → fp32 latent", "import-latent", p["bf16"], p["bf16-latent"])
            for name in ("1bitllm", "1bitllm-i2", "bf16"):  # disk: only the fp32 form is needed now
                shutil.rmtree(p[name])
            step("pack fp32 → i2", "pack", p["bf16-latent"], p["bf16-packed"])
        if a.only in (None, "gguf"):  # llama.cpp's bitnet graph is SwiGLU: the 2B4T shapes with SiLU gating
            _run("random-packed", a.preset, "swiglu", str(p["packed"]))
            step("export gguf tq2_0 (swiglu)", "export-gguf", p["packed"], p["model.gguf"])
            step("import gguf → i2", "import-gguf", p["model.gguf"], p["gguf-back"])
        if a.only in (None, "hf"):
            shutil.rmtree(p["packed"], ignore_errors=True)
            _run("random-packed", a.preset, "relu2", str(p["packed"]))
            step("export hf (packed)", "export-hf", p["packed"], p["hf"])
            step("import hf (packed)", "import-hf", p["hf"], p["hf-back"])
        print(f"ratio = (peak − baseline) / largest tensor read or written; goal ≤ {GOAL}x: "
              f"{'met' if worst[0] <= GOAL else 'NOT met'} (worst {worst[0]:.2f}x)")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
