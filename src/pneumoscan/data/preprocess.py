"""The one preprocessing path shared by training, evaluation and prediction.

``preprocess_image`` = ``decode_to_uint8`` (decode, orient, 3 channels, resize) followed by
``to_model_input`` (scale to [0, 1] float32). Training caches the uint8 stage and applies the
same ``to_model_input`` per batch, so every path feeds the model identical tensors.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pneumoscan.constants import DEFAULT_IMAGE_SIZE
from pneumoscan.data.dicom import DicomHeader, dataset_to_uint8, explain, read_dataset
from pneumoscan.data.formats import SNIFF_BYTES, jpeg_scans, sniff_format
from pneumoscan.data.limits import (
    MAX_JPEG_SCANS,
    MAX_PIXELS,
    check_deadline,
    check_min_side,
    check_pixel_budget,
    decode_deadline,
    max_file_bytes,
)
from pneumoscan.errors import (
    FileTooLargeError,
    ImageReadError,
    ImageTooLargeError,
    InvalidInputError,
    UnexpectedDecodeError,
)

ImageSource = str | Path | bytes | BinaryIO

_RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


_INTENSITY = ("none", "equalize")
#: Estimated peak bytes per pixel of decoding a Pillow image of each mode to upright RGB:
#: the decoded image, an orientation copy, the conversions to RGB (through RGBA and a black
#: background for transparent and palette images) and the array views.
_DECODE_BYTES_PER_PIXEL = {"1": 5, "L": 5, "P": 20, "RGB": 13, "I": 16, "F": 16}
_DECODE_BYTES_DEFAULT = 26  # RGBA, LA, CMYK...: the most expensive path
_HIGH_BIT_DEPTH_BYTES = 10  # I;16 and its byte orders
#: Bytes Pillow reads (and decodes) at a time, so the decode deadline is checked often: a
#: progressive JPEG's scans are decoded as their bytes arrive.
_READ_BLOCK = 16384
#: Rows rescaled at a time from 16/32 bits, so the float64 copy stays a few MB.
_ROWS_PER_CHUNK = 256
#: Colour spread (see :func:`colour_spread`) up to which an RGB image counts as a tinted grey
#: picture and is made grey; real X-rays have 0, colour photos 15 and more.
MAX_TINT_SPREAD = 10.0


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


def _describe(source: ImageSource, name: str | None = None) -> str:
    """The name messages give the file: ``name`` if the caller knows one (an upload's file
    name, ``image 3`` of a list), else its path, else a generic label."""
    if name is not None:
        return name
    return str(source) if isinstance(source, str | Path) else "<uploaded image>"


def _too_large(name: str, size: int | None, cap: int) -> FileTooLargeError:
    held = f"{size / 2**20:.0f} MB" if size is not None else "more"
    return FileTooLargeError(
        f"{name}: file of {held} is over the {cap / 2**20:g} MB limit per file; refused "
        "without reading it (PNEUMOSCAN_MAX_FILE_MB raises the limit)"
    )


def _read_bytes(source: ImageSource, name: str) -> bytes:
    """The whole file, up to the cap on bytes per file (:func:`~pneumoscan.data.limits.
    max_file_bytes`): formats are told apart by content, never by the file name, and a file
    over the cap is refused before it is read (a 2 GB file is never held in memory)."""
    cap = max_file_bytes()
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str | Path):
        try:
            with open(source, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size > cap:
                    raise _too_large(name, size, cap)
                data = file.read(cap + 1)
        except FileNotFoundError as exc:
            raise ImageReadError(f"{name}: no such file") from exc
        except IsADirectoryError as exc:
            raise ImageReadError(f"{name}: cannot read file ({exc})") from exc
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot read file ({exc})") from exc
    else:
        data = source.read(cap + 1)
    if len(data) > cap:
        raise _too_large(name, len(data) if isinstance(source, bytes) else None, cap)
    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes)")
    return data


def read_file(source: str | Path, name: str | None = None) -> bytes:
    """A file's bytes, refused over the cap on bytes per file (see :func:`_read_bytes`)."""
    return _read_bytes(source, _describe(source, name))


def failure_message(name: str, exc: BaseException) -> str:
    """The reason given for a file whose decoder failed without a specific message."""
    if isinstance(exc, MemoryError):
        return f"{name}: out of memory while decoding this file (MemoryError)"
    return f"{name}: the decoder failed on this file, which is probably damaged: {explain(exc)}"


@contextmanager
def decode_firewall(name: str) -> Iterator[None]:
    """The last line of defence around one file's decoding: any exception a decoder raises
    becomes an :class:`~pneumoscan.errors.UnexpectedDecodeError` naming the file and the
    exception type, so no file content can end a batch. Specific checks come first; this
    catches what they did not foresee.
    """
    try:
        yield
    except (ImageReadError, InvalidInputError):
        raise  # a file's own reason, or a setting to fix (PNEUMOSCAN_MAX_FILE_MB...)
    except Exception as exc:
        raise UnexpectedDecodeError(failure_message(name, exc)) from exc


