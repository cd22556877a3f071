"""`bitnet158 serve CKPT`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one checkpoint.

    bitnet158 serve runs/my-model/final --port 8080
    curl http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "final", "prompt": "def f(x):", "max_tokens": 32}'

It binds 127.0.0.1 unless told otherwise. SIGTERM (or Ctrl-C) stops accepting connections, lets
the running requests finish (up to --drain-timeout seconds), drains the engine and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..chat_template import read_template_file
from ..errors import BitNetError, CheckpointError, ConfigError
from ..runtime import choose
from ..serve.engine import Engine
from ..tokenizer import Tokenizer
from .common import default_of
from .inference import add_runtime_argument, load_model

NAME = "serve"
HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (chat, completions, streaming)"
DEFAULT_HOST = "127.0.0.1"  # local only unless the user says otherwise
DEFAULT_PORT = 8080
API_KEY_ENV = "BITNET158_API_KEY"  # the key without putting it on the command line
DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds; what container runtimes commonly allow between SIGTERM and SIGKILL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--max-concurrency", type=int, default=default_of(Engine.__init__, "max_concurrency"),
                   help="requests generating at once (slots); default %(default)s")
    p.add_argument("--context", type=int, metavar="N", help="positions each slot holds, prompt and answer (default: "
                   "the model's context; the KV cache takes max-concurrency × context positions up front)")
    p.add_argument("--max-queue", type=int, default=default_of(Engine.__init__, "max_queue"),
                   help="requests waiting for a slot before new ones get 429; default %(default)s")
    p.add_argument("--prefill-chunk", type=int, default=default_of(Engine.__init__, "prefill_chunk"),
                   help="prompt tokens one step takes at most, beside the decoding requests (a longer prompt "
                        "is prefilled over several steps); default %(default)s")
    p.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                   help="prefill every prompt whole (by default a freed slot keeps its keys, and a request that "
                        "starts with the same tokens, such as a chat's next turn, prefills only the rest)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: no key; a key given "
                   f"here shows in the process list: prefer --api-key-file or ${API_KEY_ENV})")
    p.add_argument("--api-key-file", metavar="FILE", help="read the key from the first line of FILE")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", default=None,
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a browser; "
                        "repeat for several (default: none)")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (default: the tokenizer's "
                   "own, else a plain System/User/Assistant transcript)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter (PEFT layout, or a finetune run) applied "
                   "unmerged to every request")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--threads", type=int)
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default: the server's, 1 MiB)")
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
                   help="seconds a shutdown waits for running requests; default %(default)s")
    add_runtime_argument(p)


def engine_loader(path: str | Path, *, max_concurrency: int, max_queue: int, threads: int | None = None,
                  prefill_chunk: int | None = None, adapter: str | Path | None = None, runtime: str | None = None,
                  kv_dtype: str = "fp32", context: int | None = None,
                  prompt_cache: bool = True) -> Callable[[], tuple[Engine, Tokenizer]]:
    """What the app runs in its loading thread: the checkpoint (and a LoRA adapter, unmerged) → a
    started Engine and its tokenizer."""
    def load() -> tuple[Engine, Tokenizer]:
        model, tokenizer = load_model(path, runtime=runtime, threads=threads, adapter=adapter, kv_dtype=kv_dtype)
        chunk = {"prefill_chunk": prefill_chunk} if prefill_chunk is not None else {}
        return Engine(model, tokenizer, max_concurrency=max_concurrency, max_queue=max_queue, max_len=context,
                      prompt_cache=prompt_cache, **chunk).start(), tokenizer
    return load


def resolve_api_key(given: str | None, path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The server's key: --api-key, else --api-key-file's first line, else $BITNET158_API_KEY."""
    if given is not None and path is not None:
        raise ConfigError("give --api-key or --api-key-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                key = f.readline(4096).strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--api-key-file {path}: cannot read it ({type(e).__name__})") from None
        if not key:
            raise ConfigError(f"--api-key-file {path}: the first line is empty")
        return key
    key = given if given is not None else environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ConfigError("the API key is empty")
    return key


def model_name_for(path: str | Path) -> str:
    """The checkpoint folder's name, which is what a user would call the model."""
    resolved = Path(path).resolve()
    return resolved.name or "model"


def run(args: argparse.Namespace) -> int:
    # the HTTP stack is imported here, not at the top: every other verb would pay for it
    import uvicorn

    from ..serve.api import create_app

    if not Path(args.checkpoint).exists():
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if choose(args.runtime) == "native":
        if args.adapter is not None:
            raise ConfigError("--adapter needs the torch runtime (a LoRA adapter runs in torch): "
                              "install torch or leave out --runtime native")
    elif args.adapter is not None:
        from ..checkpoint.adapter import resolve_adapter

        resolve_adapter(args.adapter)  # a missing adapter is a one-line error now, not a failed load later
    if args.max_concurrency < 1 or args.max_queue < 0 or args.prefill_chunk < 1:
        raise ConfigError("--max-concurrency and --prefill-chunk must be at least 1 and --max-queue at least 0")
    if args.context is not None and args.context < 2:
        raise ConfigError(f"--context must be at least 2 (a prompt token and an answer), got {args.context}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    template = read_template_file(args.chat_template) if args.chat_template else None
    api_key = resolve_api_key(args.api_key, args.api_key_file)
    if not _is_loopback(args.host) and not api_key:
        print(f"bitnet158: warning: serving on {args.host} without --api-key: anyone who can reach it may use it",
              file=sys.stderr)

    failure: list[BaseException] = []
    server: Any = None

    def stop_on_load_error(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True  # read by uvicorn's main loop

    options: dict[str, Any] = {"max_body_bytes": args.max_body_bytes} if args.max_body_bytes else {}
    app = create_app(engine_loader(args.checkpoint, max_concurrency=args.max_concurrency,
                                   max_queue=args.max_queue, threads=args.threads, prefill_chunk=args.prefill_chunk,
                                   adapter=args.adapter, runtime=args.runtime, kv_dtype=args.kv_cache,
                                   context=args.context, prompt_cache=args.prompt_cache),
                     model_name=args.model_name or model_name_for(args.checkpoint), api_key=api_key,
                     chat_template=template, drain_timeout=args.drain_timeout, cors_origins=args.cors_origin,
                     on_load_error=stop_on_load_error, **options)
    _show_server_log()
    # uvicorn handles SIGINT/SIGTERM itself: stop accepting, wait for open requests (at most
    # timeout_graceful_shutdown), then the app's lifespan shutdown drains the engine
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True

    # uvicorn installs its own handlers while it runs and, after its graceful shutdown, re-raises
    # the signal to the handlers it found, so with the default ones a drained stop would still die
    # by SIGTERM. Ours (also covering the moments before uvicorn's are in place) just ask it to
    # stop, so a drained stop exits 0.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        exc = failure[0]
        raise exc if isinstance(exc, BitNetError) else CheckpointError(f"the model failed to load: {exc}")
    return 0 if server.started else 1


def _show_server_log() -> None:
    """The server's own lines (model loaded, load failures) on stderr, in uvicorn's style; only
    our logger, so an embedding program's logging setup is left alone."""
    log = logging.getLogger("bitnet158.serve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
