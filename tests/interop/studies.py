"""DICOM studies made from real X-rays (``../shared/data``, else the repo's fixtures): DX and CR,
MONOCHROME1 and 2, one compressed transfer syntax, one corrupt instance and one image that is
not a frontal chest (a hand)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    JPEG2000Lossless,
    generate_uid,
)

from pneumoscan.data.dicom import write_dicom

from conftest import SITE_SAMPLE, fixture_images


def xray(label: str, index: int) -> Path:
    """A real X-ray of a class: from the site sample when present, else the fixtures."""
    found = sorted(SITE_SAMPLE.glob(f"{label}/*.jpeg")) or fixture_images(label)
    return found[index % len(found)]


def stored_values(path: Path, monochrome1: bool = False) -> np.ndarray:
    """12-bit stored values of a grey X-ray (inverted for MONOCHROME1: high is black)."""
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 16
    return (4095 - grey) if monochrome1 else grey


@dataclass(frozen=True)
class Instance:
    """One DICOM file the tests upload, and what the PACS run must make of it."""

    path: Path
    study_uid: str
    sop_uid: str
    expect: str  # ok, rejected or error


def _patient(study_uid: str, number: int) -> dict[str, object]:
    return {
        "StudyInstanceUID": study_uid,
        "PatientID": f"PNEUMO-{number:03d}",
        "PatientName": f"Test^Patient{number}",
        "PatientBirthDate": "20200101",
        "PatientSex": "F",
        "StudyDate": "20260102",
        "StudyTime": "101500",
        "StudyID": f"S{number}",
        "AccessionNumber": f"ACC{number:04d}",
        "ReferringPhysicianName": "",
        "InstanceNumber": 1,
        "SeriesNumber": 1,
    }


def _as_cr(path: Path) -> None:
    """Rewrite a file made by ``write_dicom`` (DX) as a CR image."""
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    ds.save_as(path, enforce_file_format=True)


def _corrupt(path: Path) -> None:
    """Keep the header, cut the pixel data to half its length (a transfer cut short)."""
    ds = pydicom.dcmread(path)
    data = ds.PixelData
    ds.PixelData = data[: len(data) // 4 * 2]
    ds.save_as(path, enforce_file_format=True)


def make_studies(folder: Path) -> list[Instance]:
    """Four studies, five instances:

    1. DX, MONOCHROME2, uncompressed, frontal chest (a pneumonia image): scored;
    2. CR, MONOCHROME1, JPEG 2000 lossless, frontal chest (a normal image): scored;
    3. DX whose pixel data is cut short: an SR with the reason, no probability;
    4. DX frontal chest (scored) and, in another series, a DX hand image (refused).
    """
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Instance] = []

    def add(
        name: str,
        source: Path,
        study: str,
        number: int,
        expect: str,
        photometric: str = "MONOCHROME2",
        extra: dict[str, object] | None = None,
        **options: object,
    ) -> Path:
        path = write_dicom(
            stored_values(source, photometric == "MONOCHROME1"),
            folder / f"{name}.dcm",
            photometric=photometric,
            extra=_patient(study, number) | (extra or {}),
            **options,  # type: ignore[arg-type]
        )
        made.append(Instance(path, study, str(pydicom.dcmread(path).SOPInstanceUID), expect))
        return path

    study = [str(generate_uid()) for _ in range(4)]
    add("dx-m2", xray("PNEUMONIA", 0), study[0], 1, "ok", window=(2048.0, 4096.0))
    cr = add(
        "cr-m1-j2k",
        xray("NORMAL", 0),
        study[1],
        2,
        "ok",
        photometric="MONOCHROME1",
        transfer_syntax=JPEG2000Lossless,
    )
    _as_cr(cr)
    _corrupt(add("dx-corrupt", xray("NORMAL", 1), study[2], 3, "error"))
    add("dx-chest", xray("PNEUMONIA", 1), study[3], 4, "ok")
    add(
        "dx-hand",
        xray("NORMAL", 2),
        study[3],
        4,
        "rejected",
        extra={"SeriesNumber": 2, "BodyPartExamined": "HAND", "ViewPosition": ""},
    )
    return made