def decode_bytes_per_pixel(mode: str) -> float:
    """Estimated peak memory per pixel of turning a Pillow image of ``mode`` into RGB."""
    if mode.startswith("I;16"):
        return _HIGH_BIT_DEPTH_BYTES
    return _DECODE_BYTES_PER_PIXEL.get(mode, _DECODE_BYTES_DEFAULT)


class _DeadlineReader(io.BytesIO):
    """The file's bytes as Pillow reads them, checking the decode deadline before each read:
    Pillow decodes block by block as it reads, so a decoder stuck in a scan bomb stops at the
    next block instead of holding a core for a minute."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def read(self, size: int | None = -1, /) -> bytes:
        check_deadline(self._name)
        return super().read(size)


def _open_header(data: bytes, name: str, fmt: str) -> Image.Image:
    """Open with Pillow's decoder for ``fmt`` only (the format sniffed from the content), and
    check the declared size, the minimum side and, for JPEG, the number of scans; no pixel is
    decoded yet.

    ``Image.open`` reads only the header, so an oversized image is refused before its pixels
    are decompressed; Pillow's own bomb limit (about 179 megapixels, 3x ours) still applies.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit; pneumoscan's lower one is checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(_DeadlineReader(data, name), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{name}: image over the {MAX_PIXELS / 1e6:.0f}-megapixel limit; refused without "
            f"decoding ({explain(exc)})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{name}: damaged {fmt} header (not readable as {fmt})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: damaged or truncated image header ({explain(exc)})") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageReadError(f"{name}: image size {width} x {height} is not valid")
    check_pixel_budget(name, width, height, decode_bytes_per_pixel(image.mode))
    if fmt == "JPEG" and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise ImageReadError(
            f"{name}: JPEG of {scans} scans, over the {MAX_JPEG_SCANS} any encoder writes; "
            "refused without decoding (a scan bomb)"
        )
    return image


def _open_pillow(data: bytes, name: str, fmt: str) -> Image.Image:
    """:func:`_open_header`, then decode the pixels a block at a time under the deadline."""
    image = _open_header(data, name, fmt)
    if isinstance(image, ImageFile.ImageFile):
        image.decodermaxblock = _READ_BLOCK
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: damaged or truncated image ({explain(exc)})") from exc
    check_deadline(name)
    return image


