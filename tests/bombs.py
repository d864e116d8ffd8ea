"""Hostile files built from real X-rays (issue 22), for tests and benchmarks/decode_memory.py.

Every builder streams what it writes, so a file that would inflate to gigabytes is made
without ever holding them: a test can hand it to the decoder and check that it is refused
before it is inflated.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from conftest import SITE_SAMPLE, fixture_images


def xray(side: int | tuple[int, int] = 224) -> Image.Image:
    """A real pneumonia X-ray (site sample, else the repo's fixtures), grey, resized."""
    found = sorted(SITE_SAMPLE.glob("PNEUMONIA/*.jpeg"))
    source = found[0] if found else fixture_images("PNEUMONIA")[0]
    size = (side, side) if isinstance(side, int) else side
    with Image.open(source) as image:
        return image.convert("L").resize(size, Image.Resampling.BILINEAR)


def _meta(syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    return meta


def _image_attributes(rows: int, columns: int, bits: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored = 1, bits, bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    return ds


def _file_start(meta: FileMetaDataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def _explicit_le(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflated_dicom(side: int, real_side: int = 224) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM of a ``side x side`` 16-bit image: a real
    X-ray of ``real_side`` in the corner, zeros elsewhere. The zeros deflate about 1000:1, so
    ``side=32768`` is a 2 GiB data set in about 2 MB (a decompression bomb); a small ``side``
    is a genuine deflated file."""
    grey = np.asarray(xray(min(real_side, side)), np.uint16) * 16
    attributes = _explicit_le(_image_attributes(side, side, 16))
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [_file_start(_meta(DeflatedExplicitVRLittleEndian)), deflater.compress(attributes)]
    pixel_data = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 2 * side * side)
    parts.append(deflater.compress(pixel_data))
    zero_rows = np.zeros((max(1, min(side, 2**21 // side)), side), "<u2")
    for top in range(0, side, len(zero_rows)):
        rows = zero_rows[: min(len(zero_rows), side - top)].copy()
        overlap = grey[top : top + len(rows)]
        rows[: len(overlap), : overlap.shape[1]] = overlap
        parts.append(deflater.compress(rows.tobytes()))
    parts.append(deflater.flush())
    return b"".join(parts)


def _encapsulated(codestream: bytes, syntax: str, rows: int, columns: int) -> bytes:
    ds = _image_attributes(rows, columns, 8)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01" if syntax == JPEGBaseline8Bit else "00"
    return _file_start(_meta(syntax)) + _explicit_le(ds)


def jpeg_codestream(side: int, **options: object) -> bytes:
    """A real X-ray as a ``side x side`` greyscale JPEG (made in stripes for a large side)."""
    buffer = io.BytesIO()
    xray(min(side, 1024)).resize((side, side), Image.Resampling.NEAREST).save(
        buffer, "JPEG", quality=85, **options
    )
    return buffer.getvalue()


def j2k_codestream(side: int) -> bytes:
    """A real X-ray as a raw JPEG 2000 codestream (no JP2 boxes), as DICOM holds it."""
    buffer = io.BytesIO()
    xray(min(side, 1024)).resize((side, side), Image.Resampling.NEAREST).save(
        buffer, "JPEG2000", no_jp2=True, irreversible=False
    )
    return buffer.getvalue()


def dicom_jpeg(stream_side: int, header_side: int = 512) -> bytes:
    """JPEG Baseline DICOM whose header says ``header_side`` and whose codestream holds a
    ``stream_side`` image (a codestream bomb when the stream is larger)."""
    return _encapsulated(jpeg_codestream(stream_side), JPEGBaseline8Bit, header_side, header_side)


def dicom_j2k(stream_side: int, header_side: int = 512) -> bytes:
    """The same with a JPEG 2000 Lossless codestream."""
    return _encapsulated(j2k_codestream(stream_side), JPEG2000Lossless, header_side, header_side)


def scan_bomb(side: int = 4096, repeats: int = 10_000, xray_side: int = 128) -> bytes:
    """A progressive JPEG of a real X-ray (``xray_side`` px in the corner of a black
    ``side x side`` film) whose smallest scan is repeated ``repeats`` times: each copy is a
    few hundred bytes in the file and a pass over every block of the image for the decoder."""
    film = Image.new("L", (side, side), 0)
    film.paste(xray(xray_side), (0, 0))
    buffer = io.BytesIO()
    film.save(buffer, "JPEG", quality=85, progressive=True)
    data = buffer.getvalue()
    end = data.rfind(b"\xff\xd9")
    starts = [at for at in range(len(data) - 1) if data[at : at + 2] == b"\xff\xda"]
    bounds = [*starts, end]
    scans = [data[bounds[k] : bounds[k + 1]] for k in range(len(starts))]
    smallest = min(scans, key=len)
    return data[:end] + smallest * repeats + data[end:]


def png_bomb(side: int = 40000, whole: bool = False) -> bytes:
    """A 1-bit PNG declaring ``side x side`` pixels. ``whole``: every (zero) pixel compressed,
    as a real bomb is (Pillow needs ``side**2 / 8`` bytes to write it); otherwise a header and
    a short first IDAT chunk, which is all a decoder reads before deciding (instant)."""
    if whole:
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, "PNG")
        return buffer.getvalue()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
