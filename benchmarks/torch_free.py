"""The torch-free runtime against the torch path on one packed model, in one run: resident memory
before any weight is loaded (the interpreter plus what each path imports), after loading, at the
peak of decoding, and decode tokens/s.

Each path runs in its own fresh process, so its memory is its own. Both decode the same prompt
greedily through `generate.PromptCache` (the same driver, the same native step); the torch path
imports torch and bitnet158's torch model, the runtime only numpy, tokenizers and the extension.

    python benchmarks/torch_free.py                    # a random packed model at the 2B4T shapes
    python benchmarks/torch_free.py --preset tiny      # seconds instead of a minute
    python benchmarks/torch_free.py --checkpoint runs/demo/b158-i2

Goal (edge-devices issue): the torch-free process holds at most 60 MB before loading weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, time
def rss(key="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
interpreter = rss()
path, which, prompt_len, tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
from bitnet158 import native
from bitnet158.generate import PromptCache
if which == "native":
    from bitnet158 import runtime
    native.current_path()                      # the extension loaded and its path chosen
    before = rss()
    model, _ = runtime.load(path, with_tokenizer=False)
    native.set_num_threads(threads)
else:
    import torch
    from bitnet158 import checkpoint, kernels
    from bitnet158.bench import use_kernel_threads
    kernels.current_path()
    before = rss()
    model, _ = checkpoint.load(path, with_tokenizer=False)
    use_kernel_threads(threads)
loaded = rss()
cache = PromptCache(model, max_len=prompt_len + tokens + 1)
ids = [(7 * i + 3) % model.config.vocab_size for i in range(prompt_len)]
logits = cache.prefill(model, ids)[-1]
token = int(logits.argmax())
cache.feed(model, token)                       # warm-up
start = time.perf_counter()
for _ in range(tokens):
    token = int(cache.feed(model, token).argmax())
seconds = time.perf_counter() - start
print(json.dumps({"interpreter": interpreter, "before_weights": before, "loaded": loaded, "peak": rss("VmHWM:"),
                  "tok_s": tokens / seconds, "torch_imported": "torch" in sys.modules}))
"""


def probe(path: Path, which: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), which, str(args.prompt), str(args.tokens),
                          str(args.threads)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{which} probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def random_packed_dir(preset_name: str, fmt: str, root: Path) -> Path:
    """A packed directory with random ternary codes (speed and memory do not depend on values)."""
    from bitnet158 import checkpoint
    from bitnet158.config import preset
    from bitnet158.pack import random_packed
    from bitnet158.packed_layers import PackConfig

    model = random_packed(preset(preset_name), PackConfig(format=fmt))
    out = root / f"{preset_name}-{fmt}"
    checkpoint.save_packed(model, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a packed directory (default: a random one at --preset shapes)")
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--format", default="i2")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled first")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two paths (speed: best)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else random_packed_dir(args.preset, args.format, Path(tmp))
        runs: dict[str, list[dict]] = {"torch": [], "native": []}
        for _ in range(args.rounds):
            for which in runs:
                runs[which].append(probe(path, which, args))
    mb = 1e6
    print(f"{path.name if args.checkpoint else args.preset + ' shapes, ' + args.format}: {args.threads} thread(s), "
          f"prompt {args.prompt}, {args.tokens} decode steps, best of {args.rounds} alternating rounds")
    print(f"{'path':<8}{'interpreter':>13}{'before weights':>16}{'after load':>12}{'decode peak':>13}"
          f"{'tok/s':>9}  torch imported")
    best = {}
    for which, results in runs.items():
        r = results[0]
        best[which] = max(x["tok_s"] for x in results)
        print(f"{which:<8}{r['interpreter'] / mb:>10.1f} MB{r['before_weights'] / mb:>13.1f} MB{r['loaded'] / mb:>9.1f} MB"
              f"{r['peak'] / mb:>10.1f} MB{best[which]:>9.2f}  {r['torch_imported']}")
    native, torch_path = runs["native"][0], runs["torch"][0]
    print(f"before weights: torch-free {native['before_weights'] / mb:.1f} MB (goal <= 60 MB), "
          f"{torch_path['before_weights'] / native['before_weights']:.1f}x less than the torch path's "
          f"{torch_path['before_weights'] / mb:.1f} MB; decode peak {native['peak'] / mb:.1f} MB vs "
          f"{torch_path['peak'] / mb:.1f} MB; decode tokens/s torch-free / torch = {best['native'] / best['torch']:.2f}")


if __name__ == "__main__":
    main()
