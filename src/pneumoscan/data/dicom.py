"""DICOM radiographs to display-ready 8-bit pixels, with pydicom.

A radiograph from a PACS is not a picture yet: its stored values go through the modality LUT
(rescale slope and intercept), then the VOI LUT or window centre/width chosen for viewing, and
MONOCHROME1 images are shown with their grey levels inverted (low values white). This module
applies exactly those steps, with pydicom's own implementations, so the model sees what a
radiologist's viewer shows. Compressed transfer syntaxes are decoded by the pydicom plugins
that are installed (Pillow, pylibjpeg with its libjpeg and OpenJPEG plugins).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.data.formats import DICOM_MAGIC, PREAMBLE_LENGTH, codestream_size, jpeg_scans
from pneumoscan.data.formats import looks_like_dicom as looks_like_dicom  # its home is formats
from pneumoscan.data.limits import (
    MAX_DECODE_BYTES,
    MAX_JPEG_SCANS,
    check_deadline,
    check_pixel_budget,
    max_file_bytes,
)
from pneumoscan.data.selection import refusal
from pneumoscan.errors import ImageReadError, ImageTooLargeError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pydicom.uid import UID

DECODER_PACKAGES = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
#: Peak bytes per pixel of decoding an uncompressed greyscale DICOM image: the file's bytes,
#: the stored array and the uint8 result (the float transforms run a few rows at a time).
#: Measured (benchmarks/decode_memory.py): a 59-megapixel 16-bit file peaked at 513 MiB,
#: about 8.4 bytes per pixel above the interpreter's own 36 MiB.
_DICOM_BYTES_PER_PIXEL = 9
#: The same for a deflated file: the inflated data set and the copy pydicom reads its Pixel
#: Data into come on top (benchmarks/decode_memory.py).
_DEFLATED_BYTES_PER_PIXEL = 13
#: The transfer syntax whose data set pydicom would inflate whole (as bytes, to find it in
#: the file meta before parsing anything).
_DEFLATED_UID = b"1.2.840.10008.1.2.1.99"
#: Rows transformed at a time, so the float64 temporaries of the grey-level transforms stay a
#: few MB whatever the image size.
_ROWS_PER_CHUNK = 256
#: What pydicom raises, besides its own errors, on content that does not parse: an unknown VR
#: (NotImplementedError), a value of the wrong length (struct.error), a value of the wrong
#: type (TypeError, AttributeError) or a structure that does not add up (ValueError...).
_DAMAGE: tuple[type[Exception], ...] = (
    NotImplementedError,
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    EOFError,
    OSError,
    OverflowError,
)


def _damage_types() -> tuple[type[Exception], ...]:
    # pydicom's own exceptions derive from Exception only, so they are named here; the
    # import is deferred like every pydicom import in this module.
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (*_DAMAGE, InvalidDicomError, BytesLengthException)


def explain(exc: BaseException) -> str:
    """An exception as messages show it: its text, then its type (``... (struct.error)``)."""
    kind = type(exc)
    module = kind.__module__
    qualified = kind.__qualname__ if module in ("builtins", "") else f"{module}.{kind.__qualname__}"
    text = str(exc).strip()
    return f"{text} ({qualified})" if text else qualified


@contextmanager
def _reading(name: str, what: str) -> Iterator[None]:
    """Turn pydicom's failures on damaged content into ``ImageReadError("name: what (...)")``."""
    try:
        yield
    except ImageReadError:
        raise
    except _damage_types() as exc:
        raise ImageReadError(f"{name}: {what}: {explain(exc)}") from exc


def read_dataset(data: bytes, name: str) -> Dataset:
    """Parse DICOM bytes into a pydicom data set.

    Raises:
        ImageReadError: The bytes are not a readable DICOM data set.
    """
    import pydicom  # lazy: loads pydicom

    force = data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] != DICOM_MAGIC
    # The file meta is parsed eagerly, so an unknown VR or a short value there fails here.
    with _reading(name, "damaged DICOM file"), warnings.catch_warnings():
        # pydicom warns while guessing a raw data set's encoding; failures still raise.
        warnings.simplefilter("ignore", UserWarning)
        ds = _read_deflated(data, name) if _DEFLATED_UID in data[:4096] else None
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            _set_raw_transfer_syntax(ds)
    if len(ds) == 0:
        # 'DICM' then bytes that hold no element: not a DICOM file without an image.
        raise ImageReadError(
            f"{name}: damaged DICOM file: no data element could be read after the header"
        )
    return ds


