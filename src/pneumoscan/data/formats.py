"""Which file formats pneumoscan decodes, told from their first bytes before any decoder runs.

A chest X-ray reaches pneumoscan as DICOM (from a PACS), or as JPEG, PNG or TIFF (exports,
teaching files, data sets). Pillow alone opens about 40 more formats, each a decoder an
attacker can aim at; every other format is refused here, by name, before a decoder sees it.
The codestream headers of JPEG and JPEG 2000 are also parsed here, so that the real size of
a compressed image (which the decoder allocates for) is known before it is decoded.
"""

from __future__ import annotations

import struct

from pneumoscan.errors import ImageReadError, UnsupportedFormatError

#: Formats decoded, by the name :func:`sniff_format` gives them (Pillow's format names).
ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "DICOM")
#: Bytes :func:`sniff_format` needs.
SNIFF_BYTES = 512

#: Bytes 128-131 of a DICOM Part 10 file.
DICOM_MAGIC = b"DICM"
PREAMBLE_LENGTH = 128
#: Little-endian tags of the groups a preamble-less (raw) DICOM data set starts with.
_RAW_DICOM_STARTS = (b"\x02\x00", b"\x08\x00")

_ACCEPTED = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
#: Formats recognised in order to be refused by name (the message says what the file is).
_REFUSED = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive"),
    (b"8BPS", "Photoshop"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"gimp xcf", "GIMP XCF"),
    (b"SIMPLE  =", "FITS"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"\x0a\x05\x01\x08", "PCX"),
    (b"\x0a\x03\x01\x08", "PCX"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}


def _refused_name(head: bytes) -> str | None:
    for magic, name in _REFUSED:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        return _ISO_BRANDS.get(head[8:12], "ISO media (MP4, HEIF)")
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[1:2] != b"":
        return "PNM (PBM, PGM, PPM)"
    text = head.lstrip()[:64].lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype", b"<html")):
        return "XML, SVG or HTML"
    return None


def looks_like_dicom(header: bytes) -> bool:
    """Whether a file's first bytes are a DICOM file's, whatever its name.

    True for Part 10 files (``DICM`` after the 128-byte preamble) and for raw data sets that
    start directly with a group 0002 or 0008 element, as some older archives store them.
    """
    if header[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == DICOM_MAGIC:
        return True
    # A raw data set starts with (gggg,eeee) then, in explicit VR, a two-letter VR.
    return header[:2] in _RAW_DICOM_STARTS and len(header) >= 8 and header[4:6].isalpha()


def sniff_format(head: bytes, name: str) -> str:
    """The format of a file from its first :data:`SNIFF_BYTES` bytes: one of
    :data:`ACCEPTED_FORMATS`.

    Raises:
        UnsupportedFormatError: A format an X-ray does not come in (GIF, WebP, BMP, PDF...),
            named in the message.
        ImageReadError: Content no format is recognised in ("not an image").
    """
    for magic, fmt in _ACCEPTED:
        if head.startswith(magic):
            return fmt
    if looks_like_dicom(head):
        return "DICOM"
    refused = _refused_name(head)
    accepted = ", ".join(ACCEPTED_FORMATS)
    if refused is not None:
        raise UnsupportedFormatError(
            f"{name}: {refused} files are not accepted (accepted: {accepted}); export the "
            "X-ray as one of those"
        )
    raise ImageReadError(f"{name}: not an image (unrecognised format)")


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) a JPEG stream holds, at most.

    Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so
    ``FF DA`` occurs only as a real marker (or inside an embedded thumbnail, which only adds).
    """
    return data.count(b"\xff\xda")


# Start-of-frame markers of every JPEG process (not DHT C4, JPG C8, DAC CC), and JPEG-LS F7.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG or JPEG-LS frame header, or ``None``."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # image ended or a scan began before any frame header
            return None
        if marker in _SOF_MARKERS:
            if at + 10 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height, data[at + 9]
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        at += 2 + length
    return None


def _j2k_size(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG 2000 SIZ segment, or ``None``."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 44 > len(data):
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", data[at + 8 : at + 24])
    (components,) = struct.unpack(">H", data[at + 40 : at + 42])
    if x_offset > x_size or y_offset > y_size:
        return None
    return x_size - x_offset, y_size - y_offset, components


def codestream_size(fragment: bytes, kind: str) -> tuple[int, int, int]:
    """The real ``(width, height, components)`` of a compressed image from its codestream
    header (``kind``: ``JPEG``, covering JPEG-LS, or ``JPEG 2000``), before it is decoded.

    Raises:
        ImageReadError: No valid header in the first bytes (a message without the name;
            callers add it).
    """
    if kind == "JPEG 2000":
        size = _j2k_size(fragment[:4096])
    elif fragment[:2] == b"\xff\xd8":
        size = _jpeg_frame_size(fragment)
    else:
        size = None
    if size is None or size[0] <= 0 or size[1] <= 0:
        raise ImageReadError(f"no valid {kind} frame header at the start of the codestream")
    return size
