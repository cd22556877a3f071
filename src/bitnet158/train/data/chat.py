"""Chat fine-tuning data: conversations → tokens with an assistant-only loss mask → fixed windows.

A JSONL row is {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} or
{"prompt": ..., "completion": ...} (optionally "system"), a one-turn conversation. Each
conversation is rendered with the model's chat template exactly as `chat` renders prompts, and
split into segments: the text each assistant turn adds after its generation prompt is the
assistant's (its end-of-turn token included, so the model learns to stop), the rest is prompt.
Segments are encoded one by one, so a prompt's tokens are the ones inference sees.

Samples are packed whole into windows of seq_len + 1 tokens (one is cut to the window when longer);
only assistant tokens are targets, and the first token of each sample is never one, so no loss
crosses from one sample into the next. (Attention still sees earlier samples of the window: the
model takes no block mask.) Held-out conversations are a seeded sample of whole conversations.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ...chat_template import ChatTemplateError, chat_template_for, render_chat, validate_messages
from ...errors import ConfigError, DataError
from ...jsonio import parse_json_line
from ...tokenizer import Tokenizer

IGNORE = -100  # a target that is not scored (the trainer's and F.cross_entropy's ignore index)
MAX_FILE_BYTES = 2 * 2**30


@dataclass
class ChatSample:
    ids: list[int]
    assistant: list[bool]  # per token: is it the assistant's (a loss target)?


@dataclass
class ChatData:
    """Packed windows: inputs and targets [n, seq_len] int64 (targets IGNORE where not scored)."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    heldout_inputs: torch.Tensor
    heldout_targets: torch.Tensor
    conversations: int
    heldout_conversations: int
    truncated: int  # samples cut to the window

    @property
    def train_target_tokens(self) -> int:
        return int((self.train_targets != IGNORE).sum())