def _read_deflated(data: bytes, name: str) -> Dataset | None:
    """A Deflated Explicit VR Little Endian file, inflated within a bound; ``None`` when the
    file's transfer syntax is another one.

    pydicom inflates such a file whole before reading a single element, so 1 MB of deflated
    zeros becomes gigabytes (issue 22). Here the data set is inflated by a decompressor told
    the most bytes it may produce (:func:`_inflation_limit`), and a file that holds more is
    refused; what was inflated is then read as the uncompressed data set it is.
    """
    from pydicom.dataset import FileDataset  # lazy: loads pydicom
    from pydicom.filereader import (  # lazy: loads pydicom
        _read_file_meta_info,
        read_dataset,
        read_preamble,
    )
    from pydicom.uid import (  # lazy: loads pydicom
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
    )

    stream = io.BytesIO(data)
    preamble = read_preamble(stream, data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] != DICOM_MAGIC)
    meta = _read_file_meta_info(stream)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    body = _inflate(memoryview(data)[stream.tell() :], name)
    dataset = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
    del body
    # What is held now is the uncompressed data set, decoded as such from here on.
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return FileDataset(name, dataset, preamble=preamble, file_meta=meta)


def _inflation_limit() -> int:
    """Most bytes a deflated data set may inflate to: a 16-bit image at the largest size the
    budget admits at the deflated files' cost per pixel, and never more than the file cap."""
    pixels = MAX_DECODE_BYTES / _DEFLATED_BYTES_PER_PIXEL
    return int(min(max_file_bytes(), 2 * pixels + 2**20))


def _inflate(deflated: memoryview, name: str) -> bytes:
    """The inflated data set, once a first pass that keeps nothing has measured it within the
    limit: a bomb is refused having cost a megabyte of memory, not the limit's worth."""
    limit = _inflation_limit()
    try:
        size = _inflated_size(deflated, limit)
        if size > limit:
            raise ImageTooLargeError(
                f"{name}: deflated DICOM data set inflates to more than {limit / 2**20:.0f} MB "
                f"(from {len(deflated) / 2**20:.1f} MB); refused before inflating it whole (a "
                "decompression bomb; export the image uncompressed if it is genuine)"
            )
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated)
    except zlib.error as exc:
        raise ImageReadError(f"{name}: damaged deflated DICOM data set ({explain(exc)})") from exc


def _inflated_size(deflated: memoryview, limit: int) -> int:
    """Bytes ``deflated`` inflates to, counted a megabyte at a time; stops past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    block = 2**20
    size, offset, tail = 0, block, bytes(deflated[:block])
    while size <= limit:
        produced = len(inflater.decompress(tail, block))
        size += produced
        tail = inflater.unconsumed_tail
        if not tail and offset < len(deflated):
            tail, offset = bytes(deflated[offset : offset + block]), offset + block
        elif not tail and not produced:
            break
    return size


def _set_raw_transfer_syntax(ds: Dataset) -> None:
    """A raw data set has no file meta: record the uncompressed encoding it was read with."""
    from pydicom.dataset import FileMetaDataset  # lazy: loads pydicom
    from pydicom.uid import (  # lazy: loads pydicom
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if not little:
        syntax = ExplicitVRBigEndian
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def _number_of_frames(ds: Dataset, name: str) -> int:
    with _reading(name, "invalid DICOM Number of Frames"):
        value = ds.get("NumberOfFrames", 1)
    try:
        return int(value or 1)
    except (TypeError, ValueError):
        # A blank or non-numeric count is read as one frame, as viewers do.
        return 1


def _transfer_syntax(ds: Dataset, name: str) -> UID:
    """The file's transfer syntax, checked: a damaged file meta may hold any value there."""
    from pydicom.uid import UID  # lazy: loads pydicom

    with _reading(name, "invalid DICOM Transfer Syntax UID"):
        value = ds.file_meta.get("TransferSyntaxUID")
    syntax = UID(str(value).strip("\x00 ")) if value is not None else UID("")
    if not syntax.is_transfer_syntax:
        shown = f"{syntax} ({syntax.name})" if syntax.name != syntax else f"{syntax!r}"
        raise ImageReadError(
            f"{name}: damaged DICOM file meta: Transfer Syntax UID {shown} is not a transfer syntax"
        )
    return syntax


