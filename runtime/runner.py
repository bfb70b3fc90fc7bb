"""The model runner of in-flight batching: turns a scheduler step into backend calls on one cache of
``max_batch`` sequence slots, allocated once.

A prefill call runs on its slots' rows (`Backend.rows`: a view, nothing copied), with the image patches and
audio frames of exactly those token ranges: one sequence's chunk, or the first chunks of neighbouring slots.  A decode step runs once for the cache's leading rows up to
the highest slot that decodes (slots are handed out lowest first, so that prefix is short); rows in it that do
not decode (free, or between two prefill chunks) are fed the pad token at their own length: the write lands on a
position the sequence overwrites before it reads it (full layers), or on the ring slot of the token that just
left every later query's window (sliding layers), and a free slot's next request starts from ``past_lens`` 0,
before which nothing is attended.  ``tests/test_engine.py`` checks that no state leaks between requests.

No requests, threads, sampling or HTTP here (`runtime.engine`, `runtime.scheduler`).
"""

from __future__ import annotations

import numpy as np

from runtime.prompt import PrefillInputs, RowMedia

__all__ = ["Runner"]


class Runner:
    def __init__(self, model, max_batch: int):
        self.model, self.backend = model, model.backend
        self.max_batch, self.max_len = max_batch, model.max_len
        self.pad = int(model.config["tokens"]["pad"])
        self.cache = self.backend.new_cache(max_batch, self.max_len)
        self._views: dict[tuple[int, int], object] = {}
        if max_batch > 1:
            self._rows(0, 1)  # refuses an engine that cannot step on some rows, before serving

    def _rows(self, start: int, stop: int):
        """`Backend.rows` of this runner's cache, asked once per row range: the backend checks the cache on every
        call (its buffers against the arrays they wrap: ~0.1 ms for 24 buffers, 1 % of an INT4 bench-model step)
        and gives the same view for the same rows anyway, and the cache never changes hands."""
        view = self._views.get((start, stop))
        if view is None:
            view = self._views[(start, stop)] = self.backend.rows(self.cache, start, stop)
        return view

    def prefill(self, start_slot: int, rows: list[tuple[np.ndarray, RowMedia, int, int]]) -> np.ndarray:
        """Prompt tokens ``ids[a:b]`` of each sequence in slots ``start_slot``, ``start_slot + 1``, ... (``rows``:
        (ids, media, a, b) each; several rows only for first chunks, ``a`` 0) in one call -> (rows, vocab) logits
        after each row's ``b - 1``."""
        width = max(b - a for _, _, a, b in rows)
        call = np.full((len(rows), width), self.pad, np.int64)
        parts: list[list[np.ndarray]] = [[], [], []]
        for i, (ids, media, a, b) in enumerate(rows):
            call[i, :b - a] = ids[a:b]
            for part, x in zip(parts, media.between(a, b)):
                if x is not None and len(x):
                    part.append(x)
        patches, positions, frames = (np.concatenate(x) if x else None for x in parts)
        inputs = PrefillInputs(call, np.array([a for _, _, a, _ in rows], np.int64),
                               np.array([b - a for _, _, a, b in rows], np.int64), patches, positions, frames)
        return self.backend.prefill(inputs, self._rows(start_slot, start_slot + len(rows)))

    def decode(self, feed: dict[int, tuple[int, int]], idle: dict[int, int]) -> np.ndarray:
        """One token for each slot in ``feed`` (slot -> (token, position)); ``idle``: the length of every other
        occupied slot (fed the pad token there).  Returns (rows, vocab) logits for slots 0..max(feed) (a view the
        next step overwrites: consume it first)."""
        n = max(feed) + 1
        ids, lens = [self.pad] * n, [0] * n
        for slot, length in idle.items():
            if slot < n:
                lens[slot] = length
        for slot, (token, position) in feed.items():
            ids[slot], lens[slot] = token, position
        return self.backend.decode(ids, lens, self._rows(0, n), copy=False)