def read_conversations(path: str | os.PathLike) -> list[tuple[str, list[dict[str, Any]]]]:
    """(where, messages) for every non-blank row of a JSONL file; `where` is "file:line"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such chat data file" if not path.exists() else f"{path}: not a regular file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise DataError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes")
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8") from None
            if not line.strip():
                continue
            out.append((where, _messages_of(parse_json_line(line, where), where)))
    if not out:
        raise DataError(f"{path}: no conversations (an empty chat data file)")
    return out


def _messages_of(row: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with \"messages\" or \"prompt\" and \"completion\"")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise DataError(f"{where}: prompt and completion must be strings")
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
        if isinstance(row.get("system"), str):
            messages.insert(0, {"role": "system", "content": row["system"]})
    else:
        raise DataError(f"{where}: expected \"messages\" or \"prompt\" and \"completion\"")
    try:
        messages = validate_messages(messages)
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the conversation starts with the assistant; start with a system or user turn")
    return messages


def chat_segments(template: str, messages: list[dict[str, Any]], *, bos_token: str | None,
                  eos_token: str | None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces in order. Assistant turn i is what
    rendering messages[:i+1] adds to the prompt for messages[:i] (generation prompt included)."""
    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        return render_chat(template, msgs, add_generation_prompt=gen, bos_token=bos_token, eos_token=eos_token)

    full = render(messages, False)
    pieces, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[:i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done):
            raise ChatTemplateError(f"the chat template does not render turn {i + 1} as its prompt plus the "
                                    "answer (a template that rewrites earlier turns), so the assistant's tokens "
                                    "cannot be found")
        pieces += [(full[done:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        done = len(upto)
    pieces.append((full[done:], False))
    return [(text, mine) for text, mine in pieces if text]


def encode_conversation(tokenizer: Tokenizer, messages: list[dict[str, Any]],
                        template: str | None = None) -> ChatSample:
    """Token ids of a conversation and which of them are the assistant's."""
    template = chat_template_for(tokenizer, template)
    ids: list[int] = []
    assistant: list[bool] = []
    for text, mine in chat_segments(template, messages, bos_token=tokenizer.bos_token,
                                    eos_token=tokenizer.eos_token):
        piece = tokenizer.encode(text)
        ids += piece
        assistant += [mine] * len(piece)
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)  # as encode_prompt does at inference
        assistant.insert(0, False)
    return ChatSample(ids, assistant)


def pack_samples(samples: Sequence[ChatSample], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs, targets [n, seq_len], samples cut) from whole samples laid end to end, a window of
    seq_len + 1 tokens at a time; a sample that does not fit the rest of a window starts the next."""
    width = seq_len + 1
    windows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    tgt: list[int] = []
    truncated = 0
    for sample in samples:
        s_ids, s_mask = sample.ids, sample.assistant
        if len(s_ids) > width:
            s_ids, s_mask, truncated = s_ids[:width], s_mask[:width], truncated + 1
        if not any(s_mask[1:]):
            continue  # cut before its answer: nothing to learn
        if len(ids) + len(s_ids) > width:
            windows.append((ids, tgt))
            ids, tgt = [], []
        ids += s_ids
        # a sample's first token is never a target: no loss reaches across from the sample before
        tgt += [IGNORE] + [t if m else IGNORE for t, m in zip(s_ids[1:], s_mask[1:])]
    if ids:
        windows.append((ids, tgt))
    if not windows:
        return torch.empty(0, seq_len, dtype=torch.long), torch.empty(0, seq_len, dtype=torch.long), truncated
    full_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    full_tgt = torch.full((len(windows), width), IGNORE, dtype=torch.long)
    for row, (w_ids, w_tgt) in enumerate(windows):
        full_ids[row, :len(w_ids)] = torch.tensor(w_ids)
        full_tgt[row, :len(w_tgt)] = torch.tensor(w_tgt)
    return full_ids[:, :-1], full_tgt[:, 1:], truncated


def split_heldout(n: int, fraction: float, seed: int) -> set[int]:
    """Indices of the held-out conversations: a seeded `fraction` of n (at least one when n ≥ 2)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"held-out fraction must be in [0, 1), got {fraction!r}")
    count = 0 if fraction == 0.0 or n < 2 else max(1, round(n * fraction))
    return set(random.Random(seed).sample(range(n), count))


def prepare_chat_data(conversations: Sequence[tuple[str, list[dict[str, Any]]]], tokenizer: Tokenizer,
                      seq_len: int, *, heldout: float = 0.1, seed: int = 0, template: str | None = None,
                      groups: Sequence[str] | None = None) -> ChatData:
    """Encode, split and pack into windows; a template error names the row. The held-out share is
    of whole conversations, or of whole `groups` (one key per conversation, e.g. its topic)."""
    samples = []
    for where, messages in conversations:
        try:
            samples.append(encode_conversation(tokenizer, messages, template))
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: {e}") from None
    if groups is None:
        held = split_heldout(len(samples), heldout, seed)
    else:
        keys = sorted(set(groups))
        held_keys = {keys[i] for i in split_heldout(len(keys), heldout, seed)}
        held = {i for i, g in enumerate(groups) if g in held_keys}
    order = list(range(len(samples)))
    random.Random(seed + 1).shuffle(order)  # windows mix conversations from all over the file
    train = [samples[i] for i in order if i not in held]
    test = [samples[i] for i in order if i in held]
    tr_in, tr_tg, cut1 = pack_samples(train, seq_len, tokenizer.eos_id)
    he_in, he_tg, cut2 = pack_samples(test, seq_len, tokenizer.eos_id)
    if tr_in.shape[0] == 0:
        raise DataError(f"no training window has an assistant token at seq_len {seq_len} "
                        "(answers cut off by the window? raise --seq-len)")
    return ChatData(tr_in, tr_tg, he_in, he_tg, len(samples), len(test), cut1 + cut2)


def _draw_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"bitnet158-chat:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def window_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int):
    """batches(index) → (inputs, targets) [batch_size, seq_len]: windows drawn with a generator seeded
    by (seed, index) alone, so a resumed run sees the batches an uninterrupted one would."""
    def batches(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_draw_seed(seed, index))
        rows = torch.randint(0, inputs.shape[0], (batch_size,), generator=gen)
        return inputs[rows], targets[rows]
    return batches


def describe(data: ChatData) -> str:
    """One line about the prepared data, for the CLI."""
    cut = f", {data.truncated} cut to the window" if data.truncated else ""
    return (f"{data.conversations} conversations ({data.heldout_conversations} held out){cut}: "
            f"{data.train_inputs.shape[0]} training windows, {data.train_target_tokens:,} assistant tokens")

