"""Stop strings on streamed text: hold back what could be the start of a stop string, cut at the first match.

`StopStrings.feed(piece)` returns the text that is safe to stream and whether a stop string was completed; text
after the stop string (and the stop string itself) is never returned, as OpenAI's ``stop`` does.  `flush()` gives
what is still held back once the stream ends without a match.  Pure Python; knows nothing of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStrings"]


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string ended the stream)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return text[: min(hits)], True
        keep = 0  # the longest tail of text that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
