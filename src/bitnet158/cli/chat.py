"""`bitnet158 chat CKPT`: a multi-turn chat in the terminal, streamed, one prompt cache for the session.

Each turn renders the *whole* conversation with the chat template (the model's own, a
--chat-template file, or the default transcript for base models) and hands its ids to
`stream_generate` with one PromptCache: the conversation so far is a prefix of the new prompt, so
only the new message is prefilled. Lines are read from stdin, so a chat can be piped; `/reset`
clears the history and the cache, `/exit`, end of input or Ctrl-C end the session.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from ..chat_template import chat_template_for, encode_chat, read_template_file, stop_texts_for
from ..errors import ConfigError
from ..generate import PromptCache, stream_generate
from ..sampling import SamplingConfig
from ..tokenizer import Tokenizer
from .common import default_of
from .inference import add_runtime_argument, load_model

NAME = "chat"
HELP = "chat with a checkpoint in the terminal (multi-turn, streamed; /reset, /exit)"
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (default: the tokenizer's "
                   "own, else a plain System/User/Assistant transcript)")
    p.add_argument("--max-tokens", type=int, default=default_of(stream_generate, "max_tokens"),
                   help="most tokens per answer")
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=SamplingConfig.top_k, help="0 disables")
    p.add_argument("--top-p", type=float, default=SamplingConfig.top_p, help="1 disables")
    p.add_argument("--repetition-penalty", type=float, default=SamplingConfig.repetition_penalty)
    p.add_argument("--seed", type=int, help="seed of the first answer (each later answer: seed + its turn)")
    p.add_argument("--threads", type=int)
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT layout, or a finetune run) applied unmerged")
    add_runtime_argument(p)


class ChatSession:
    """The conversation, its template and its prompt cache; `ask` runs one turn."""

    def __init__(self, model: Any, tokenizer: Tokenizer, template: str, sampling: SamplingConfig,
                 max_tokens: int, *, system: str | None = None, seed: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.stops = stop_texts_for(template)
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.system = system
        self.seed = seed
        self.context = model.config.max_seq_len
        self.cache = PromptCache(model)
        self.messages: list[dict[str, str]] = []
        self.turn = 0
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and everything cached for it."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turn = 0
        self.cache.reset()

    def _fit(self) -> tuple[list[int], int]:
        """The conversation's prompt ids, dropping the oldest turns (never the system message or
        the new message) until the prompt and a full answer fit the model's context. Returns the
        ids and how many messages were dropped. The room kept for the answer is at most half the
        context, so a --max-tokens near the context size does not cost every earlier turn."""
        room = min(self.max_tokens, self.context // 2)
        dropped = 0
        while True:
            ids = encode_chat(self.tokenizer, self.messages, self.template)
            first = 1 if self.messages[0]["role"] == "system" else 0
            if len(ids) + room <= self.context or len(self.messages) - first <= 1:
                break
            # drop a message, then any that would open the conversation without a user turn
            del self.messages[first]
            dropped += 1
            while len(self.messages) - first > 1 and self.messages[first]["role"] != "user":
                del self.messages[first]
                dropped += 1
        if len(ids) >= self.context:
            self.messages.pop()
            raise _TooLong(f"[that message needs {len(ids)} tokens with the conversation kept; the model's "
                           f"context is {self.context}: not sent]")
        return ids, dropped

    def ask(self, text: str, out: TextIO, err: TextIO) -> str | None:
        """Add the user's `text`, stream the answer to `out` and a statistics line to `err`; the
        answer joins the history. None when the message could not be sent."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = self._fit()
        except _TooLong as exc:
            print(exc, file=err)
            return None
        if dropped:
            print(f"[dropped the {dropped} oldest messages to fit the model's {self.context}-token context]",
                  file=err)
        seed = None if self.seed is None else self.seed + self.turn
        pieces: list[str] = []
        last = None
        # the stop texts end an answer where a base model starts writing the next turn itself
        for last in stream_generate(self.model, self.tokenizer, ids, self.max_tokens, self.sampling, seed,
                                    stop=self.stops, cache=self.cache):
            pieces.append(last.text)
            out.write(last.text)
            out.flush()
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        self.turn += 1
        if last is not None:
            print(f"[{last.generated_tokens} tokens, {last.tokens_per_second:.1f} tok/s, "
                  f"finish: {last.finish_reason}]", file=err)
        return answer


class _TooLong(Exception):
    """A single message (with the system message) that leaves no room in the context."""


def _template_note(tokenizer: Tokenizer, args: argparse.Namespace) -> str:
    if args.chat_template:
        return f"template from {args.chat_template}"
    if tokenizer.chat_template:
        return "the model's own chat template"
    return ("the default transcript template: this checkpoint has no chat format, and a base model is not "
            "an instruction model, so expect continuations rather than answers")


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty).validate()
    override = read_template_file(args.chat_template) if args.chat_template else None
    model, tokenizer = load_model(args.checkpoint, runtime=args.runtime, threads=args.threads, adapter=args.adapter,
                                  kv_dtype=args.kv_cache)
    session = ChatSession(model, tokenizer, chat_template_for(tokenizer, override), sampling, args.max_tokens,
                          system=args.system, seed=args.seed)
    interactive = sys.stdin.isatty()
    print(f"[chat with {args.checkpoint}: {_template_note(tokenizer, args)}; "
          f"{RESET_COMMAND} clears the conversation, {EXIT_COMMANDS[0]} or end of input ends it]",
          file=sys.stderr)
    try:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # end of input (Ctrl-D, or the end of a piped file)
                break
            text = line.rstrip("\r\n")
            command = text.strip()
            if not command:
                continue
            if command in EXIT_COMMANDS:
                break
            if command == RESET_COMMAND:
                session.reset()
                print("[conversation cleared]", file=sys.stderr)
                continue
            session.ask(text, sys.stdout, sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C ends the chat like /exit, without a traceback
        sys.stdout.write("\n")
    return 0
