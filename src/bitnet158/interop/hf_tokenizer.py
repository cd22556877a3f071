"""Hugging Face tokenizer files ⇄ our Tokenizer, special-token roles and chat template included.

An HF model directory spreads its tokenizer over several files; the reader gathers them:

    tokenizer.json          the vocabulary, merges, pre-tokenizer, post-processor
    tokenizer.model         (when there is no tokenizer.json) a SentencePiece BPE model, converted
    tokenizer_config.json   bos_token / eos_token (a string or {"content": ...}), add_bos_token,
                            chat_template (a string, or a list of {"name", "template"}: "default")
    chat_template.jinja     the template as its own file (newer transformers); wins when present
    generation_config.json  eos_token_id: an int or a LIST (LLaMA 3: <|end_of_text|>, <|eot_id|>),
                            bos_token_id
    config.json             bos_token_id / eos_token_id, the last resort

End tokens are the union of tokenizer_config's eos and every eos id of generation_config and
config.json, eos first. Ids there must name an *added* token: transformers writes its config
classes' default ids whatever the tokenizer is, so an id that lands on an ordinary BPE piece is
not an end marker and is skipped. Whether bos is added comes from add_bos_token, else from a
post-processor whose single-sequence template starts with a special token (LLaMA 3's
TemplateProcessing), which also names bos when nothing else does.

The writer emits tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer
reads back to the same bos / eos / add_bos / chat template, and returns the ids that belong in
config.json and generation_config.json (eos_token_id a list when there are several end tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError, first_line
from ..fileio import atomic_write_json
from ..tokenizer import DEFAULT_EOS, Tokenizer, read_backend
from ..jsonio import read_json_object
from .spm_tokenizer import sentencepiece_backend

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model")  # the first present is read


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."



def _token_text(value: Any, path: Path, key: str) -> str | None:
    """A special token as tokenizer_config.json spells it: "text" or {"content": "text", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: {key} must be a string or {{\"content\": string}}, "
                              f"got {_short(value)}")
    return value


def _ids(value: Any, path: Path, key: str) -> list[int]:
    values = [] if value is None else value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise CheckpointError(f"{path}: {key} must be an integer or a list of integers, got {_short(value)}")
    return values


def _chat_template(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: transformers uses "default" unless told otherwise
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise CheckpointError(f"{path}: chat_template entries must be {{\"name\": string, "
                                      f"\"template\": string}}, got {_short(entry)}")
            named[entry["name"]] = entry["template"]
        return named.get("default")
    raise CheckpointError(f"{path}: chat_template must be a string or a list of named templates, "
                          f"got {_short(value)}")


def _post_processor_bos(doc: dict[str, Any]) -> str | None:
    """The special token a TemplateProcessing post-processor puts first in a single sequence (as
    LLaMA 3's does with <|begin_of_text|>), or None. Looked for inside a Sequence too."""
    proc = doc.get("post_processor")
    procs = proc.get("processors") if isinstance(proc, dict) and proc.get("type") == "Sequence" else [proc]
    for p in procs if isinstance(procs, list) else []:
        if not isinstance(p, dict) or p.get("type") != "TemplateProcessing":
            continue
        single = p.get("single")
        first = single[0] if isinstance(single, list) and single else None
        if not isinstance(first, dict) or not isinstance(first.get("SpecialToken"), dict):
            return None
        name = first["SpecialToken"].get("id")
        special = (p.get("special_tokens") or {}).get(name)
        tokens = special.get("tokens") if isinstance(special, dict) else None
        if isinstance(tokens, list) and len(tokens) == 1 and isinstance(tokens[0], str):
            return tokens[0]
        return name if isinstance(name, str) else None
    return None


def read_hf_tokenizer(directory: Path, config_doc: dict[str, Any] | None = None, *,
                      file: Path | None = None) -> Tokenizer | None:
    """Our Tokenizer from an HF model directory (see the module docstring), or None when it has
    neither a tokenizer.json nor a SentencePiece tokenizer.model (converted, spm_tokenizer.py).
    `config_doc`: config.json already parsed (read from the directory otherwise); `file`: the
    vocabulary file to use instead of the directory's. Every problem is a one-line
    CheckpointError naming the file."""
    directory = Path(directory)
    tok_path = file or next((directory / name for name in VOCABULARY_FILES if (directory / name).is_file()), None)
    if tok_path is None:
        return None
    if tok_path.suffix == ".model":
        backend = sentencepiece_backend(tok_path)
        backend_doc = {}  # a converted model has no post-processor of its own
    else:
        backend = read_backend(tok_path)
        backend_doc = read_json_object(tok_path)
    added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}

    tc_path = directory / "tokenizer_config.json"
    tc = read_json_object(tc_path) if tc_path.is_file() else {}
    bos = _token_text(tc.get("bos_token"), tc_path, "bos_token")
    eos = _token_text(tc.get("eos_token"), tc_path, "eos_token")
    add_bos = tc.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise CheckpointError(f"{tc_path}: add_bos_token must be true or false, got {_short(add_bos)}")
    template = _chat_template(tc.get("chat_template"), tc_path)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{jinja}: not a readable template ({first_line(exc)})") from None

    gen_path, cfg_path = directory / "generation_config.json", directory / "config.json"
    gen = read_json_object(gen_path) if gen_path.is_file() else {}
    if config_doc is None:
        config_doc = read_json_object(cfg_path) if cfg_path.is_file() else {}
    ends: list[str] = [eos] if eos is not None else []
    bos_candidates: list[str] = [bos] if bos is not None else []
    for doc, path in ((gen, gen_path), (config_doc, cfg_path)):
        ends += [added[i] for i in _ids(doc.get("eos_token_id"), path, "eos_token_id") if i in added]
        bos_ids = _ids(doc.get("bos_token_id"), path, "bos_token_id")
        bos_candidates += [added[i] for i in bos_ids if i in added]
    ends = list(dict.fromkeys(ends))

    # the post-processor is only asked when the config files leave bos or add_bos open
    template_bos = _post_processor_bos(backend_doc) if add_bos is None or not bos_candidates else None
    bos = bos_candidates[0] if bos_candidates else template_bos
    if add_bos is None:  # LLaMA's SentencePiece tokenizers start every prompt with bos by default
        add_bos = bos is not None and (template_bos == bos or tok_path.suffix == ".model")
    try:
        return Tokenizer(backend, ends[0] if ends else DEFAULT_EOS, bos_token=bos, end_tokens=ends,
                         add_bos=add_bos, chat_template=template)
    except CheckpointError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> dict[str, Any]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir` (each atomically); return
    {"bos_token_id": int | None, "eos_token_id": int or list of ints} for config.json and
    generation_config.json.

    A tokenizer without a bos of its own (an old checkpoint's) gets eos as bos, GPT-2's convention
    and what HF expects to find; add_bos_token is written either way, since transformers rebuilds
    the post-processor from it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_id
    if bos is None:
        bos, bos_id = tokenizer.eos_token, tokenizer.eos_id
    doc: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos, "add_eos_token": False, "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template is not None:  # base models trained on raw text have no chat format
        doc["chat_template"] = tokenizer.chat_template
    tokenizer.save(out_dir / "tokenizer.json")
    atomic_write_json(out_dir / "tokenizer_config.json", doc)
    end_ids = list(tokenizer.end_ids)
    return {"bos_token_id": bos_id, "eos_token_id": end_ids[0] if len(end_ids) == 1 else end_ids}


__all__ = ["read_hf_tokenizer", "write_hf_tokenizer"]
