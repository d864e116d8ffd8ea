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
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.errors import ImageReadError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Bytes 128-131 of a DICOM Part 10 file.
DICOM_MAGIC = b"DICM"
PREAMBLE_LENGTH = 128
#: Little-endian tags of the groups a preamble-less (raw) DICOM data set starts with.
_RAW_DICOM_STARTS = (b"\x02\x00", b"\x08\x00")
DECODER_PACKAGES = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def looks_like_dicom(header: bytes) -> bool:
    """Whether a file's first bytes are a DICOM file's, whatever its name.

    True for Part 10 files (``DICM`` after the 128-byte preamble) and for raw data sets that
    start directly with a group 0002 or 0008 element, as some older archives store them.
    """
    if header[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == DICOM_MAGIC:
        return True
    # A raw data set starts with (gggg,eeee) then, in explicit VR, a two-letter VR.
    return header[:2] in _RAW_DICOM_STARTS and len(header) >= 8 and header[4:6].isalpha()


def read_dataset(data: bytes, name: str) -> Dataset:
    """Parse DICOM bytes into a pydicom data set.

    Raises:
        ImageReadError: The bytes are not a readable DICOM data set.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    force = data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] != DICOM_MAGIC
    try:
        with warnings.catch_warnings():
            # pydicom warns while guessing a raw data set's encoding; failures still raise.
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageReadError(f"{name}: damaged DICOM file ({exc})") from exc
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        _set_raw_transfer_syntax(ds)
    return ds


def _set_raw_transfer_syntax(ds: Dataset) -> None:
    """A raw data set has no file meta: record the uncompressed encoding it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
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


def _number_of_frames(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _pixels(ds: Dataset, name: str) -> np.ndarray:
    """The stored pixel values, decoding compressed transfer syntaxes with installed plugins."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        return np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, OSError) as exc:
        if syntax is not None and syntax.is_compressed:
            raise ImageReadError(
                f"{name}: cannot decode DICOM compressed as {syntax.name} ({exc}); install "
                f"the decoders with `pip install {DECODER_PACKAGES}`, or export the image "
                "uncompressed from the PACS"
            ) from exc
        raise ImageReadError(f"{name}: damaged DICOM pixel data ({exc})") from exc


def _display_range(ds: Dataset, values: np.ndarray, voi_applied: bool) -> tuple[float, float]:
    """The grey-level range that maps to black..white.

    After a VOI transform it is that transform's output range (found by passing the extreme
    inputs through the same pydicom function, so window and LUT variants agree with it).
    Without one, an 8-bit image (a secondary capture, an exported JPEG) is already display
    ready and keeps its full 0-255 range; deeper raw data is shown from its minimum to its
    maximum, as viewers show unwindowed images.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

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


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The first VOI LUT, else the first window, with pydicom.

    A LUT is indexed by integers, so integral values are passed as integers. pydicom 3.0
    indexes an 8-bit LUT with an 8-bit index array, which wraps for LUTs with more than 256
    entries; the descriptor's depth is raised to 16 for the call (the entries are the same
    numbers) and restored after.
    """
    from pydicom.pixels import apply_voi_lut

    if "VOILUTSequence" not in ds:
        return np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if np.all(values == np.round(values)):
        values = values.astype(np.int64)
    item = ds.VOILUTSequence[0]
    descriptor = list(item.LUTDescriptor)
    try:
        if descriptor[2] == 8:
            item.LUTDescriptor = [descriptor[0], descriptor[1], 16]
        return np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    finally:
        item.LUTDescriptor = descriptor


def _has_voi(ds: Dataset) -> bool:
    return "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)


def _inverted(ds: Dataset) -> bool:
    """MONOCHROME1 shows low values as white; a Presentation LUT Shape INVERSE flips again."""
    inverse_presentation = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    return (ds.PhotometricInterpretation == "MONOCHROME1") != inverse_presentation


def _monochrome_to_uint8(ds: Dataset, stored: np.ndarray, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        voi = _has_voi(ds)
        if voi:
            values = _apply_voi(values, ds)
        low, high = _display_range(ds, values, voi)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ImageReadError(f"{name}: invalid DICOM grey-level transform ({exc})") from exc
    if not np.all(np.isfinite(values)):
        raise ImageReadError(f"{name}: DICOM pixel data holds non-finite values")
    unit = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else values * 0.0
    if _inverted(ds):
        unit = 1.0 - unit
    return np.round(unit * 255.0).astype(np.uint8)


def _colour_to_uint8(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

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
        kind = ds.get("SOPClassUID")
        what = f" ({kind.name})" if kind is not None and hasattr(kind, "name") else ""
        raise ImageReadError(f"{name}: DICOM file holds no image{what}")
    frames = _number_of_frames(ds)
    if frames > 1:
        raise ImageReadError(
            f"{name}: multi-frame DICOM ({frames} frames) is not supported; export the "
            "frontal chest radiograph as a single-frame DICOM file"
        )
    stored = _pixels(ds, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in _MONOCHROME:
        if stored.ndim != 2:
            raise ImageReadError(f"{name}: unexpected greyscale pixel shape {stored.shape}")
        return _monochrome_to_uint8(ds, stored, name)
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise ImageReadError(f"{name}: unexpected {photometric} pixel shape {stored.shape}")
    return _colour_to_uint8(ds, stored)


def read_dicom(data: bytes, name: str = "<DICOM>") -> np.ndarray:
    """Decode DICOM file bytes to display-ready uint8 pixels (see :func:`dataset_to_uint8`)."""
    return dataset_to_uint8(read_dataset(data, name), name)


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
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
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
