"""Peak memory and time of decoding one large or hostile file, each in a fresh process
(issues 12 and 22: every file decoded or refused within 5 s and ~500 MB).

Usage:
    .venv/bin/python benchmarks/decode_memory.py [--side 7700] [--tmp DIR] [--bombs-only]

Builds, from a real full-resolution X-ray of ``../shared/data/originals`` upscaled, files just
under the pixel budget (``pneumoscan.data.limits.MAX_PIXELS``): an 8-bit grey PNG, an RGB
JPEG, a 16-bit grey TIFF and an uncompressed 16-bit DICOM; plus the hostile files of issues
12 and 22, built from real X-rays by ``tests/bombs.py``: a 1-bit PNG bomb, a deflated DICOM
that inflates to 2 GiB, JPEG and JPEG 2000 DICOMs whose codestream is far larger than their
header says, a progressive JPEG of 10,000 scans, a GIF, and a sparse 2 GB file that is not an
image. Each file is decoded by ``pneumoscan.data.preprocess.decode_image`` in its own
subprocess, whose peak resident set size comes from ``os.wait4``; the baseline is the same
process decoding a 224x224 image. Prints the file, its size, the peak memory, the decode time
(inside the child, without the interpreter's start) and the outcome.
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
import sys, time
from pneumoscan.data import preprocess
from pneumoscan.data.preprocess import decode_image
if sys.argv[2:] == ["--no-scan-limit"]:
    preprocess.MAX_JPEG_SCANS = 10**9  # to measure the decode deadline alone
from pneumoscan.errors import ImageReadError
started = time.perf_counter()
try:
    decoded = decode_image(sys.argv[1])
    outcome = f"decoded {decoded.original_size}"
except ImageReadError as exc:
    outcome = f"refused ({type(exc).__name__}): {str(exc).split(': ', 1)[-1][:150]}"
print(f"{time.perf_counter() - started:6.2f} s  {outcome}")
"""


def _peak_mib(path: Path, *options: str) -> tuple[float, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), *options], stdout=subprocess.PIPE, text=True
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
    "deflated DICOM bomb (2 GiB inflated)": "deflated-bomb.dcm",
    "JPEG DICOM, 512 header, 16000 stream": "jpeg-codestream-bomb.dcm",
    "J2K DICOM, 512 header, 8000 stream": "j2k-codestream-bomb.dcm",
    "progressive JPEG, 10000 scans": "scan-bomb.jpeg",
    "GIF of an X-ray": "xray.gif",
    "2 GB sparse non-image file": "huge.bin",
}
BOMBS = list(FILES)[5:]


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
    make_bombs(root)


def make_bombs(root: Path) -> None:
    """The hostile files of issue 22, from real X-rays (``tests/bombs.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import bombs

    def write(name: str, data: bytes) -> None:
        (root / FILES[name]).write_bytes(data)

    write("1-bit PNG bomb 40000x40000", bombs.png_bomb(40000, whole=True))
    write("deflated DICOM bomb (2 GiB inflated)", bombs.deflated_dicom(32768))
    write("JPEG DICOM, 512 header, 16000 stream", bombs.dicom_jpeg(16000, header_side=512))
    write("J2K DICOM, 512 header, 8000 stream", bombs.dicom_j2k(8000, header_side=512))
    write("progressive JPEG, 10000 scans", bombs.scan_bomb(side=7000, repeats=10_000))
    bombs.xray(1024).save(root / FILES["GIF of an X-ray"], "GIF")
    with open(root / FILES["2 GB sparse non-image file"], "wb") as file:
        file.truncate(2 * 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=7700, help="Side of the large files.")
    parser.add_argument("--tmp", type=Path, default=None)
    parser.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bombs-only", action="store_true", help="Only the hostile files.")
    args = parser.parse_args()
    if args.make is not None:
        if args.bombs_only:
            source = sorted((SHARED_DATA / "originals").rglob("*.jpeg"))[0]
            baseline = args.make / FILES["small 224x224 JPEG (baseline)"]
            Image.open(source).convert("L").resize((224, 224)).save(baseline)
            make_bombs(args.make)
        else:
            make_files(args.make, args.side)
        return
    print(machine())
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        root = Path(folder)
        command = [sys.executable, __file__, "--make", str(root), "--side", str(args.side)]
        if args.bombs_only:
            command.append("--bombs-only")
        subprocess.run(command, check=True)
        for name, file in FILES.items():
            if args.bombs_only and name not in BOMBS and "baseline" not in name:
                continue
            path = root / file
            peak, outcome = _peak_mib(path)
            size = path.stat().st_size / 2**20
            print(f"{name:38s} {size:8.1f} MiB file  peak RSS {peak:7.1f} MiB  {outcome}")
            if file == "scan-bomb.jpeg":
                peak, outcome = _peak_mib(path, "--no-scan-limit")
                name = "  the same, scan limit off (deadline)"
                print(f"{name:38s} {size:8.1f} MiB file  peak RSS {peak:7.1f} MiB  {outcome}")


if __name__ == "__main__":
    main()
