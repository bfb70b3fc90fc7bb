"""Turn an image into Gemma 4 Unified vision soft tokens, with numpy and Pillow only.

The model has no vision tower: each soft token is a raw 48x48 RGB square of the image (3x3 merged 16-pixel patches,
6912 values in [0, 1]) plus its (x, y) grid position. This module loads an image (any Pillow mode, 16-bit included;
files with their EXIF orientation applied, as the reference's loader does), resizes it to the soft-token budget
keeping its aspect ratio, and cuts it into those squares, matching the transformers image processor
(`Gemma4UnifiedImageProcessor`) value for value whenever no resize is needed.  A grid longer than the model's
position table, an unreadable, truncated or oversized (decompression bomb) file are refused with `InputError`.

It deliberately does not:
- pad to the budget (padding tokens with position (-1, -1) are the caller's business when it batches images);
- resize with torchvision: Pillow's antialiased bicubic is used instead, so a resized image may differ from the
  reference processor's output by a few intensity levels (the reference needs torchvision, which the runtime avoids);
- shrink an image below its budget to fit the position table (the reference does not either; we refuse instead);
- apply mean/std normalisation or any augmentation (the reference does none of these either).
"""

from __future__ import annotations

import math
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from runtime.errors import InputError, InputFileNotFoundError

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

ImageInput = Union[str, "os.PathLike[str]", bytes, "PILImage.Image", np.ndarray]

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


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray(gray8: np.ndarray, transparent: np.ndarray | None) -> np.ndarray:
    rgb = np.repeat(gray8[..., None], 3, axis=-1)  # (H, W, 3)
    if transparent is not None:
        rgb[transparent] = 255  # a transparent pixel composited onto white
    return rgb


def _from_pil(image: PILImage.Image, name: str = "the image") -> np.ndarray:
    """RGB uint8 array of a PIL image of any mode.

    Transparency is composited onto white, as the reference processor does.  16-bit grayscale (``I;16*``, and
    ``I`` holding 0..65535, as Pillow opens 16-bit PNG/TIFF files) is scaled to 8 bits by dropping the low byte,
    as torchvision's ``to_dtype(uint8, scale=True)`` does (Pillow's own conversion clips it to 255 instead).
    32-bit float ``F`` is on Pillow's 0..255 scale, converted as Pillow does; out-of-range values are refused
    rather than clipped.  Every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) goes
    through Pillow's conversion, as in the reference.
    """
    from PIL import Image

    mode = image.mode
    transparency = image.info.get("transparency")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)  # (H, W)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise InputError(
                f"{name} is a 32-bit integer image (mode I) with values in [{values.min()}, {values.max()}]; "
                "expected 16-bit data (0..65535). Convert it to 8-bit RGB yourself."
            )
        transparent = values == transparency if isinstance(transparency, int) else None
        return _gray((values >> 8).astype(np.uint8), transparent)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 255):
            raise InputError(
                f"{name} is a float image (mode F) with values outside [0, 255] (Pillow's scale for mode F) or not "
                "finite; scale it to [0, 255] (or to 8-bit RGB) first."
            )
        return _gray(np.asarray(image.convert("L"), dtype=np.uint8), None)
    if mode == "La":
        image = image.convert("LA")  # un-premultiply; Pillow converts La to nothing else
    has_alpha = any(b in ("A", "a") for b in image.getbands()) or transparency is not None or (
        mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    )
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except ValueError as err:  # Pillow: "conversion from X to Y not supported"
        raise InputError(f"{name} has the PIL mode {mode!r}, which cannot be converted to RGB ({err})") from None


