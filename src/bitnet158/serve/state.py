"""What one server holds: the model being loaded or loaded (engine, tokenizer, chat template), its
public name, and the shutdown that drains the engine.

Loading runs in a background thread started by the app's lifespan, so uvicorn accepts
connections at once and /health can say 503 "loading" (then 200) instead of refusing them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from ..chat_template import chat_template_for
from ..errors import first_line
from ..tokenizer import Tokenizer
from .http_errors import ApiError

log = logging.getLogger("bitnet158.serve")


class Loaded(NamedTuple):
    engine: Any          # serve.engine.Engine, or anything with its interface (tests use a fake)
    tokenizer: Tokenizer
    template: str        # the chat template in use: --chat-template, the tokenizer's, or the default


class ServerState:
    def __init__(self, load: Callable[[], tuple[Any, Tokenizer]], *, model_name: str,
                 chat_template: str | None = None, drain_timeout: float | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.model_name = model_name
        self.created = int(time.time())
        self.loaded: Loaded | None = None
        self.error: str | None = None
        self._load, self._template = load, chat_template
        self._drain_timeout, self._on_load_error = drain_timeout, on_load_error
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def engine(self) -> Any | None:
        loaded = self.loaded
        return loaded.engine if loaded is not None else None

    def start_loading(self) -> None:
        # a daemon thread: a server told to stop while a large model still loads must not wait for it
        self._thread = threading.Thread(target=self._run_load, name="bitnet158-load", daemon=True)
        self._thread.start()

    def _run_load(self) -> None:
        started = time.perf_counter()
        try:
            engine, tokenizer = self._load()
            loaded = Loaded(engine, tokenizer, chat_template_for(tokenizer, self._template))
        except BaseException as exc:  # noqa: BLE001 - anything: the server must say it failed, not hang in "loading"
            self.error = f"the model failed to load: {first_line(exc)}"
            log.error("%s", self.error)
            if self._on_load_error is not None:
                self._on_load_error(exc)
            return
        with self._lock:
            if self._closing:  # shut down while loading: stop what was just started
                engine.shutdown(drain=False)
                return
            self.loaded = loaded
        log.info("model %r loaded in %.1f s; %s", self.model_name, time.perf_counter() - started,
                 engine.cache_summary())

    def ready(self) -> Loaded:
        """The loaded model, or 503 while it loads (or after it failed to)."""
        loaded = self.loaded
        if loaded is None:
            raise ApiError(503, self.error or "the model is still loading; retry when /health answers 200",
                           type="server_error", code="model_not_ready", headers={"Retry-After": "1"})
        return loaded

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(404, f"the model {name[:100]!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "bitnet158"}

    def close(self) -> None:
        """Shutdown: let the running and waiting requests finish (up to the drain timeout). uvicorn
        calls this after its own graceful wait for open connections, so usually nothing is left."""
        with self._lock:
            self._closing = True
            engine = self.engine
        if engine is not None:
            engine.shutdown(drain=True, timeout=self._drain_timeout)
