"""Backend wrappers for the speculative tests: `Counting` records the verify and decode calls a loop makes;
`RowByRow` says ``batched_verify`` and runs a verify call's rows one by one on row views, so the batched rounds
(`runtime.speculative.batched`) run on the ring engine, the one form the assistant reads (until it reads the
window form's caches)."""

from __future__ import annotations

import numpy as np


class Counting:
    """The backend, its `verify` and `decode` calls recorded (batch size and tokens per row)."""

    def __init__(self, backend):
        self._b, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self._b, name)

    def verify(self, input_ids, past_lens, cache, seq_lens=None, **kw):
        ids = np.asarray(input_ids)
        self.calls.append(("verify", ids.shape[0], ids.shape[1] if seq_lens is None else list(seq_lens)))
        return self._b.verify(input_ids, past_lens, cache, seq_lens, **kw)

    def decode(self, input_ids, past_lens, cache, **kw):
        self.calls.append(("decode", len(input_ids), 1))
        return self._b.decode(input_ids, past_lens, cache, **kw)


class RowByRow(Counting):
    """A backend that says ``batched_verify`` and runs a verify call's rows one by one on row views (each row's own
    tokens only): the batched loop's semantics on an engine that verifies one row per call."""

    batched_verify = True

    def verify(self, input_ids, past_lens, cache, seq_lens=None, *, copy=True):
        ids = np.asarray(input_ids)
        b, n = ids.shape
        lens = [n] * b if seq_lens is None else [int(x) for x in seq_lens]
        self.calls.append(("verify", b, n if seq_lens is None else lens))
        logits = hidden = None
        for i in range(b):
            view = self._b.rows(cache, i, i + 1) if b > 1 else cache
            lg, hd = self._b.verify(ids[i:i + 1, :lens[i]], [past_lens[i]], view, copy=True)
            if logits is None:
                logits = np.zeros((b, n, lg.shape[-1]), np.float32)
                hidden = np.zeros((b, n, hd.shape[-1]), np.float32)
            logits[i, :lens[i]], hidden[i, :lens[i]] = lg[0], hd[0]
        return logits, hidden
