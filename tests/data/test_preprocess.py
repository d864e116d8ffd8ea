"""Tests for pneumoscan.data.preprocess: one path for every input kind, with clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.data.preprocess import (
    PreprocessConfig,
    decode_image,
    decode_to_uint8,
    load_image,
    preprocess_image,
    to_model_input,
)
from pneumoscan.errors import ImageReadError

from conftest import ORIGINALS, SHARED_TRAIN, needs_shared


def test_output_shape_dtype_and_range(xray_path: Path) -> None:
    tensor = preprocess_image(xray_path)
    assert tensor.shape == (224, 224, 3) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() < 0.2 and 0.8 < tensor.max() <= 1.0


def _variants(xray_path: Path, tmp_path: Path) -> dict[str, Path]:
    grey = Image.open(xray_path).convert("L")
    paths = {}
    for name, image in {
        "grey.png": grey,
        "rgb.jpg": grey.convert("RGB"),
        "rgba.png": grey.convert("RGBA"),
        "palette.png": grey.convert("P"),
        # 12 significant bits in a 16-bit container, as medical PNGs often are.
        "deep.png": Image.fromarray(np.asarray(grey).astype(np.uint16) * 16),
    }.items():
        paths[name] = tmp_path / name
        image.save(paths[name])
    return paths


def test_every_pixel_format_gives_the_same_tensor(xray_path: Path, tmp_path: Path) -> None:
    reference = preprocess_image(xray_path)
    for name, path in _variants(xray_path, tmp_path).items():
        tensor = preprocess_image(path)
        assert tensor.shape == (224, 224, 3), name
        assert np.abs(tensor - reference).mean() < 0.01, name


def test_exif_orientation_is_honoured(xray_path: Path, tmp_path: Path) -> None:
    upright = Image.open(xray_path).convert("L").resize((200, 260))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    config = PreprocessConfig(image_size=(260, 200))
    decoded = decode_to_uint8(path, config)[..., 0].astype(float)
    assert np.abs(decoded - np.asarray(upright, float)).mean() < 6


def test_bytes_and_file_objects_match_paths(xray_path: Path) -> None:
    data = xray_path.read_bytes()
    expected = preprocess_image(xray_path)
    np.testing.assert_array_equal(preprocess_image(data), expected)
    np.testing.assert_array_equal(preprocess_image(io.BytesIO(data)), expected)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty file"), (b"hello, not an image", "not an image"), (None, "damaged or truncated")],
)
def test_bad_files_raise_naming_the_file(
    xray_path: Path, tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "bad.jpeg"
    path.write_bytes(xray_path.read_bytes()[:300] if content is None else content)
    with pytest.raises(ImageReadError, match=message) as caught:
        preprocess_image(path)
    assert str(path) in str(caught.value)


def test_to_model_input_refuses_unknown_range() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((2, 2, 3), np.float32))


def test_config_round_trip_and_validation() -> None:
    config = PreprocessConfig(image_size=(128, 160))
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="resize"):
        PreprocessConfig.from_dict({"resize": "crop"})


@needs_shared
def test_full_resolution_originals_match_their_224_copies() -> None:
    originals = sorted(ORIGINALS.glob("*/*.jpeg"))
    assert len(originals) == 24
    for original in originals:
        copy = SHARED_TRAIN / original.parent.name / original.name
        difference = np.abs(preprocess_image(original) - preprocess_image(copy)).mean()
        assert difference < 0.03, f"{original.name}: mean absolute difference {difference:.4f}"


def test_equalize_spreads_the_histogram_and_keeps_shape(xray_path: Path, tmp_path: Path) -> None:
    config = PreprocessConfig(intensity="equalize")
    dim = Image.open(xray_path).convert("L").point(lambda v: 60 + v // 3)  # low contrast copy
    dim_path = tmp_path / "dim.png"
    dim.save(dim_path)
    plain = decode_to_uint8(dim_path)
    equalized = decode_to_uint8(dim_path, config)
    assert equalized.shape == plain.shape == (224, 224, 3)
    assert equalized.std() > 1.5 * plain.std()
    # Equalisation undoes most of a global contrast change.
    reference = decode_to_uint8(xray_path, config).astype(float)
    assert np.abs(equalized.astype(float) - reference).mean() < 12
    with pytest.raises(ValueError, match="intensity"):
        PreprocessConfig(intensity="clahe").validate()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("grey-lzw", lambda g: g),
        ("rgb-lzw", lambda g: g.convert("RGB")),
        ("deep", lambda g: Image.fromarray(np.asarray(g).astype(np.uint16) * 257)),
        ("float", lambda g: Image.fromarray(np.asarray(g).astype(np.float32) / 255.0)),
    ],
)
def test_tiff_inputs_give_the_same_tensor(
    xray_path: Path, tmp_path: Path, name: str, make: object
) -> None:
    grey = Image.open(xray_path).convert("L")
    path = tmp_path / f"{name}.tif"
    make(grey).save(path, compression="tiff_lzw" if "lzw" in name else None)  # type: ignore[operator]
    decoded = decode_image(path)
    assert decoded.source_format == "TIFF"
    assert np.abs(decoded.pixels.astype(float) - decode_to_uint8(xray_path)).mean() < 1.5


def test_format_comes_from_content_and_size_is_kept(xray_path: Path, tmp_path: Path) -> None:
    png_named_jpeg = tmp_path / "really-a-png.jpeg"
    Image.open(xray_path).convert("L").resize((300, 200)).save(png_named_jpeg, format="PNG")
    decoded = decode_image(png_named_jpeg)
    assert decoded.source_format == "PNG" and decoded.original_size == (300, 200)
    assert decoded.pixels.shape == (224, 224, 3) and decoded.display is decoded.pixels


def test_decode_image_keeps_the_unequalised_display(xray_path: Path) -> None:
    decoded = decode_image(xray_path, PreprocessConfig(intensity="equalize"))
    equalised = decode_to_uint8(xray_path, PreprocessConfig(intensity="equalize"))
    np.testing.assert_array_equal(decoded.pixels, equalised)
    np.testing.assert_array_equal(decoded.display, decode_to_uint8(xray_path))


def test_unreadable_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="cannot read file"):
        preprocess_image(tmp_path)  # a folder


def test_a_tinted_photo_of_a_film_becomes_grey(xray_path: Path, tmp_path: Path) -> None:
    grey = np.asarray(Image.open(xray_path).convert("L")).astype(float)
    tinted = np.clip(grey[..., None] * [1.0, 0.93, 0.8] + [10, 8, 2], 0, 255).astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(tinted).save(path, quality=95)
    decoded = decode_to_uint8(path)
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()
    assert np.abs(decoded[..., 0].astype(float) - grey * 0.93).mean() < 12


def test_grey_and_colourful_images_keep_their_pixels(xray_path: Path) -> None:
    import skimage.data

    plain = np.asarray(Image.open(xray_path).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(xray_path)), plain)
    photo = skimage.data.astronaut()
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    np.testing.assert_array_equal(np.asarray(load_image(buffer.getvalue())), photo)
