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

import runtime
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


# ------------------------------------------------------------------ modes, bit depths, damaged files, the position table
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A 0..65535 gradient keeps its shape: each value loses its low byte (torchvision's to_dtype(uint8, scale=True));
    Pillow's own conversion, which the reference processor uses for PIL input, turns 99.6 % of it white."""
    gradient = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as opened:
        assert opened.mode.startswith("I;16")
        assert (np.asarray(opened.convert("RGB")) == 255).mean() > 0.99  # the bug this guards against
    got = load_image(tmp_path / "deep.png")
    assert np.array_equal(got, np.repeat((gradient >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    assert (got == 255).mean() < 0.01 and len(np.unique(got)) == 256
    as_i32 = Image.fromarray(gradient.astype(np.int32))  # mode I, as older Pillow opens 16-bit PNGs
    assert as_i32.mode == "I" and np.array_equal(load_image(as_i32), got)


def test_32_bit_integer_and_float_images():
    with pytest.raises(runtime.InputError, match=r"mode I.*\[-5, 70000\].*16-bit"):
        load_image(Image.fromarray(np.array([[-5, 70000]], np.int32)))
    values = np.array([[0.0, 1.5, 127.9, 255.0]], np.float32)
    f_image = Image.fromarray(values)
    assert np.array_equal(load_image(f_image)[..., 0], np.asarray(f_image.convert("L")))  # Pillow's 0..255 scale
    for bad in (np.array([[0.5, 300.0]], np.float32), np.array([[np.nan, 1.0]], np.float32)):
        with pytest.raises(runtime.InputError, match=r"mode F.*\[0, 255\]"):
            load_image(Image.fromarray(bad))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "RGBa"])
def test_pil_modes_equal_reference_conversion(mode):
    """The reference's conversion, except where it drops an alpha channel it does not recognise (a palette with
    alpha, premultiplied RGBa): those are composited onto white like every other transparent image."""
    from transformers.image_transforms import convert_to_rgb

    rng = np.random.default_rng(len(mode))
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), mode="RGBA").convert(mode)
    hidden_alpha = mode == "RGBa" or (mode == "P" and image.palette.mode == "RGBA")
    assert hidden_alpha == (mode in ("P", "RGBa"))
    expected = convert_to_rgb(image.convert("RGBA") if hidden_alpha else image, return_numpy=True)
    assert np.array_equal(load_image(image), expected)
    if hidden_alpha:
        assert not np.array_equal(expected, convert_to_rgb(image, return_numpy=True))


def test_palette_transparency_and_premultiplied_alpha(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    palette = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), mode="L").convert("P")
    palette.info["transparency"] = 5
    palette.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as opened:
        got = load_image(opened)
        assert np.array_equal(got, convert_to_rgb(opened, return_numpy=True))
    assert (got.reshape(-1, 3)[5] == 255).all() and (got.reshape(-1, 3)[4] == 4).all()  # only index 5 is clear
    la = Image.fromarray(np.dstack([np.full((2, 2), 200, np.uint8), np.full((2, 2), 128, np.uint8)]), mode="LA")
    premultiplied = la.convert("La")  # Pillow converts La to nothing but LA; the reference's conversion fails on it
    assert np.abs(load_image(premultiplied).astype(int) - load_image(la).astype(int)).max() <= 1


def test_exif_orientation_is_applied_to_files(tmp_path):
    from transformers.image_utils import load_image as reference_load_image

    pixels = _random_image(24, 40, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    got = load_image(tmp_path / "photo.jpg")
    assert got.shape == (40, 24, 3)
    assert np.array_equal(got, np.asarray(reference_load_image(str(tmp_path / "photo.jpg"))))


def test_truncated_file_is_an_input_error(tmp_path):
    Image.fromarray(_random_image(64, 64, seed=6)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(runtime.InputError, match=r"cut\.png' is truncated or corrupt"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_is_an_input_error(tmp_path, monkeypatch):
    Image.new("1", (200, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 20000 pixels is more than twice the limit
    with pytest.raises(runtime.InputError, match=r"bomb\.png' is refused as a possible decompression bomb.*"
                                                 r"MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "bomb.png")


def test_grid_wider_than_the_position_table_is_refused():
    """The demo's table has 16 positions: 384x1920 at budget 70 is a 3x18 grid (ONNX Runtime's GatherND crashed)."""
    wide = _random_image(384, 1920, seed=7)
    with pytest.raises(runtime.InputError, match=r"384x1920 \(HxW\) image at max_soft_tokens=70 becomes a grid of 3x18 "
                                                 r"soft tokens.*holds at most 16 per row.*pad or crop"):
        preprocess_image(wide, max_soft_tokens=70, max_positions=16)
    assert len(preprocess_image(wide, max_soft_tokens=70, max_positions=18)) == 3 * 18
    long_strip = _random_image(48, 1920, seed=8)  # 2x105 at 280, 1x74 at 140, 1x52 at 70
    with pytest.raises(runtime.InputError, match=r"grid of 2x105 .* use max_soft_tokens=70 \(--max-soft-tokens 70\)"):
        preprocess_image(long_strip, max_soft_tokens=280, max_positions=64)
    assert len(preprocess_image(long_strip, max_soft_tokens=70, max_positions=64)) == 52


def test_image_errors_are_typed(tmp_path):
    assert issubclass(runtime.InputError, ValueError)
    with pytest.raises(runtime.InputFileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(runtime.InputError):
        load_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(runtime.InputError):
        preprocess_image(_random_image(48, 48), max_soft_tokens=300)
