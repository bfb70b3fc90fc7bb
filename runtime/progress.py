"""A dependency-free progress bar with ETA for long steps (export, quantization, engine builds), on stderr.

On a terminal the bar redraws in place at most every ``refresh`` seconds; when stderr is not a terminal (CI logs,
pipes) it prints one plain line every ``every`` seconds and a last line when done, so logs show progress without a
line per tensor.  ``GEMMA4_PROGRESS=0`` silences it; ``=1`` forces the terminal form.  It measures nothing itself:
callers say how much is done (tensors, bytes, layers).  Torch-free, importable from the runtime.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["Progress", "format_seconds"]


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _human(n: float, unit: str) -> str:
    if unit == "B":
        for u, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if n >= f:
                return f"{n / f:.1f} {u}"
        return f"{n:.0f} B"
    return f"{n:g}{' ' + unit if unit else ''}"


class Progress:
    """``with Progress(total, "export prefill", unit="B") as p: p.update(nbytes)``.

    ``total`` may be 0 or unknown (None): then only the count and the rate are shown.
    """

    def __init__(self, total: float | None, label: str, *, unit: str = "", stream=None, refresh: float = 0.2,
                 every: float = 30.0, width: int = 24):
        self.total, self.label, self.unit, self.width = total, label, unit, width
        self.stream = stream if stream is not None else sys.stderr
        mode = os.environ.get("GEMMA4_PROGRESS", "")
        self.enabled = mode != "0"
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tty = mode == "1" or (mode != "0" and is_tty)
        self.interval = refresh if self.tty else every
        self.done = 0.0
        self.note = ""
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(complete=exc_type is None)

    def update(self, n: float = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = time.perf_counter()
        finished = bool(self.total) and self.done >= self.total  # close() prints the last line
        if now - self._last >= self.interval and not finished:
            self._last = now
            self._emit(final=False)

    def line(self) -> str:
        """The current status line (bar, fraction, elapsed, ETA)."""
        elapsed = time.perf_counter() - self.t0
        done = _human(self.done, self.unit)
        if self.total:
            frac = min(1.0, self.done / self.total)
            fill = int(frac * self.width)
            bar = "#" * fill + "-" * (self.width - fill)
            eta = format_seconds(elapsed * (1 - frac) / frac) if frac > 0 else "?"
            head = f"[{self.label}] {bar} {100 * frac:3.0f}% {done}/{_human(self.total, self.unit)}"
            tail = f"{format_seconds(elapsed)} elapsed, ETA {eta}"
        else:
            head, tail = f"[{self.label}] {done}", f"{format_seconds(elapsed)} elapsed"
        return f"{head} {self.note + ' ' if self.note else ''}({tail})"

    def _emit(self, *, final: bool) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, *, complete: bool = True) -> None:
        """Print the last line; ``complete`` marks the work as done (the count then reads total/total)."""
        if not self._closed:
            self._closed = True
            if complete and self.total:
                self.done = max(self.done, self.total)
            self._emit(final=True)
