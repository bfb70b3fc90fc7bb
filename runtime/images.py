"""Turn an image into Gemma 4 Unified vision soft tokens, with numpy and Pillow only.

The model has no vision tower: each soft token is a raw 48x48 RGB square of the image (3x3 merged 16-pixel patches,
6912 values in [0, 1]) plus its (x, y) grid position. This module loads an image, resizes it to the soft-token budget
keeping its aspect ratio, and cuts it into those squares, matching the transformers image processor
(`Gemma4UnifiedImageProcessor`) value for value whenever no resize is needed.

It deliberately does not:
- pad to the budget (padding tokens with position (-1, -1) are the caller's business when it batches images);
- resize with torchvision: Pillow's antialiased bicubic is used instead, so a resized image may differ from the
  reference processor's output by a few intensity levels (the reference needs torchvision, which the runtime avoids);
- apply EXIF orientation, mean/std normalisation or any augmentation (the reference does none of these either).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "SUPPORTED_SOFT_TOKEN_BUDGETS",
    "ImageInput",
    "ImageSoftTokens",
    "aspect_preserving_size",
    "load_image",
    "preprocess_image",
]

SUPPORTED_SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)

ImageInput = Union[str, "os.PathLike[str]", "PILImage.Image", np.ndarray]

# The reference processor rescales uint8 pixels by multiplying with float32(1/255) (not dividing by 255); the two differ
# in the last bit for about half of the 256 levels, so we do exactly what it does.
_RESCALE = np.float32(1 / 255)


@dataclass(frozen=True)
class ImageSoftTokens:
    """The soft tokens of one image, in row-major order (top row first, left to right)."""

    patches: np.ndarray  # (n, 6912) float32: each a 48x48x3 square flattened row-major, channel-last
    positions: np.ndarray  # (n, 2) int64: (x, y) = (column, row) of the square in the grid

    def __len__(self) -> int:
        return int(self.patches.shape[0])


def _from_pil(image: PILImage.Image) -> np.ndarray:
    """RGB uint8 array of a PIL image; transparency is composited onto white, as the reference processor does."""
    from PIL import Image

    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(image: ImageInput) -> np.ndarray:
    """Return `image` as an (H, W, 3) uint8 RGB array.

    Accepts a path to an image file, a PIL image of any mode (converted to RGB, transparency composited onto white),
    or an (H, W, 3) uint8 array (returned as is).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Got an image array of shape {image.shape} and dtype {image.dtype}; expected shape (height, width, 3) "
                "and dtype uint8 (RGB, channel-last). Convert it first, e.g. `np.asarray(pil_image.convert('RGB'))`."
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"Got an empty image array of shape {image.shape}; expected at least one pixel.")
        return image
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"Image file {str(path)!r} does not exist.")
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a directory; expected an image file (PNG, JPEG, ...).")
        try:
            with Image.open(path) as opened:
                opened.load()
                return _from_pil(opened)
        except UnidentifiedImageError as err:
            raise ValueError(
                f"{str(path)!r} is not an image Pillow can read; expected a PNG, JPEG, WebP or other Pillow format."
            ) from err
    raise ValueError(
        f"Got an image of type {type(image).__name__}; expected a file path, a PIL image or an (H, W, 3) uint8 array."
    )


def aspect_preserving_size(
    height: int,
    width: int,
    *,
    patch_size: int = 16,
    max_soft_tokens: int = 280,
    pooling_kernel_size: int = 3,
) -> tuple[int, int]:
    """Largest (height, width) with the image's aspect ratio, both multiples of `pooling_kernel_size * patch_size`,
    whose pixel count fits the budget of `max_soft_tokens` soft tokens.

    The image is scaled (up or down) so its area equals the budget, then each side is floored to a multiple of the
    soft-token side (48 px by default). An image so elongated that its short side floors to zero gets one soft token
    on that side and `floor(long / short)` on the other, at most `max_soft_tokens`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"Got an image size of {height}x{width} (HxW); both sides must be positive.")
    side = pooling_kernel_size * patch_size  # pixels per soft token along one side
    budget_px = max_soft_tokens * pooling_kernel_size**2 * patch_size**2
    scale = math.sqrt(budget_px / (height * width))
    rows = math.floor(scale * height / side)
    cols = math.floor(scale * width / side)
    if rows == 0 and cols == 0:
        raise ValueError(
            f"An image of {height}x{width} (HxW) cannot be resized to a whole number of {side}-pixel soft tokens "
            f"within {max_soft_tokens} tokens."
        )
    if rows == 0:
        rows, cols = 1, min(math.floor(width / height), max_soft_tokens)
    elif cols == 0:
        rows, cols = min(math.floor(height / width), max_soft_tokens), 1
    if rows * cols > max_soft_tokens:
        raise ValueError(
            f"Resizing {height}x{width} (HxW) to {rows * side}x{cols * side} would need {rows * cols} soft tokens, "
            f"more than the budget of {max_soft_tokens}."
        )
    return rows * side, cols * side


def preprocess_image(
    image: ImageInput,
    *,
    max_soft_tokens: int = 280,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
) -> ImageSoftTokens:
    """Load `image`, resize it to the soft-token budget and cut it into soft tokens (see the module docstring)."""
    if max_soft_tokens not in SUPPORTED_SOFT_TOKEN_BUDGETS:
        raise ValueError(
            f"max_soft_tokens={max_soft_tokens} is not supported; Gemma 4 was trained with budgets "
            f"{SUPPORTED_SOFT_TOKEN_BUDGETS}. Pick one of them (280 is the default)."
        )
    pixels = load_image(image)  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    target_h, target_w = aspect_preserving_size(
        height, width, patch_size=patch_size, max_soft_tokens=max_soft_tokens, pooling_kernel_size=pooling_kernel_size
    )
    if (target_h, target_w) != (height, width):
        from PIL import Image

        resized = Image.fromarray(pixels).resize((target_w, target_h), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.uint8)  # (target_h, target_w, 3)

    side = pooling_kernel_size * patch_size
    rows, cols = target_h // side, target_w // side
    scaled = pixels.astype(np.float32) * _RESCALE  # (H, W, 3) in [0, 1]
    squares = scaled.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, side, side, 3)
    patches = np.ascontiguousarray(squares.reshape(rows * cols, side * side * 3))  # (n, 6912)
    ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    positions = np.stack([xs, ys], axis=-1)  # (n, 2) as (x, y)
    return ImageSoftTokens(patches=patches, positions=positions)