def _check_size(ds: Dataset, name: str, frames: int) -> None:
    """Refuse an image over the pixel budget from its header, before any pixel is decoded."""
    with _reading(name, "invalid DICOM image size"):
        rows = int(ds.get("Rows", 0) or 0)
        columns = int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows <= 0 or columns <= 0:
        raise ImageReadError(f"{name}: DICOM image size {rows} x {columns} is not valid")
    check_pixel_budget(
        name, columns, rows * frames, bytes_per_pixel=_DICOM_BYTES_PER_PIXEL * max(1, samples)
    )
    _check_codestream(ds, name, columns, rows)


def _check_codestream(ds: Dataset, name: str, columns: int, rows: int) -> None:
    """Compare a compressed image's real size, from its codestream header, with Rows and
    Columns before decoding: the codec allocates for the codestream, so a 3 MB file that says
    512 x 512 and holds 16000 x 16000 would need gigabytes (issue 22). JPEG streams with far
    more scans than any encoder writes (scan bombs) are refused too.
    """
    import pydicom.uid as uids  # lazy: loads pydicom
    from pydicom.encaps import generate_fragments  # lazy: loads pydicom

    syntax = _transfer_syntax(ds, name)
    if syntax in uids.JPEG2000TransferSyntaxes:
        kind = "JPEG 2000"
    elif syntax in uids.JPEGTransferSyntaxes or syntax in uids.JPEGLSTransferSyntaxes:
        kind = "JPEG"
    else:
        return
    with _reading(name, f"damaged encapsulated {syntax.name} Pixel Data"):
        encapsulated = ds.PixelData
        fragments = generate_fragments(encapsulated)
        next(fragments, None)  # the Basic Offset Table
        first = next(fragments, b"")
    try:
        width, height, _ = codestream_size(first, kind)
    except ImageReadError as exc:
        raise ImageReadError(f"{name}: damaged {syntax.name} DICOM: {exc}") from exc
    check_pixel_budget(name, width, height, bytes_per_pixel=_DICOM_BYTES_PER_PIXEL)
    if (width, height) != (columns, rows):
        raise ImageReadError(
            f"{name}: DICOM header says {columns} x {rows} pixels but its {syntax.name} "
            f"codestream holds {width} x {height}; refused without decoding (a damaged or "
            "crafted file)"
        )
    if kind == "JPEG" and (scans := jpeg_scans(encapsulated)) > MAX_JPEG_SCANS:
        raise ImageReadError(
            f"{name}: its {syntax.name} codestream holds {scans} scans, over the "
            f"{MAX_JPEG_SCANS} any encoder writes; refused without decoding (a scan bomb)"
        )


def _pixels(ds: Dataset, name: str) -> np.ndarray:
    """The stored pixel values, decoding compressed transfer syntaxes with installed plugins."""
    syntax = _transfer_syntax(ds, name)
    with _reading(name, "damaged DICOM Pixel Data"):
        if not ds["PixelData"].value:
            raise ImageReadError(f"{name}: DICOM Pixel Data element is empty")
    failures: tuple[type[Exception], ...] = (*_damage_types(), RuntimeError)
    try:
        with warnings.catch_warnings():
            # Length mismatches are warned about, then raise (or decode) by themselves.
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(ds.pixel_array)
    except failures as exc:
        if syntax.is_compressed and isinstance(exc, NotImplementedError | RuntimeError):
            raise ImageReadError(
                f"{name}: cannot decode DICOM compressed as {syntax.name} ({explain(exc)}); "
                f"install the decoders with `pip install {DECODER_PACKAGES}`, or export the "
                "image uncompressed from the PACS"
            ) from exc
        where = f" ({syntax.name})" if syntax.is_compressed else ""
        raise ImageReadError(f"{name}: damaged DICOM Pixel Data{where}: {explain(exc)}") from exc


