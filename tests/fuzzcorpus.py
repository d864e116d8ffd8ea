"""A seed corpus of small real X-rays in every input format, and the mutations a fuzzer makes.

Shared by ``tests/test_firewall.py`` (a few thousand deterministic mutations) and
``benchmarks/fuzz_decode.py`` (the atheris harness, which starts from the same seeds).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

import bombs
from pneumoscan.data.dicom import write_dicom
from pneumoscan.data.formats import SNIFF_BYTES, sniff_format

from conftest import SITE_SAMPLE, fixture_images

#: Seeds stay small, so that thousands of mutations decode in seconds.
SEED_SIDE = 64


def _xray_grey() -> np.ndarray:
    found = sorted(SITE_SAMPLE.glob("PNEUMONIA/*.jpeg"))
    source = found[0] if found else fixture_images("PNEUMONIA")[0]
    with Image.open(source) as image:
        return np.asarray(image.convert("L").resize((SEED_SIDE, SEED_SIDE + 8)))


def _pillow(grey: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, fmt, **options)
    return buffer.getvalue()


def _dicom(stored: np.ndarray, **options: object) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_dicom(stored, Path(folder) / "seed.dcm", **options).read_bytes()


def _with_voi_lut(stored: np.ndarray) -> bytes:
    data = _dicom(stored, bits_stored=12)
    ds = pydicom.dcmread(io.BytesIO(data))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", (np.arange(4096, dtype="<u2") * 16).tobytes())
    ds.VOILUTSequence = [item]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def seed_corpus() -> dict[str, bytes]:
    """``name -> bytes``: JPEG (baseline, progressive), PNG (8 and 16 bit), TIFF (LZW, 16 bit),
    and DICOM raw, RLE, MONOCHROME1, with a VOI LUT, JPEG, JPEG 2000 and deflated, all of one
    real X-ray."""
    grey = _xray_grey()
    stored = (grey.astype(np.uint16) * 16).astype(np.uint16)
    return {
        "xray.jpeg": _pillow(grey, "JPEG", quality=90),
        "xray.png": _pillow(grey, "PNG"),
        "xray16.png": _pillow(stored.astype(np.uint16), "PNG"),
        "xray.tiff": _pillow(grey, "TIFF", compression="tiff_lzw"),
        "raw.dcm": _dicom(stored, bits_stored=12, window=(2048.0, 4096.0)),
        "rle.dcm": _dicom(stored, bits_stored=12, transfer_syntax=RLELossless),
        "mono1.dcm": _dicom(4095 - stored, photometric="MONOCHROME1", bits_stored=12),
        "voilut.dcm": _with_voi_lut(stored),
        # Issue 22: every accepted format and every DICOM codec path has a seed.
        "progressive.jpeg": _pillow(grey, "JPEG", quality=90, progressive=True),
        "xray16.tiff": _pillow(stored.astype(np.uint16), "TIFF"),
        "jpeg.dcm": bombs.dicom_jpeg(SEED_SIDE, header_side=SEED_SIDE),
        "j2k.dcm": bombs.dicom_j2k(SEED_SIDE, header_side=SEED_SIDE),
        "deflated.dcm": bombs.deflated_dicom(SEED_SIDE, real_side=SEED_SIDE),
    }


def seeds_by_format() -> dict[str, dict[str, bytes]]:
    """:func:`seed_corpus` grouped by the format the decoder sniffs (JPEG, PNG, TIFF, DICOM)."""
    grouped: dict[str, dict[str, bytes]] = {}
    for name, data in seed_corpus().items():
        grouped.setdefault(sniff_format(data[:SNIFF_BYTES], name), {})[name] = data
    return grouped


def mutations(seeds: dict[str, bytes], count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """``count`` deterministic mutants: byte flips, truncations, runs of random bytes,
    splices of another seed's header, and overwritten length fields."""
    rng = np.random.default_rng(seed)
    names = sorted(seeds)
    for index in range(count):
        name = names[index % len(names)]
        data = bytearray(seeds[name])
        kind = int(rng.integers(5))
        if kind == 0:  # flip a few bytes anywhere
            for at in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
                data[at] ^= int(rng.integers(1, 256))
        elif kind == 1:  # cut the file short
            del data[int(rng.integers(1, len(data))) :]
        elif kind == 2:  # a run of random bytes inside the header (lengths, tags, VRs)
            at = int(rng.integers(0, min(len(data), 600)))
            run = rng.integers(0, 256, size=int(rng.integers(2, 12)), dtype=np.uint8)
            data[at : at + len(run)] = run.tobytes()
        elif kind == 3:  # another file's header on this file's body
            other = seeds[names[int(rng.integers(len(names)))]]
            cut = int(rng.integers(16, min(len(other), len(data), 1500)))
            data[:cut] = other[:cut]
        else:  # a 16- or 32-bit field set to an extreme value
            at = int(rng.integers(0, min(len(data) - 4, 800)))
            width = 2 if rng.integers(2) else 4
            value = [0, 1, 0xFFFF, 0x7FFF, 0xFFFFFFFF][int(rng.integers(5))] & (
                2 ** (8 * width) - 1
            )
            data[at : at + width] = int(value).to_bytes(width, "little")
        yield f"{name}#{index}-{kind}", bytes(data)