def read_header(source: str | Path, name: str | None = None) -> tuple[int, int, int, str]:
    """``(width, height, channels, format)`` of an image file from its header, with every
    check :func:`decode_image` makes before decoding (format, size, budget, minimum side,
    scans); no pixel is decoded, and only the first bytes of a non-DICOM file are read.

    Raises:
        ImageReadError: Whatever the file holds; the same reasons decoding would give.
    """
    name = _describe(source, name)
    with decode_firewall(name), decode_deadline():
        try:
            with open(source, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                head = file.read(SNIFF_BYTES)
        except FileNotFoundError as exc:
            raise ImageReadError(f"{name}: no such file") from exc
        except OSError as exc:
            raise ImageReadError(f"{name}: cannot read file ({exc})") from exc
        if size == 0:
            raise ImageReadError(f"{name}: empty file (0 bytes)")
        if size > (cap := max_file_bytes()):
            raise _too_large(name, size, cap)
        fmt = sniff_format(head, name)
        if fmt == "DICOM":
            image = _open_with_format(source, name)[0]
            return image.width, image.height, len(image.getbands()), fmt
        with _open_header(_read_bytes(source, name), name, fmt) as image:
            check_min_side(name, image.width, image.height)
            return image.width, image.height, len(image.getbands()), fmt


def _open_with_format(source: ImageSource, name: str) -> tuple[Image.Image, str]:
    """Decode any supported file into a PIL image and name its format (``JPEG``, ``DICOM``...).

    DICOM is recognised by its content (``DICM`` after the preamble) and decoded with pydicom;
    everything else (JPEG, PNG, TIFF, BMP, WebP...) by Pillow, which also sniffs content.
    Either way the declared size is checked before decoding (:mod:`pneumoscan.data.limits`).
    """
    image, fmt, _ = _open_with_header(source, name)
    return image, fmt


def _open_with_header(
    source: ImageSource, name: str
) -> tuple[Image.Image, str, DicomHeader | None]:
    """:func:`_open_with_format` and, for a DICOM file, its header (identifiers and the
    series rules' verdict) from the same parse."""
    data = _read_bytes(source, name)
    fmt = sniff_format(data[:SNIFF_BYTES], name)
    if fmt != "DICOM":
        image = _open_pillow(data, name, fmt)
        # After decoding, so that a damaged small file gets the specific reason; decoding an
        # image this small costs nothing.
        check_min_side(name, image.width, image.height)
        return image, fmt, None
    ds = read_dataset(data, name)
    header = DicomHeader.of(ds, name)
    try:
        image = Image.fromarray(dataset_to_uint8(ds, name))
        check_min_side(name, image.width, image.height)
    except ImageReadError as exc:
        exc.source_header = header  # the failure keeps the file's identifiers
        raise
    return image, fmt, header


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit greyscale to 8 bits by the bit depth the pixels actually use.

    Medical PNGs often store 10-14 significant bits in 16-bit containers; dividing by 65535
    would make them nearly black, so the divisor is the smallest 2**k - 1 >= max value.
    """
    values = np.asarray(image)
    if values.size == 0:
        raise ValueError("image has no pixels")
    if not np.all(np.isfinite(values)):
        raise ValueError("image contains non-finite values")
    lowest, highest = float(values.min()), float(values.max())
    # Rescaled a few rows at a time: a float64 copy of the whole image takes 8 bytes a pixel.
    if image.mode == "F" and lowest >= 0.0 and highest <= 1.0:
        # Floating-point images in [0, 1] (e.g. TIFFs from research pipelines) are unit scaled.
        return Image.fromarray(_rescaled(values, 0.0, 1.0))
    offset = min(0.0, lowest)
    peak = highest - offset
    bits = int(np.clip(np.ceil(np.log2(peak + 1.0)), 8, 32)) if peak > 0 else 8
    return Image.fromarray(_rescaled(values, offset, 2.0**bits - 1.0))


def _rescaled(values: np.ndarray, offset: float, full_scale: float) -> np.ndarray:
    """``round((values - offset) / full_scale * 255)`` as uint8, in float64 row by row."""
    out = np.empty(values.shape, np.uint8)
    for start in range(0, values.shape[0], _ROWS_PER_CHUNK):
        rows = values[start : start + _ROWS_PER_CHUNK].astype(np.float64) - offset
        out[start : start + _ROWS_PER_CHUNK] = np.round(rows / full_scale * 255.0).astype(np.uint8)
    return out


def colour_spread(pixels: np.ndarray) -> np.ndarray:
    """Colour not explained by a single tint, in grey levels, per image of a uint8 RGB batch.

    Each channel's difference from the brightness is regressed on the brightness; a grey or
    uniformly tinted image (a film photographed under warm light) leaves no residual, a photo
    with several hues leaves a large one (15 to 140 for scikit-image's colour photos).
    """
    pixels = np.asarray(pixels)
    spread = np.zeros(len(pixels))
    # Grey images (every X-ray) have exactly zero spread; checking that in uint8 saves the
    # float arithmetic that dominated prediction's cheap checks.
    flat = pixels.reshape(len(pixels), -1, 3)
    grey = ((flat[..., 0] == flat[..., 1]) & (flat[..., 1] == flat[..., 2])).all(axis=1)
    if not grey.all():
        spread[~grey] = _colour_spread(flat[~grey])
    return spread


def _colour_spread(flat: np.ndarray) -> np.ndarray:
    values = np.asarray(flat, np.float32)
    brightness = values.mean(axis=2, keepdims=True)
    chroma = values - brightness
    centred_b = brightness - brightness.mean(axis=1, keepdims=True)
    centred_c = chroma - chroma.mean(axis=1, keepdims=True)
    variance_b = (centred_b**2).mean(axis=1, keepdims=True)
    slope = (centred_b * centred_c).mean(axis=1, keepdims=True) / np.maximum(variance_b, 1e-6)
    residual = centred_c - slope * centred_b
    return np.asarray(np.sqrt((residual**2).mean(axis=1).sum(axis=1)))


def _desaturate_tint(image: Image.Image) -> Image.Image:
    """A tinted grey picture (a photo of a film) becomes grey; other images are unchanged.

    X-rays are greyscale, so a colour cast carries no information, yet it changes what a
    network trained on grey images outputs. Images whose channels are already equal (every
    X-ray in the data sets) are returned as they are, so their pixels do not change.
    """
    pixels = np.asarray(image)
    step = max(1, min(pixels.shape[:2]) // 256)
    sample = pixels[::step, ::step]
    if (sample[..., 0] == sample[..., 1]).all() and (sample[..., 1] == sample[..., 2]).all():
        return image
    if float(colour_spread(sample[None])[0]) > MAX_TINT_SPREAD:
        return image
    return image.convert("L").convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_bit_depth_to_8bit(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become black, like the unexposed edge of a film.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode == "L":
        return image.convert("RGB")
    return _desaturate_tint(image.convert("RGB"))


def _upright_rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{name}: cannot convert image ({exc})") from exc


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode an image file into an upright 8-bit RGB ``PIL.Image``.

    The format is found from the content, not the file name: JPEG, PNG (8/16-bit, greyscale,
    RGB, RGBA, palette), TIFF and the other formats Pillow reads, and DICOM (see
    :mod:`pneumoscan.data.dicom`). EXIF orientation is honoured.

    Args:
        source: A path, the file's bytes, or a binary file object.
        name: What messages call the file (default: its path, or a generic label).

    Raises:
        ImageReadError: The file is missing, empty, not an image, or damaged; the message
            names the file.
    """
    name = _describe(source, name)
    with decode_firewall(name), decode_deadline():
        return _upright_rgb(_open_with_format(source, name)[0], name)


@dataclass(frozen=True)
class DecodedImage:
    """One decoded file, with what prediction needs besides the model input.

    Attributes:
        pixels: Model input stage one, ``(height, width, 3)`` uint8 (as
            :func:`decode_to_uint8` returns it).
        display: The same image before intensity normalisation (what a viewer shows); the
            same array as ``pixels`` when the model uses none.
        original_size: ``(width, height)`` of the upright image before resizing.
        source_format: ``JPEG``, ``PNG``, ``TIFF``, ``DICOM``... as found from the content.
        dicom: A DICOM file's identifiers and the series rules' verdict (``None`` for other
            formats).
    """

    pixels: np.ndarray
    display: np.ndarray
    original_size: tuple[int, int]
    source_format: str
    dicom: DicomHeader | None = None


def decode_image(
    source: ImageSource, config: PreprocessConfig | None = None, name: str | None = None
) -> DecodedImage:
    """Decode and resize a file like :func:`decode_to_uint8`, keeping its size and format.

    ``name`` is what error messages call the file (default: its path, or a generic label
    for bytes and file objects), so a caller never has to patch names into messages.

    Raises:
        ImageReadError: Whatever the file holds: a specific subclass or message for every
            known problem (:class:`~pneumoscan.errors.ImageTooLargeError` over the pixel
            budget), :class:`~pneumoscan.errors.UnexpectedDecodeError` for the rest.
    """
    name = _describe(source, name)
    with decode_firewall(name), decode_deadline():
        return _decode_image(source, config, name)


def _decode_image(
    source: ImageSource, config: PreprocessConfig | None, name: str | None = None
) -> DecodedImage:
    """:func:`decode_image` without the firewall (tests call it to see raw decoder errors)."""
    name = _describe(source, name)
    config = config or PreprocessConfig()
    height, width = config.image_size
    image, source_format, header = _open_with_header(source, name)
    image = _upright_rgb(image, name)
    original_size = image.size
    if image.size != (width, height):
        image = image.resize((width, height), _RESAMPLING[config.interpolation])
    display = np.asarray(image, dtype=np.uint8)
    pixels = display
    if config.intensity == "equalize":
        # After resizing, so a full-resolution original and its 224x224 copy equalise alike.
        pixels = np.asarray(ImageOps.equalize(image.convert("L")).convert("RGB"), np.uint8)
    return DecodedImage(pixels, display, original_size, source_format, header)


@dataclass(frozen=True)
class DecodeFailure:
    """Why one file could not be decoded: the typed value a decode failure travels as.

    Attributes:
        path: What the file is called (its path, an upload's file name, ``image 3``).
        message: The reason, naming the file, exactly as results and warnings show it.
        error_type: The exception's class name (``ImageReadError``, ``ImageTooLargeError``...).
        dicom: A DICOM file's header when it was read before the pixels failed (its
            identifiers go into the error row).
    """

    path: str
    message: str
    error_type: str
    dicom: DicomHeader | None = None

    @classmethod
    def from_exception(cls, path: str, exc: BaseException) -> DecodeFailure:
        """The failure for an exception a decoder raised.

        An :class:`~pneumoscan.errors.ImageReadError` already names the file; anything else
        (which the firewall should have turned into one) gets :func:`failure_message`.
        """
        message = str(exc) if isinstance(exc, ImageReadError) else failure_message(path, exc)
        header = getattr(exc, "source_header", None)
        dicom = header if isinstance(header, DicomHeader) else None
        return cls(path, message, type(exc).__name__, dicom)


def try_decode_image(
    source: ImageSource, config: PreprocessConfig | None = None, name: str | None = None
) -> DecodedImage | DecodeFailure:
    """:func:`decode_image`, or the :class:`DecodeFailure` saying why not; never raises."""
    name = _describe(source, name)
    try:
        return decode_image(source, config, name)
    except Exception as exc:  # the per-file firewall: no file's content may end a run
        return DecodeFailure.from_exception(name, exc)


def decode_to_uint8(source: ImageSource, config: PreprocessConfig | None = None) -> np.ndarray:
    """First stage: decode and resize to a ``(height, width, 3)`` uint8 array."""
    return decode_image(source, config).pixels


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