def _display_range(ds: Dataset, values: np.ndarray, voi_applied: bool) -> tuple[float, float]:
    """The grey-level range that maps to black..white.

    After a VOI transform it is that transform's output range (found by passing the extreme
    inputs through the same pydicom function, so window and LUT variants agree with it).
    Without one, an 8-bit image (a secondary capture, an exported JPEG) is already display
    ready and keeps its full 0-255 range; deeper raw data is shown from its minimum to its
    maximum, as viewers show unwindowed images.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut  # lazy: loads pydicom

    if voi_applied:
        if "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            return 0.0, float(2**bits - 1)
        extremes = apply_voi_lut(np.array([-1e30, 1e30]), ds)
        return float(extremes[0]), float(extremes[1])
    bits = int(ds.get("BitsStored", 16) or 16)
    if bits <= 8 and int(ds.get("PixelRepresentation", 0) or 0) == 0:
        ends = np.asarray(apply_modality_lut(np.array([0, 2**bits - 1]), ds), np.float64)
        return float(ends.min()), float(ends.max())
    return float(values.min()), float(values.max())


def _apply_voi(values: np.ndarray, ds: Dataset, integral: bool) -> np.ndarray:
    """The first VOI LUT, else the first window, with pydicom.

    A LUT is indexed by integers, so integral values are passed as integers. pydicom 3.0
    indexes an 8-bit LUT with an 8-bit index array, which wraps for LUTs with more than 256
    entries; the descriptor's depth is raised to 16 for the call (the entries are the same
    numbers) and restored after. ``integral`` says whether every value of the whole image
    (not only of these rows) is an integer, so that all rows are looked up alike.
    """
    from pydicom.pixels import apply_voi_lut  # lazy: loads pydicom

    if "VOILUTSequence" not in ds:
        return np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if integral:
        values = values.astype(np.int64)
    item = ds.VOILUTSequence[0]
    descriptor = list(item.LUTDescriptor)
    try:
        if descriptor[2] == 8:
            item.LUTDescriptor = [descriptor[0], descriptor[1], 16]
        return np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    finally:
        item.LUTDescriptor = descriptor


def _check_voi_lut(ds: Dataset, name: str) -> None:
    """Refuse a VOI LUT whose descriptor and data disagree, naming what is wrong.

    pydicom would fail on them with ``NotImplementedError`` (an entry depth it does not know)
    or ``struct.error`` (fewer entries than the descriptor says).
    """
    if not ds.VOILUTSequence:
        raise ImageReadError(f"{name}: DICOM VOI LUT Sequence is empty")
    item = ds.VOILUTSequence[0]
    if "LUTDescriptor" not in item or "LUTData" not in item:
        raise ImageReadError(f"{name}: DICOM VOI LUT lacks its LUT Descriptor or LUT Data")
    descriptor = list(item.LUTDescriptor)
    if len(descriptor) != 3:
        raise ImageReadError(
            f"{name}: DICOM VOI LUT Descriptor has {len(descriptor)} values, not 3"
        )
    entries, bits = int(descriptor[0]) or 2**16, int(descriptor[2])
    if bits != 8 and not 10 <= bits <= 16:
        raise ImageReadError(
            f"{name}: DICOM VOI LUT of {bits} bits per entry is not valid (8 or 10 to 16)"
        )
    data = item.LUTData
    # OW LUT data is raw 16-bit words; US data is a number or a list of numbers.
    held = len(data) // 2 if isinstance(data, bytes) else len(np.atleast_1d(np.asarray(data)))
    if held < entries:
        raise ImageReadError(
            f"{name}: DICOM VOI LUT holds {held} entries, its descriptor says {entries}"
        )


def _has_voi(ds: Dataset) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _inverted(ds: Dataset) -> bool:
    """MONOCHROME1 shows low values as white; a Presentation LUT Shape INVERSE flips again."""
    inverse_presentation = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return (ds.PhotometricInterpretation == "MONOCHROME1") != inverse_presentation


def _row_chunks(rows: int) -> Iterator[slice]:
    for start in range(0, rows, _ROWS_PER_CHUNK):
        yield slice(start, min(rows, start + _ROWS_PER_CHUNK))


def _modality(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut  # lazy: loads pydicom

    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)


def _grey_range(ds: Dataset, stored: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """Smallest and largest modality value, and whether every one is an integer (one pass,
    a few rows at a time)."""
    low, high, integral = np.inf, -np.inf, True
    for rows in _row_chunks(stored.shape[0]):
        values = _modality(ds, stored[rows])
        if not np.all(np.isfinite(values)):
            raise ImageReadError(f"{name}: DICOM pixel data holds non-finite values")
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        integral = integral and bool(np.all(values == np.round(values)))
    return np.array([low, high]), integral


def _monochrome_to_uint8(ds: Dataset, stored: np.ndarray, name: str) -> np.ndarray:
    """Grey levels to uint8 a few rows at a time: float64 copies of a whole large image
    would take ~30 bytes per pixel."""
    if stored.size == 0:
        raise ImageReadError(f"{name}: DICOM image has no pixels")
    out = np.empty(stored.shape, np.uint8)
    with _reading(name, "invalid DICOM grey-level transform"):
        voi = _has_voi(ds)
        if voi and "VOILUTSequence" in ds:
            _check_voi_lut(ds, name)
        extremes, integral = _grey_range(ds, stored, name)
        low, high = _display_range(ds, extremes, voi)
        inverted = _inverted(ds)
        for rows in _row_chunks(stored.shape[0]):
            check_deadline(name)
            values = _modality(ds, stored[rows])
            if voi:
                values = _apply_voi(values, ds, integral)
            if not np.all(np.isfinite(values)):
                raise ImageReadError(f"{name}: DICOM grey-level transform gives non-finite values")
            unit = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else values * 0.0
            if inverted:
                unit = 1.0 - unit
            out[rows] = np.round(unit * 255.0).astype(np.uint8)
    return out


def _colour_to_uint8(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut  # lazy: loads pydicom

    if ds.PhotometricInterpretation == "PALETTE COLOR":
        stored = np.asarray(apply_color_lut(stored, ds))
    bits = int(ds.get("BitsStored", 8) or 8)
    if bits > 8 or stored.dtype != np.uint8:
        # Palette LUTs and deep colour images hold up to 16 bits per channel.
        peak = float(2 ** (16 if ds.PhotometricInterpretation == "PALETTE COLOR" else bits) - 1)
        stored = np.round(np.clip(stored / peak, 0.0, 1.0) * 255.0)
    return stored.astype(np.uint8)


def dataset_to_uint8(ds: Dataset, name: str = "<DICOM>") -> np.ndarray:
    """Display-ready pixels of a single-frame DICOM image.

    Greyscale images get the modality LUT (rescale slope and intercept), then the first VOI
    LUT or window centre/width if present, are mapped to 0-255, and MONOCHROME1 images are
    inverted so that bone is white. Colour images (RGB, YBR, palette) are returned as RGB.

    Args:
        ds: A data set with pixel data.
        name: How messages name the file.

    Returns:
        ``(rows, columns)`` uint8 for greyscale, ``(rows, columns, 3)`` for colour.

    Raises:
        ImageReadError: No pixel data, several frames, an undecodable transfer syntax
            (the message names the packages to install) or an invalid grey-level transform.
    """
    if "PixelData" not in ds:
        if "Rows" in ds or "BitsAllocated" in ds:
            # Image attributes without pixels: pixels removed, or a damaged element before
            # them made the parser stop; the message cannot tell which, so it says both.
            raise ImageReadError(
                f"{name}: DICOM file holds no image{_sop_class(ds)}: it describes one (Rows, "
                "Columns) but has no readable Pixel Data element; the file may be cut short "
                "or damaged"
            )
        raise ImageReadError(f"{name}: DICOM file holds no image{_sop_class(ds)}")
    frames = _number_of_frames(ds, name)
    if frames > 1:
        raise ImageReadError(
            f"{name}: multi-frame DICOM ({frames} frames) is not supported; export the "
            "frontal chest radiograph as a single-frame DICOM file"
        )
    _check_size(ds, name, frames)
    with _reading(name, "invalid DICOM Photometric Interpretation"):
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    check_deadline(name)
    stored = _pixels(ds, name)
    check_deadline(name)
    if photometric in _MONOCHROME:
        if stored.ndim != 2:
            raise ImageReadError(f"{name}: unexpected greyscale pixel shape {stored.shape}")
        return _monochrome_to_uint8(ds, stored, name)
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise ImageReadError(f"{name}: unexpected {photometric} pixel shape {stored.shape}")
    with _reading(name, f"invalid DICOM {photometric} colour data"):
        return _colour_to_uint8(ds, stored)


def _sop_class(ds: Dataset) -> str:
    """`` (Basic Text SR Storage)`` for messages, or nothing when the class is unreadable."""
    try:
        kind = ds.get("SOPClassUID")
        return f" ({kind.name})" if kind is not None and hasattr(kind, "name") else ""
    except _damage_types():
        return ""


def read_dicom(data: bytes, name: str = "<DICOM>") -> np.ndarray:
    """Decode DICOM file bytes to display-ready uint8 pixels (see :func:`dataset_to_uint8`)."""
    return dataset_to_uint8(read_dataset(data, name), name)


#: The identifiers a result keeps of its DICOM source: (Prediction field, DICOM keyword).
IDENTIFIERS = (
    ("study_instance_uid", "StudyInstanceUID"),
    ("series_instance_uid", "SeriesInstanceUID"),
    ("sop_instance_uid", "SOPInstanceUID"),
    ("accession_number", "AccessionNumber"),
    ("patient_id", "PatientID"),
)


@dataclass(frozen=True)
class DicomHeader:
    """What a result needs of a DICOM file's header besides its pixels: the study, series and
    instance UIDs, accession number and patient id (``None`` when absent or empty), and why
    the series rules (:mod:`pneumoscan.data.selection`) refuse the image, if they do.
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    refusal: str | None = None

    @classmethod
    def of(cls, ds: Dataset, name: str = "<DICOM>") -> DicomHeader:
        """The header of a data set; an identifier that cannot be read is left out."""
        values: dict[str, str | None] = {}
        for field, keyword in IDENTIFIERS:
            try:
                text = str(ds.get(keyword, "") or "").strip()
            except _damage_types():
                text = ""
            values[field] = text or None
        try:
            refused = refusal(ds)
        except _damage_types() as exc:
            refused = f"not a frontal chest radiograph: header unreadable ({explain(exc)})"
        return cls(**values, refusal=refused)

    def identifiers(self) -> dict[str, str | None]:
        """The identifiers by :class:`~pneumoscan.inference.prediction.Prediction` field."""
        return {field: getattr(self, field) for field, _ in IDENTIFIERS}


def write_dicom(
    pixels: np.ndarray,
    path: str | Path,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    transfer_syntax: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a greyscale image as a single-frame DX DICOM file (for tests and conversions).

    Args:
        pixels: ``(rows, columns)`` unsigned stored values, below ``2**bits_stored``.
        path: File to write.
        photometric: ``MONOCHROME2`` (high = white) or ``MONOCHROME1`` (high = black).
        bits_stored: Significant bits per pixel (8 or up to 16).
        window: ``(centre, width)`` in output units of the rescale, or ``None``.
        rescale: ``(slope, intercept)``, or ``None``.
        transfer_syntax: Compress with this transfer syntax UID (e.g. RLE Lossless,
            JPEG 2000 Lossless) using pydicom's installed encoders; ``None`` for uncompressed.
        extra: More attributes (keyword -> value) to set.
    """
    from pydicom.dataset import Dataset, FileMetaDataset  # lazy: loads pydicom
    from pydicom.uid import (  # lazy: loads pydicom
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    ds.set_pixel_data(np.asarray(pixels).astype(dtype), photometric, bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path