def _open(path, name: str | None = None) -> np.ndarray:
    """Decode an image file, or a file object of its bytes named ``name`` (first frame, EXIF orientation applied
    as the reference's loader does)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = name or repr(str(path))
    try:
        with Image.open(path) as opened:
            opened.load()
            return _from_pil(ImageOps.exif_transpose(opened), f"Image file {name}")
    except UnidentifiedImageError:
        raise InputError(
            f"{name} is not an image Pillow can read; expected a PNG, JPEG, WebP or other Pillow format."
        ) from None
    except Image.DecompressionBombError as err:
        raise InputError(
            f"{name} is refused as a possible decompression bomb ({err}); downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file."
        ) from None
    except (OSError, SyntaxError, EOFError) as err:  # truncated or corrupt data (Pillow raises all three)
        raise InputError(f"{name} is truncated or corrupt and cannot be decoded ({err}).") from None


def load_image(image: ImageInput) -> np.ndarray:
    """Return `image` as an (H, W, 3) uint8 RGB array.

    Accepts a path to an image file (EXIF orientation applied) or the file's bytes, a PIL image of any mode (see `_from_pil`), or an
    (H, W, 3) uint8 array (returned as is).  Raises `InputError` for anything it cannot read.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(
                f"Got an image array of shape {image.shape} and dtype {image.dtype}; expected shape (height, width, 3) "
                "and dtype uint8 (RGB, channel-last). Convert it first, e.g. `np.asarray(pil_image.convert('RGB'))`."
            )
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InputError(f"Got an empty image array of shape {image.shape}; expected at least one pixel.")
        return image
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InputError(f"Got an empty PIL image of size {image.size}; expected at least one pixel.")
        return _from_pil(image, f"The PIL image (mode {image.mode})")
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise InputError("Got empty image bytes; expected the bytes of a PNG, JPEG or other Pillow format.")
        return _open(io.BytesIO(bytes(image)), "the image bytes")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise InputFileNotFoundError(f"Image file {str(path)!r} does not exist.")
        if path.is_dir():
            raise InputError(f"{str(path)!r} is a directory; expected an image file (PNG, JPEG, ...).")
        return _open(path)
    raise InputError(
        f"Got an image of type {type(image).__name__}; expected a file path, image file bytes, a PIL image or an (H, W, 3) uint8 "
        "array."
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
        raise InputError(f"Got an image size of {height}x{width} (HxW); both sides must be positive.")
    side = pooling_kernel_size * patch_size  # pixels per soft token along one side
    budget_px = max_soft_tokens * pooling_kernel_size**2 * patch_size**2
    scale = math.sqrt(budget_px / (height * width))
    rows = math.floor(scale * height / side)
    cols = math.floor(scale * width / side)
    if rows == 0 and cols == 0:
        raise InputError(
            f"An image of {height}x{width} (HxW) cannot be resized to a whole number of {side}-pixel soft tokens "
            f"within {max_soft_tokens} tokens."
        )
    if rows == 0:
        rows, cols = 1, min(math.floor(width / height), max_soft_tokens)
    elif cols == 0:
        rows, cols = min(math.floor(height / width), max_soft_tokens), 1
    if rows * cols > max_soft_tokens:
        raise InputError(
            f"Resizing {height}x{width} (HxW) to {rows * side}x{cols * side} would need {rows * cols} soft tokens, "
            f"more than the budget of {max_soft_tokens}."
        )
    return rows * side, cols * side


def _fitting_budget(height: int, width: int, budget: int, max_positions: int, side: int, **sizes) -> int | None:
    """The largest supported budget below ``budget`` whose grid fits the position table, if any."""
    for smaller in sorted((b for b in SUPPORTED_SOFT_TOKEN_BUDGETS if b < budget), reverse=True):
        h, w = aspect_preserving_size(height, width, max_soft_tokens=smaller, **sizes)
        if max(h, w) // side <= max_positions:
            return smaller
    return None


def preprocess_image(
    image: ImageInput,
    *,
    max_soft_tokens: int = 280,
    patch_size: int = 16,
    pooling_kernel_size: int = 3,
    max_positions: int | None = None,
) -> ImageSoftTokens:
    """Load `image`, resize it to the soft-token budget and cut it into soft tokens (see the module docstring).

    ``max_positions`` is the size of the model's position table per axis (``mm_posemb_size``): a grid with more
    soft tokens than that in a row or a column is refused with `InputError` (the reference would index past the
    table).  Gemma 4 12B's table (1120) holds every grid the budgets allow."""
    if max_soft_tokens not in SUPPORTED_SOFT_TOKEN_BUDGETS:
        raise InputError(
            f"max_soft_tokens={max_soft_tokens} is not supported; Gemma 4 was trained with budgets "
            f"{SUPPORTED_SOFT_TOKEN_BUDGETS}. Pick one of them (280 is the default)."
        )
    pixels = load_image(image)  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    sizes = {"patch_size": patch_size, "pooling_kernel_size": pooling_kernel_size}
    target_h, target_w = aspect_preserving_size(height, width, max_soft_tokens=max_soft_tokens, **sizes)
    side = pooling_kernel_size * patch_size
    rows, cols = target_h // side, target_w // side
    if max_positions is not None and max(rows, cols) > max_positions:
        smaller = _fitting_budget(height, width, max_soft_tokens, max_positions, side, **sizes)
        hint = (f"use max_soft_tokens={smaller} (--max-soft-tokens {smaller})" if smaller else
                "pad or crop it to a less elongated shape")
        raise InputError(
            f"a {height}x{width} (HxW) image at max_soft_tokens={max_soft_tokens} becomes a grid of {rows}x{cols} "
            f"soft tokens (rows x columns), but this model's position table (mm_posemb_size) holds at most "
            f"{max_positions} per row and per column; {hint}."
        )
    if (target_h, target_w) != (height, width):
        from PIL import Image

        resized = Image.fromarray(pixels).resize((target_w, target_h), resample=Image.Resampling.BICUBIC)
        pixels = np.asarray(resized, dtype=np.uint8)  # (target_h, target_w, 3)

    scaled = pixels.astype(np.float32) * _RESCALE  # (H, W, 3) in [0, 1]
    squares = scaled.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4)  # (rows, cols, side, side, 3)
    patches = np.ascontiguousarray(squares.reshape(rows * cols, side * side * 3))  # (n, 6912)
    ys, xs = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    positions = np.stack([xs, ys], axis=-1)  # (n, 2) as (x, y)
    return ImageSoftTokens(patches=patches, positions=positions)
