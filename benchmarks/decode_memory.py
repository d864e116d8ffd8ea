"""Peak memory of decoding one large image, each in a fresh process (issue 12: <= ~500 MB).

Usage:
    .venv/bin/python benchmarks/decode_memory.py [--side 7700] [--tmp DIR]

Builds, from a real full-resolution X-ray of ``../shared/data/originals`` upscaled, files just
under the pixel budget (``pneumoscan.data.limits.MAX_PIXELS``): an 8-bit grey PNG, an RGB
JPEG, a 16-bit grey TIFF and an uncompressed 16-bit DICOM; plus a 1-bit PNG bomb far over it.
Each file is decoded by ``pneumoscan.data.preprocess.decode_image`` in its own subprocess,
whose peak resident set size comes from ``os.wait4``; the baseline is the same process
decoding a 224x224 image. Prints the file, its pixels, the outcome and the peak memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import SHARED_DATA, machine
from PIL import Image

CHILD = """
import sys
from pneumoscan.data.preprocess import decode_image
from pneumoscan.errors import ImageReadError
try:
    decoded = decode_image(sys.argv[1])
    print("decoded", decoded.original_size)
except ImageReadError as exc:
    print("refused:", str(exc)[:160])
"""


def _peak_mib(path: Path) -> tuple[float, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    _, _, usage = os.wait4(process.pid, 0)
    out = process.stdout.read().strip() if process.stdout else ""
    return usage.ru_maxrss / 1024, out


def _dicom(pixels: np.ndarray, path: Path) -> None:
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    ds.save_as(path, enforce_file_format=True)


FILES = {
    "small 224x224 JPEG (baseline)": "small.jpeg",
    "8-bit grey PNG": "grey.png",
    "RGB JPEG": "rgb.jpeg",
    "16-bit grey TIFF": "grey16.tiff",
    "16-bit DICOM": "grey16.dcm",
    "1-bit PNG bomb 40000x40000": "bomb.png",
}


def make_files(root: Path, side: int) -> None:
    """Write :data:`FILES` into ``root`` (run in a child: a large parent would inflate every
    later child's peak RSS, which Linux counts from before ``exec``)."""
    source = sorted((SHARED_DATA / "originals").rglob("*.jpeg"))[0]
    grey = Image.open(source).convert("L").resize((side, side), Image.Resampling.BILINEAR)
    grey.resize((224, 224)).save(root / FILES["small 224x224 JPEG (baseline)"])
    grey.save(root / FILES["8-bit grey PNG"])
    grey.convert("RGB").save(root / FILES["RGB JPEG"], quality=90)
    Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257).save(root / FILES["16-bit grey TIFF"])
    _dicom(np.asarray(grey), root / FILES["16-bit DICOM"])
    Image.new("1", (40000, 40000)).save(root / FILES["1-bit PNG bomb 40000x40000"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=7700, help="Side of the large files.")
    parser.add_argument("--tmp", type=Path, default=None)
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make is not None:
        make_files(args.make, args.side)
        return
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        root = Path(folder)
        command = [sys.executable, __file__, "--make", str(root), "--side", str(args.side)]
        subprocess.run(command, check=True)
        for name, file in FILES.items():
            path = root / file
            peak, outcome = _peak_mib(path)
            size = path.stat().st_size / 2**20
            print(f"{name:32s} {size:8.1f} MiB file  peak RSS {peak:7.1f} MiB  {outcome}")


if __name__ == "__main__":
    main()
