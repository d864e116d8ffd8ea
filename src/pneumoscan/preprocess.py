"""The one preprocessing path shared by training, evaluation and prediction.

``preprocess_image`` = ``decode_to_uint8`` (decode, orient, 3 channels, resize) followed by
``to_model_input`` (scale to [0, 1] float32). Training caches the uint8 stage and applies the
same ``to_model_input`` per batch, so every path feeds the model identical tensors.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pneumoscan.constants import DEFAULT_IMAGE_SIZE
from pneumoscan.errors import ImageReadError

ImageSource = str | Path | bytes | BinaryIO

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


_INTENSITY = ("none", "equalize")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input; stored in every model file.

    Attributes:
        image_size: Target ``(height, width)``.
        resize: ``squash`` stretches to the target size without keeping the aspect ratio,
            as the original notebook did.
        interpolation: ``bilinear``, ``bicubic`` or ``area`` (antialiased when shrinking).
        scale: ``unit`` divides 8-bit values by 255 to give [0, 1].
        channels: Channels fed to the model (grey images are repeated).
        intensity: ``none`` keeps pixel values; ``equalize`` equalises the grey-level histogram
            after resizing, so exposure and contrast differences between scanners shrink
            before the model sees the image (the image becomes grey).
    """

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    resize: str = "squash"
    interpolation: str = "bilinear"
    scale: str = "unit"
    channels: int = 3
    intensity: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for model metadata and run configs."""
        return asdict(self) | {"image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        values = dict(values)
        values["image_size"] = tuple(values.get("image_size", DEFAULT_IMAGE_SIZE))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` on settings this version cannot apply."""
        if self.resize != "squash":
            raise ValueError(f"unsupported resize mode {self.resize!r} (supported: 'squash')")
        if self.interpolation not in _RESAMPLING:
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if self.scale != "unit":
            raise ValueError(f"unsupported scale {self.scale!r} (supported: 'unit')")
        if self.channels != 3:
            raise ValueError(f"unsupported channel count {self.channels} (supported: 3)")
        if self.intensity not in _INTENSITY:
            raise ValueError(f"unsupported intensity {self.intensity!r} (supported: {_INTENSITY})")


def _describe(source: ImageSource) -> str:
    return str(source) if isinstance(source, str | Path) else "<uploaded image>"


def _open(source: ImageSource) -> Image.Image:
    name = _describe(source)
    try:
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        if isinstance(source, str | Path) and Path(source).stat().st_size == 0:
            raise ImageReadError(f"{name}: empty file (0 bytes)")
        image = Image.open(source)
        image.load()
    except ImageReadError:
        raise
    except FileNotFoundError as exc:
        raise ImageReadError(f"{name}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{name}: not an image (unrecognised format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{name}: damaged or truncated image ({exc})") from exc
    return image


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit greyscale to 8 bits by the bit depth the pixels actually use.

    Medical PNGs often store 10-14 significant bits in 16-bit containers; dividing by 65535
    would make them nearly black, so the divisor is the smallest 2**k - 1 >= max value.
    """
    values = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("image contains non-finite values")
    values = values - min(0.0, float(values.min()))
    peak = float(values.max())
    bits = int(np.clip(np.ceil(np.log2(peak + 1.0)), 8, 32)) if peak > 0 else 8
    scaled = np.round(values / (2.0**bits - 1.0) * 255.0)
    return Image.fromarray(scaled.astype(np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_bit_depth_to_8bit(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become black, like the unexposed edge of a film.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB ``PIL.Image``.

    Handles greyscale, RGB, RGBA, palette and 16-bit images, and honours EXIF orientation.

    Args:
        source: A path, the file's bytes, or a binary file object.

    Raises:
        ImageReadError: The file is missing, empty, not an image, or damaged; the message
            names the file.
    """
    image = _open(source)
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{_describe(source)}: cannot convert image ({exc})") from exc


def decode_to_uint8(source: ImageSource, config: PreprocessConfig | None = None) -> np.ndarray:
    """First stage: decode and resize to a ``(height, width, 3)`` uint8 array."""
    config = config or PreprocessConfig()
    height, width = config.image_size
    image = load_image(source)
    if image.size != (width, height):
        image = image.resize((width, height), _RESAMPLING[config.interpolation])
    if config.intensity == "equalize":
        # After resizing, so a full-resolution original and its 224x224 copy equalise alike.
        image = ImageOps.equalize(image.convert("L")).convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """Second stage: uint8 pixels (any leading batch shape) to float32 in [0, 1].

    Raises:
        ValueError: The array is not uint8, so its value range is unknown.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels in [0, 255], got dtype {pixels.dtype}")
    return pixels.astype(np.float32) / np.float32(255.0)


def preprocess_image(source: ImageSource, config: PreprocessConfig | None = None) -> np.ndarray:
    """Turn an image file into the model's input tensor ``(height, width, 3)`` float32 in [0, 1].

    Args:
        source: A path, the file's bytes, or a binary file object.
        config: The model's preprocessing; the default matches the ``seed`` model.
    """
    return to_model_input(decode_to_uint8(source, config))
