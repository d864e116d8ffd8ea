"""How large an image pneumoscan decodes: checked from the header, before any pixel is read.

A few kilobytes of PNG or DICOM can declare hundreds of megapixels (a 48 KB 1-bit PNG of
40000 x 40000 pixels). Every decoder checks the declared size here first, so one file can
neither exhaust memory nor stall a batch; the CLI, training and the service share the limits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pneumoscan.errors import (
    DecodeTimeoutError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidInputError,
)

#: Largest image decoded, in pixels (all frames together): 60 megapixels, seven times the
#: largest chest detector in use (43 x 43 cm at 140 µm is about 3070 x 3070).
MAX_PIXELS = 60_000_000
#: Largest estimated peak memory of decoding one file, in bytes; per-pixel costs differ by
#: format and mode (an RGBA PNG needs several full-size copies, a greyscale JPEG one).
MAX_DECODE_BYTES = 500 * 1024 * 1024


def check_pixel_budget(name: str, width: int, height: int, bytes_per_pixel: float = 1.0) -> None:
    """Refuse an image whose declared size is over :data:`MAX_PIXELS` or whose decoding would
    need more than :data:`MAX_DECODE_BYTES`.

    Args:
        name: How the message names the file.
        width: Declared width in pixels.
        height: Declared height in pixels (times the number of frames for several frames).
        bytes_per_pixel: Estimated peak memory per pixel of decoding this kind of image.

    Raises:
        ImageTooLargeError: Over a limit; the message gives the size and the limit.
    """
    pixels = int(width) * int(height)
    size = f"{width} x {height} pixels ({pixels / 1e6:.1f} megapixels)"
    if pixels > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{name}: image of {size} is over the {MAX_PIXELS / 1e6:.0f}-megapixel limit; "
            "refused without decoding (downscale it, or check that the file is an X-ray)"
        )
    needed = pixels * bytes_per_pixel
    if needed > MAX_DECODE_BYTES:
        raise ImageTooLargeError(
            f"{name}: image of {size} would need about {needed / 2**20:.0f} MB to decode, over "
            f"the {MAX_DECODE_BYTES / 2**20:.0f} MB limit per file; refused without decoding"
        )


#: Smallest side, in pixels, of an image pneumoscan scores. Measured on the site sample
#: (benchmarks/min_resolution.py, README): thumbnails of 64 px keep the full-size AUC (0.985)
#: and specificity; at 32 px the AUC falls to 0.974 and nine normal X-rays in ten are flagged
#: (specificity 0.17), at 8 px every one is. Smaller images are refused, not scored.
MIN_IMAGE_SIDE = 64
#: Default cap on the bytes read from one file (``PNEUMOSCAN_MAX_FILE_MB`` overrides it): an
#: uncompressed 16-bit DICOM at the pixel budget is about 110 MB; a larger file is not read.
DEFAULT_MAX_FILE_MB = 128.0
#: Default wall-clock limit on decoding one file (``PNEUMOSCAN_DECODE_SECONDS`` overrides it).
#: The largest legitimate files (55 megapixels) decode in about 1 s on one core.
DEFAULT_DECODE_SECONDS = 4.0
#: Most scans a JPEG may hold. Progressive encoders write about 10 (Pillow 10, libjpeg's
#: default script 10, mozjpeg up to 20); each scan is a pass over every block, so thousands of
#: tiny repeated scans hold a core for minutes (issue 22: 10,000 scans, 77 s).
MAX_JPEG_SCANS = 100
_MAX_FILE_ENV = "PNEUMOSCAN_MAX_FILE_MB"
_DECODE_SECONDS_ENV = "PNEUMOSCAN_DECODE_SECONDS"


def _positive_setting(variable: str, default: float) -> float:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0 or number == float("inf"):
        raise InvalidInputError(f"{variable}={value!r} is not a positive number")
    return number


def max_file_bytes() -> int:
    """Most bytes read from one input file: ``PNEUMOSCAN_MAX_FILE_MB`` (MB, default 128)."""
    return int(_positive_setting(_MAX_FILE_ENV, DEFAULT_MAX_FILE_MB) * 2**20)


def decode_seconds() -> float:
    """Deadline of decoding one file: ``PNEUMOSCAN_DECODE_SECONDS`` (default 4)."""
    return _positive_setting(_DECODE_SECONDS_ENV, DEFAULT_DECODE_SECONDS)


def check_min_side(name: str, width: int, height: int) -> None:
    """Refuse an image smaller than :data:`MIN_IMAGE_SIDE` on either side, from its header.

    Raises:
        ImageTooSmallError: The message gives the size, the minimum and why.
    """
    if min(int(width), int(height)) < MIN_IMAGE_SIDE:
        raise ImageTooSmallError(
            f"{name}: image of {width} x {height} pixels is below the {MIN_IMAGE_SIDE}-pixel "
            "minimum side; a thumbnail this small cannot be read reliably (at 32 px nine normal "
            "X-rays in ten are flagged); give the full-resolution image"
        )


#: ``(monotonic deadline, seconds allowed)`` of the file being decoded in this thread.
_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("decode_deadline", default=None)


@contextmanager
def decode_deadline(seconds: float | None = None) -> Iterator[None]:
    """Give the decoding inside the block ``seconds`` (default :func:`decode_seconds`) of
    wall-clock time; :func:`check_deadline` raises once they have passed.

    The deadline is cooperative: decoders check it between steps and, for Pillow, before each
    block of the file they read (a few kilobytes), so a scan bomb stops within a fraction of a
    second of the deadline, and the thread is free again (no decoder is left running).
    """
    allowed = decode_seconds() if seconds is None else seconds
    token = _DEADLINE.set((time.monotonic() + allowed, allowed))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_deadline(name: str) -> None:
    """Raise :class:`~pneumoscan.errors.DecodeTimeoutError` once this file's decode deadline
    (see :func:`decode_deadline`) has passed; nothing outside a deadline block."""
    current = _DEADLINE.get()
    if current is not None and time.monotonic() > current[0]:
        raise DecodeTimeoutError(
            f"{name}: decoding took longer than the {current[1]:g} s limit per file and was "
            f"stopped (a scan bomb or a damaged file); {_DECODE_SECONDS_ENV} raises the limit"
        )
