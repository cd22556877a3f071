"""lm-evaluation-harness scores a local multiple-choice task through `bitnet158 serve`, and its
log-likelihoods match the ones the library computes directly (not run by CI).

lm-eval is not a dependency of bitnet158: give this script the Python of an environment that has
it (`pip install torch==2.13.0 && pip install 'lm-eval[api]'`), e.g.

    python scripts/lm_eval_check.py --lm-eval-python /path/to/venv/bin/python [--checkpoint DIR] [--batch-size 8]

What it does, all on 127.0.0.1 and local files (no hub, no datasets download):
1. the model: `--checkpoint` (any of our directories with a tokenizer), or by default a tiny random
   packed model with a tokenizer trained on a few lines of text — log-likelihoods of random
   weights mean nothing, but the comparison is exact either way;
2. the tokenizer written as a Hugging Face tokenizer directory, which lm-eval tokenizes with;
3. a 12-question jsonl task and its task yaml (output_type multiple_choice, metric acc);
4. `bitnet158 serve`'s app on a free port;
5. `lm_eval --model local-completions` against /v1/completions, samples logged;
6. every (context, continuation) lm-eval scored, re-scored with one forward of the model here:
   prints the largest difference of the summed log-likelihood and whether the argmax choices agree.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

import bitnet158 as bn
from bitnet158.cache import KVCache
from bitnet158.cli.serve import engine_loader
from bitnet158.config import ModelConfig
from bitnet158.interop.hf_tokenizer import write_hf_tokenizer
from bitnet158.serve.api import create_app
from bitnet158.tokenizer import Tokenizer

QUESTIONS = [
    ("The with statement", ["wraps a block of code.", "returns x plus one.", "prints ten numbers."], 0),
    ("def f(x):\n    return", [" x + 1", " the with statement", " range(10)"], 0),
    ("for i in range(10):\n   ", [" print(i)", " return x", " wraps"], 0),
    ("Python's standard library", ["has many modules.", "is a block of code.", "prints i."], 0),
    ("A list comprehension", ["builds a list.", "closes a file.", "raises an error."], 0),
    ("The import statement", ["loads a module.", "adds one to x.", "wraps a block."], 0),
    ("An exception", ["signals an error.", "prints a number.", "is a loop."], 0),
    ("A dictionary maps", ["keys to values.", "files to blocks.", "x to range."], 0),
    ("The print function", ["writes text.", "imports modules.", "raises errors."], 0),
    ("A class defines", ["a new type.", "a for loop.", "one number."], 0),
    ("The len function", ["counts items.", "opens files.", "defines classes."], 0),
    ("A while loop", ["repeats while true.", "imports a module.", "maps keys."], 0),
]
TEXTS = [q + c for q, cs, _ in QUESTIONS for c in cs] * 5


def tiny_model_dir(out: Path) -> Path:
    tok = Tokenizer.train(TEXTS, vocab_size=400)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_seq_len=256)
    return bn.save_packed(bn.pack_(bn.Transformer(cfg)), out, tok)


def write_task(folder: Path) -> str:
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": cs, "answer": a}) + "\n" for q, cs, a in QUESTIONS))
    (folder / "bitnet158_mc.yaml").write_text(
        "task: bitnet158_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    return "bitnet158_mc"


def direct_loglikelihood(model, tok: Tokenizer, context: str, continuation: str) -> float:
    """What lm-eval asks for, computed here by lm-eval's rules: the context's trailing whitespace
    moves to the continuation; the scored tokens are the context's own tokens followed by the
    tokens of context + continuation past that length; the continuation's log-probabilities summed."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    ids = ctx + whole[len(ctx):]  # the context's own tokens, then the rest of the whole's (not always `whole`)
    with torch.no_grad():  # the inference path: a KV cache, as generation and the server run
        logprobs = model(torch.tensor([ids]), KVCache(model.config, max_len=len(ids)))[0].log_softmax(-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm-eval-python", required=True, help="a Python with lm-eval installed")
    ap.add_argument("--checkpoint", help="our model directory (default: a tiny random packed model)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="lm-eval's batch size: above 1 it sends that many prompts in one /v1/completions request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = Path(args.checkpoint) if args.checkpoint else tiny_model_dir(tmp / "model")
        model, tok = bn.load(ckpt)
        tok_dir = tmp / "hf-tokenizer"
        tok_dir.mkdir()
        write_hf_tokenizer(tok, tok_dir, model.config.max_seq_len)
        task = write_task(tmp)

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = create_app(engine_loader(ckpt, max_concurrency=4, max_queue=64), model_name="bitnet158")
        requests = []  # one entry per POST to /v1/completions: with --batch-size > 1, fewer than prompts

        @app.middleware("http")
        async def count_requests(request, call_next):
            if request.url.path == "/v1/completions":
                requests.append(request.url.path)
            return await call_next(request)

        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        try:
            cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                   f"model=bitnet158,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={tok_dir},"
                   "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
                   "--tasks", task, "--include_path", str(tmp), "--output_path", str(tmp / "out"), "--log_samples",
                   "--batch_size", str(args.batch_size)]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                 env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                      "PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "unused", "HOME": str(tmp)})
        finally:
            server.should_exit = True
        if run.returncode != 0:
            sys.exit(f"lm_eval failed:\n{run.stderr[-3000:]}")
        print(run.stdout[-1500:])
        samples = next((tmp / "out").rglob(f"samples_{task}_*.jsonl"))
        worst, agree, total, scored = 0.0, 0, 0, 0
        for line in samples.read_text().splitlines():
            doc = json.loads(line)
            theirs = [float(r[0][0]) for r in doc["resps"]]
            args_ = doc["arguments"]  # a list of [context, continuation], or {"gen_args_i": {"arg_0", "arg_1"}}
            pairs = [(a["arg_0"], a["arg_1"]) for a in args_.values()] if isinstance(args_, dict) else args_
            ours = [direct_loglikelihood(model, tok, *a) for a in pairs]
            scored += len(pairs)
            diff = max(abs(a - b) for a, b in zip(theirs, ours))
            if diff > 1e-3 and worst <= 1e-3:  # show the first disagreement
                print(f"first mismatch: {pairs[0]!r}: lm-eval {theirs}, direct {ours}")
            worst = max(worst, diff)
            agree += int(max(range(len(ours)), key=ours.__getitem__) == max(range(len(theirs)), key=theirs.__getitem__))
            total += 1
        print(f"{total} questions ({scored} continuations scored in {len(requests)} requests): largest "
              f"|log-likelihood through the server - direct| = {worst:.2e}; argmax choice agrees on {agree}/{total}")
        if not (worst < 1e-3 and agree == total and math.isfinite(worst)):
            sys.exit("MISMATCH")


if __name__ == "__main__":
    main()
