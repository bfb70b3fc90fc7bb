"""Run exported Gemma 4 Unified artifacts: `load(dir)` and `generate(model_or_dir, prompt, ...)`.

Torch-free on the ONNX Runtime path; heavy backends are imported when a model is loaded.
"""

from runtime.generate import GenerationResult, LoadedModel, Piece, generate, load
from runtime.manifest import ArtifactError
from runtime.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, chat_prompt

__all__ = [
    "AUDIO_PLACEHOLDER",
    "ArtifactError",
    "GenerationResult",
    "IMAGE_PLACEHOLDER",
    "LoadedModel",
    "Piece",
    "chat_prompt",
    "generate",
    "load",
]
