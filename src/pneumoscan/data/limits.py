"""How large an image pneumoscan decodes: checked from the header, before any pixel is read.

A few kilobytes of PNG or DICOM can declare hundreds of megapixels (a 48 KB 1-bit PNG of
40000 x 40000 pixels). Every decoder checks the declared size here first, so one file can
neither exhaust memory nor stall a batch; the CLI, training and the service share the limits.
"""

from __future__ import annotations

from pneumoscan.errors import ImageTooLargeError

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
