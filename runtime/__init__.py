"""Run exported Gemma 4 Unified artifacts: `load(dir)` and `generate(model_or_dir, prompt, ...)`.

Torch-free on the ONNX Runtime path; heavy backends are imported when a model is loaded.  Bad input raises
`InputError` (a ValueError), an unusable artifact `ArtifactError` (a ValueError); each message names the file or
argument, and `python -m runtime` prints it as one ``error: ...`` line.
"""

from runtime.errors import InputError, InputFileNotFoundError
from runtime.generate import GenerationResult, LoadedModel, Piece, generate, load
from runtime.manifest import ArtifactError
from runtime.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, chat_prompt

__all__ = [
    "AUDIO_PLACEHOLDER",
    "ArtifactError",
    "GenerationResult",
    "IMAGE_PLACEHOLDER",
    "InputError",
    "InputFileNotFoundError",
    "LoadedModel",
    "Piece",
    "chat_prompt",
    "generate",
    "load",
]
