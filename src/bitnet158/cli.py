"""`bitnet158 <verb>`: a thin shell over the library. Each verb imports its module lazily; a user
mistake (BitNetError) prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RUNS = "runs"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model size preset (tiny, small, 700m, 1.3b, 3b, 2b4t)")
    p.add_argument("--mode", default="b158", help="b158 (ternary), b1 (binary) or fp (the twin)")
    p.add_argument("--activation", help="swiglu (default) or relu2 (2B4T)")
    p.add_argument("--norm-placement", help="subln (2B4T block norms, default) or inner (FAQ: RMSNorm in BitLinear)")
    p.add_argument("--data", nargs="+", metavar="PATH", help=".txt/.jsonl/.parquet files or folders "
                   "(default: the embedded corpus: Python's own docs and standard library)")
    p.add_argument("--max-bytes", type=int, help="cap the default corpus's training text at this many bytes")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary to train (default: the preset's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="stage-1 peak LR (default by mode: high for b1.58/b1)")
    p.add_argument("--lr-stage2", type=float, help="stage-2 peak LR (default 2/3 of --lr)")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--schedule", default="auto", help="auto (two-stage for b1.58/b1, cosine for fp), two-stage, cosine")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")


def cmd_demo(args) -> int:
    from .demo import run_demo

    _threads(args.threads)
    run_demo(out=args.out, steps=args.steps, progress=not args.quiet)
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from . import checkpoint
    from .config import TrainConfig, preset
    from .errors import ConfigError
    from .train.prepare import prepare_data
    from .train.trainer import train

    _threads(args.threads)
    out = Path(args.out or f"{DEFAULT_RUNS}/{args.preset}-{args.mode}")
    overrides = {k: v for k, v in {"mode": args.mode, "activation": args.activation,
                                   "norm_placement": args.norm_placement}.items() if v is not None}
    cfg = preset(args.preset, **overrides)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     grad_accum=args.grad_accum, lr=args.lr, lr_stage2=args.lr_stage2, warmup=args.warmup,
                     weight_decay=args.weight_decay, schedule=args.schedule, eval_every=args.eval_every,
                     save_every=args.save_every, seed=args.seed, device=args.device).validate()
    tokenizer = None
    if args.resume:
        _, tokenizer = checkpoint.load(out)
        if tokenizer is None:
            raise ConfigError(f"{out}: the checkpoint has no tokenizer.json to resume with")
    elif out.exists() and any(out.iterdir()):
        if not args.force:
            raise ConfigError(f"{out} already exists; pass --resume to continue it or --force to replace it")
        import shutil
        shutil.rmtree(out)
    prepared = prepare_data(args.data, args.vocab_size or cfg.vocab_size, args.max_bytes, tokenizer=tokenizer)
    cfg = dataclasses.replace(cfg, vocab_size=prepared.tokenizer.vocab_size,
                              max_seq_len=max(cfg.max_seq_len, tc.seq_len))
    result = train(cfg, tc, prepared.tokens.train, prepared.tokens.heldout, tokenizer=prepared.tokenizer,
                   run_dir=out, resume=args.resume, progress=not args.quiet, desc=f"train {cfg.mode}")
    print(f"held-out perplexity {result.final_perplexity:.2f} after {tc.steps} steps; checkpoint: {out}")
    return 0


def cmd_generate(args) -> int:
    from . import checkpoint
    from .errors import CheckpointError
    from .generate import stream_generate
    from .sampling import SamplingConfig

    _threads(args.threads)
    model, tokenizer = checkpoint.load(args.checkpoint)
    if getattr(model, "packing", None) is not None:
        from .bench import use_kernel_threads
        use_kernel_threads(args.threads)
    if tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer.json beside the weights")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty)
    last = None
    sys.stdout.write(args.prompt)
    for last in stream_generate(model, tokenizer, args.prompt, args.max_tokens, sampling, args.seed):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if last is not None and not args.quiet:
        print(f"[{last.prompt_tokens} prompt tokens, {last.generated_tokens} generated, "
              f"{last.tokens_per_second:.1f} tok/s, finish: {last.finish_reason}]", file=sys.stderr)
    return 0


def cmd_pack(args) -> int:
    from . import checkpoint
    from .errors import ConfigError
    from .pack import PackConfig, pack_, packed_linear_bytes

    config = PackConfig(format=args.format, head=args.head).validate()
    model, tokenizer = checkpoint.load(args.checkpoint)
    if getattr(model, "packing", None) is not None:
        raise ConfigError(f"{args.checkpoint} is already packed ({model.packing.describe()})")
    if model.config.mode == "fp":
        raise ConfigError(f"{args.checkpoint} is a full-precision (fp) model; only b158 and b1 models pack")
    linear_params = sum(m.weight.numel() for m in model.modules() if hasattr(m, "quantized_weight"))
    if config.format == "auto":
        print("timing every packed format on each weight shape (format auto) ...", file=sys.stderr)
    pack_(model, config)
    config = model.packing
    out = checkpoint.save_packed(model, args.out, tokenizer, overwrite=args.force)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    packed = packed_linear_bytes(model)
    print(f"packed {linear_params:,} linear weights into {packed / 1e6:.2f} MB ({8 * packed / linear_params:.2f} "
          f"bits each, {config.describe()}; fp16 would be {2 * linear_params / 1e6:.2f} MB), head {config.head}; "
          f"{out} is {size / 1e6:.2f} MB")
    return 0


def cmd_convert(args) -> int:
    from . import checkpoint
    from .errors import ConfigError
    from .train.adapt import convert_model
    from .train.prepare import prepare_data

    _threads(args.threads)
    from .interop.hf_llama import is_hf_directory, load_hf_llama
    if is_hf_directory(args.source):  # a Hugging Face LLaMA-family directory (refuses other architectures)
        src, tokenizer = load_hf_llama(args.source)
    else:
        src, tokenizer = checkpoint.load(args.source)
    if src.config.mode != "fp":
        raise ConfigError(f"{args.source} is a {src.config.mode} model; convert takes a full-precision (fp) one")
    if tokenizer is None:
        raise ConfigError(f"{args.source} has no tokenizer.json to encode the fine-tuning text with")
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    prepared = prepare_data(args.data, tokenizer.vocab_size, args.max_bytes, tokenizer=tokenizer)
    model = convert_model(src, args.method, prepared.tokens.train, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    checkpoint.save(model, out, tokenizer, overwrite=args.force)
    from .train.data import eval_windows
    from .train.trainer import evaluate
    import math
    x, y = eval_windows(prepared.tokens.heldout, args.seq_len, 32)
    print(f"converted with {args.method}: held-out perplexity {math.exp(evaluate(model, x, y)):.2f} "
          f"(FP source {math.exp(evaluate(src, x, y)):.2f}); saved {out}")
    return 0


def cmd_export_hf(args) -> int:
    from .interop.hf_export import save_hf

    layout = "bf16" if args.bf16 else "packed"
    out = save_hf(args.checkpoint, args.out, layout=layout, dtype=args.dtype, overwrite=args.force)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"wrote {out}: Hugging Face BitNetForCausalLM, "
          f"{'latent masters (online quantization)' if args.bf16 else 'packed ternary (autobitlinear, offline)'}, "
          f"{size / 1e6:.2f} MB")
    return 0


def cmd_import_hf(args) -> int:
    import json

    from .interop.hf import import_hf

    out = import_hf(args.directory, args.out, latent=args.latent, overwrite=args.force)
    kind = json.loads((Path(out) / "config.json").read_text()).get("kind")
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    print(f"imported {args.directory} into {out}: "
          f"{'a packed (i2) checkpoint' if kind == 'packed' else 'a training-form checkpoint'}, {size / 1e6:.2f} MB")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    _threads(args.threads)
    run_bench(args.checkpoint, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
              threads=args.threads)
    return 0


def cmd_evidence(args) -> int:
    from .evidence import run_evidence

    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    run_evidence(mode, data=args.data, out=args.out, threads=args.threads, force=args.force,
                 progress=not args.quiet, resume=args.resume)
    return 0


def cmd_export_gguf(args) -> int:
    from .interop.gguf import export_gguf

    r = export_gguf(args.checkpoint, args.out, args.type, overwrite=args.force, scale_tensors=args.scale_tensors)
    notes = [f"FFN padded to {r.ffn_padded_to} with zero weights"] if r.ffn_padded_to else []
    if r.type in ("tq1_0", "tq2_0") and not args.scale_tensors:
        notes.append(f"fp16 block scales: max relative scale error {r.max_scale_rel_error:.2e}")
    if not r.tokenizer:
        notes.append("no tokenizer (no_vocab)")
    print(f"wrote {r.path} ({r.type}, {r.tensors} tensors, {r.bytes / 1e6:.2f} MB)" + "".join(f"; {n}" for n in notes))
    return 0


def cmd_import_gguf(args) -> int:
    from .interop.gguf import import_gguf_to_dir

    out, model = import_gguf_to_dir(args.file, args.out, format=args.format, overwrite=args.force)
    info = model.gguf_import
    note = (f"; {len(info['ternarized'])} float tensors absmean-ternarized (not exact)" if info["ternarized"] else "")
    print(f"imported {args.file} ({', '.join(info['types'])}) into packed {args.format} directory {out}{note}")
    return 0


def cmd_info(args) -> int:
    from . import checkpoint

    directory = checkpoint.resolve(args.checkpoint)
    model, tokenizer = checkpoint.load(directory)
    cfg, stats = model.config, model.stats()
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    print(f"checkpoint      {directory}  ({size / 1e6:.1f} MB on disk)")
    packing = getattr(model, "packing", None)
    if packing is not None:
        from .pack import packed_linear_bytes
        print(f"packed          format {packing.describe()}, head {packing.head}; linear weights "
              f"{packed_linear_bytes(model) / 1e6:.2f} MB ({8 * packed_linear_bytes(model) / stats['linear_parameters']:.2f} bits each)")
    print(f"mode            {cfg.mode}  (linear weights: {stats['linear_weight_bits']:.2f} bits each)")
    print(f"architecture    {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads} kv, ffn {cfg.intermediate_size} {cfg.activation}, norms {cfg.norm_placement}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings, context {cfg.max_seq_len}")
    print(f"parameters      {stats['parameters']:,} total; {stats['linear_parameters']:,} in BitLinear "
          f"layers ({stats['linear_weight_megabytes']:.2f} MB at {stats['linear_weight_bits']:.2f} bits); "
          f"{stats['embedding_parameters']:,} embedding")
    print(f"tokenizer       {tokenizer.vocab_size if tokenizer else 'none'}"
          f"{' tokens (byte-level BPE)' if tokenizer else ''}")
    return 0


def _threads(n: int | None) -> None:
    if n is not None:
        import torch

        from .errors import ConfigError
        if n < 1:
            raise ConfigError(f"--threads must be at least 1, got {n}")
        torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitnet158", description="1.58-bit BitNet models on a CPU")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("demo", help="train BitNet b1.58 and its FP twin on the embedded corpus and compare")
    p.add_argument("--out", default=f"{DEFAULT_RUNS}/demo")
    p.add_argument("--steps", type=int, help="training steps per model (default: sized for ~10 min)")
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a model")
    _add_train_options(p)
    p.add_argument("--out", help=f"run directory (default {DEFAULT_RUNS}/PRESET-MODE)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest step")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a checkpoint (streams to the terminal)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--quiet", action="store_true", help="no statistics line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("pack", help="pack a b1.58/b1 checkpoint for the fast CPU runtime")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--format", default="i2", help="i2 (2 bits/weight), base3 (1.6 bits/weight), lut2 (2 bits, for the "
                   "multiplication-free kernel) or auto (each weight shape in the fastest, timed on this machine)")
    p.add_argument("--head", default="int8", help="output head: int8 per row (default), fp16 or fp32")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("convert", help="turn a full-precision checkpoint into a b1.58 one")
    p.add_argument("source", help="an fp checkpoint (e.g. runs/demo/fp) or a Hugging Face LLaMA, Mistral "
                   "or Qwen2 directory")
    p.add_argument("out")
    p.add_argument("--method", default="adaround,lambda,distill",
                   help="comma-separated: rtn, adaround, lambda, quant-noise, qat, distill")
    p.add_argument("--data", nargs="+", metavar="PATH", help="fine-tuning text (default: the embedded corpus)")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="cap the default corpus's training text")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face BitNetForCausalLM directory")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--bf16", action="store_true", help="latent master weights (quantization_mode online) "
                   "instead of packed ternary codes; also the way to export an fp model")
    p.add_argument("--dtype", help="float tensors' storage: float32 (default for packed), bfloat16 "
                   "(default with --bf16) or float16")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="turn a Hugging Face BitNet directory into a bitnet158 checkpoint")
    p.add_argument("directory", help="BitNetForCausalLM (packed or bf16 masters) or 1bitLLM BitnetForCausalLM")
    p.add_argument("out")
    p.add_argument("--latent", action="store_true", help="a training-form checkpoint even from packed codes "
                   "(latent weights that re-quantize to the same codes and scales)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("bench", help="prefill and decode speed of a checkpoint (packed or not)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("evidence", help="the papers' claims measured on our models beside an FP twin: "
                       "report.md, results.json, plots")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized (default): about 3 minutes on 2 cores")
    size.add_argument("--full", action="store_true", help="the real comparison: about 75 minutes on 2 cores (--resume continues a stopped run)")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # internal: the test suite's run
    p.add_argument("--data", nargs="+", metavar="PATH", help="training text for the quality part "
                   "(default: the embedded corpus)")
    p.add_argument("--out", default=f"{DEFAULT_RUNS}/evidence")
    p.add_argument("--threads", type=int, help="threads for training and timing (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace a report (and its training runs) already in --out")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --out (same mode and data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evidence)

    p = sub.add_parser("export-gguf", help="write a GGUF that llama.cpp runs (arch bitnet; tq2_0, tq1_0, i2_s, f16)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="tq2_0", help="tq2_0 (default), tq1_0, i2_s (bitnet.cpp) or f16")
    p.add_argument("--scale-tensors", action="store_true",
                   help="TQ types: unit block scales plus an exact fp32 per-tensor .scale tensor")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("import-gguf", help="read a TQ1_0/TQ2_0/I2_S/F16/BF16 bitnet GGUF into a packed directory")
    p.add_argument("file")
    p.add_argument("out", help="the packed bitnet158 directory to write")
    p.add_argument("--format", default="i2", help="packed layout: i2 (default) or base3")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_import_gguf)

    p = sub.add_parser("info", help="what a checkpoint holds: config, parameter counts, bits")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import BitNetError

    try:
        return args.func(args)
    except BitNetError as e:
        print(f"bitnet158: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitnet158: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
