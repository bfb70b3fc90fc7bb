"""runtime.images against the transformers Gemma 4 Unified image processor (its pure functions and `_preprocess`)."""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import sys
import types

import numpy as np
import pytest
from PIL import Image

from runtime.images import (
    SUPPORTED_SOFT_TOKEN_BUDGETS,
    ImageSoftTokens,
    aspect_preserving_size,
    load_image,
    preprocess_image,
)

torch = pytest.importorskip("torch")

_REFERENCE = "transformers.models.gemma4_unified.image_processing_gemma4_unified"
_TORCHVISION_STUBS = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.v2",
    "torchvision.transforms.v2.functional",
)


@pytest.fixture(scope="module")
def ref() -> types.ModuleType:
    """The reference image-processing module, imported with torchvision stubbed out when it is not installed.

    The module imports `torchvision.transforms.v2.functional` at top level and uses `tvF.InterpolationMode` in an
    annotation; nothing else from torchvision runs unless an image needs resizing. transformers' availability probe
    is consulted (and cached) before the stubs go in, so the rest of transformers keeps seeing no torchvision; the
    stubs and the reference module are removed from sys.modules afterwards so other tests are not affected.
    """
    from transformers.utils import import_utils

    if import_utils.is_torchvision_available():
        return importlib.import_module(_REFERENCE)
    saved = {name: sys.modules.get(name) for name in (*_TORCHVISION_STUBS, _REFERENCE)}
    for name in _TORCHVISION_STUBS:
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = stub
    for parent, child in zip(_TORCHVISION_STUBS, _TORCHVISION_STUBS[1:]):
        setattr(sys.modules[parent], child.rsplit(".", 1)[1], sys.modules[child])
    sys.modules[_TORCHVISION_STUBS[-1]].InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    try:
        return importlib.import_module(_REFERENCE)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _reference_soft_tokens(ref: types.ModuleType, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """convert_image_to_patches + patches_merge on an (H, W, 3) uint8 image that needs no resize."""
    chw = torch.from_numpy(pixels).permute(2, 0, 1) * (1 / 255)  # what TorchvisionBackend.rescale does
    rows, cols = chw.shape[1] // 16, chw.shape[2] // 16
    patches = ref.convert_image_to_patches(chw, 16)
    xs, ys = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="xy")
    positions = torch.stack([xs, ys], dim=-1).reshape(-1, 2)
    merged, merged_pos = ref.patches_merge(patches[None], positions[None], patches.shape[0] // 9)
    return merged[0].numpy(), merged_pos[0].numpy()


def _random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("height", "width", "budget"), [(672, 960, 280), (480, 336, 70), (960, 672, 280)])
def test_soft_tokens_equal_reference_functions(ref, height, width, budget):
    pixels = _random_image(height, width)
    assert aspect_preserving_size(height, width, max_soft_tokens=budget) == (height, width)  # no resize involved
    ours = preprocess_image(pixels, max_soft_tokens=budget)
    patches, positions = _reference_soft_tokens(ref, pixels)
    assert len(ours) == (height // 48) * (width // 48) == budget
    assert ours.patches.dtype == np.float32 and ours.patches.shape == (budget, 6912)
    assert ours.positions.dtype == np.int64 and ours.positions.shape == (budget, 2)
    assert np.array_equal(ours.patches, patches), f"max abs diff {np.abs(ours.patches - patches).max()}"
    assert np.array_equal(ours.positions, positions)


def test_soft_tokens_equal_reference_preprocess(ref):
    pixels = _random_image(672, 960, seed=1)
    processor = ref.Gemma4UnifiedImageProcessor()
    out = processor._preprocess(
        [torch.from_numpy(pixels).permute(2, 0, 1)],
        do_resize=True,  # a no-op for this size, so the stubbed torchvision resize is never called
        resample=None,
        do_rescale=processor.do_rescale,
        rescale_factor=processor.rescale_factor,
        do_normalize=processor.do_normalize,
        image_mean=tuple(processor.image_mean),
        image_std=tuple(processor.image_std),
        return_tensors=None,
        patch_size=processor.patch_size,
        max_soft_tokens=processor.max_soft_tokens,
        pooling_kernel_size=processor.pooling_kernel_size,
    )
    ours = preprocess_image(pixels)
    assert out["num_soft_tokens_per_image"] == [len(ours)]
    assert np.array_equal(ours.patches, out["pixel_values"][0].numpy())
    assert np.array_equal(ours.positions, out["image_position_ids"][0].numpy())


def _size_cases() -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(2)
    extremes = [
        (1, 1), (1, 20000), (20000, 1), (10, 100000), (100000, 10), (47, 5000), (5000, 47), (48, 48), (49, 4000),
        (3000, 7), (224, 224), (672, 960), (480, 336), (1080, 1920), (4000, 3000), (33, 33333), (12345, 67),
    ]  # fmt: skip
    random_sizes = [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(60)]
    return [(h, w, b) for h, w in extremes + random_sizes for b in SUPPORTED_SOFT_TOKEN_BUDGETS]


def test_aspect_preserving_size_equals_reference(ref):
    for height, width, budget in _size_cases():
        try:
            expected = ref.get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
        except ValueError:
            with pytest.raises(ValueError):
                aspect_preserving_size(height, width, max_soft_tokens=budget)
            continue
        got = aspect_preserving_size(height, width, max_soft_tokens=budget)
        assert got == expected, f"{height}x{width} budget {budget}: got {got}, reference {expected}"
        assert got[0] % 48 == 0 and got[1] % 48 == 0 and got[0] * got[1] // 48**2 <= budget


def test_resized_image_gives_budgeted_grid(ref):
    pixels = _random_image(500, 700, seed=3)
    target_h, target_w = aspect_preserving_size(500, 700, max_soft_tokens=140)
    assert (target_h, target_w) != (500, 700)
    ours = preprocess_image(pixels, max_soft_tokens=140)
    rows, cols = target_h // 48, target_w // 48
    assert len(ours) == rows * cols <= 140
    assert ours.positions[:, 0].max() == cols - 1 and ours.positions[:, 1].max() == rows - 1
    assert len({tuple(p) for p in ours.positions.tolist()}) == len(ours)
    resized = np.array(Image.fromarray(pixels).resize((target_w, target_h), Image.Resampling.BICUBIC))
    patches, positions = _reference_soft_tokens(ref, resized)
    assert np.array_equal(ours.patches, patches) and np.array_equal(ours.positions, positions)


def test_load_image_from_path_and_pil_modes(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    pixels = _random_image(30, 40, seed=4)
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)
    assert np.array_equal(load_image(path), pixels)
    assert np.array_equal(load_image(str(path)), pixels)
    gray = Image.fromarray(pixels[..., 0])
    assert np.array_equal(load_image(gray), np.repeat(pixels[..., :1], 3, axis=-1))
    rgba = Image.fromarray(np.dstack([pixels, pixels[..., 1]]), mode="RGBA")
    assert np.array_equal(load_image(rgba), convert_to_rgb(rgba, return_numpy=True))


def test_not_an_image_file(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="fake.png.*is not an image Pillow can read"):
        load_image(fake)


def test_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        preprocess_image(tmp_path / "nowhere.jpg")


@pytest.mark.parametrize(
    "bad",
    [np.zeros((48, 48, 3), np.float32), np.zeros((48, 48), np.uint8), np.zeros((48, 48, 4), np.uint8)],
    ids=["float32", "2-D", "4-channel"],
)
def test_bad_array(bad):
    with pytest.raises(ValueError, match=r"expected shape \(height, width, 3\)"):
        load_image(bad)


def test_unsupported_budget():
    with pytest.raises(ValueError, match="max_soft_tokens=300"):
        preprocess_image(_random_image(48, 48), max_soft_tokens=300)


def test_soft_tokens_len():
    tokens = ImageSoftTokens(patches=np.zeros((5, 6912), np.float32), positions=np.zeros((5, 2), np.int64))
    assert len(tokens) == 5
