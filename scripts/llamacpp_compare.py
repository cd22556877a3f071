"""Compare our model with upstream llama.cpp running our GGUF export (used by check_llamacpp.sh).

For every GGUF given, llama.cpp's logits come from the llama-cpp-python bindings over a libllama
built from the vendored llama.cpp sources (LLAMA_CPP_LIB_PATH), so it is upstream's loader, graph
and TQ kernels that run. The same held-out token chunks go through our fp32 checkpoint, and the
script prints: next-token argmax agreement, perplexity on both sides, and (for the TQ files) what
the fp16 rounding of the per-tensor scale costs on its own.

    python scripts/llamacpp_compare.py --model runs/demo/b158 --text heldout.txt --ctx 256 a.gguf b.gguf
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def chunk_nll(logits: np.ndarray, tokens: np.ndarray, first: int = 0) -> tuple[float, int]:
    """Summed next-token NLL over positions [first, len-1) of one chunk, and their count."""
    lg = torch.from_numpy(np.ascontiguousarray(logits[first:-1], dtype=np.float32))
    target = torch.from_numpy(tokens[first + 1:].astype(np.int64))
    nll = torch.nn.functional.cross_entropy(lg, target, reduction="sum")
    return float(nll), len(target)


def ours(model, chunks: list[np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.from_numpy(c.astype(np.int64))[None])[0].numpy() for c in chunks]


def theirs(gguf_path: str, chunks: list[np.ndarray], ctx: int, threads: int) -> tuple[list[np.ndarray], object]:
    from llama_cpp import Llama

    # F32 KV cache (type 0): the default F16 cache alone moves logits by ~3e-2 (FORMATS §8)
    llm = Llama(model_path=gguf_path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, type_k=0, type_v=0, verbose=False)
    out = []
    for c in chunks:
        llm.reset()
        llm.eval(c.tolist())
        out.append(np.array(llm.scores[:len(c)], dtype=np.float32))
    return out, llm


def summarize(name: str, ref: list[np.ndarray], got: list[np.ndarray], chunks: list[np.ndarray]) -> dict:
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    total = sum(len(c) for c in chunks)
    full = [chunk_nll(g, c) for g, c in zip(got, chunks)]
    half = [chunk_nll(g, c, first=len(c) // 2) for g, c in zip(got, chunks)]  # llama-perplexity's scoring
    return {"name": name, "agree": agree / total, "positions": total,
            "ppl": math.exp(sum(n for n, _ in full) / sum(k for _, k in full)),
            "ppl_half": math.exp(sum(n for n, _ in half) / sum(k for _, k in half)),
            "max_abs_logit_diff": max(float(np.abs(r - g).max()) for r, g in zip(ref, got))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ggufs", nargs="+")
    ap.add_argument("--model", required=True, help="our checkpoint directory")
    ap.add_argument("--text", required=True, help="held-out text file")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=0, help="0 = all whole chunks of the text")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from bitnet158 import checkpoint
    from bitnet158.interop.gguf_export import export_gguf
    from bitnet158.interop.gguf_import import load_gguf

    torch.set_num_threads(args.threads)
    model, tok = checkpoint.load(args.model)
    model.eval()
    ids = np.array(tok.encode(Path(args.text).read_text(encoding="utf-8")), dtype=np.int64)
    n = len(ids) // args.ctx if not args.chunks else min(args.chunks, len(ids) // args.ctx)
    chunks = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(n)]
    print(f"held-out text: {len(ids)} tokens (ours); {n} chunks of {args.ctx}")
    ref = ours(model, chunks)
    base = summarize("ours (fp32 checkpoint)", ref, ref, chunks)
    print(f"  {base['name']:<34} ppl {base['ppl']:.4f}   ppl (2nd halves, llama-perplexity style) "
          f"{base['ppl_half']:.4f}")

    ok = True
    for path in args.ggufs:
        got, llm = theirs(path, chunks, args.ctx, args.threads)
        text = Path(args.text).read_text(encoding="utf-8")
        their_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        same = sum(int(a == b) for a, b in zip(their_ids, ids.tolist()))
        s = summarize(f"llama.cpp {Path(path).name}", ref, got, chunks)
        rel = abs(s["ppl"] - base["ppl"]) / base["ppl"]
        print(f"  {s['name']:<34} ppl {s['ppl']:.4f} ({100 * rel:+.3f}% vs ours, |Δ| {100 * rel:.3f}%)   "
              f"2nd halves {s['ppl_half']:.4f}   argmax agreement {100 * s['agree']:.2f}% of {s['positions']}   "
              f"max |Δlogit| {s['max_abs_logit_diff']:.3g}")
        print(f"  {'':<34} llama.cpp's tokenizer: {len(their_ids)} tokens, "
              f"{'identical to ours' if their_ids == ids.tolist() else f'{same} leading-aligned positions equal'}")
        ok &= s["agree"] >= 0.98 and rel <= 0.01
        del llm

    # the fp16 block scale on its own: the same export with exact fp32 scale tensors vs fp16 block scales
    with tempfile.TemporaryDirectory() as d:
        exact, _ = load_gguf(export_gguf(model, f"{d}/x.gguf", "tq2_0", tokenizer=tok, scale_tensors=True).path)
        r16 = export_gguf(model, f"{d}/h.gguf", "tq2_0", tokenizer=tok)
        half, _ = load_gguf(r16.path)
        a, b = ours(exact, chunks), ours(half, chunks)
        sa, sb = summarize("exact", a, a, chunks), summarize("fp16", a, b, chunks)
        print(f"fp16 block scales: max relative scale error {r16.max_scale_rel_error:.3e}; packed model with "
              f"fp16 scales vs exact fp32 scales: ppl {sb['ppl']:.5f} vs {sa['ppl']:.5f} "
              f"({100 * (sb['ppl'] - sa['ppl']) / sa['ppl']:+.4f}%), argmax agreement {100 * sb['agree']:.2f}%, "
              f"max |Δlogit| {sb['max_abs_logit_diff']:.3g}")
    print("PASS" if ok else "FAIL", "(argmax agreement >= 98% and perplexity within 1% for every file)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
