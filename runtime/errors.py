"""The runtime's typed errors for bad input: each message names the argument or file and what was expected.

`InputError` covers what a caller passes to `runtime.generate` (prompts, token ids, images, audio, budgets);
`InputFileNotFoundError` is also a `FileNotFoundError`.  Problems with the artifact itself are
`runtime.manifest.ArtifactError`.  The command line prints any of them as one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

__all__ = ["InputError", "InputFileNotFoundError"]


class InputError(ValueError):
    """An input to `runtime.generate` that cannot be used; the message says which one and what to do."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """An image or audio file that does not exist."""
