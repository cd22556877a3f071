"""Stop strings over streamed text: never emit a stop string, or any part of one.

Text arrives a piece at a time (one token's worth), and a stop string may span several pieces,
so the matcher holds back the longest tail of the text that could still grow into a stop string
and emits it only once it cannot. When a stop string completes, everything before it that was
held back is emitted and the rest (the stop string and whatever came with it) is dropped.

Which stop wins when several occur: the one that is completed first (the earliest end); among
those ending at the same place, the longest. That is what a token-by-token reader would see, and
it makes the result independent of how the text is cut into pieces:

>>> m = StopMatcher(["\\n\\n", "END"])
>>> m.feed("hello\\n"), m.feed("\\nworld")
(('hello', False), ('', True))
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):  # a bare string is one stop, not one per character
            stops = [stops]
        for stop in stops:
            if not isinstance(stop, str):
                raise ConfigError(f"a stop string must be text, got {type(stop).__name__}")
            if not stop:
                raise ConfigError("empty stop strings are not allowed: every text would stop at once")
        self.stops = tuple(dict.fromkeys(stops))
        # every proper prefix of every stop: the tails worth holding back, longest checked first
        self._prefixes = sorted({s[:n] for s in self.stops for n in range(1, len(s))}, key=len, reverse=True)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """Add the next piece; return (text safe to emit now, whether a stop string completed).
        After a stop, further pieces are ignored."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        best: tuple[int, int, str] | None = None  # (end, -length, stop): earliest end, then longest
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0:
                key = (i + len(stop), -len(stop), stop)
                best = key if best is None or key < best else best
        if best is not None:
            end, neg_len, stop = best
            self.stopped, self.matched, self._held = True, stop, ""
            return buf[:end + neg_len], True
        keep = next((len(p) for p in self._prefixes if buf.endswith(p)), 0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of the stream when no stop string completed."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
