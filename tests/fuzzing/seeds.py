"""Small valid inputs for every reader, built once into a folder: `root/<reader>/<variant>/`.

Every seed is a folder; `main_path` says what the reader is handed (the folder itself, or the one
file in it). Models are tiny (hidden 16, one layer; 256 for GGUF, whose ternary blocks are 256
wide) so that a case costs milliseconds and the fuzzer's time goes to the mutations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import bitnet158 as bn
from bitnet158 import checkpoint
from bitnet158.tokenizer import DEFAULT_EOS, Tokenizer

TEXT = ["def f(x):\n    return x * 2  # é ü 中文\n", "the quick brown fox jumps over the lazy dog.\n",
        "Lists [1, 2, 3] and {'a': 1} and 3.14159 - naïve café ☕\n"]
BOS, EOT = "<|begin_of_text|>", "<|eot_id|>"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# what the reader is handed: the seed folder or this file inside it
MAIN_FILE = {"gguf": "model.gguf", "tokenizer": "tokenizer.json"}
DATA_FILES = {"txt": "corpus.txt", "jsonl": "corpus.jsonl", "parquet": "corpus.parquet"}


def main_path(reader: str, variant: str, case_dir: Path) -> Path:
    if reader == "data":
        return case_dir / DATA_FILES[variant]
    return case_dir / MAIN_FILE[reader] if reader in MAIN_FILE else case_dir


def _tokenizer() -> Tokenizer:
    tok = Tokenizer.train(TEXT * 30, vocab_size=300, special_tokens=(DEFAULT_EOS, BOS, EOT))
    return tok.replace(bos_token=BOS, end_tokens=[DEFAULT_EOS, EOT], add_bos=True, chat_template=TEMPLATE)


def _model(tok: Tokenizer, hidden: int = 16, ffn: int = 32, **changes) -> bn.Transformer:
    torch.manual_seed(0)
    cfg = bn.preset("tiny", vocab_size=tok.vocab_size, hidden_size=hidden, num_layers=1, num_heads=2,
                    num_kv_heads=1, intermediate_size=ffn, max_seq_len=32, **changes)
    return bn.Transformer(cfg)


def _packed(tok: Tokenizer, fmt: str, head: str) -> bn.Transformer:
    return bn.pack_(_model(tok), bn.PackConfig(format=fmt, head=head))


def _run(tok: Tokenizer, out: Path) -> None:
    """A training run with two step directories and the optimizer state a resume reads."""
    model = _model(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, tok.vocab_size, (2, 8))
    for step in (1, 2):
        loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        state = {"history": [{"step": step, "loss": loss.item()}], "evals": [], "seconds": 0.5 * step}
        checkpoint.save_training_checkpoint(out, step, model, tok, opt, state)


def _data(out: Path) -> None:
    out.mkdir(parents=True)
    (out / "txt").mkdir()
    (out / "txt" / DATA_FILES["txt"]).write_text("".join(TEXT * 4), encoding="utf-8")
    (out / "jsonl").mkdir()
    rows = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXT * 3)]
    (out / "jsonl" / DATA_FILES["jsonl"]).write_text("\n".join(rows) + "\n", encoding="utf-8")
    try:
        import pyarrow as pa  # optional (the parquet extra): without it there is no parquet seed
        import pyarrow.parquet as pq
    except ImportError:
        return
    (out / "parquet").mkdir()
    pq.write_table(pa.table({"text": TEXT * 3, "n": list(range(9))}), out / "parquet" / DATA_FILES["parquet"])


def build_seeds(root: Path) -> dict[str, list[str]]:
    """Write every seed under `root`; return reader → its variants (sub-folder names)."""
    from bitnet158.interop import save_hf
    from bitnet158.interop.gguf_export import export_gguf

    root = Path(root)
    tok = _tokenizer()
    checkpoint.save(_model(tok), root / "model" / "b158", tok)
    checkpoint.save(_model(tok, activation="relu2", tie_embeddings=False), root / "model" / "relu2")
    checkpoint.save_packed(_packed(tok, "i2", "int8"), root / "packed" / "i2", tok)
    checkpoint.save_packed(_packed(tok, "base3", "fp16"), root / "packed" / "base3", tok)
    checkpoint.save_packed(_packed(tok, "lut2", "fp32"), root / "packed" / "lut2", tok)
    _run(tok, root / "run" / "two-steps")
    save_hf(_model(tok), root / "hf" / "packed", tokenizer=tok)
    save_hf(_model(tok), root / "hf" / "bf16", tokenizer=tok, layout="bf16")
    save_hf(_model(tok), root / "hf" / "sharded", tokenizer=tok, max_shard_bytes=4_000)
    for gtype in ("tq2_0", "i2_s", "f16"):
        (root / "gguf" / gtype).mkdir(parents=True)
        export_gguf(_model(tok, hidden=256, ffn=256), root / "gguf" / gtype / MAIN_FILE["gguf"], gtype,
                    tokenizer=tok)
    (root / "tokenizer" / "chat").mkdir(parents=True)
    tok.save(root / "tokenizer" / "chat" / MAIN_FILE["tokenizer"])
    _data(root / "data")
    return {reader: sorted(p.name for p in (root / reader).iterdir()) for reader in
            ("model", "packed", "run", "hf", "gguf", "tokenizer", "data")}
